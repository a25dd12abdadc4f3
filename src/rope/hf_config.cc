// ropekit: Hugging Face config.json -> RopeParams.
//
// Dimension legend: D = head_dim, R = rotary_dim = int(D * partial_rotary_factor), N = R / 2.
//
// Follows transformers v5 (`rope_parameters`, `standardize_rope_params`) while accepting the
// older `rope_scaling` spelling:
//   * rope dict: `rope_parameters` (v5; may be nested per layer type, Gemma-3 style) else
//     `rope_scaling` (null = default). `type` is the legacy alias of `rope_type`; Phi-3 `su` (and
//     `yarn` carrying short/long factor lists) means longrope; Qwen2-VL `mrope` means default.
//   * rope_theta: inside the rope dict first (v5), then top level, then GPT-NeoX
//     `rotary_emb_base`; GPT-J/CodeGen hard-code 10000. When it is absent everywhere, the default
//     of the transformers config class is used only for model types whose default is known;
//     otherwise the config is rejected (a silently defaulted base is a classic long-context bug).
//   * head_dim if present and non-zero, else hidden_size // num_attention_heads (GPT-J aliases
//     n_embd / n_head; DeepSeek MLA rotates the qk_rope_head_dim slice; ChatGLM uses kv_channels).
//   * R = int(D * partial_rotary_factor) with a double product and truncation (GPT-NeoX
//     rotary_pct is the same field; GPT-J/CodeGen read rotary_dim; GLM defaults to 0.5).
//   * original_max_position_embeddings: a top-level value has priority (v5), then the rope dict's;
//     0 in RopeParams means "use max_position_embeddings".
// Every problem becomes ropekit::Error "<source>: <field> ...".
#include "ropekit/hf_config.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "ropekit/json_limits.h"

namespace ropekit {
namespace {

using Json = nlohmann::json;

// Files larger than this are not configs; reading them would only waste memory.
constexpr int64_t kMaxConfigBytes = 64 << 20;
// Upper bound for head_dim, hidden_size and head counts: far beyond any model.
constexpr int64_t kMaxDim = 1 << 20;

// transformers' config-class defaults for rope_theta, where known (`rope_theta` absent from the
// file means the class default applies).
const std::map<std::string, double>& KnownDefaultTheta() {
  static const auto* table = new std::map<std::string, double>{
      {"llama", 10000.0},    {"mistral", 10000.0}, {"mixtral", 1000000.0}, {"qwen2", 10000.0},
      {"phi", 10000.0},      {"phi3", 10000.0},    {"gemma", 10000.0},     {"gemma2", 10000.0},
      {"gpt_neox", 10000.0}, {"gptj", 10000.0},    {"codegen", 10000.0},   {"chatglm", 10000.0},
  };
  return *table;
}

std::string Describe(const Json& v) {
  std::string dumped = v.dump();
  if (dumped.size() > 40) dumped = dumped.substr(0, 37) + "...";
  return std::string(v.type_name()) + " " + dumped;
}

std::string Num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void Fail(const std::string& message) const {
    throw Error(source_ + ": " + message);
  }

  // A JSON number as double; null/absent -> nullopt.
  std::optional<double> OptNumber(const Json& obj, const std::string& key,
                                  const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::nullopt;
    if (!it->is_number()) Fail(path + " must be a number (got " + Describe(*it) + ")");
    const double v = it->get<double>();
    if (!std::isfinite(v)) Fail(path + " must be a finite number (got " + Num(v) + ")");
    return v;
  }

  // A JSON integer (an integral float such as 4096.0 is accepted) in [min, max].
  std::optional<int64_t> OptInt(const Json& obj, const std::string& key, const std::string& path,
                                int64_t min, int64_t max) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::nullopt;
    const std::string range =
        "an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
    if (it->is_number_integer()) {
      if (it->is_number_unsigned()) {
        const uint64_t u = it->get<uint64_t>();
        if (u > static_cast<uint64_t>(max) || static_cast<int64_t>(u) < min) {
          Fail(path + " must be " + range + " (got " + std::to_string(u) + ")");
        }
        return static_cast<int64_t>(u);
      }
      const int64_t v = it->get<int64_t>();
      if (v < min || v > max) Fail(path + " must be " + range + " (got " + std::to_string(v) + ")");
      return v;
    }
    if (it->is_number_float()) {
      const double d = it->get<double>();
      if (!std::isfinite(d) || d != std::floor(d) || d < static_cast<double>(min) ||
          d > static_cast<double>(max)) {
        Fail(path + " must be " + range + " (got " + Num(d) + ")");
      }
      return static_cast<int64_t>(d);
    }
    Fail(path + " must be " + range + " (got " + Describe(*it) + ")");
  }

