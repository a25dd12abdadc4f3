// The study's summary tables (terminal) and report page: one self-contained HTML file with
// inline SVG line plots (svg_plot.h; no scripts, no external resources).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "ropekit/study.h"
#include "src/study/svg_plot.h"

namespace ropekit::study {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

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

std::string MethodLabel(const std::string& m) {
  static const std::map<std::string, std::string> k = {{"full", "full fine-tuning"},
                                                       {"lora-qv", "LoRA q,v"},
                                                       {"lora-all", "LoRA all"},
                                                       {"lora-plus", "LoRA+ (emb., norms)"},
                                                       {"qlora", "QLoRA (all, NF4)"}};
  auto it = k.find(m);
  return it == k.end() ? m : it->second;
}

// ---- Record lookups ----------------------------------------------------------------------------

// The record of a configuration of the main grid; fine-tunes: with full fine-tuning, or with
// `method`.
const StudyRecord* Find(const std::vector<StudyRecord>& records, const std::string& encoding,
                        const std::string& scaling, int64_t finetune_steps, int64_t eval_length,
                        const std::string& method = "full") {
  for (const StudyRecord& r : records) {
    if (r.encoding == encoding && r.scaling == scaling && r.finetune_steps == finetune_steps &&
        r.eval_length == eval_length && r.variant.empty() &&
        (finetune_steps == 0 || r.method == method)) {
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
  for (const auto& h : header) s += "<th>" + HtmlEscape(h) + "</th>";
  s += "</tr>\n";
  for (const auto& r : rows) {
    s += "<tr>";
    for (size_t c = 0; c < r.size(); ++c) {
      s += (c == 0 ? "<td class=\"l\">" : "<td>") + HtmlEscape(r[c]) + "</td>";
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

// A loss; over several seeds, mean ± sample standard deviation.
std::string Cell(const StudyRecord* r, bool tail) {
  if (!r) return "-";
  std::string s = Fmt("%.3f", tail ? r->tail_loss : r->window_loss);
  if (r->seeds > 1) s += " ± " + Fmt("%.3f", tail ? r->tail_loss_sd : r->window_loss_sd);
  return s;
}
std::string Delta(const StudyRecord* r, const StudyRecord* base) {
  if (!r || !base) return "-";
  return Fmt("%+.3f", r->tail_loss - base->tail_loss);
}

// The record of an experiment's variant (see StudyRecord::variant).
const StudyRecord* FindVariant(const std::vector<StudyRecord>& records, const std::string& encoding,
                               const std::string& variant, int64_t eval_length) {
  for (const StudyRecord& r : records) {
    if (r.encoding == encoding && r.variant == variant && r.eval_length == eval_length) return &r;
  }
  return nullptr;
}

// A row of tail losses at every length, then the changes from 1x.
std::vector<std::string> LossRow(const std::string& label, const std::vector<int64_t>& lengths,
                                 const std::function<const StudyRecord*(int64_t)>& find) {
  std::vector<std::string> row = {label};
  for (int64_t c : lengths) row.push_back(Cell(find(c), true));
  for (size_t i = 1; i < lengths.size(); ++i)
    row.push_back(Delta(find(lengths[i]), find(lengths[0])));
  return row;
}

// The experiments that test the deviations from the papers: T5's max_distance, ALiBi's heads,
// and PI applied below a frequency cut-off.
void AddExperimentTables(const StudyPreset& p, const std::vector<StudyRecord>& rec,
                         std::vector<Table>& tables) {
  const std::vector<int64_t> lengths = Lengths(p);
  std::vector<std::string> header = {"setting"};
  for (int64_t c : lengths) header.push_back(std::to_string(c));
  for (size_t i = 1; i < lengths.size(); ++i) {
    header.push_back("d" + std::to_string(lengths[i] / p.train.seq_len) + "x");
  }
  Table published{"Published settings beside the study's: tail loss", header, {}};
  for (const char* kind : {"t5", "alibi"}) {
    const std::string enc = kind;
    std::set<std::string> variants;
    for (const StudyRecord& r : rec) {
      if (r.encoding == enc && !r.variant.empty()) variants.insert(r.variant);
    }
    if (variants.empty()) continue;
    const ModelConfig m = StudyModel(p, enc);
    const std::string ours =
        enc == "t5" ? "max_distance=" + std::to_string(m.position_encoding.max_distance)
                    : "heads=" + std::to_string(m.num_heads);
    published.rows.push_back(LossRow(EncodingLabel(enc) + " " + ours + " (study)", lengths,
                                     [&](int64_t c) { return Find(rec, enc, "none", 0, c); }));
    for (const std::string& v : variants) {
      published.rows.push_back(LossRow(EncodingLabel(enc) + " " + v, lengths,
                                       [&](int64_t c) { return FindVariant(rec, enc, v, c); }));
    }
  }
  if (!published.rows.empty()) tables.push_back(published);
  Table cutoff{
      "PI on all but the k highest-frequency pairs (no fine-tuning; k = 0 is PI, k = N "
      "plain RoPE): tail loss",
      header,
      {}};
  std::vector<std::pair<int, std::string>> keeps;
  for (const StudyRecord& r : rec) {
    if (r.encoding == "rope" && r.variant.rfind("pi_keep=", 0) == 0 &&
        r.eval_length == lengths[0]) {
      keeps.emplace_back(std::stoi(r.variant.substr(8)), r.variant);
    }
  }
  std::sort(keeps.begin(), keeps.end());
  for (const auto& [k, v] : keeps) {
    cutoff.rows.push_back(LossRow("k = " + std::to_string(k), lengths,
                                  [&](int64_t c) { return FindVariant(rec, "rope", v, c); }));
  }
  if (!cutoff.rows.empty()) tables.push_back(cutoff);
}

// ---- Paired differences over seeds ---------------------------------------------------------

// One seed's lookup of a configuration at an evaluation length.
using Finder = std::function<const StudyRecord*(const std::vector<StudyRecord>&, int64_t)>;

// "b - a": two configurations that the study's conclusions compare.
struct Comparison {
  std::string label;
  Finder a, b;
};

Finder MainGrid(const std::string& encoding, const std::string& scaling) {
  return [=](const std::vector<StudyRecord>& r, int64_t c) {
    return Find(r, encoding, scaling, 0, c);
  };
}

Finder Variant(const std::string& encoding, const std::string& variant) {
  return [=](const std::vector<StudyRecord>& r, int64_t c) {
    return FindVariant(r, encoding, variant, c);
  };
}

// Every encoding against RoPE, every scaling against plain RoPE, and every experiment's
// setting against the study's (PI's cut-offs against PI, k = 0).
std::vector<Comparison> Comparisons(const StudyPreset& p, const std::vector<StudyRecord>& rec) {
  std::vector<Comparison> out;
  for (const std::string& e : p.encodings) {
    const std::string kind = std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
    if (kind != "rope") {
      out.push_back(
          {EncodingLabel(e) + " - RoPE", MainGrid("rope", "none"), MainGrid(kind, "none")});
    }
  }
  for (const std::string& sc : p.scalings) {
    out.push_back(
        {ScalingLabel(sc) + " - plain RoPE", MainGrid("rope", "none"), MainGrid("rope", sc)});
  }
  std::set<std::pair<std::string, std::string>> variants;
  for (const StudyRecord& r : rec) {
    if (!r.variant.empty()) variants.insert({r.encoding, r.variant});
  }
  for (const auto& [enc, v] : variants) {
    if (v.rfind("pi_keep=", 0) == 0) {
      if (v != "pi_keep=0") {
        out.push_back({"PI keeping " + v.substr(8) + " pairs - PI", Variant(enc, "pi_keep=0"),
                       Variant(enc, v)});
      }
      continue;
    }
    out.push_back(
        {EncodingLabel(enc) + " " + v + " - study's", MainGrid(enc, "none"), Variant(enc, v)});
  }
  return out;
}

// Mean ± half-width of the 95% confidence interval (Student's t) of paired differences; "*"
// marks an interval that excludes 0. Fewer than two pairs: "-".
std::string PairedCell(const std::vector<double>& d) {
  const size_t n = d.size();
  if (n < 2) return "-";
  double mean = 0;
  for (double v : d) mean += v;
  mean /= static_cast<double>(n);
  double ss = 0;
  for (double v : d) ss += (v - mean) * (v - mean);
  const double sd = std::sqrt(ss / static_cast<double>(n - 1));
  const double half =
      StudentT95(static_cast<int64_t>(n) - 1) * sd / std::sqrt(static_cast<double>(n));
  return Fmt("%+.3f", mean) + " ± " + Fmt("%.3f", half) + (std::abs(mean) > half ? " *" : "");
}

// With two or more seeds: the paired differences b - a (same seed: same initialisation and data
// order) of the tail loss at each length, then of the changes from 1x.
void AddSignificanceTable(const StudyPreset& p, const std::vector<StudyRecord>& per_seed,
                          std::vector<Table>& tables) {
  std::map<uint64_t, std::vector<StudyRecord>> by_seed;
  for (const StudyRecord& r : per_seed) by_seed[r.seed].push_back(r);
  if (by_seed.size() < 2) return;
  const std::vector<int64_t> lengths = Lengths(p);
  Table t{"Paired differences over " + std::to_string(by_seed.size()) +
              " seeds (b - a, same seed; mean ± 95% CI, Student's t; * = the interval excludes "
              "0): tail loss, then its change from 1x",
          {"b - a"},
          {}};
  for (int64_t c : lengths) t.header.push_back(std::to_string(c));
  for (size_t i = 1; i < lengths.size(); ++i) {
    t.header.push_back("d" + std::to_string(lengths[i] / p.train.seq_len) + "x");
  }
  for (const Comparison& cmp : Comparisons(p, per_seed)) {
    // diffs[i]: per-seed b - a at lengths[i]; deltas[i]: per-seed change of (b - a) from 1x.
    std::vector<std::vector<double>> diffs(lengths.size()), deltas(lengths.size());
    for (const auto& [seed, recs] : by_seed) {
      std::vector<double> d(lengths.size(), kNaN);
      for (size_t i = 0; i < lengths.size(); ++i) {
        const StudyRecord* a = cmp.a(recs, lengths[i]);
        const StudyRecord* b = cmp.b(recs, lengths[i]);
        if (a && b) d[i] = b->tail_loss - a->tail_loss;
      }
      for (size_t i = 0; i < lengths.size(); ++i) {
        if (std::isfinite(d[i])) diffs[i].push_back(d[i]);
        if (i > 0 && std::isfinite(d[i]) && std::isfinite(d[0])) deltas[i].push_back(d[i] - d[0]);
      }
    }
    std::vector<std::string> row = {cmp.label};
    for (const auto& d : diffs) row.push_back(PairedCell(d));
    for (size_t i = 1; i < lengths.size(); ++i) row.push_back(PairedCell(deltas[i]));
    t.rows.push_back(row);
  }
  if (!t.rows.empty()) tables.push_back(t);
}

std::string Thousands(int64_t v) {
  std::string digits = std::to_string(v), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}

// The fine-tuning methods at the target length (after LongLoRA Table 2): tail loss after each
// number of steps, the trainable parameters (and their share of the model's), the AdamW state
// and the wall time of the fine-tune to its last step.
void AddMethodTable(const StudyPreset& p, const std::vector<StudyRecord>& rec,
                    std::vector<Table>& tables) {
  if (p.methods.empty() || p.finetune_steps.empty()) return;
  const int64_t L = p.train.seq_len, target = p.extension_factor * L;
  const int64_t last = p.finetune_steps.back();
  Table t;
  t.title = "Fine-tuning methods at " + std::to_string(target) +
            " (s = " + std::to_string(p.extension_factor) +
            "; after LongLoRA Table 2): tail loss at " + std::to_string(target) +
            " after each number of steps and at L = " + std::to_string(L) + " after " +
            std::to_string(last) +
            "; trainable parameters (share of the model's), AdamW state (m and v, float32), "
            "wall time of the fine-tune to step " +
            std::to_string(last) + " (training and evaluation)";
  t.header = {"scaling", "method", "trainable", "AdamW state"};
  for (int64_t k : p.finetune_steps) t.header.push_back(std::to_string(k) + " steps");
  t.header.push_back("at " + std::to_string(L));
  t.header.push_back("wall (s)");
  for (const std::string& sc : p.method_scalings) {
    const StudyRecord* full = Find(rec, "rope", sc, last, target, "full");
    for (const std::string& m : p.methods) {
      const StudyRecord* end = Find(rec, "rope", sc, last, target, m);
      std::vector<std::string> row = {ScalingLabel(sc), MethodLabel(m)};
      if (end && end->trainable_parameters > 0) {
        std::string share;
        if (full && full->trainable_parameters > 0) {
          share = " (" +
                  Fmt("%.1f", 100.0 * static_cast<double>(end->trainable_parameters) /
                                  static_cast<double>(full->trainable_parameters)) +
                  "%)";
        }
        row.push_back(Thousands(end->trainable_parameters) + share);
        row.push_back(Fmt("%.1f", static_cast<double>(end->optimizer_bytes) / 1024.0) + " KiB");
      } else {
        row.insert(row.end(), {"-", "-"});
      }
      for (int64_t k : p.finetune_steps)
        row.push_back(Cell(Find(rec, "rope", sc, k, target, m), true));
      row.push_back(Cell(Find(rec, "rope", sc, last, L, m), true));
      row.push_back(end && end->trainable_parameters > 0 ? Fmt("%.1f", end->seconds) : "-");
      t.rows.push_back(row);
    }
  }
  tables.push_back(t);
}

// The tables of the per-seed records `per_seed` (aggregated over seeds where there are several).
std::vector<Table> BuildTables(const StudyPreset& p, const std::vector<StudyRecord>& per_seed) {
  const std::vector<StudyRecord> rec = AggregateSeeds(per_seed);
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
    AddMethodTable(p, rec, tables);
  }
  AddExperimentTables(p, rec, tables);
  AddSignificanceTable(p, per_seed, tables);
  return tables;
}

}  // namespace

std::string MarkdownTables(const StudyPreset& preset, const std::vector<StudyRecord>& records) {
  std::string s;
  for (const Table& t : BuildTables(preset, records)) {
    s += "\n" + t.title + ":\n\n|";
    for (const std::string& h : t.header) s += " " + h + " |";
    s += "\n|";
    for (size_t c = 0; c < t.header.size(); ++c) s += c == 0 ? " --- |" : " ---: |";
    s += "\n";
    for (const auto& row : t.rows) {
      s += "|";
      for (const std::string& v : row) s += " " + v + " |";
      s += "\n";
    }
  }
  return s;
}

std::string SummaryTables(const StudyPreset& preset, const std::vector<StudyRecord>& records) {
  std::string s;
  for (const Table& t : BuildTables(preset, records)) {
    std::vector<std::string> header = t.header;
    s += "\n" + t.title + "\n" + TextTable(header, t.rows);
  }
  return s;
}

namespace {

// What every section of the report page shares: the preset, the records, the evaluation lengths
// and the page body the plots are appended to.
struct ReportPage {
  const StudyPreset& p;
  const StudyResult& result;
  const std::vector<StudyRecord> rec;  // one per configuration: means over the seeds
  std::vector<int64_t> lengths;
  int64_t L;
  std::vector<double> xt;                            // x ticks at the evaluation lengths
  std::vector<std::pair<double, std::string>> at_L;  // a marker at the training length
  double cap;                                        // y cap for exploding curves
  std::vector<std::string> plot_ids;
  std::ostringstream body;

  ReportPage(const StudyPreset& preset, const StudyResult& r)
      : p(preset),
        result(r),
        rec(AggregateSeeds(r.records)),
        lengths(Lengths(preset)),
        L(preset.train.seq_len) {
    xt.assign(lengths.begin(), lengths.end());
    at_L = {{static_cast<double>(L), "L"}};
    double base_max = 0;  // largest 1x loss; used to clip exploding curves
    for (const std::string& e : p.encodings) {
      if (const StudyRecord* rr = Find(rec, KindName(e), "none", 0, L)) {
        base_max = std::max(base_max, std::max(rr->tail_loss, rr->window_loss));
      }
    }
    cap = base_max > 0 ? base_max + 2.5 : kNaN;
  }

  static std::string KindName(const std::string& e) {
    return std::string(PositionEncodingKindName(ParsePositionEncodingKind(e)));
  }

  // A plot over the evaluation lengths (log2 x axis, marker at L).
  PlotSpec LengthPlot(std::string id, std::string title) const {
    PlotSpec spec;
    spec.id = std::move(id);
    spec.title = std::move(title);
    spec.xlabel = "evaluation length (tokens, log scale)";
    spec.ylabel = "loss (nats / byte)";
    spec.log2x = true;
    spec.xticks = xt;
    spec.ycap = cap;
    spec.vlines = at_L;
    return spec;
  }

  void AddPlot(const PlotSpec& spec, const std::vector<Series>& series,
               const std::string& caption) {
    plot_ids.push_back(spec.id);
    bool bands = false;
    for (const Series& s : series) {
      for (double w : s.spread) bands = bands || w > 0;
    }
    const std::string note = bands ? " Shaded: mean ± one standard deviation over the seeds." : "";
    body << "<figure>\n"
         << SvgPlot(spec, series) << "<figcaption>" << HtmlEscape(caption + note)
         << "</figcaption>\n</figure>\n";
  }
};

// Adds r's loss at x to s, with its standard deviation over seeds as the band's half-width (0
// for a single seed: no band).
void AddPoint(Series& s, double x, const StudyRecord& r, bool tail = true) {
  s.points.emplace_back(x, tail ? r.tail_loss : r.window_loss);
  s.spread.push_back(tail ? r.tail_loss_sd : r.window_loss_sd);
}

// One series per training curve whose name starts with `prefix` ("pretrain-", "finetune-"),
// labelled from the rest of the name, with the points of `member` (loss or val_loss).
std::vector<Series> CurveSeries(const std::vector<TrainCurve>& curves, const std::string& prefix,
                                std::string (*label)(const std::string&),
                                std::vector<std::pair<int64_t, double>> TrainCurve::*member) {
  std::vector<Series> series;
  for (const TrainCurve& c : curves) {
    if (c.name.rfind(prefix, 0) != 0) continue;
    Series s{label(c.name.substr(prefix.size())), {}, false};
    for (auto [step, loss] : c.*member) s.points.emplace_back(static_cast<double>(step), loss);
    series.push_back(s);
  }
  return series;
}

void LengthPlots(ReportPage& page) {
  const StudyPreset& p = page.p;
  page.body << "<h2>Length extrapolation: trained at L = " << page.L << "</h2>\n";
  for (bool tail : {true, false}) {
    const PlotSpec spec = page.LengthPlot(
        tail ? "plot-tail-loss" : "plot-window-loss",
        tail ? "Tail loss vs evaluation length" : "Non-overlapping window loss vs length");
    std::vector<Series> series;
    for (const std::string& e : p.encodings) {
      Series s{EncodingLabel(e), {}, false};
      for (int64_t c : page.lengths) {
        if (const StudyRecord* r = Find(page.rec, ReportPage::KindName(e), "none", 0, c)) {
          AddPoint(s, static_cast<double>(c), *r, tail);
        }
      }
      series.push_back(s);
    }
    page.AddPlot(spec, series,
                 tail ? "Primary metric: the same last " + std::to_string(p.tail) +
                            " target bytes of " + std::to_string(p.tail_windows) +
                            " fixed windows, scored with growing context. Flat = extrapolates; "
                            "rising = fails."
                      : "ALiBi-paper style: mean over all targets of non-overlapping windows. "
                        "Longer windows have fewer short-context targets (the early-token curse), "
                        "so healthy methods improve here.");
  }
}

// Per-position curves at the largest length.
void PositionLossPlot(ReportPage& page) {
  const StudyPreset& p = page.p;
  const int64_t cmax = page.lengths.back();
  PlotSpec spec;
  spec.id = "plot-position-loss";
  spec.title = "Per-position loss at length " + std::to_string(cmax);
  spec.xlabel = "position in window (bucket centre)";
  spec.ylabel = "loss (nats / byte)";
  spec.ycap = page.cap;
  for (int64_t m : p.eval_multipliers) {
    spec.vlines.emplace_back(static_cast<double>(m * page.L), std::to_string(m) + "L");
  }
  std::vector<Series> series;
  for (const std::string& e : p.encodings) {
    Series s{EncodingLabel(e), {}, false};
    if (const StudyRecord* r = Find(page.rec, ReportPage::KindName(e), "none", 0, cmax)) {
      for (size_t b = 0; b < r->position_loss.size(); ++b) {
        const double centre = (static_cast<double>(b) + 0.5) * static_cast<double>(r->bucket_size);
        s.points.emplace_back(centre, r->position_loss[b]);
      }
    }
    series.push_back(s);
  }
  page.AddPlot(spec, series,
               "Mean loss by position over non-overlapping windows of " + std::to_string(cmax) +
                   " tokens (buckets of " + std::to_string(p.bucket_size) +
                   "). Beyond L a method that cannot extrapolate rises.");
}

// RoPE scalings without fine-tuning.
void ExtensionPlot(ReportPage& page) {
  const StudyPreset& p = page.p;
  const PlotSpec spec =
      page.LengthPlot("plot-extension", "RoPE scalings without fine-tuning: tail loss");
  std::vector<Series> series;
  std::vector<std::string> scalings = {"none"};
  scalings.insert(scalings.end(), p.scalings.begin(), p.scalings.end());
  for (const std::string& sc : scalings) {
    Series s{ScalingLabel(sc), {}, false};
    for (int64_t c : page.lengths) {
      if (const StudyRecord* r = Find(page.rec, "rope", sc, 0, c)) {
        AddPoint(s, static_cast<double>(c), *r);
      }
    }
    series.push_back(s);
  }
  page.AddPlot(spec, series,
               "The RoPE model evaluated with each scaling, factor s = evaluation length / L. "
               "Dynamic NTK recomputes s = (window length) / L per forward pass; every window "
               "here has exactly the evaluation length, so it coincides with NTK-aware at the "
               "matched s (they differ in incremental decoding).");
}

// Tail loss at the target length after each number of fine-tuning steps.
void FinetunePlot(ReportPage& page) {
  const StudyPreset& p = page.p;
  const int64_t target = p.extension_factor * page.L;
  PlotSpec spec;
  spec.id = "plot-finetune";
  spec.title =
      "Fine-tuning at " + std::to_string(target) + ": tail loss at " + std::to_string(target);
  spec.xlabel = "fine-tuning steps";
  spec.ylabel = "loss (nats / byte)";
  spec.ycap = page.cap;
  std::vector<Series> series;
  for (const std::string& sc : p.finetune_scalings) {
    Series s{ScalingLabel(sc) + (sc == "none" ? " (direct)" : ""), {}, false};
    if (const StudyRecord* r = FinetuneStart(page.rec, sc, target)) {
      AddPoint(s, 0.0, *r);
    }
    for (int64_t k : p.finetune_steps) {
      if (const StudyRecord* r = Find(page.rec, "rope", sc, k, target)) {
        AddPoint(s, static_cast<double>(k), *r);
      }
    }
    series.push_back(s);
  }
  if (const StudyRecord* r = Find(page.rec, "rope", "none", 0, page.L)) {
    Series s{"RoPE at L (reference)", {}, true};
    s.points = {{0.0, r->tail_loss}, {static_cast<double>(p.finetune_steps.back()), r->tail_loss}};
    series.push_back(s);
  }
  page.AddPlot(spec, series,
               "PI paper Table 3 in miniature: the tail loss at the target length after each "
               "number of fine-tuning steps (step 0: no fine-tuning). The dashed line is the base "
               "model at its training length.");
}

// The method comparison: tail loss at the target length after each number of steps, one series
// per scaling and method, and the training losses.
void MethodsSection(ReportPage& page) {
  const StudyPreset& p = page.p;
  if (p.methods.empty() || !Find(page.rec, "rope", "none", 0, page.L)) return;
  const int64_t target = p.extension_factor * page.L;
  page.body << "<h2>Fine-tuning methods at " << target << "</h2>\n";
  PlotSpec spec;
  spec.id = "plot-methods";
  spec.title = "Fine-tuning methods: tail loss at " + std::to_string(target);
  spec.xlabel = "fine-tuning steps";
  spec.ylabel = "loss (nats / byte)";
  spec.ycap = page.cap;
  std::vector<Series> series;
  for (const std::string& sc : p.method_scalings) {
    for (const std::string& m : p.methods) {
      Series s{ScalingLabel(sc) + ", " + MethodLabel(m), {}, false};
      if (const StudyRecord* r = FinetuneStart(page.rec, sc, target)) {
        AddPoint(s, 0.0, *r);
      }
      for (int64_t k : p.finetune_steps) {
        if (const StudyRecord* r = Find(page.rec, "rope", sc, k, target, m)) {
          AddPoint(s, static_cast<double>(k), *r);
        }
      }
      series.push_back(s);
    }
  }
  page.AddPlot(spec, series,
               "After LongLoRA (Chen et al. 2023) Table 2: full fine-tuning against LoRA on the "
               "query and value projections, LoRA on every projection, LoRA+ (every projection, "
               "embeddings and norms trainable) and QLoRA (every projection, NF4 base), from the "
               "same pretrained model with the same data. Step 0: the scaled model before "
               "fine-tuning.");
  PlotSpec train;
  train.id = "plot-methods-train";
  train.title = "Fine-tuning methods: training loss";
  train.xlabel = "step";
  train.ylabel = "training loss (nats / byte)";
  std::vector<Series> curves;
  for (const std::string& sc : p.method_scalings) {
    for (const std::string& m : p.methods) {
      const std::string name = m == "full" ? "finetune-" + sc : "methods-" + sc + "-" + m;
      for (const TrainCurve& c : page.result.curves) {
        if (c.name != name) continue;
        Series s{ScalingLabel(sc) + ", " + MethodLabel(m), {}, false};
        for (auto [step, loss] : c.loss) s.points.emplace_back(static_cast<double>(step), loss);
        curves.push_back(s);
      }
    }
  }
  page.AddPlot(train, curves, "Training loss per step at " + std::to_string(target) + ".");
}

void ExtensionSection(ReportPage& page) {
  if (!Find(page.rec, "rope", "none", 0, page.L)) return;
  page.body << "<h2>RoPE context extension</h2>\n";
  ExtensionPlot(page);
  FinetunePlot(page);
  PlotSpec spec;
  spec.id = "plot-finetune-train";
  spec.title = "Fine-tuning training loss";
  spec.xlabel = "step";
  spec.ylabel = "training loss (nats / byte)";
  page.AddPlot(spec, CurveSeries(page.result.curves, "finetune-", ScalingLabel, &TrainCurve::loss),
               "Training loss per step at the extended length.");
}

void PretrainSection(ReportPage& page) {
  page.body << "<h2>Training</h2>\n";
  PlotSpec spec;
  spec.id = "plot-pretrain";
  spec.title = "Pre-training: validation loss at L";
  spec.xlabel = "step";
  spec.ylabel = "loss (nats / byte)";
  page.AddPlot(spec,
               CurveSeries(page.result.curves, "pretrain-", EncodingLabel, &TrainCurve::val_loss),
               "Held-out loss at the training length during pre-training.");
}

// Moving mean of `curve` over `window` consecutive distances, plotted at the window's centre.
Series MovingMean(const std::string& name, const std::vector<double>& curve, int64_t window) {
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
  return ms;
}

// RoFormer long-term decay from the model's inverse frequencies: the raw curve (as in the
// paper's Fig. 2), then the scaled frequencies as moving means (the raw curves oscillate).
void DecaySection(ReportPage& page, const ModelConfig& rope_model) {
  const StudyPreset& p = page.p;
  page.body << "<h2>RoPE long-term decay</h2>\n";
  const RopeParams& base = rope_model.position_encoding.rope;
  std::vector<std::pair<std::string, double>> variants = {{"none", 1.0}};
  for (const char* sc : {"linear", "ntk", "yarn", "llama3"}) {
    variants.emplace_back(sc, static_cast<double>(p.extension_factor));
  }
  const int64_t window = std::max<int64_t>(4, page.L / 4);
  std::vector<Series> raw, smooth;
  for (const auto& [sc, s] : variants) {
    const RopeFrequencies f = ComputeFrequencies(ScaledRope(base, sc, s, page.L), Numerics::kExact);
    const std::vector<double> curve = RopeDecayCurve(f.inv_freq, page.lengths.back());
    const std::string name = ScalingLabel(sc) + (sc == "none" ? "" : " s=" + Fmt("%.0f", s));
    if (sc == "none") {
      Series ser{name, {}, false};
      for (size_t r = 0; r < curve.size(); ++r) {
        ser.points.emplace_back(static_cast<double>(r), curve[r]);
      }
      raw.push_back(ser);
    }
    smooth.push_back(MovingMean(name, curve, window));
  }
  PlotSpec spec;
  spec.id = "plot-decay";
  spec.title =
      "RoFormer decay bound of the model's RoPE (R = " + std::to_string(base.rotary_dim) + ")";
  spec.xlabel = "relative distance r";
  spec.ylabel = "(1/N) sum_j |S_j(r)|";
  for (int64_t m : p.eval_multipliers) {
    spec.vlines.emplace_back(static_cast<double>(m * page.L), std::to_string(m) + "L");
  }
  page.AddPlot(spec, raw,
               "Su et al. sec. 3.4.3: the relative upper bound (1/N) sum_{j=1..N} |sum_{i<j} "
               "exp(i r theta_i)| computed from the inverse frequencies the model actually uses "
               "(base " +
                   Fmt("%g", base.base) + ", N = " + std::to_string(base.rotary_dim / 2) +
                   " pairs). Oscillating, decaying on average: its value at r = 0 is (N + 1) / 2.");
  PlotSpec sspec = spec;
  sspec.id = "plot-decay-scaled";
  sspec.title =
      "Decay bound of the scaled frequencies (moving mean over " + std::to_string(window) + ")";
  page.AddPlot(sspec, smooth,
               "The same bound for the inverse frequencies of each scaling at s = " +
                   std::to_string(p.extension_factor) + ", averaged over windows of " +
                   std::to_string(window) +
                   " distances. Interpolation stretches the curve: the decay reached at distance "
                   "r by plain RoPE is reached later (YaRN's attention factor is not part of the "
                   "bound).");
}

void PageHead(std::ostringstream& html) {
  html << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
       << "<title>ropekit length-extrapolation study</title>\n<style>\n"
       << "body{font-family:sans-serif;max-width:1100px;margin:20px auto;padding:0 16px;"
       << "color:#222}\n"
       << "table{border-collapse:collapse;margin:8px 0 20px}\n"
       << "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}\n"
       << "td.l{text-align:left}\nth{background:#f0f0f0}\n"
       << "figure{margin:12px 0 24px}\nfigcaption{font-size:13px;color:#444;max-width:720px}\n"
       << "</style>\n</head>\n<body>\n";
}

// The paragraphs under the title: preset, corpus, run counts and the encodings' settings.
void Introduction(const StudyPreset& p, const StudyResult& result,
                  const std::string& corpus_description, std::ostringstream& html) {
  html << "<h1>ropekit length-extrapolation study</h1>\n";
  html << "<p>Preset <b>" << HtmlEscape(p.name) << "</b>: " << HtmlEscape(p.description)
       << ". Corpus: " << HtmlEscape(corpus_description)
       << ". Byte-level tokens; losses in nats per byte. " << result.trained_units.size()
       << " runs computed now, " << result.reused_units.size() << " reused from earlier runs; "
       << "compute time of all runs " << Fmt("%.0f", result.compute_seconds) << " s, this "
       << "invocation " << Fmt("%.0f", result.seconds) << " s.</p>\n";
  std::set<uint64_t> seeds;
  for (const StudyRecord& r : result.records) seeds.insert(r.seed);
  if (seeds.size() > 1) {
    html << "<p>Every configuration ran with " << seeds.size()
         << " seeds (weight initialisation and data order vary together). Tables show the mean "
            "&plusmn; the sample standard deviation over the seeds, plots the means; "
            "results.json also holds each seed's record and the 95% confidence interval of "
            "each mean (Student's t).</p>\n";
  }
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
}

}  // namespace

std::string ReportHtml(const StudyPreset& p, const StudyResult& result,
                       const ModelConfig& rope_model, const std::string& corpus_description) {
  ReportPage page(p, result);
  LengthPlots(page);
  PositionLossPlot(page);
  ExtensionSection(page);
  MethodsSection(page);
  PretrainSection(page);
  DecaySection(page, rope_model);

  std::ostringstream html;
  PageHead(html);
  Introduction(p, result, corpus_description, html);
  html << "<h2>Tables</h2>\n";
  for (const Table& t : BuildTables(p, result.records)) {
    html << "<h3>" << HtmlEscape(t.title) << "</h3>\n" << HtmlTable(t.header, t.rows);
  }
  html << page.body.str();
  html << "<p>Plots: ";
  for (size_t i = 0; i < page.plot_ids.size(); ++i) html << (i ? ", " : "") << page.plot_ids[i];
  html << ".</p>\n</body>\n</html>\n";
  return html.str();
}

}  // namespace ropekit::study
