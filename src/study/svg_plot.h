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
  explicit Series(std::string series_name, std::vector<std::pair<double, double>> xy = {},
                  bool dashed_line = false)
      : name(std::move(series_name)), points(std::move(xy)), dashed(dashed_line) {}
  std::string name;
  std::vector<std::pair<double, double>> points;  // (x, y); non-finite points are skipped
  bool dashed = false;
  // Optional, one per point: the half-width of a shaded band y ± spread around the line (e.g.
  // the standard deviation over seeds). Empty, or all zero: no band.
  std::vector<double> spread;
};

struct PlotSpec {
  std::string id, title, xlabel, ylabel;
  bool log2x = false;
  std::vector<double> xticks;  // empty: automatic
  std::vector<std::pair<double, std::string>> vlines;
  double ycap = std::numeric_limits<double>::quiet_NaN();  // values above are drawn at the cap
};

// One <svg> element: framed plot area, grid, ticks, dashed vertical markers, one coloured line
// per series (over its translucent band, when it has one) and a legend (a clipped series says
// so, with its true maximum).
std::string SvgPlot(const PlotSpec& spec, const std::vector<Series>& series);

}  // namespace ropekit::study

#endif  // ROPEKIT_SRC_STUDY_SVG_PLOT_H_