  std::optional<std::string> OptString(const Json& obj, const std::string& key,
                                       const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::nullopt;
    if (!it->is_string()) Fail(path + " must be a string (got " + Describe(*it) + ")");
    return it->get<std::string>();
  }

  std::optional<bool> OptBool(const Json& obj, const std::string& key,
                              const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::nullopt;
    if (!it->is_boolean()) Fail(path + " must be true or false (got " + Describe(*it) + ")");
    return it->get<bool>();
  }

  std::vector<double> NumberList(const Json& obj, const std::string& key,
                                 const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) Fail(path + " is required for rope_type longrope");
    if (!it->is_array()) Fail(path + " must be a list of numbers (got " + Describe(*it) + ")");
    std::vector<double> out;
    out.reserve(it->size());
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& v = (*it)[i];
      if (!v.is_number()) {
        Fail(path + "[" + std::to_string(i) + "] must be a number (got " + Describe(v) + ")");
      }
      out.push_back(v.get<double>());
    }
    return out;
  }

  HfRopeConfig Parse(std::string_view text, std::string_view layer_type) {
    CheckJsonLimits(text, source_);
    Json root;
    try {
      root = Json::parse(text.begin(), text.end());
    } catch (const Json::parse_error& e) {
      // Locate the byte as line:column for the message.
      const size_t byte = std::min<size_t>(e.byte == 0 ? 0 : e.byte - 1, text.size());
      size_t line = 1, column = 1;
      for (size_t i = 0; i < byte; ++i) {
        if (text[i] == '\n') {
          ++line;
          column = 1;
        } else {
          ++column;
        }
      }
      Fail("invalid JSON at line " + std::to_string(line) + ", column " + std::to_string(column) +
           " (byte " + std::to_string(e.byte) + "): " + e.what());
    } catch (const Json::exception& e) {
      Fail(std::string("invalid JSON: ") + e.what());  // e.g. a number outside the double range
    }
    if (!root.is_object()) Fail("the top level must be a JSON object (got " + Describe(root) + ")");
    // Vision-language configs (Qwen2-VL v5, Qwen2.5-VL, Qwen3-VL) keep the language model's fields
    // in text_config; a config with top-level attention fields is read as is.
    auto text_config = root.find("text_config");
    if (text_config != root.end() && text_config->is_object() &&
        !root.contains("num_attention_heads") && !root.contains("n_head")) {
      Json text = *text_config;
      if (!text.contains("model_type") && root.contains("model_type")) {
        text["model_type"] = root["model_type"];
      }
      source_ += " text_config";
      return Build(text, layer_type);
    }
    return Build(root, layer_type);
  }

 private:
  // Per-layer-type rope_parameters: an object of objects without rope keys of its own.
  static bool IsNestedRopeDict(const Json& dict) {
    if (!dict.is_object() || dict.empty()) return false;
    for (auto it = dict.begin(); it != dict.end(); ++it) {
      if (!it->is_object()) return false;
    }
    return !dict.contains("rope_type") && !dict.contains("type") && !dict.contains("rope_theta");
  }

  HfRopeConfig Build(const Json& root, std::string_view layer_type_arg) {
    HfRopeConfig out;
    RopeParams& p = out.params;
    if (auto s = OptString(root, "model_type", "model_type")) out.model_type = *s;
    const std::string& mt = out.model_type;
    const bool gptj_family = mt == "gptj" || mt == "codegen";
    const bool chatglm = mt == "chatglm";
    const bool deepseek = mt == "deepseek_v2" || mt == "deepseek_v3";

    // ---- The rope dict ---------------------------------------------------------------------
    std::string dict_path;
    const Json* dict = nullptr;
    const std::string layer_type(layer_type_arg);
    bool layer_type_used = false;
    for (const char* key : {"rope_parameters", "rope_scaling"}) {
      auto it = root.find(key);
      if (it == root.end() || it->is_null()) continue;
      if (!it->is_object()) {
        Fail(std::string(key) + " must be an object or null (got " + Describe(*it) + ")");
      }
      dict_path = key;
      dict = &*it;
      break;
    }
    if (dict != nullptr && IsNestedRopeDict(*dict)) {
      const std::string want = layer_type.empty() ? "full_attention" : layer_type;
      auto it = dict->find(want);
      if (it == dict->end()) {
        std::string keys;
        for (auto k = dict->begin(); k != dict->end(); ++k) {
          keys += (keys.empty() ? "" : ", ") + k.key();
        }
        Fail(dict_path + " has no entry for layer type \"" + want + "\" (available: " + keys + ")");
      }
      dict_path += "." + want;
      dict = &*it;
      layer_type_used = true;
    }
    static const Json kEmpty = Json::object();
    const Json& rd = dict != nullptr ? *dict : kEmpty;
    auto key_path = [&](const std::string& key) {
      return dict_path.empty() ? "rope_scaling." + key : dict_path + "." + key;
    };

    // Older Gemma-3 configs: one top-level rope_scaling for the global layers and
    // rope_local_base_freq (unscaled) for the sliding-window layers.
    bool local_layers = false;
    if (!layer_type.empty() && !layer_type_used) {
      if (layer_type == "sliding_attention" && root.contains("rope_local_base_freq")) {
        local_layers = true;
      } else if (layer_type != "full_attention") {
        Fail("layer type \"" + layer_type +
             "\" was requested but rope_parameters is not a per-layer-type dict");
      }
    }

    // ---- rope type ------------------------------------------------------------------------------
    std::optional<std::string> type_name = OptString(rd, "rope_type", key_path("rope_type"));
    if (!type_name) type_name = OptString(rd, "type", key_path("type"));
    if (!type_name) {
      if (rd.contains("factor")) {
        Fail(key_path("rope_type") + " is missing (the dict has a factor but no rope_type/type)");
      }
      type_name = "default";
    }
    std::string tn = *type_name;
    if (tn == "su") tn = "longrope";
    if (tn == "yarn" && (rd.contains("short_factor") || rd.contains("long_factor")))
      tn = "longrope";
    const bool mrope_type = tn == "mrope";
    if (tn == "mrope") tn = "default";
    try {
      p.type = ParseRopeType(tn);
    } catch (const Error& e) {
      Fail(key_path("rope_type") + ": " + e.what());
    }
    if (local_layers) p.type = RopeType::kDefault;

    // ---- base ----------------------------------------------------------------------------------
    std::optional<double> theta;
    if (local_layers) {
      theta = OptNumber(root, "rope_local_base_freq", "rope_local_base_freq");
    } else if (gptj_family) {
      theta = 10000.0;  // hard-coded in GPT-J / CodeGen modelling code
    } else {
      theta = OptNumber(rd, "rope_theta", key_path("rope_theta"));
      if (!theta) theta = OptNumber(root, "rope_theta", "rope_theta");
      if (!theta) theta = OptNumber(root, "rotary_emb_base", "rotary_emb_base");
      if (!theta) {
        auto known = KnownDefaultTheta().find(mt);
        if (known == KnownDefaultTheta().end()) {
          Fail("rope_theta is missing and model_type \"" + mt +
               "\" has no known transformers default; add rope_theta to the config");
        }
        theta = known->second;
      }
      if (chatglm) {
        // ChatGLM3 / GLM-4 remote code: base = 10000 * rope_ratio.
        if (auto ratio = OptNumber(root, "rope_ratio", "rope_ratio")) {
          if (!(*ratio > 0))
            Fail("rope_ratio must be a finite number > 0 (got " + Num(*ratio) + ")");
          *theta *= *ratio;
        }
      }
    }
    p.base = *theta;

    // ---- dimensions -----------------------------------------------------------------------------
    auto heads = OptInt(root, "num_attention_heads", "num_attention_heads", 1, kMaxDim);
    if (!heads) heads = OptInt(root, "n_head", "n_head", 1, kMaxDim);
    out.num_attention_heads = heads ? static_cast<int>(*heads) : 0;
    if (auto kv = OptInt(root, "num_key_value_heads", "num_key_value_heads", 1, kMaxDim)) {
      out.num_key_value_heads = static_cast<int>(*kv);
    } else if (chatglm) {
      if (auto groups =
              OptInt(root, "multi_query_group_num", "multi_query_group_num", 1, kMaxDim)) {
        out.num_key_value_heads = static_cast<int>(*groups);
      }
    }
    if (out.num_key_value_heads > 0 && out.num_attention_heads > 0 &&
        out.num_attention_heads % out.num_key_value_heads != 0) {
      Fail("num_key_value_heads must divide num_attention_heads = " +
           std::to_string(out.num_attention_heads) + " (got " +
           std::to_string(out.num_key_value_heads) + ")");
    }

    std::optional<int64_t> head_dim;
    std::string head_dim_source = "head_dim";
    if (deepseek) {
      head_dim = OptInt(root, "qk_rope_head_dim", "qk_rope_head_dim", 0, kMaxDim);
      head_dim_source = "qk_rope_head_dim";
    }
    if (chatglm && (!head_dim || *head_dim == 0)) {
      head_dim = OptInt(root, "kv_channels", "kv_channels", 0, kMaxDim);
      head_dim_source = "kv_channels";
    }
    if (!head_dim || *head_dim == 0) {
      head_dim = OptInt(root, "head_dim", "head_dim", 0, kMaxDim);
      head_dim_source = "head_dim";
    }
    if (!head_dim || *head_dim == 0) {  // Python truthiness: 0 / null fall back
      auto hidden = OptInt(root, "hidden_size", "hidden_size", 1, kMaxDim * kMaxDim);
      if (!hidden) hidden = OptInt(root, "n_embd", "n_embd", 1, kMaxDim * kMaxDim);
      if (!hidden || !heads) {
        Fail(std::string("head_dim is missing and hidden_size / num_attention_heads cannot be "
                         "formed: ") +
             (!hidden ? "hidden_size" : "num_attention_heads") + " is missing");
      }
      head_dim = *hidden / *heads;  // Python floor division of positive integers
      head_dim_source = "hidden_size / num_attention_heads";
      if (*head_dim < 1 || *head_dim > kMaxDim) {
        Fail("hidden_size / num_attention_heads = " + std::to_string(*head_dim) +
             " must be in [1, " + std::to_string(kMaxDim) + "]");
      }
    }
    p.head_dim = static_cast<int>(*head_dim);

    if (gptj_family) {
      auto rd_dim = OptInt(root, "rotary_dim", "rotary_dim", 0, kMaxDim);
      p.rotary_dim = rd_dim ? static_cast<int>(*rd_dim) : p.head_dim;
      if (p.rotary_dim < 2 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0) {
        Fail("rotary_dim must be an even integer in [2, head_dim = " + std::to_string(p.head_dim) +
             "] (got " + std::to_string(p.rotary_dim) + ")");
      }
    } else {
      std::string factor_path = "partial_rotary_factor";
      std::optional<double> partial =
          local_layers ? std::nullopt
                       : OptNumber(rd, "partial_rotary_factor", key_path("partial_rotary_factor"));
      if (partial) factor_path = key_path("partial_rotary_factor");
      if (!partial) partial = OptNumber(root, "partial_rotary_factor", "partial_rotary_factor");
      if (!partial) {
        partial = OptNumber(root, "rotary_pct", "rotary_pct");
        if (partial) factor_path = "rotary_pct";
      }
      if (!partial && (mt == "glm" || mt == "glm4" || chatglm)) partial = 0.5;
      if (!partial) partial = 1.0;
      if (!(*partial > 0 && *partial <= 1)) {
        Fail(factor_path + " must be a number in (0, 1] (got " + Num(*partial) + ")");
      }
      // transformers: int(head_dim * partial_rotary_factor), a double product truncated.
      const double product = static_cast<double>(p.head_dim) * *partial;
      p.rotary_dim = static_cast<int>(product);
      if (p.rotary_dim < 2 || p.rotary_dim % 2 != 0) {
        Fail("rotary_dim = int(" + head_dim_source + " " + std::to_string(p.head_dim) + " * " +
             factor_path + " " + Num(*partial) + ") = " + std::to_string(p.rotary_dim) +
             " must be an even integer >= 2");
      }
    }

    // ---- layout ---------------------------------------------------------------------------------
    out.layout = Layout::kHalfSplit;
    if (gptj_family || chatglm || mt == "glm" || mt == "glm4") out.layout = Layout::kInterleaved;
    if (deepseek) {
      // DeepSeek checkpoints pair adjacent channels; transformers de-interleaves them when
      // rope_interleave (default true) is set.
      auto inter = OptBool(root, "rope_interleave", "rope_interleave");
      if (inter.value_or(true)) out.layout = Layout::kInterleaved;
    }

    // ---- lengths --------------------------------------------------------------------------------
    std::optional<int64_t> mpe =
        OptInt(root, "max_position_embeddings", "max_position_embeddings", 1, kMaxPosition);
    if (!mpe) mpe = OptInt(root, "n_positions", "n_positions", 1, kMaxPosition);
    if (!mpe && chatglm) mpe = OptInt(root, "seq_length", "seq_length", 1, kMaxPosition);
    if (mpe) p.max_position_embeddings = *mpe;
    std::optional<int64_t> omp = OptInt(root, "original_max_position_embeddings",
                                        "original_max_position_embeddings", 1, kMaxPosition);
    if (!omp) {
      omp = OptInt(rd, "original_max_position_embeddings",
                   key_path("original_max_position_embeddings"), 1, kMaxPosition);
    }
    auto require_mpe = [&](const std::string& why) {
      if (!mpe) Fail("max_position_embeddings is missing (" + why + ")");
    };

    // ---- type-specific fields -------------------------------------------------------------------
    const std::string tname(RopeTypeName(p.type));
    auto require_number = [&](const std::string& key) {
      auto v = OptNumber(rd, key, key_path(key));
      if (!v) Fail(key_path(key) + " is required for rope_type " + tname);
      return *v;
    };
    switch (p.type) {
      case RopeType::kDefault:
        break;
      case RopeType::kLinear:
        p.factor = require_number("factor");
        break;
      case RopeType::kDynamic:
        p.factor = require_number("factor");
        require_mpe("rope_type dynamic scales relative to it");
        break;
      case RopeType::kNtk: {
        auto alpha = OptNumber(rd, "alpha", key_path("alpha"));
        if (!alpha) alpha = OptNumber(rd, "factor", key_path("factor"));
        if (!alpha) Fail(key_path("alpha") + " is required for rope_type ntk");
        p.ntk_alpha = *alpha;
        break;
      }
      case RopeType::kYarn: {
        auto factor = OptNumber(rd, "factor", key_path("factor"));
        if (omp) p.original_max_position_embeddings = *omp;
        if (!omp) require_mpe("rope_type yarn without original_max_position_embeddings");
        if (factor) {
          p.factor = *factor;
        } else {
          require_mpe("rope_type yarn without factor uses max / original max positions");
          if (!omp)
            Fail(key_path("factor") + " is required for rope_type yarn (or give " +
                 "original_max_position_embeddings)");
          p.factor = static_cast<double>(*mpe) / static_cast<double>(*omp);
        }
        // Python `or`: a missing, null or zero beta means the default.
        if (auto bf = OptNumber(rd, "beta_fast", key_path("beta_fast")); bf && *bf != 0) {
          p.beta_fast = *bf;
        }
        if (auto bs = OptNumber(rd, "beta_slow", key_path("beta_slow")); bs && *bs != 0) {
          p.beta_slow = *bs;
        }
        p.mscale = OptNumber(rd, "mscale", key_path("mscale")).value_or(0.0);
        p.mscale_all_dim =
            OptNumber(rd, "mscale_all_dim", key_path("mscale_all_dim")).value_or(0.0);
        p.truncate = OptBool(rd, "truncate", key_path("truncate")).value_or(true);
        p.attention_factor = OptNumber(rd, "attention_factor", key_path("attention_factor"));
        break;
      }
      case RopeType::kLongRope: {
        if (omp) p.original_max_position_embeddings = *omp;
        if (!omp) require_mpe("rope_type longrope without original_max_position_embeddings");
        auto factor = OptNumber(rd, "factor", key_path("factor"));
        if (factor) {
          if (*factor == 0) Fail(key_path("factor") + " must be a finite number >= 1 (got 0)");
          p.factor = *factor;
        } else {
          require_mpe("rope_type longrope without factor uses max / original max positions");
        }
        p.short_factor = NumberList(rd, "short_factor", key_path("short_factor"));
        p.long_factor = NumberList(rd, "long_factor", key_path("long_factor"));
        p.attention_factor = OptNumber(rd, "attention_factor", key_path("attention_factor"));
        break;
      }
      case RopeType::kLlama3:
        p.factor = require_number("factor");
        p.low_freq_factor = require_number("low_freq_factor");
        p.high_freq_factor = require_number("high_freq_factor");
        if (omp) p.original_max_position_embeddings = *omp;
        if (!omp) require_mpe("rope_type llama3 without original_max_position_embeddings");
        break;
      case RopeType::kSentinel:
        break;
    }

    ParseAxes(rd, key_path, mrope_type, out);

    try {
      p.Validate();
    } catch (const Error& e) {
      std::string message = e.what();
      // Validate names fields by their legacy rope_scaling key; point at the key actually used.
      if (!dict_path.empty() && dict_path != "rope_scaling" &&
          message.rfind("rope_scaling.", 0) == 0) {
        message = dict_path + message.substr(std::string("rope_scaling").size());
      }
      Fail(message);
    }
    return out;
  }

  // Multimodal RoPE sections: Qwen2-VL `mrope_section` (chunked) and Qwen3-VL `mrope_section`
  // with `mrope_interleaved`. Qwen3-VL's rotary module always interleaves, with the section
  // [24, 20, 20] when the config has none (transformers `Qwen3VLTextRotaryEmbedding`).
  template <class KeyPath>
  void ParseAxes(const Json& rd, const KeyPath& key_path, bool mrope_type, HfRopeConfig& out) {
    const std::string& mt = out.model_type;
    const bool qwen3_vl = mt.rfind("qwen3_vl", 0) == 0;
    const std::string section_path = key_path("mrope_section");
    auto it = rd.find("mrope_section");
    if (it != rd.end() && !it->is_null()) {
      if (!it->is_array() || it->empty()) {
        Fail(section_path + " must be a non-empty list of integers (got " + Describe(*it) + ")");
      }
      for (size_t a = 0; a < it->size(); ++a) {
        const Json& v = (*it)[a];
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > kMaxDim) {
          Fail(section_path + "[" + std::to_string(a) + "] must be an integer >= 1 (got " +
               Describe(v) + ")");
        }
        out.axes.sections.push_back(static_cast<int>(v.get<int64_t>()));
      }
    } else if (qwen3_vl) {
      out.axes.sections = {24, 20, 20};
    } else if (mrope_type) {
      Fail(section_path + " is required for type mrope (e.g. [16, 24, 24] for Qwen2-VL-7B)");
    }
    const auto interleaved = OptBool(rd, "mrope_interleaved", key_path("mrope_interleaved"));
    out.axes.interleaved = interleaved.value_or(qwen3_vl);
    if (out.axes.interleaved && out.axes.sections.empty()) {
      Fail(key_path("mrope_interleaved") + " is true but " + section_path + " is missing");
    }
    if (out.axes.sections.empty()) return;
    try {
      out.axes.PairAxes(out.params.rotary_dim / 2);
    } catch (const Error& e) {
      Fail(section_path + ": " + e.what());
    }
  }

  std::string source_;
};

}  // namespace

