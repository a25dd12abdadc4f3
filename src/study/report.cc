// The study's summary tables (terminal) and report page: one self-contained HTML file with
// inline SVG line plots drawn here (no scripts, no external resources).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "ropekit/study.h"

namespace ropekit::study {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

std::string Escape(std::string_view s) {
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

// Display names.
std::string EncodingLabel(const std::string& e) {
  static const std::map<std::string, std::string> k = {
      {"learned", "learned APE"}, {"sinusoidal", "sinusoidal"}, {"none", "NoPE"},
      {"rope", "RoPE"},           {"alibi", "ALiBi"},           {"t5", "T5 bias"}};
  auto it = k.find(e);
  return it == k.end() ? e : it->second;
}
std::string ScalingLabel(const std::string& s) {
  static const std::map<std::string, std::string> k = {
      {"none", "plain"},          {"linear", "PI (linear)"}, {"ntk", "NTK-aware"},
      {"dynamic", "dynamic NTK"}, {"yarn", "YaRN"},          {"llama3", "Llama 3.1"}};
  auto it = k.find(s);
  return it == k.end() ? s : it->second;
}

const char* kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
                          "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> points;
  bool dashed = false;
};

struct PlotSpec {
  std::string id, title, xlabel, ylabel;
  bool log2x = false;
  std::vector<double> xticks;  // empty: automatic
  std::vector<std::pair<double, std::string>> vlines;
  double ycap = kNaN;  // values above are drawn at the cap (legend says so)
};

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

std::string SvgPlot(const PlotSpec& spec, const std::vector<Series>& series) {
  const double W = 720, H = 380, left = 64, right = 200, top = 34, bottom = 52;
  const double pw = W - left - right, ph = H - top - bottom;
  auto fx = [&](double x) { return spec.log2x ? std::log2(x) : x; };
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  std::vector<bool> clipped(series.size(), false);
  std::vector<double> series_max(series.size(), -1e300);
  for (size_t i = 0; i < series.size(); ++i) {
    for (auto [x, y] : series[i].points) {
      if (!std::isfinite(x) || !std::isfinite(y) || (spec.log2x && x <= 0)) continue;
      x0 = std::min(x0, fx(x));
      x1 = std::max(x1, fx(x));
      series_max[i] = std::max(series_max[i], y);
      if (std::isfinite(spec.ycap) && y > spec.ycap) {
        clipped[i] = true;
        y = spec.ycap;
      }
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  }
  for (const auto& [x, label] : spec.vlines) {
    if (std::isfinite(x) && x0 <= x1) {
      x0 = std::min(x0, fx(x));
      x1 = std::max(x1, fx(x));
    }
  }
  std::ostringstream s;
  s << "<svg id=\"" << spec.id << "\" class=\"plot\" xmlns=\"http://www.w3.org/2000/svg\" width=\""
    << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W << " " << H << "\" role=\"img\">\n";
  s << "<title>" << Escape(spec.title) << "</title>\n";
  s << "<rect x=\"0\" y=\"0\" width=\"" << W << "\" height=\"" << H << "\" fill=\"#ffffff\"/>\n";
  s << "<text x=\"" << left + pw / 2 << "\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" "
    << "font-weight=\"bold\">" << Escape(spec.title) << "</text>\n";
  if (!(x0 <= x1) || !(y0 <= y1)) {
    s << "<text x=\"" << W / 2 << "\" y=\"" << H / 2 << "\" text-anchor=\"middle\">no data</text>"
      << "</svg>\n";
    return s.str();
  }
  if (x1 == x0) {
    x0 -= 0.5;
    x1 += 0.5;
  }
  const double pad = (y1 - y0) * 0.06 + (y1 == y0 ? 0.1 : 0.0);
  y0 -= pad;
  y1 += pad;
  auto px = [&](double x) { return left + (fx(x) - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return top + (1.0 - (y - y0) / (y1 - y0)) * ph; };
  // Axes and grid.
  s << "<rect x=\"" << left << "\" y=\"" << top << "\" width=\"" << pw << "\" height=\"" << ph
    << "\" fill=\"#fafafa\" stroke=\"#444\"/>\n";
  for (double t : NiceTicks(y0, y1, 6)) {
    s << "<line x1=\"" << left << "\" x2=\"" << left + pw << "\" y1=\"" << py(t) << "\" y2=\""
      << py(t) << "\" stroke=\"#ddd\"/>\n";
    s << "<text x=\"" << left - 6 << "\" y=\"" << py(t) + 4
      << "\" text-anchor=\"end\" font-size=\"11\">" << TickLabel(t) << "</text>\n";
  }
  std::vector<double> xt = spec.xticks;
  if (xt.empty()) {
    if (spec.log2x) {
      for (double v = std::pow(2.0, std::ceil(x0)); std::log2(v) <= x1 + 1e-9; v *= 2) {
        xt.push_back(v);
      }
    } else {
      xt = NiceTicks(x0, x1, 7);
    }
  }
  for (double t : xt) {
    if (spec.log2x && t <= 0) continue;
    const double X = px(t);
    if (X < left - 1e-6 || X > left + pw + 1e-6) continue;
    s << "<line x1=\"" << X << "\" x2=\"" << X << "\" y1=\"" << top << "\" y2=\"" << top + ph
      << "\" stroke=\"#eee\"/>\n";
    s << "<text x=\"" << X << "\" y=\"" << top + ph + 16 << "\" text-anchor=\"middle\" "
      << "font-size=\"11\">" << TickLabel(t) << "</text>\n";
  }
  for (const auto& [x, label] : spec.vlines) {
    const double X = px(x);
    s << "<line x1=\"" << X << "\" x2=\"" << X << "\" y1=\"" << top << "\" y2=\"" << top + ph
      << "\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n";
    const bool near_right = X > left + 0.92 * pw;  // keep the label inside the plot area
    s << "<text x=\"" << (near_right ? X - 3 : X + 3) << "\" y=\"" << top + 12 << "\" "
      << (near_right ? "text-anchor=\"end\" " : "") << "font-size=\"10\" fill=\"#555\">"
      << Escape(label) << "</text>\n";
  }
  s << "<text x=\"" << left + pw / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\" "
    << "font-size=\"12\">" << Escape(spec.xlabel) << "</text>\n";
  s << "<text transform=\"translate(16 " << top + ph / 2 << ") rotate(-90)\" "
    << "text-anchor=\"middle\" font-size=\"12\">" << Escape(spec.ylabel) << "</text>\n";
  // Series.
  for (size_t i = 0; i < series.size(); ++i) {
    const char* color = kPalette[i % std::size(kPalette)];
    std::string path;
    std::string marks;
    for (auto [x, y] : series[i].points) {
      if (!std::isfinite(x) || !std::isfinite(y) || (spec.log2x && x <= 0)) continue;
      const bool cap = std::isfinite(spec.ycap) && y > spec.ycap;
      if (cap) y = spec.ycap;
      path += (path.empty() ? "M" : " L") + Fmt("%.2f", px(x)) + " " + Fmt("%.2f", py(y));
      if (series[i].points.size() <= 24) {
        marks += "<circle cx=\"" + Fmt("%.2f", px(x)) + "\" cy=\"" + Fmt("%.2f", py(y)) +
                 "\" r=\"" + (cap ? "4.5" : "2.8") + "\" fill=\"" + (cap ? "#ffffff" : color) +
                 "\" stroke=\"" + color + "\"/>\n";
      }
    }
    if (!path.empty()) {
      s << "<path d=\"" << path << "\" fill=\"none\" stroke=\"" << color
        << "\" stroke-width=\"1.8\"" << (series[i].dashed ? " stroke-dasharray=\"6 4\"" : "")
        << "/>\n"
        << marks;
    }
    const double ly = top + 10 + 18 * static_cast<double>(i);
    s << "<line x1=\"" << left + pw + 12 << "\" x2=\"" << left + pw + 36 << "\" y1=\"" << ly
      << "\" y2=\"" << ly << "\" stroke=\"" << color << "\" stroke-width=\"2\""
      << (series[i].dashed ? " stroke-dasharray=\"6 4\"" : "") << "/>\n";
    std::string name = series[i].name;
    if (clipped[i]) name += " (max " + Fmt("%.2f", series_max[i]) + ", clipped)";
    s << "<text x=\"" << left + pw + 40 << "\" y=\"" << ly + 4 << "\" font-size=\"11\">"
      << Escape(name) << "</text>\n";
  }
  s << "</svg>\n";
  return s.str();
}

// ---- Record lookups ----------------------------------------------------------------------------

const StudyRecord* Find(const std::vector<StudyRecord>& records, const std::string& encoding,
                        const std::string& scaling, int64_t finetune_steps, int64_t eval_length) {
  for (const StudyRecord& r : records) {
    if (r.encoding == encoding && r.scaling == scaling && r.finetune_steps == finetune_steps &&
        r.eval_length == eval_length) {
      return &r;
    }
  }
  return nullptr;
}

std::vector<int64_t> Lengths(const StudyPreset& p) {
  std::vector<int64_t> v;
  for (int64_t m : p.eval_multipliers) v.push_back(m * p.train.seq_len);
  return v;
}

// Tail loss at step 0 of fine-tuning: the unscaled / scaled model before any update.
const StudyRecord* FinetuneStart(const std::vector<StudyRecord>& records,
                                 const std::string& scaling, int64_t length) {
  return scaling == "none" ? Find(records, "rope", "none", 0, length)
                           : Find(records, "rope", scaling, 0, length);
}

// A plain-text table: first column labels, then one column per header.
std::string TextTable(const std::vector<std::string>& header,
                      const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> w(header.size(), 0);
  for (size_t c = 0; c < header.size(); ++c) w[c] = header[c].size();
  for (const auto& r : rows) {
    for (size_t c = 0; c < r.size() && c < w.size(); ++c) w[c] = std::max(w[c], r[c].size());
  }
  auto line = [&](const std::vector<std::string>& r) {
    std::string s;
    for (size_t c = 0; c < header.size(); ++c) {
      const std::string v = c < r.size() ? r[c] : "";
      const std::string padding(w[c] - v.size(), ' ');
      s += c == 0 ? v + padding : "  " + padding + v;
    }
    return s + "\n";
  };
  std::string s = line(header);
  size_t total = 0;
  for (size_t c = 0; c < w.size(); ++c) total += w[c] + (c ? 2 : 0);
  s += std::string(total, '-') + "\n";
  for (const auto& r : rows) s += line(r);
  return s;
}

std::string HtmlTable(const std::vector<std::string>& header,
                      const std::vector<std::vector<std::string>>& rows) {
  std::string s = "<table>\n<tr>";
  for (const auto& h : header) s += "<th>" + Escape(h) + "</th>";
  s += "</tr>\n";
  for (const auto& r : rows) {
    s += "<tr>";
    for (size_t c = 0; c < r.size(); ++c) {
      s += (c == 0 ? "<td class=\"l\">" : "<td>") + Escape(r[c]) + "</td>";
    }
    s += "</tr>\n";
  }
  return s + "</table>\n";
}

struct Table {
  std::string title;
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

std::string Cell(const StudyRecord* r, bool tail) {
  if (!r) return "-";
  return Fmt("%.3f", tail ? r->tail_loss : r->window_loss);
}
std::string Delta(const StudyRecord* r, const StudyRecord* base) {
  if (!r || !base) return "-";
  return Fmt("%+.3f", r->tail_loss - base->tail_loss);
}

std::vector<Table> BuildTables(const StudyPreset& p, const std::vector<StudyRecord>& rec) {
  const std::vector<int64_t> lengths = Lengths(p);
  const int64_t L = p.train.seq_len;
  std::vector<Table> tables;
  {
    Table t;
    t.title =
        "Tail loss (nats/byte; same last " + std::to_string(p.tail) +
        " targets at every length); dNx = change from 1x; trained at L = " + std::to_string(L);
    t.header = {"encoding"};
    for (int64_t c : lengths) t.header.push_back(std::to_string(c));
    for (size_t i = 1; i < lengths.size(); ++i) {
      t.header.push_back("d" + std::to_string(lengths[i] / L) + "x");
    }
    for (const std::string& e : p.encodings) {
      const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
      std::vector<std::string> row = {EncodingLabel(e)};
      for (int64_t c : lengths) row.push_back(Cell(Find(rec, kind, "none", 0, c), true));
      const StudyRecord* base = Find(rec, kind, "none", 0, lengths[0]);
      for (size_t i = 1; i < lengths.size(); ++i) {
        row.push_back(Delta(Find(rec, kind, "none", 0, lengths[i]), base));
      }
      t.rows.push_back(row);
    }
    tables.push_back(t);
  }
  {
    Table t;
    t.title = "Non-overlapping window loss (mean over every target of each window)";
    t.header = {"encoding"};
    for (int64_t c : lengths) t.header.push_back(std::to_string(c));
    for (const std::string& e : p.encodings) {
      const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
      std::vector<std::string> row = {EncodingLabel(e)};
      for (int64_t c : lengths) row.push_back(Cell(Find(rec, kind, "none", 0, c), false));
      t.rows.push_back(row);
    }
    tables.push_back(t);
  }
  if (Find(rec, "rope", "none", 0, lengths[0])) {
    Table t;
    t.title =
        "RoPE context extension without fine-tuning: tail loss, s = eval length / L "
        "(dynamic: per forward pass)";
    t.header = {"scaling"};
    for (int64_t c : lengths) t.header.push_back(std::to_string(c));
    std::vector<std::string> scalings = {"none"};
    scalings.insert(scalings.end(), p.scalings.begin(), p.scalings.end());
    for (const std::string& s : scalings) {
      std::vector<std::string> row = {ScalingLabel(s)};
      for (int64_t c : lengths) row.push_back(Cell(Find(rec, "rope", s, 0, c), true));
      t.rows.push_back(row);
    }
    tables.push_back(t);
    Table f;
    f.title = "RoPE fine-tuned at " + std::to_string(p.extension_factor * L) +
              " (s = " + std::to_string(p.extension_factor) +
              "; plain = direct fine-tuning without scaling): tail loss";
    f.header = {"scaling", "steps"};
    for (int64_t c : lengths) f.header.push_back(std::to_string(c));
    for (const std::string& s : p.finetune_scalings) {
      std::vector<int64_t> steps = {0};
      steps.insert(steps.end(), p.finetune_steps.begin(), p.finetune_steps.end());
      for (int64_t k : steps) {
        std::vector<std::string> row = {ScalingLabel(s), std::to_string(k)};
        for (int64_t c : lengths) {
          const StudyRecord* r = nullptr;
          if (k == 0) {
            // Before fine-tuning the scaled model uses the fixed factor s, which equals the
            // matched factor only at the target length.
            r = c == p.extension_factor * L || s == "none" ? FinetuneStart(rec, s, c) : nullptr;
          } else {
            r = Find(rec, "rope", s, k, c);
          }
          row.push_back(Cell(r, true));
        }
        f.rows.push_back(row);
      }
    }
    tables.push_back(f);
  }
  return tables;
}

}  // namespace

std::string SummaryTables(const StudyPreset& preset, const std::vector<StudyRecord>& records) {
  std::string s;
  for (const Table& t : BuildTables(preset, records)) {
    std::vector<std::string> header = t.header;
    s += "\n" + t.title + "\n" + TextTable(header, t.rows);
  }
  return s;
}

std::string ReportHtml(const StudyPreset& p, const StudyResult& result,
                       const ModelConfig& rope_model, const std::string& corpus_description) {
  const std::vector<StudyRecord>& rec = result.records;
  const std::vector<int64_t> lengths = Lengths(p);
  const int64_t L = p.train.seq_len;
  std::vector<double> xt(lengths.begin(), lengths.end());
  std::vector<std::pair<double, std::string>> at_L = {{static_cast<double>(L), "L"}};
  std::vector<std::string> plot_ids;
  std::ostringstream body;
  auto add_plot = [&](const PlotSpec& spec, const std::vector<Series>& series,
                      const std::string& caption) {
    plot_ids.push_back(spec.id);
    body << "<figure>\n"
         << SvgPlot(spec, series) << "<figcaption>" << Escape(caption)
         << "</figcaption>\n</figure>\n";
  };
  double base_max = 0;  // largest 1x tail loss; used to clip exploding curves
  for (const std::string& e : p.encodings) {
    const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
    if (const StudyRecord* r = Find(rec, kind, "none", 0, L)) {
      base_max = std::max(base_max, std::max(r->tail_loss, r->window_loss));
    }
  }
  const double cap = base_max > 0 ? base_max + 2.5 : kNaN;

  body << "<h2>Length extrapolation: trained at L = " << L << "</h2>\n";
  for (bool tail : {true, false}) {
    PlotSpec spec;
    spec.id = tail ? "plot-tail-loss" : "plot-window-loss";
    spec.title = tail ? "Tail loss vs evaluation length" : "Non-overlapping window loss vs length";
    spec.xlabel = "evaluation length (tokens, log scale)";
    spec.ylabel = "loss (nats / byte)";
    spec.log2x = true;
    spec.xticks = xt;
    spec.ycap = cap;
    spec.vlines = at_L;
    std::vector<Series> series;
    for (const std::string& e : p.encodings) {
      const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
      Series s{EncodingLabel(e), {}, false};
      for (int64_t c : lengths) {
        if (const StudyRecord* r = Find(rec, kind, "none", 0, c)) {
          s.points.emplace_back(static_cast<double>(c), tail ? r->tail_loss : r->window_loss);
        }
      }
      series.push_back(s);
    }
    add_plot(spec, series,
             tail ? "Primary metric: the same last " + std::to_string(p.tail) +
                        " target bytes of " + std::to_string(p.tail_windows) +
                        " fixed windows, scored with growing context. Flat = extrapolates; rising "
                        "= fails."
                  : "ALiBi-paper style: mean over all targets of non-overlapping windows. Longer "
                    "windows have fewer short-context targets (the early-token curse), so healthy "
                    "methods improve here.");
  }
  // Per-position curves at the largest length.
  {
    const int64_t cmax = lengths.back();
    PlotSpec spec;
    spec.id = "plot-position-loss";
    spec.title = "Per-position loss at length " + std::to_string(cmax);
    spec.xlabel = "position in window (bucket centre)";
    spec.ylabel = "loss (nats / byte)";
    spec.ycap = cap;
    for (int64_t m : p.eval_multipliers) {
      spec.vlines.emplace_back(static_cast<double>(m * L), std::to_string(m) + "L");
    }
    std::vector<Series> series;
    for (const std::string& e : p.encodings) {
      const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
      Series s{EncodingLabel(e), {}, false};
      if (const StudyRecord* r = Find(rec, kind, "none", 0, cmax)) {
        for (size_t b = 0; b < r->position_loss.size(); ++b) {
          const double centre =
              (static_cast<double>(b) + 0.5) * static_cast<double>(r->bucket_size);
          s.points.emplace_back(centre, r->position_loss[b]);
        }
      }
      series.push_back(s);
    }
    add_plot(spec, series,
             "Mean loss by position over non-overlapping windows of " + std::to_string(cmax) +
                 " tokens (buckets of " + std::to_string(p.bucket_size) +
                 "). Beyond L a method that cannot extrapolate rises.");
  }
  // Extension without fine-tuning.
  if (Find(rec, "rope", "none", 0, L)) {
    body << "<h2>RoPE context extension</h2>\n";
    {
      PlotSpec spec;
      spec.id = "plot-extension";
      spec.title = "RoPE scalings without fine-tuning: tail loss";
      spec.xlabel = "evaluation length (tokens, log scale)";
      spec.ylabel = "loss (nats / byte)";
      spec.log2x = true;
      spec.xticks = xt;
      spec.ycap = cap;
      spec.vlines = at_L;
      std::vector<Series> series;
      std::vector<std::string> scalings = {"none"};
      scalings.insert(scalings.end(), p.scalings.begin(), p.scalings.end());
      for (const std::string& sc : scalings) {
        Series s{ScalingLabel(sc), {}, false};
        for (int64_t c : lengths) {
          if (const StudyRecord* r = Find(rec, "rope", sc, 0, c)) {
            s.points.emplace_back(static_cast<double>(c), r->tail_loss);
          }
        }
        series.push_back(s);
      }
      add_plot(spec, series,
               "The RoPE model evaluated with each scaling, factor s = evaluation length / L. "
               "Dynamic NTK recomputes s = (window length) / L per forward pass; every window "
               "here has exactly the evaluation length, so it coincides with NTK-aware at the "
               "matched s (they differ in incremental decoding).");
    }
    {
      const int64_t target = p.extension_factor * L;
      PlotSpec spec;
      spec.id = "plot-finetune";
      spec.title =
          "Fine-tuning at " + std::to_string(target) + ": tail loss at " + std::to_string(target);
      spec.xlabel = "fine-tuning steps";
      spec.ylabel = "loss (nats / byte)";
      spec.ycap = cap;
      std::vector<Series> series;
      for (const std::string& sc : p.finetune_scalings) {
        Series s{ScalingLabel(sc) + (sc == "none" ? " (direct)" : ""), {}, false};
        if (const StudyRecord* r = FinetuneStart(rec, sc, target)) {
          s.points.emplace_back(0.0, r->tail_loss);
        }
        for (int64_t k : p.finetune_steps) {
          if (const StudyRecord* r = Find(rec, "rope", sc, k, target)) {
            s.points.emplace_back(static_cast<double>(k), r->tail_loss);
          }
        }
        series.push_back(s);
      }
      if (const StudyRecord* r = Find(rec, "rope", "none", 0, L)) {
        Series s{"RoPE at L (reference)", {}, true};
        s.points = {{0.0, r->tail_loss},
                    {static_cast<double>(p.finetune_steps.back()), r->tail_loss}};
        series.push_back(s);
      }
      add_plot(spec, series,
               "PI paper Table 3 in miniature: the tail loss at the target length after each "
               "number of fine-tuning steps (step 0: no fine-tuning). The dashed line is the base "
               "model at its training length.");
    }
    {
      PlotSpec spec;
      spec.id = "plot-finetune-train";
      spec.title = "Fine-tuning training loss";
      spec.xlabel = "step";
      spec.ylabel = "training loss (nats / byte)";
      std::vector<Series> series;
      for (const TrainCurve& c : result.curves) {
        if (c.name.rfind("finetune-", 0) != 0) continue;
        Series s{ScalingLabel(c.name.substr(9)), {}, false};
        for (auto [step, loss] : c.loss) s.points.emplace_back(static_cast<double>(step), loss);
        series.push_back(s);
      }
      add_plot(spec, series, "Training loss per step at the extended length.");
    }
  }
  // Pre-training curves.
  {
    body << "<h2>Training</h2>\n";
    PlotSpec spec;
    spec.id = "plot-pretrain";
    spec.title = "Pre-training: validation loss at L";
    spec.xlabel = "step";
    spec.ylabel = "loss (nats / byte)";
    std::vector<Series> series;
    for (const TrainCurve& c : result.curves) {
      if (c.name.rfind("pretrain-", 0) != 0) continue;
      Series s{EncodingLabel(c.name.substr(9)), {}, false};
      for (auto [step, loss] : c.val_loss) s.points.emplace_back(static_cast<double>(step), loss);
      series.push_back(s);
    }
    add_plot(spec, series, "Held-out loss at the training length during pre-training.");
  }
  // RoFormer long-term decay from the model's inverse frequencies: the raw curve (as in the
  // paper's Fig. 2), then the scaled frequencies as moving means (the raw curves oscillate).
  {
    body << "<h2>RoPE long-term decay</h2>\n";
    const RopeParams& base = rope_model.position_encoding.rope;
    const int64_t rmax = lengths.back();
    std::vector<std::pair<double, std::string>> marks;
    for (int64_t m : p.eval_multipliers) {
      marks.emplace_back(static_cast<double>(m * L), std::to_string(m) + "L");
    }
    std::vector<std::pair<std::string, double>> variants = {{"none", 1.0}};
    for (const char* sc : {"linear", "ntk", "yarn", "llama3"}) {
      variants.emplace_back(sc, static_cast<double>(p.extension_factor));
    }
    const int64_t window = std::max<int64_t>(4, L / 4);
    std::vector<Series> raw, smooth;
    for (const auto& [sc, s] : variants) {
      const RopeFrequencies f = ComputeFrequencies(ScaledRope(base, sc, s, L), Numerics::kExact);
      const std::vector<double> curve = RopeDecayCurve(f.inv_freq, rmax);
      const std::string name = ScalingLabel(sc) + (sc == "none" ? "" : " s=" + Fmt("%.0f", s));
      if (sc == "none") {
        Series ser{name, {}, false};
        for (size_t r = 0; r < curve.size(); ++r) {
          ser.points.emplace_back(static_cast<double>(r), curve[r]);
        }
        raw.push_back(ser);
      }
      Series ms{name, {}, false};
      double sum = 0;
      for (size_t r = 0; r < curve.size(); ++r) {
        sum += curve[r];
        if (r >= static_cast<size_t>(window)) sum -= curve[r - window];
        if (r + 1 >= static_cast<size_t>(window)) {
          ms.points.emplace_back(static_cast<double>(r) - 0.5 * static_cast<double>(window - 1),
                                 sum / static_cast<double>(window));
        }
      }
      smooth.push_back(ms);
    }
    PlotSpec spec;
    spec.id = "plot-decay";
    spec.title =
        "RoFormer decay bound of the model's RoPE (R = " + std::to_string(base.rotary_dim) + ")";
    spec.xlabel = "relative distance r";
    spec.ylabel = "(1/N) sum_j |S_j(r)|";
    spec.vlines = marks;
    add_plot(spec, raw,
             "Su et al. sec. 3.4.3: the relative upper bound (1/N) sum_{j=1..N} |sum_{i<j} "
             "exp(i r theta_i)| computed from the inverse frequencies the model actually uses "
             "(base " +
                 Fmt("%g", base.base) + ", N = " + std::to_string(base.rotary_dim / 2) +
                 " pairs). Oscillating, decaying on average: its value at r = 0 is (N + 1) / 2.");
    PlotSpec sspec = spec;
    sspec.id = "plot-decay-scaled";
    sspec.title =
        "Decay bound of the scaled frequencies (moving mean over " + std::to_string(window) + ")";
    add_plot(sspec, smooth,
             "The same bound for the inverse frequencies of each scaling at s = " +
                 std::to_string(p.extension_factor) + ", averaged over windows of " +
                 std::to_string(window) +
                 " distances. Interpolation stretches the curve: the decay reached at distance r "
                 "by plain RoPE is reached later (YaRN's attention factor is not part of the "
                 "bound).");
  }

  std::ostringstream html;
  html << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
       << "<title>ropekit length-extrapolation study</title>\n<style>\n"
       << "body{font-family:sans-serif;max-width:1100px;margin:20px auto;padding:0 16px;"
       << "color:#222}\n"
       << "table{border-collapse:collapse;margin:8px 0 20px}\n"
       << "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}\n"
       << "td.l{text-align:left}\nth{background:#f0f0f0}\n"
       << "figure{margin:12px 0 24px}\nfigcaption{font-size:13px;color:#444;max-width:720px}\n"
       << "</style>\n</head>\n<body>\n";
  html << "<h1>ropekit length-extrapolation study</h1>\n";
  html << "<p>Preset <b>" << Escape(p.name) << "</b>: " << Escape(p.description)
       << ". Corpus: " << Escape(corpus_description)
       << ". Byte-level tokens; losses in nats per byte. " << result.trained_units.size()
       << " runs computed now, " << result.reused_units.size() << " reused from earlier runs; "
       << "compute time of all runs " << Fmt("%.0f", result.compute_seconds) << " s, this "
       << "invocation " << Fmt("%.0f", result.seconds) << " s.</p>\n";
  // Rows of the learned table at positions >= L get no gradient (their Adam moments stay 0), so
  // AdamW only applies the decoupled decay p <- p (1 - lr_t wd) to them.
  double shrink = 1.0;
  for (int64_t step = 0; step < p.train.steps; ++step) {
    shrink *= 1.0 - LearningRate(p.train, step) * p.train.weight_decay;
  }
  html << "<p>Encodings: learned absolute (a table of 8L rows; rows at positions &ge; L never "
          "receive a gradient: they keep their random initial values, multiplied only by the "
          "decoupled weight decay, a factor "
       << Fmt("%.3f", shrink)
       << " over the run; nothing is clamped), sinusoidal (token embeddings scaled by sqrt(d)), "
          "NoPE, RoPE (base 10000), ALiBi, T5 bias (32 buckets, max distance L). Every model has "
          "the same architecture, data order and budget. The tail protocol scores the same last "
       << p.tail << " targets of " << p.tail_windows
       << " fixed windows at every evaluation length (Kazemnejad et al. 2023, App. F).</p>\n";
  html << "<h2>Tables</h2>\n";
  for (const Table& t : BuildTables(p, rec)) {
    html << "<h3>" << Escape(t.title) << "</h3>\n" << HtmlTable(t.header, t.rows);
  }
  html << body.str();
  html << "<p>Plots: ";
  for (size_t i = 0; i < plot_ids.size(); ++i) html << (i ? ", " : "") << plot_ids[i];
  html << ".</p>\n</body>\n</html>\n";
  return html.str();
}

}  // namespace ropekit::study
