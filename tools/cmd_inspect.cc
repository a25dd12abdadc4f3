// `ropekit inspect CONFIG.json`: what RoPE a Hugging Face config asks for, pair by pair.
//
// Dimension legend: D = head_dim, R = rotary_dim, N = R / 2 pairs.
// For each pair i: the inverse frequency w_i, its wavelength 2 pi / w_i in tokens, the ratio to
// the unscaled frequency base^(-2i/R) and what the scaling did (kept / interpolated / blended /
// rescaled / rebased). --json prints one object with full-precision (round-trip) numbers.
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numbers>
#include <string>
#include <vector>

#include "command.h"
#include "ropekit/hf_config.h"
#include "ropekit/rope.h"

namespace ropekit::cli {
namespace {

struct InspectOptions {
  std::string config;
  int64_t seq_len = 0;
  bool json = false;
  std::string numerics = "exact";
  std::string layer_type;
};

// Classifies pair i from its ratio to the unscaled frequency. `tol` is a few ulps of the numerics.
std::string Classify(const RopeParams& p, double ratio, double tol) {
  if (std::fabs(ratio - 1) <= tol) return "kept";
  switch (p.type) {
    case RopeType::kLinear:
      return "interpolated";
    case RopeType::kDynamic:
    case RopeType::kNtk:
      return "rebased";
    case RopeType::kLongRope:
      return "rescaled";
    case RopeType::kYarn:
    case RopeType::kLlama3:
      if (std::fabs(ratio * p.factor - 1) <= tol * p.factor) return "interpolated";
      return p.type == RopeType::kYarn ? "blended" : "smoothed";
    default:
      return "changed";
  }
}

std::string Fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

// Runs of equal labels, e.g. "0-28 kept, 29-34 smoothed, 35-63 interpolated".
std::string RunsSummary(const std::vector<std::string>& labels) {
  const int n = static_cast<int>(labels.size());
  std::string s;
  for (int i = 0; i < n;) {
    int j = i;
    while (j + 1 < n && labels[j + 1] == labels[i]) ++j;
    s += (s.empty() ? "" : ", ") + std::to_string(i) + (j > i ? "-" + std::to_string(j) : "") +
         " " + labels[i];
    i = j + 1;
  }
  return s;
}

// Name of position axis a: temporal/height/width for the three axes of M-RoPE.
std::string AxisName(int a, int num_axes) {
  if (num_axes == 3) return a == 0 ? "temporal" : a == 1 ? "height" : "width";
  return "axis " + std::to_string(a);
}

// Runs of pairs per axis, e.g. "0-15 temporal, 16-39 height, 40-63 width"; interleaved rules are
// summarised by their period.
std::string AxesSummary(const RopeAxes& axes, const std::vector<uint8_t>& pair_axis) {
  const int num = axes.num_axes();
  const int n = static_cast<int>(pair_axis.size());
  if (axes.interleaved) {
    int periodic = n;
    while (periodic > 0 && pair_axis[periodic - 1] == 0) --periodic;
    std::string s = "pairs 0-" + std::to_string(periodic - 1) + " cycle ";
    for (int a = 0; a < num; ++a) s += (a ? "/" : "") + AxisName(a, num);
    if (periodic < n) {
      s += " (axis a >= 1 up to pair " + std::to_string(num) + " s_a - 1), pairs " +
           std::to_string(periodic) + "-" + std::to_string(n - 1) + " " + AxisName(0, num);
    }
    return s;
  }
  std::vector<std::string> names(n);
  for (int i = 0; i < n; ++i) names[i] = AxisName(pair_axis[i], num);
  return RunsSummary(names);
}

std::string ScalingSummary(const RopeParams& p) {
  const auto g = [](double v) { return Fmt("%.17g", v); };
  const std::string omp =
      std::to_string(p.original_max_position_embeddings > 0 ? p.original_max_position_embeddings
                                                            : p.max_position_embeddings);
  switch (p.type) {
    case RopeType::kDefault:
      return "no scaling";
    case RopeType::kLinear:
      return "position interpolation, factor " + g(p.factor);
    case RopeType::kDynamic:
      return "dynamic NTK, factor " + g(p.factor) + " beyond max_position_embeddings " +
             std::to_string(p.max_position_embeddings);
    case RopeType::kNtk:
      return "NTK-aware base scaling, alpha " + g(p.ntk_alpha);
    case RopeType::kYarn: {
      std::string s = "YaRN, factor " + g(p.factor) + ", original_max_position_embeddings " + omp +
                      ", beta_fast " + g(p.beta_fast) + ", beta_slow " + g(p.beta_slow);
      if (p.mscale != 0) s += ", mscale " + g(p.mscale);
      if (p.mscale_all_dim != 0) s += ", mscale_all_dim " + g(p.mscale_all_dim);
      if (!p.truncate) s += ", truncate false";
      return s;
    }
    case RopeType::kLongRope:
      return "LongRoPE, " +
             (p.factor != 0 ? "factor " + g(p.factor) : std::string("factor MPE/OMP")) +
             ", original_max_position_embeddings " + omp;
    case RopeType::kLlama3:
      return "Llama 3 bands, factor " + g(p.factor) + ", low_freq_factor " + g(p.low_freq_factor) +
             ", high_freq_factor " + g(p.high_freq_factor) + ", original_max_position_embeddings " +
             omp;
    default:
      return "";
  }
}

// What inspect reports: the config, the scaled and unscaled frequencies and, per pair, its
// wavelength, its ratio to the unscaled frequency, how the scaling treated it and its axis.
struct PairReport {
  HfRopeConfig config;
  Numerics numerics;
  RopeFrequencies f;
  int n = 0;  // pairs
  int num_axes = 1;
  std::vector<uint8_t> pair_axis;
  std::vector<double> wavelength, ratio;
  std::vector<std::string> scaling;
  std::string bands;   // runs of equally treated pairs
  std::string detail;  // the effective base (dynamic, ntk) or the factor list (longrope)
};

// Dynamic / NTK: the base in effect; LongRoPE: which factor list the length selects.
std::string ScalingDetail(const RopeParams& p, const RopeFrequencies& f, int n, int64_t seq_len) {
  if (p.type == RopeType::kDynamic || p.type == RopeType::kNtk) {
    // w_1 = base'^(-2/R), so the base in effect is w_1^(-R/2).
    const double effective = n > 1 ? std::pow(f.inv_freq[1], -p.rotary_dim / 2.0) : p.base;
    return Fmt("%.10g", effective);
  }
  if (p.type == RopeType::kLongRope) {
    const int64_t omp = p.original_max_position_embeddings > 0 ? p.original_max_position_embeddings
                                                               : p.max_position_embeddings;
    return seq_len > omp ? "long_factor (seq_len > original_max_position_embeddings " +
                               std::to_string(omp) + ")"
                         : "short_factor (seq_len <= original_max_position_embeddings " +
                               std::to_string(omp) + " or not given)";
  }
  return "";
}

PairReport AnalyzePairs(const InspectOptions& o) {
  PairReport r;
  r.numerics = ParseNumerics(o.numerics);
  if (o.seq_len < 0) throw Error("--seq-len must be >= 0 (got " + std::to_string(o.seq_len) + ")");
  r.config = LoadHfConfig(o.config, o.layer_type);
  const RopeParams& p = r.config.params;
  r.f = ComputeFrequencies(p, r.numerics, o.seq_len);
  RopeParams unscaled_params = p;
  unscaled_params.type = RopeType::kDefault;
  const RopeFrequencies unscaled = ComputeFrequencies(unscaled_params, r.numerics);
  const int n = r.n = p.rotary_dim / 2;
  const double tol = r.numerics == Numerics::kHf ? 4 * 5.96e-8 : 8 * 1.11e-16;
  r.pair_axis = r.config.axes.PairAxes(n);
  r.num_axes = r.config.axes.num_axes();
  r.wavelength.resize(n);
  r.ratio.resize(n);
  r.scaling.resize(n);
  for (int i = 0; i < n; ++i) {
    r.wavelength[i] = 2 * std::numbers::pi / r.f.inv_freq[i];
    r.ratio[i] = r.f.inv_freq[i] / unscaled.inv_freq[i];
    r.scaling[i] = Classify(p, r.ratio[i], tol);
  }
  r.bands = RunsSummary(r.scaling);
  r.detail = ScalingDetail(p, r.f, n, o.seq_len);
  return r;
}

void PrintJson(const InspectOptions& o, const PairReport& r) {
  const RopeParams& p = r.config.params;
  nlohmann::json j;
  j["config"] = o.config;
  j["model_type"] = r.config.model_type;
  j["rope_type"] = std::string(RopeTypeName(p.type));
  j["numerics"] = std::string(NumericsName(r.numerics));
  j["layout"] = std::string(LayoutName(r.config.layout));
  j["base"] = p.base;
  j["head_dim"] = p.head_dim;
  j["rotary_dim"] = p.rotary_dim;
  j["num_pairs"] = r.n;
  j["max_position_embeddings"] = p.max_position_embeddings;
  j["original_max_position_embeddings"] = p.original_max_position_embeddings > 0
                                              ? p.original_max_position_embeddings
                                              : p.max_position_embeddings;
  j["seq_len"] = o.seq_len;
  j["factor"] = p.factor;
  j["attention_factor"] = r.f.attention_factor;
  j["num_attention_heads"] = r.config.num_attention_heads;
  j["num_key_value_heads"] = r.config.num_key_value_heads;
  j["inv_freq"] = r.f.inv_freq;
  j["wavelength"] = r.wavelength;
  j["ratio_to_unscaled"] = r.ratio;
  j["scaling"] = r.scaling;
  j["bands"] = r.bands;
  j["position_axes"] = r.num_axes;
  if (r.config.axes.multimodal()) {
    j["mrope_section"] = r.config.axes.sections;
    j["mrope_interleaved"] = r.config.axes.interleaved;
    std::vector<int> axis_of_pair(r.pair_axis.begin(), r.pair_axis.end());
    j["pair_axis"] = axis_of_pair;
  }
  if (p.type == RopeType::kDynamic || p.type == RopeType::kNtk) {
    j["effective_base"] = r.n > 1 ? std::pow(r.f.inv_freq[1], -p.rotary_dim / 2.0) : p.base;
  }
  if (p.type == RopeType::kLongRope) j["factor_list"] = r.detail.substr(0, r.detail.find(' '));
  // nlohmann prints doubles in the shortest form that reads back to the same double.
  std::printf("%s\n", j.dump(2).c_str());
}

// The text report's header: one "name: value" line per property.
void PrintTextHeader(const InspectOptions& o, const PairReport& r) {
  const RopeParams& p = r.config.params;
  const int n = r.n;
  std::printf("config:                   %s\n", o.config.c_str());
  std::printf("model_type:               %s\n",
              r.config.model_type.empty() ? "(absent)" : r.config.model_type.c_str());
  std::printf("rope_type:                %s (%s)\n", std::string(RopeTypeName(p.type)).c_str(),
              ScalingSummary(p).c_str());
  std::printf("base (rope_theta):        %.17g\n", p.base);
  std::printf("head_dim:                 %d\n", p.head_dim);
  std::printf("rotary_dim:               %d (%d pairs", p.rotary_dim, n);
  if (p.rotary_dim < p.head_dim) {
    std::printf("; channels %d..%d pass through unchanged", p.rotary_dim, p.head_dim - 1);
  }
  std::printf(")\n");
  if (r.config.layout == Layout::kHalfSplit) {
    std::printf("layout:                   neox (pair i = channels i and i + %d)\n", n);
  } else {
    std::printf("layout:                   gptj (pair i = channels 2i and 2i + 1)\n");
  }
  std::printf("max_position_embeddings:  %lld\n",
              static_cast<long long>(p.max_position_embeddings));
  if (o.seq_len > 0) {
    std::printf("seq_len:                  %lld\n", static_cast<long long>(o.seq_len));
  }
  std::printf("numerics:                 %s\n", std::string(NumericsName(r.numerics)).c_str());
  std::printf("attention_factor (A):     %.17g (cos and sin are multiplied by A; logits by A^2)\n",
              r.f.attention_factor);
  std::printf("pairs:                    %s\n", r.bands.c_str());
  if (r.config.axes.multimodal()) {
    std::printf("position axes:            %d, M-RoPE %s (positions [%d, T])\n", r.num_axes,
                r.config.axes.Describe().c_str(), r.num_axes);
    std::printf("pair axes:                %s\n", AxesSummary(r.config.axes, r.pair_axis).c_str());
  } else {
    std::printf("position axes:            1 (positions [T])\n");
  }
  if (p.type == RopeType::kDynamic || p.type == RopeType::kNtk) {
    std::printf("effective base:           %s\n", r.detail.c_str());
  } else if (p.type == RopeType::kLongRope) {
    std::printf("factor list:              %s\n", r.detail.c_str());
  }
}

// The text report's table: one row per pair.
void PrintPairTable(const PairReport& r) {
  const bool multi = r.config.axes.multimodal();
  std::printf("\n%5s  %-24s  %-22s  %-22s  %-12s%s\n", "pair", "inv_freq", "wavelength (tokens)",
              "ratio to unscaled", "scaling", multi ? "  axis" : "");
  for (int i = 0; i < r.n; ++i) {
    std::printf("%5d  %-24.17g  %-22.10g  %-22.10g  %-12s%s\n", i, r.f.inv_freq[i], r.wavelength[i],
                r.ratio[i], r.scaling[i].c_str(),
                multi ? ("  " + AxisName(r.pair_axis[i], r.num_axes)).c_str() : "");
  }
}

int RunInspect(const InspectOptions& o) {
  const PairReport r = AnalyzePairs(o);
  if (o.json) {
    PrintJson(o, r);
    return 0;
  }
  PrintTextHeader(o, r);
  PrintPairTable(r);
  return 0;
}

const CommandRegistration kInspect(
    "inspect", "Explain the RoPE frequencies a Hugging Face config.json asks for",
    [](CLI::App* sub) -> std::function<int()> {
      auto o = std::make_shared<InspectOptions>();
      sub->add_option("config", o->config, "path of config.json")->required();
      sub->add_option("--seq-len", o->seq_len,
                      "current sequence length (dynamic NTK, LongRoPE long/short switch); 0 = not "
                      "given");
      sub->add_flag("--json", o->json, "print one JSON object");
      sub->add_option("--numerics", o->numerics, "exact (default) or hf (transformers float32)");
      sub->add_option("--layer-type", o->layer_type,
                      "entry of a per-layer-type rope_parameters dict (default full_attention)");
      return [o] { return RunInspect(*o); };
    });

}  // namespace
}  // namespace ropekit::cli
