// Inline SVG line plots for the study report (see svg_plot.h).
#include "src/study/svg_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <sstream>

namespace ropekit::study {

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

std::string HtmlEscape(std::string_view s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

namespace {

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                          "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

// Canvas and margins (pixels).
constexpr double kW = 720, kH = 380, kLeft = 64, kRight = 200, kTop = 34, kBottom = 52;
constexpr double kPw = kW - kLeft - kRight, kPh = kH - kTop - kBottom;

// Ticks at 1, 2, 5 x 10^k covering [lo, hi].
std::vector<double> NiceTicks(double lo, double hi, int target) {
  std::vector<double> t;
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= m * mag) {
      step = m * mag;
      break;
    }
  }
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    t.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  }
  return t;
}

std::string TickLabel(double v) {
  if (v != 0 && (std::abs(v) >= 1e5 || std::abs(v) < 1e-3)) return Fmt("%.1e", v);
  std::string s = Fmt("%.4f", v);
  while (!s.empty() && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s;
}

bool Drawable(const PlotSpec& spec, double x, double y) {
  return std::isfinite(x) && std::isfinite(y) && !(spec.log2x && x <= 0);
}

bool HasBand(const Series& series) {
  return series.spread.size() == series.points.size() &&
         std::any_of(series.spread.begin(), series.spread.end(),
                     [](double w) { return std::isfinite(w) && w > 0; });
}

// Half-width of point k's band (0 without a band or for a non-finite width).
double Spread(const Series& series, size_t k) {
  if (!HasBand(series)) return 0.0;
  const double w = series.spread[k];
  return std::isfinite(w) && w > 0 ? w : 0.0;
}

// Data ranges (x in plot coordinates: log2 for log2x) and which series exceed the cap.
struct Frame {
  explicit Frame(const PlotSpec& s) : spec(s) {}
  const PlotSpec& spec;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  std::vector<bool> clipped;
  std::vector<double> series_max;

  double Fx(double x) const { return spec.log2x ? std::log2(x) : x; }
  double Px(double x) const { return kLeft + (Fx(x) - x0) / (x1 - x0) * kPw; }
  double Py(double y) const { return kTop + (1.0 - (y - y0) / (y1 - y0)) * kPh; }
  bool Empty() const { return !(x0 <= x1) || !(y0 <= y1); }
};

Frame MeasureFrame(const PlotSpec& spec, const std::vector<Series>& series) {
  Frame f(spec);
  f.clipped.assign(series.size(), false);
  f.series_max.assign(series.size(), -1e300);
  const bool capped = std::isfinite(spec.ycap);
  for (size_t i = 0; i < series.size(); ++i) {
    for (size_t k = 0; k < series[i].points.size(); ++k) {
      const auto [x, y] = series[i].points[k];
      if (!Drawable(spec, x, y)) continue;
      f.x0 = std::min(f.x0, f.Fx(x));
      f.x1 = std::max(f.x1, f.Fx(x));
      f.series_max[i] = std::max(f.series_max[i], y);
      if (capped && y > spec.ycap) f.clipped[i] = true;
      const double w = Spread(series[i], k);
      f.y0 = std::min(f.y0, capped ? std::min(y - w, spec.ycap) : y - w);
      f.y1 = std::max(f.y1, capped ? std::min(y + w, spec.ycap) : y + w);
    }
  }
  for (const auto& [x, label] : spec.vlines) {
    if (std::isfinite(x) && f.x0 <= f.x1) {
      f.x0 = std::min(f.x0, f.Fx(x));
      f.x1 = std::max(f.x1, f.Fx(x));
    }
  }
  return f;
}

// Widens a degenerate x range and pads the y range by 6%.
void PadFrame(Frame& f) {
  if (f.x1 == f.x0) {
    f.x0 -= 0.5;
    f.x1 += 0.5;
  }
  const double pad = (f.y1 - f.y0) * 0.06 + (f.y1 == f.y0 ? 0.1 : 0.0);
  f.y0 -= pad;
  f.y1 += pad;
}

void DrawYGrid(const Frame& f, std::ostringstream& s) {
  for (double t : NiceTicks(f.y0, f.y1, 6)) {
    s << "<line x1=\"" << kLeft << "\" x2=\"" << kLeft + kPw << "\" y1=\"" << f.Py(t) << "\" y2=\""
      << f.Py(t) << "\" stroke=\"#ddd\"/>\n";
    s << "<text x=\"" << kLeft - 6 << "\" y=\"" << f.Py(t) + 4
      << "\" text-anchor=\"end\" font-size=\"11\">" << TickLabel(t) << "</text>\n";
  }
}

void DrawXGrid(const Frame& f, std::ostringstream& s) {
  const PlotSpec& spec = f.spec;
  std::vector<double> xt = spec.xticks;
  if (xt.empty()) {
    if (spec.log2x) {
      for (double v = std::pow(2.0, std::ceil(f.x0)); std::log2(v) <= f.x1 + 1e-9; v *= 2) {
        xt.push_back(v);
      }
    } else {
      xt = NiceTicks(f.x0, f.x1, 7);
    }
  }
  for (double t : xt) {
    if (spec.log2x && t <= 0) continue;
    const double X = f.Px(t);
    if (X < kLeft - 1e-6 || X > kLeft + kPw + 1e-6) continue;
    s << "<line x1=\"" << X << "\" x2=\"" << X << "\" y1=\"" << kTop << "\" y2=\"" << kTop + kPh
      << "\" stroke=\"#eee\"/>\n";
    s << "<text x=\"" << X << "\" y=\"" << kTop + kPh + 16 << "\" text-anchor=\"middle\" "
      << "font-size=\"11\">" << TickLabel(t) << "</text>\n";
  }
}

void DrawMarkersAndLabels(const Frame& f, std::ostringstream& s) {
  for (const auto& [x, label] : f.spec.vlines) {
    const double X = f.Px(x);
    s << "<line x1=\"" << X << "\" x2=\"" << X << "\" y1=\"" << kTop << "\" y2=\"" << kTop + kPh
      << "\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n";
    const bool near_right = X > kLeft + 0.92 * kPw;  // keep the label inside the plot area
    s << "<text x=\"" << (near_right ? X - 3 : X + 3) << "\" y=\"" << kTop + 12 << "\" "
      << (near_right ? "text-anchor=\"end\" " : "") << "font-size=\"10\" fill=\"#555\">"
      << HtmlEscape(label) << "</text>\n";
  }
  s << "<text x=\"" << kLeft + kPw / 2 << "\" y=\"" << kH - 12 << "\" text-anchor=\"middle\" "
    << "font-size=\"12\">" << HtmlEscape(f.spec.xlabel) << "</text>\n";
  s << "<text transform=\"translate(16 " << kTop + kPh / 2 << ") rotate(-90)\" "
    << "text-anchor=\"middle\" font-size=\"12\">" << HtmlEscape(f.spec.ylabel) << "</text>\n";
}

// A series' band: the polygon through y + spread forwards and y - spread backwards, capped.
void DrawBand(const Frame& f, const Series& series, const char* color, std::ostringstream& s) {
  if (!HasBand(series)) return;
  std::vector<std::pair<double, double>> upper, lower;
  const double cap = std::isfinite(f.spec.ycap) ? f.spec.ycap : 1e300;
  for (size_t k = 0; k < series.points.size(); ++k) {
    const auto [x, y] = series.points[k];
    if (!Drawable(f.spec, x, y)) continue;
    const double w = Spread(series, k);
    upper.emplace_back(f.Px(x), f.Py(std::min(y + w, cap)));
    lower.emplace_back(f.Px(x), f.Py(std::min(y - w, cap)));
  }
  if (upper.size() < 2) return;
  std::string pts;
  for (auto [X, Y] : upper) pts += Fmt("%.2f", X) + "," + Fmt("%.2f", Y) + " ";
  for (auto it = lower.rbegin(); it != lower.rend(); ++it) {
    pts += Fmt("%.2f", it->first) + "," + Fmt("%.2f", it->second) + " ";
  }
  pts.pop_back();
  s << "<polygon class=\"band\" points=\"" << pts << "\" fill=\"" << color
    << "\" fill-opacity=\"0.15\" stroke=\"none\"/>\n";
}

// One series' line (with point marks when it has few points) and its legend entry.
void DrawSeries(const Frame& f, const Series& series, size_t i, std::ostringstream& s) {
  const PlotSpec& spec = f.spec;
  const char* color = kPalette[i % std::size(kPalette)];
  DrawBand(f, series, color, s);
  std::string path;
  std::string marks;
  for (auto [x, y] : series.points) {
    if (!Drawable(spec, x, y)) continue;
    const bool cap = std::isfinite(spec.ycap) && y > spec.ycap;
    if (cap) y = spec.ycap;
    path += (path.empty() ? "M" : " L") + Fmt("%.2f", f.Px(x)) + " " + Fmt("%.2f", f.Py(y));
    if (series.points.size() <= 24) {
      marks += "<circle cx=\"" + Fmt("%.2f", f.Px(x)) + "\" cy=\"" + Fmt("%.2f", f.Py(y)) +
               "\" r=\"" + (cap ? "4.5" : "2.8") + "\" fill=\"" + (cap ? "#ffffff" : color) +
               "\" stroke=\"" + color + "\"/>\n";
    }
  }
  const char* dash = series.dashed ? " stroke-dasharray=\"6 4\"" : "";
  if (!path.empty()) {
    s << "<path d=\"" << path << "\" fill=\"none\" stroke=\"" << color << "\" stroke-width=\"1.8\""
      << dash << "/>\n"
      << marks;
  }
  const double ly = kTop + 10 + 18 * static_cast<double>(i);
  s << "<line x1=\"" << kLeft + kPw + 12 << "\" x2=\"" << kLeft + kPw + 36 << "\" y1=\"" << ly
    << "\" y2=\"" << ly << "\" stroke=\"" << color << "\" stroke-width=\"2\"" << dash << "/>\n";
  std::string name = series.name;
  if (f.clipped[i]) name += " (max " + Fmt("%.2f", f.series_max[i]) + ", clipped)";
  s << "<text x=\"" << kLeft + kPw + 40 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">"
    << HtmlEscape(name) << "</text>\n";
}

}  // namespace

