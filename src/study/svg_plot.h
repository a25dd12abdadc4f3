// Line plots as inline SVG for the study's self-contained report page (no scripts, no external
// resources), and the HTML escaping and number formatting they share with the page.
#ifndef ROPEKIT_SRC_STUDY_SVG_PLOT_H_
#define ROPEKIT_SRC_STUDY_SVG_PLOT_H_

#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ropekit::study {

// printf-style formatting of one number.
std::string Fmt(const char* format, double v);

// Escapes &, <, > and " for HTML text and attribute values.
std::string HtmlEscape(std::string_view s);

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y); non-finite points are skipped
  bool dashed = false;
};

struct PlotSpec {
  std::string id, title, xlabel, ylabel;
  bool log2x = false;
  std::vector<double> xticks;  // empty: automatic
  std::vector<std::pair<double, std::string>> vlines;
  double ycap = std::numeric_limits<double>::quiet_NaN();  // values above are drawn at the cap
};

// One <svg> element: framed plot area, grid, ticks, dashed vertical markers, one coloured line
// per series and a legend (a clipped series says so, with its true maximum).
std::string SvgPlot(const PlotSpec& spec, const std::vector<Series>& series);

}  // namespace ropekit::study

#endif  // ROPEKIT_SRC_STUDY_SVG_PLOT_H_
