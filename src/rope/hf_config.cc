// ropekit: Hugging Face config.json -> RopeParams, and RopeParams -> its rope_scaling dict.
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
// RopeScalingToJson writes the rope_scaling dict back in the same spelling, so that
// ParseRopeScaling (and ParseHfConfig) read the same RopeParams from it.
// Every problem becomes ropekit::Error "<source>: <field> ...".
#include "ropekit/hf_config.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "ropekit/file.h"
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
    const Json root = ParseJson(text);
    if (!root.is_object()) Fail("the top level must be a JSON object (got " + Describe(root) + ")");
    // Vision-language configs (Qwen2-VL v5, Qwen2.5-VL, Qwen3-VL) keep the language model's fields
    // in text_config; a config with top-level attention fields is read as is.
    auto text_config = root.find("text_config");
    if (text_config != root.end() && text_config->is_object() &&
        !root.contains("num_attention_heads") && !root.contains("n_head")) {
      Json text = *text_config;
      if (!text.contains("model_type") && root.contains("model_type")) {
        text["model_type"] = root.at("model_type");
      }
      source_ += " text_config";
      return Build(text, layer_type);
    }
    return Build(root, layer_type);
  }

  // A rope_scaling dict alone (JSON text: an object, or null for plain RoPE) on top of `base`:
  // the type, its fields and a rope_theta of the dict replace base's; the rest stays.
  RopeParams ParseScaling(std::string_view text, const RopeParams& base) {
    const Json dict = ParseJson(text);
    if (!dict.is_object() && !dict.is_null()) {
      Fail("must be a JSON object or null (got " + Describe(dict) + ")");
    }
    dict_path_ = "rope_scaling";
    rd_ = dict.is_null() ? &EmptyObject() : &dict;
    RopeParams p;
    p.head_dim = base.head_dim;
    p.rotary_dim = base.rotary_dim;
    p.max_position_embeddings = base.max_position_embeddings;
    bool mrope_type = false;
    p.type = ParseType(&mrope_type);
    p.base = OptNumber(*rd_, "rope_theta", KeyPath("rope_theta")).value_or(base.base);
    Lengths lengths;
    lengths.max = base.max_position_embeddings;
    lengths.original = OriginalLength();
    ParseTypeFields(lengths, p);
    Validate(p);
    rd_ = &EmptyObject();
    return p;
  }

 private:
  Json ParseJson(std::string_view text) const {
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
    return root;
  }

  // Per-layer-type rope_parameters: an object of objects without rope keys of its own.
  static bool IsNestedRopeDict(const Json& dict) {
    if (!dict.is_object() || dict.empty()) return false;
    for (auto it = dict.begin(); it != dict.end(); ++it) {
      if (!it->is_object()) return false;
    }
    return !dict.contains("rope_type") && !dict.contains("type") && !dict.contains("rope_theta");
  }

  // Model families whose config.json differs from LLaMA's in where RoPE's fields live.
  struct Family {
    explicit Family(const std::string& mt)
        : gptj(mt == "gptj" || mt == "codegen"),
          chatglm(mt == "chatglm"),
          glm(mt == "glm" || mt == "glm4" || mt == "chatglm"),
          deepseek(mt == "deepseek_v2" || mt == "deepseek_v3") {}
    bool gptj, chatglm, glm, deepseek;
  };

  // max_position_embeddings and original_max_position_embeddings, where given.
  struct Lengths {
    std::optional<int64_t> max, original;
  };

  HfRopeConfig Build(const Json& root, std::string_view layer_type_arg) {
    HfRopeConfig out;
    RopeParams& p = out.params;
    if (auto s = OptString(root, "model_type", "model_type")) out.model_type = *s;
    const std::string& mt = out.model_type;
    const Family family(mt);
    const std::string layer_type(layer_type_arg);
    const bool layer_type_used = FindRopeDict(root, layer_type);
    const bool local_layers = UsesLocalBase(root, layer_type, layer_type_used);
    bool mrope_type = false;
    p.type = ParseType(&mrope_type);
    if (local_layers) p.type = RopeType::kDefault;
    p.base = ParseBase(root, mt, family, local_layers);
    const std::optional<int64_t> heads = ParseHeads(root, family, out);
    std::string head_dim_source;
    p.head_dim = ParseHeadDim(root, family, heads, &head_dim_source);
    p.rotary_dim = ParseRotaryDim(root, family, local_layers, p.head_dim, head_dim_source);
    out.layout = ParseLayout(root, family);
    const Lengths lengths = ParseLengths(root, family);
    if (lengths.max) p.max_position_embeddings = *lengths.max;
    ParseTypeFields(lengths, p);
    ParseAxes(mrope_type, out);
    Validate(p);
    return out;
  }

  // Finds the rope dict (rope_parameters, else rope_scaling; one entry of a per-layer-type dict)
  // into rd_ and dict_path_; returns whether layer_type selected the entry.
  bool FindRopeDict(const Json& root, const std::string& layer_type) {
    dict_path_.clear();
    rd_ = &EmptyObject();
    for (const char* key : {"rope_parameters", "rope_scaling"}) {
      auto it = root.find(key);
      if (it == root.end() || it->is_null()) continue;
      if (!it->is_object()) {
        Fail(std::string(key) + " must be an object or null (got " + Describe(*it) + ")");
      }
      dict_path_ = key;
      rd_ = &*it;
      break;
    }
    if (!IsNestedRopeDict(*rd_)) return false;
    const std::string want = layer_type.empty() ? "full_attention" : layer_type;
    auto it = rd_->find(want);
    if (it == rd_->end()) {
      std::string keys;
      for (auto k = rd_->begin(); k != rd_->end(); ++k) {
        keys += (keys.empty() ? "" : ", ") + k.key();
      }
      Fail(dict_path_ + " has no entry for layer type \"" + want + "\" (available: " + keys + ")");
    }
    dict_path_ += "." + want;
    rd_ = &*it;
    return true;
  }

  static const Json& EmptyObject() {
    static const Json kEmpty = Json::object();
    return kEmpty;
  }

  // The path of `key` of the rope dict in messages ("rope_scaling.<key>" when there is none).
  std::string KeyPath(const std::string& key) const {
    return dict_path_.empty() ? "rope_scaling." + key : dict_path_ + "." + key;
  }

  // Older Gemma-3 configs: one top-level rope_scaling for the global layers and
  // rope_local_base_freq (unscaled) for the sliding-window layers. True when the sliding-window
  // layers of such a config are asked for.
  bool UsesLocalBase(const Json& root, const std::string& layer_type, bool layer_type_used) const {
    if (layer_type.empty() || layer_type_used) return false;
    if (layer_type == "sliding_attention" && root.contains("rope_local_base_freq")) return true;
    if (layer_type != "full_attention") {
      Fail("layer type \"" + layer_type +
           "\" was requested but rope_parameters is not a per-layer-type dict");
    }
    return false;
  }

  // rope_type (or its alias type) of the dict; `mrope_type` tells Qwen2-VL's "mrope".
  RopeType ParseType(bool* mrope_type) const {
    const Json& rd = *rd_;
    std::optional<std::string> type_name = OptString(rd, "rope_type", KeyPath("rope_type"));
    if (!type_name) type_name = OptString(rd, "type", KeyPath("type"));
    if (!type_name) {
      if (rd.contains("factor")) {
        Fail(KeyPath("rope_type") + " is missing (the dict has a factor but no rope_type/type)");
      }
      type_name = "default";
    }
    std::string tn = *type_name;
    if (tn == "su") tn = "longrope";
    if (tn == "yarn" && (rd.contains("short_factor") || rd.contains("long_factor"))) {
      tn = "longrope";
    }
    *mrope_type = tn == "mrope";
    if (tn == "mrope") tn = "default";
    try {
      return ParseRopeType(tn);
    } catch (const Error& e) {
      Fail(KeyPath("rope_type") + ": " + e.what());
    }
  }

  // rope_theta: the dict's (v5), the top level's, GPT-NeoX rotary_emb_base, the known default
  // of the model type; GPT-J / CodeGen hard-code 10000, ChatGLM multiplies by rope_ratio.
  double ParseBase(const Json& root, const std::string& mt, const Family& family,
                   bool local_layers) const {
    if (local_layers) {
      const auto local = OptNumber(root, "rope_local_base_freq", "rope_local_base_freq");
      if (!local) Fail("rope_local_base_freq must be a number (got null)");
      return *local;
    }
    if (family.gptj) return 10000.0;  // hard-coded in GPT-J / CodeGen modelling code
    std::optional<double> theta = OptNumber(*rd_, "rope_theta", KeyPath("rope_theta"));
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
    if (family.chatglm) {
      // ChatGLM3 / GLM-4 remote code: base = 10000 * rope_ratio.
      if (auto ratio = OptNumber(root, "rope_ratio", "rope_ratio")) {
        if (!(*ratio > 0)) Fail("rope_ratio must be a finite number > 0 (got " + Num(*ratio) + ")");
        *theta *= *ratio;
      }
    }
    return *theta;
  }

  // num_attention_heads (n_head) and num_key_value_heads (ChatGLM multi_query_group_num) into
  // `out`; returns the attention heads where given.
  std::optional<int64_t> ParseHeads(const Json& root, const Family& family,
                                    HfRopeConfig& out) const {
    auto heads = OptInt(root, "num_attention_heads", "num_attention_heads", 1, kMaxDim);
    if (!heads) heads = OptInt(root, "n_head", "n_head", 1, kMaxDim);
    out.num_attention_heads = heads ? static_cast<int>(*heads) : 0;
    if (auto kv = OptInt(root, "num_key_value_heads", "num_key_value_heads", 1, kMaxDim)) {
      out.num_key_value_heads = static_cast<int>(*kv);
    } else if (family.chatglm) {
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
    return heads;
  }

  // D: DeepSeek qk_rope_head_dim, ChatGLM kv_channels, head_dim, else hidden_size // heads;
  // `source` names the field it came from.
  int ParseHeadDim(const Json& root, const Family& family, std::optional<int64_t> heads,
                   std::string* source) const {
    std::optional<int64_t> head_dim;
    if (family.deepseek) {
      head_dim = OptInt(root, "qk_rope_head_dim", "qk_rope_head_dim", 0, kMaxDim);
      *source = "qk_rope_head_dim";
    }
    if (family.chatglm && (!head_dim || *head_dim == 0)) {
      head_dim = OptInt(root, "kv_channels", "kv_channels", 0, kMaxDim);
      *source = "kv_channels";
    }
    if (!head_dim || *head_dim == 0) {
      head_dim = OptInt(root, "head_dim", "head_dim", 0, kMaxDim);
      *source = "head_dim";
    }
    if (head_dim && *head_dim != 0) return static_cast<int>(*head_dim);
    // Python truthiness: 0 / null fall back.
    auto hidden = OptInt(root, "hidden_size", "hidden_size", 1, kMaxDim * kMaxDim);
    if (!hidden) hidden = OptInt(root, "n_embd", "n_embd", 1, kMaxDim * kMaxDim);
    if (!hidden || !heads) {
      Fail(std::string("head_dim is missing and hidden_size / num_attention_heads cannot be "
                       "formed: ") +
           (!hidden ? "hidden_size" : "num_attention_heads") + " is missing");
    }
    const int64_t derived = *hidden / *heads;  // Python floor division of positive integers
    *source = "hidden_size / num_attention_heads";
    if (derived < 1 || derived > kMaxDim) {
      Fail("hidden_size / num_attention_heads = " + std::to_string(derived) + " must be in [1, " +
           std::to_string(kMaxDim) + "]");
    }
    return static_cast<int>(derived);
  }

  // R: GPT-J / CodeGen rotary_dim, else int(D * partial_rotary_factor) (rotary_pct; GLM 0.5).
  int ParseRotaryDim(const Json& root, const Family& family, bool local_layers, int head_dim,
                     const std::string& head_dim_source) const {
    if (family.gptj) {
      auto rd_dim = OptInt(root, "rotary_dim", "rotary_dim", 0, kMaxDim);
      const int rotary_dim = rd_dim ? static_cast<int>(*rd_dim) : head_dim;
      if (rotary_dim < 2 || rotary_dim > head_dim || rotary_dim % 2 != 0) {
        Fail("rotary_dim must be an even integer in [2, head_dim = " + std::to_string(head_dim) +
             "] (got " + std::to_string(rotary_dim) + ")");
      }
      return rotary_dim;
    }
    std::string factor_path = "partial_rotary_factor";
    std::optional<double> partial =
        local_layers ? std::nullopt
                     : OptNumber(*rd_, "partial_rotary_factor", KeyPath("partial_rotary_factor"));
    if (partial) factor_path = KeyPath("partial_rotary_factor");
    if (!partial) partial = OptNumber(root, "partial_rotary_factor", "partial_rotary_factor");
    if (!partial) {
      partial = OptNumber(root, "rotary_pct", "rotary_pct");
      if (partial) factor_path = "rotary_pct";
    }
    if (!partial && family.glm) partial = 0.5;
    if (!partial) partial = 1.0;
    if (!(*partial > 0 && *partial <= 1)) {
      Fail(factor_path + " must be a number in (0, 1] (got " + Num(*partial) + ")");
    }
    // transformers: int(head_dim * partial_rotary_factor), a double product truncated.
    const double product = static_cast<double>(head_dim) * *partial;
    const int rotary_dim = static_cast<int>(product);
    if (rotary_dim < 2 || rotary_dim % 2 != 0) {
      Fail("rotary_dim = int(" + head_dim_source + " " + std::to_string(head_dim) + " * " +
           factor_path + " " + Num(*partial) + ") = " + std::to_string(rotary_dim) +
           " must be an even integer >= 2");
    }
    return rotary_dim;
  }

  // The checkpoint's pairing of channels.
  Layout ParseLayout(const Json& root, const Family& family) const {
    if (family.deepseek) {
      // DeepSeek checkpoints pair adjacent channels; transformers de-interleaves them when
      // rope_interleave (default true) is set.
      auto inter = OptBool(root, "rope_interleave", "rope_interleave");
      return inter.value_or(true) ? Layout::kInterleaved : Layout::kHalfSplit;
    }
    return family.gptj || family.glm ? Layout::kInterleaved : Layout::kHalfSplit;
  }

  // max_position_embeddings (n_positions; ChatGLM seq_length) and
  // original_max_position_embeddings (a top-level value has priority, as in v5).
  Lengths ParseLengths(const Json& root, const Family& family) const {
    Lengths l;
    l.max = OptInt(root, "max_position_embeddings", "max_position_embeddings", 1, kMaxPosition);
    if (!l.max) l.max = OptInt(root, "n_positions", "n_positions", 1, kMaxPosition);
    if (!l.max && family.chatglm) {
      l.max = OptInt(root, "seq_length", "seq_length", 1, kMaxPosition);
    }
    l.original = OptInt(root, "original_max_position_embeddings",
                        "original_max_position_embeddings", 1, kMaxPosition);
    if (!l.original) l.original = OriginalLength();
    return l;
  }

  std::optional<int64_t> OriginalLength() const {
    return OptInt(*rd_, "original_max_position_embeddings",
                  KeyPath("original_max_position_embeddings"), 1, kMaxPosition);
  }

  void RequireMax(const Lengths& l, const std::string& why) const {
    if (!l.max) Fail("max_position_embeddings is missing (" + why + ")");
  }

  double RequireNumber(const std::string& key, const RopeParams& p) const {
    auto v = OptNumber(*rd_, key, KeyPath(key));
    if (!v) Fail(KeyPath(key) + " is required for rope_type " + std::string(RopeTypeName(p.type)));
    return *v;
  }

  // The fields of p.type from the rope dict.
  void ParseTypeFields(const Lengths& l, RopeParams& p) const {
    switch (p.type) {
      case RopeType::kDefault:
      case RopeType::kSentinel:
        break;
      case RopeType::kLinear:
        p.factor = RequireNumber("factor", p);
        break;
      case RopeType::kDynamic:
        p.factor = RequireNumber("factor", p);
        RequireMax(l, "rope_type dynamic scales relative to it");
        break;
      case RopeType::kNtk: {
        auto alpha = OptNumber(*rd_, "alpha", KeyPath("alpha"));
        if (!alpha) alpha = OptNumber(*rd_, "factor", KeyPath("factor"));
        if (!alpha) Fail(KeyPath("alpha") + " is required for rope_type ntk");
        p.ntk_alpha = *alpha;
        break;
      }
      case RopeType::kYarn:
        ParseYarn(l, p);
        break;
      case RopeType::kLongRope:
        ParseLongRope(l, p);
        break;
      case RopeType::kLlama3:
        p.factor = RequireNumber("factor", p);
        p.low_freq_factor = RequireNumber("low_freq_factor", p);
        p.high_freq_factor = RequireNumber("high_freq_factor", p);
        if (l.original) p.original_max_position_embeddings = *l.original;
        if (!l.original) RequireMax(l, "rope_type llama3 without original_max_position_embeddings");
        break;
    }
  }

  void ParseYarn(const Lengths& l, RopeParams& p) const {
    const Json& rd = *rd_;
    auto factor = OptNumber(rd, "factor", KeyPath("factor"));
    if (l.original) p.original_max_position_embeddings = *l.original;
    if (!l.original) RequireMax(l, "rope_type yarn without original_max_position_embeddings");
    if (factor) {
      p.factor = *factor;
    } else {
      RequireMax(l, "rope_type yarn without factor uses max / original max positions");
      if (!l.original) {
        Fail(KeyPath("factor") + " is required for rope_type yarn (or give " +
             "original_max_position_embeddings)");
      }
      p.factor = static_cast<double>(*l.max) / static_cast<double>(*l.original);
    }
    // Python `or`: a missing, null or zero beta means the default.
    if (auto bf = OptNumber(rd, "beta_fast", KeyPath("beta_fast")); bf && *bf != 0) {
      p.beta_fast = *bf;
    }
    if (auto bs = OptNumber(rd, "beta_slow", KeyPath("beta_slow")); bs && *bs != 0) {
      p.beta_slow = *bs;
    }
    p.mscale = OptNumber(rd, "mscale", KeyPath("mscale")).value_or(0.0);
    p.mscale_all_dim = OptNumber(rd, "mscale_all_dim", KeyPath("mscale_all_dim")).value_or(0.0);
    p.truncate = OptBool(rd, "truncate", KeyPath("truncate")).value_or(true);
    p.attention_factor = OptNumber(rd, "attention_factor", KeyPath("attention_factor"));
  }

  void ParseLongRope(const Lengths& l, RopeParams& p) const {
    const Json& rd = *rd_;
    if (l.original) p.original_max_position_embeddings = *l.original;
    if (!l.original) RequireMax(l, "rope_type longrope without original_max_position_embeddings");
    auto factor = OptNumber(rd, "factor", KeyPath("factor"));
    if (factor) {
      if (*factor == 0) Fail(KeyPath("factor") + " must be a finite number >= 1 (got 0)");
      p.factor = *factor;
    } else {
      RequireMax(l, "rope_type longrope without factor uses max / original max positions");
    }
    p.short_factor = NumberList(rd, "short_factor", KeyPath("short_factor"));
    p.long_factor = NumberList(rd, "long_factor", KeyPath("long_factor"));
    p.attention_factor = OptNumber(rd, "attention_factor", KeyPath("attention_factor"));
  }

  // RopeParams::Validate, its messages pointing at the key actually read.
  void Validate(const RopeParams& p) const {
    try {
      p.Validate();
    } catch (const Error& e) {
      std::string message = e.what();
      // Validate names fields by their legacy rope_scaling key; point at the key actually used.
      if (!dict_path_.empty() && dict_path_ != "rope_scaling" &&
          message.rfind("rope_scaling.", 0) == 0) {
        message = dict_path_ + message.substr(std::string("rope_scaling").size());
      }
      Fail(message);
    }
  }

  // Multimodal RoPE sections: Qwen2-VL `mrope_section` (chunked) and Qwen3-VL `mrope_section`
  // with `mrope_interleaved`. Qwen3-VL's rotary module always interleaves, with the section
  // [24, 20, 20] when the config has none (transformers `Qwen3VLTextRotaryEmbedding`).
  void ParseAxes(bool mrope_type, HfRopeConfig& out) const {
    const Json& rd = *rd_;
    const std::string& mt = out.model_type;
    const bool qwen3_vl = mt.rfind("qwen3_vl", 0) == 0;
    const std::string section_path = KeyPath("mrope_section");
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
    const auto interleaved = OptBool(rd, "mrope_interleaved", KeyPath("mrope_interleaved"));
    out.axes.interleaved = interleaved.value_or(qwen3_vl);
    if (out.axes.interleaved && out.axes.sections.empty()) {
      Fail(KeyPath("mrope_interleaved") + " is true but " + section_path + " is missing");
    }
    if (out.axes.sections.empty()) return;
    try {
      out.axes.PairAxes(out.params.rotary_dim / 2);
    } catch (const Error& e) {
      Fail(section_path + ": " + e.what());
    }
  }

  // The rope dict of the config being read (an empty object when it has none) and its path.
  const Json* rd_ = &EmptyObject();
  std::string dict_path_;
  std::string source_;
};