std::string SvgPlot(const PlotSpec& spec, const std::vector<Series>& series) {
  Frame f = MeasureFrame(spec, series);
  std::ostringstream s;
  s << "<svg id=\"" << spec.id << "\" class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\""
    << kW << "\" height=\"" << kH << "\" viewBox=\"0 0 " << kW << " " << kH << "\" role=\"img\">\n";
  s << "<title>" << HtmlEscape(spec.title) << "</title>\n";
  s << "<rect x=\"0\" y=\"0\" width=\"" << kW << "\" height=\"" << kH << "\" fill=\"#ffffff\"/>\n";
  s << "<text x=\"" << kLeft + kPw / 2 << "\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" "
    << "font-weight=\"bold\">" << HtmlEscape(spec.title) << "</text>\n";
  if (f.Empty()) {
    s << "<text x=\"" << kW / 2 << "\" y=\"" << kH / 2 << "\" text-anchor=\"middle\">no data</text>"
      << "</svg>\n";
    return s.str();
  }
  PadFrame(f);
  s << "<rect x=\"" << kLeft << "\" y=\"" << kTop << "\" width=\"" << kPw << "\" height=\"" << kPh
    << "\" fill=\"#fafafa\" stroke=\"#444\"/>\n";
  DrawYGrid(f, s);
  DrawXGrid(f, s);
  DrawMarkersAndLabels(f, s);
  for (size_t i = 0; i < series.size(); ++i) DrawSeries(f, series[i], i, s);
  s << "</svg>\n";
  return s.str();
}

}  // namespace ropekit::study