HfRopeConfig ParseHfConfig(std::string_view json_text, std::string_view layer_type) {
  Parser parser("config.json");
  try {
    return parser.Parse(json_text, layer_type);
  } catch (const Error&) {
    throw;
  } catch (const nlohmann::json::exception& e) {
    parser.Fail(std::string("malformed value: ") + e.what());
  }
}

HfRopeConfig LoadHfConfig(const std::string& path, std::string_view layer_type) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw Error(path + ": is a directory; give the path of its config.json");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open the file for reading");
  // Read in chunks (works for pipes too) and stop past the size limit.
  std::string text;
  char chunk[1 << 16];
  while (in.read(chunk, sizeof(chunk)) || in.gcount() > 0) {
    text.append(chunk, static_cast<size_t>(in.gcount()));
    if (static_cast<int64_t>(text.size()) > kMaxConfigBytes) {
      throw Error(path + ": file is larger than " + std::to_string(kMaxConfigBytes) +
                  " bytes; not a config.json");
    }
  }
  if (in.bad()) throw Error(path + ": read error");
  Parser parser(path);
  try {
    return parser.Parse(text, layer_type);
  } catch (const Error&) {
    throw;
  } catch (const nlohmann::json::exception& e) {
    parser.Fail(std::string("malformed value: ") + e.what());
  }
}

}  // namespace ropekit