// Runs `parse` on a Parser for `source`; a malformed value nlohmann reports becomes an Error.
template <class Fn>
auto WithParser(const std::string& source, Fn parse) {
  Parser parser(source);
  try {
    return parse(parser);
  } catch (const Error&) {
    throw;
  } catch (const nlohmann::json::exception& e) {
    parser.Fail(std::string("malformed value: ") + e.what());
  }
}

}  // namespace

HfRopeConfig ParseHfConfig(std::string_view json_text, std::string_view layer_type) {
  return WithParser("config.json", [&](Parser& p) { return p.Parse(json_text, layer_type); });
}

HfRopeConfig LoadHfConfig(const std::string& path, std::string_view layer_type) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw Error(path + ": is a directory; give the path of its config.json");
  }
  const std::string text = ReadFileToString(path, kMaxConfigBytes);
  return WithParser(path, [&](Parser& p) { return p.Parse(text, layer_type); });
}

RopeParams ParseRopeScaling(std::string_view json_text, const RopeParams& base,
                            const std::string& source) {
  return WithParser(source, [&](Parser& p) { return p.ParseScaling(json_text, base); });
}

std::string RopeScalingToJson(const RopeParams& p) {
  nlohmann::ordered_json j;
  switch (p.type) {
    case RopeType::kDefault:
    case RopeType::kSentinel:
      return "null";
    case RopeType::kLinear:
    case RopeType::kDynamic:
      j["rope_type"] = RopeTypeName(p.type);
      j["factor"] = p.factor;
      break;
    case RopeType::kNtk:
      j["rope_type"] = "ntk";
      j["alpha"] = p.ntk_alpha;
      break;
    case RopeType::kYarn:
      j["rope_type"] = "yarn";
      j["factor"] = p.factor;
      if (p.original_max_position_embeddings > 0) {
        j["original_max_position_embeddings"] = p.original_max_position_embeddings;
      }
      j["beta_fast"] = p.beta_fast;
      j["beta_slow"] = p.beta_slow;
      if (p.mscale != 0.0) j["mscale"] = p.mscale;
      if (p.mscale_all_dim != 0.0) j["mscale_all_dim"] = p.mscale_all_dim;
      if (!p.truncate) j["truncate"] = false;
      if (p.attention_factor) j["attention_factor"] = *p.attention_factor;
      break;
    case RopeType::kLongRope:
      j["rope_type"] = "longrope";
      if (p.factor != 0.0) j["factor"] = p.factor;
      if (p.original_max_position_embeddings > 0) {
        j["original_max_position_embeddings"] = p.original_max_position_embeddings;
      }
      j["short_factor"] = p.short_factor;
      j["long_factor"] = p.long_factor;
      if (p.attention_factor) j["attention_factor"] = *p.attention_factor;
      break;
    case RopeType::kLlama3:
      j["rope_type"] = "llama3";
      j["factor"] = p.factor;
      j["low_freq_factor"] = p.low_freq_factor;
      j["high_freq_factor"] = p.high_freq_factor;
      if (p.original_max_position_embeddings > 0) {
        j["original_max_position_embeddings"] = p.original_max_position_embeddings;
      }
      break;
  }
  return j.dump();
}

}  // namespace ropekit
