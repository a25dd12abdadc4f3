// ModelConfig: derived fields, validation and the config.json form (Hugging Face
// LlamaForCausalLM keys plus a "ropekit" object); ByteTokenizer; text file reading.
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "ropekit/file.h"
#include "ropekit/hf_config.h"
#include "ropekit/json_limits.h"
#include "ropekit/model.h"

namespace ropekit {
namespace {

using Json = nlohmann::ordered_json;

void Require(bool ok, const std::string& message) {
  if (!ok) throw Error(message);
}

}  // namespace

std::vector<int32_t> ByteTokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string text(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] > 255) {
      throw Error("ByteTokenizer::Decode: token id " + std::to_string(ids[i]) + " at index " +
                  std::to_string(i) + " is outside [0, 255]");
    }
    text[i] = static_cast<char>(ids[i]);
  }
  return text;
}

PositionEncodingSpec ModelConfig::DefaultPositionEncoding() {
  PositionEncodingSpec spec;
  spec.kind = PositionEncodingKind::kRope;
  spec.rope.base = 10000.0;
  return spec;
}

ModelConfig ModelConfig::Resolved() const {
  constexpr int kMax = 1 << 16;
  Require(vocab_size >= 1 && vocab_size <= (1 << 24),
          "vocab_size: " + std::to_string(vocab_size) + " must be in [1, 2^24]");
  Require(hidden_size >= 1 && hidden_size <= kMax,
          "hidden_size: " + std::to_string(hidden_size) + " must be in [1, 65536]");
  Require(num_layers >= 1 && num_layers <= 1024,
          "num_hidden_layers: " + std::to_string(num_layers) + " must be in [1, 1024]");
  Require(num_heads >= 1 && num_heads <= kMax,
          "num_attention_heads: " + std::to_string(num_heads) + " must be in [1, 65536]");
  Require(num_kv_heads >= 1 && num_kv_heads <= num_heads && num_heads % num_kv_heads == 0,
          "num_key_value_heads: " + std::to_string(num_kv_heads) +
              " must be >= 1 and divide num_attention_heads " + std::to_string(num_heads));
  Require(head_dim >= 0 && head_dim <= kMax,
          "head_dim: " + std::to_string(head_dim) + " must be in [0, 65536] (0 = derived)");
  Require(head_dim > 0 || hidden_size % num_heads == 0,
          "head_dim: 0 (derived) needs hidden_size " + std::to_string(hidden_size) +
              " divisible by num_attention_heads " + std::to_string(num_heads));
  Require(intermediate_size >= 1 && intermediate_size <= (1 << 20),
          "intermediate_size: " + std::to_string(intermediate_size) + " must be in [1, 2^20]");
  Require(rms_norm_eps > 0.0 && std::isfinite(rms_norm_eps),
          "rms_norm_eps: must be finite and > 0");
  Require(max_position_embeddings >= 1 && max_position_embeddings <= kMaxPosition,
          "max_position_embeddings: " + std::to_string(max_position_embeddings) +
              " must be in [1, 2^31 - 1]");
  Require(init_std >= 0.0 && std::isfinite(init_std), "init_std: must be finite and >= 0");
  ModelConfig c = *this;
  c.head_dim = resolved_head_dim();
  PositionEncodingSpec& pe = c.position_encoding;
  pe.dim = c.hidden_size;
  pe.num_heads = c.num_heads;
  pe.rope.head_dim = c.head_dim;
  if (pe.rope.rotary_dim == 0) pe.rope.rotary_dim = c.head_dim;
  pe.rope.max_position_embeddings = c.max_position_embeddings;
  if (pe.kind == PositionEncodingKind::kLearned && pe.max_positions == 0) {
    pe.max_positions = 8 * c.max_position_embeddings;
  }
  pe.Validate();
  if (pe.kind == PositionEncodingKind::kRope) pe.rope.Validate();
  return c;
}

std::string ModelConfigToJson(const ModelConfig& config) {
  const ModelConfig c = config.Resolved();
  const PositionEncodingSpec& pe = c.position_encoding;
  Json j;
  j["architectures"] = Json::array({"LlamaForCausalLM"});
  j["model_type"] = "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["initializer_range"] = c.init_std;
  j["torch_dtype"] = "float32";
  const bool rope = pe.kind == PositionEncodingKind::kRope;
  j["rope_theta"] = pe.rope.base;
  j["rope_scaling"] = rope ? Json::parse(RopeScalingToJson(pe.rope)) : Json(nullptr);
  if (rope && pe.rope.rotary_dim != c.head_dim) {
    j["partial_rotary_factor"] = static_cast<double>(pe.rope.rotary_dim) / c.head_dim;
  }
  Json r;
  r["position_encoding"] = PositionEncodingKindName(pe.kind);
  switch (pe.kind) {
    case PositionEncodingKind::kRope:
      r["rope_layout"] = LayoutName(pe.rope_layout);
      r["rope_numerics"] = NumericsName(pe.rope_numerics);
      r["rotary_dim"] = pe.rope.rotary_dim;
      break;
    case PositionEncodingKind::kLearned:
      r["max_positions"] = pe.max_positions;
      r["out_of_range"] = OutOfRangeName(pe.out_of_range);
      r["embedding_scale"] = EmbeddingScaleName(pe.embedding_scale);
      r["init_std"] = pe.init_std;
      break;
    case PositionEncodingKind::kSinusoidal:
      r["sinusoidal_base"] = pe.sinusoidal_base;
      r["embedding_scale"] = EmbeddingScaleName(pe.embedding_scale);
      break;
    case PositionEncodingKind::kT5:
      r["num_buckets"] = pe.num_buckets;
      r["max_distance"] = pe.max_distance;
      r["bidirectional"] = pe.bidirectional;
      r["init_std"] = pe.init_std;
      break;
    default:
      break;
  }
  j["ropekit"] = r;
  return j.dump(2) + "\n";
}

namespace {

// Typed reads of config.json fields; errors name the file and the field's path.
class ConfigFields {
 public:
  explicit ConfigFields(const std::string& name) : name_(name) {}

  int64_t Int(const Json& obj, const char* key, int64_t fallback, bool required,
              const std::string& path) const {
    if (!obj.contains(key) || obj[key].is_null()) {
      if (required) throw Error(name_ + ": " + path + " is missing");
      return fallback;
    }
    if (!obj[key].is_number_integer()) {
      throw Error(name_ + ": " + path + " must be an integer, got " + obj[key].dump());
    }
    return obj[key].get<int64_t>();
  }
  double Num(const Json& obj, const char* key, double fallback, const std::string& path) const {
    if (!obj.contains(key) || obj[key].is_null()) return fallback;
    if (!obj[key].is_number()) throw Error(name_ + ": " + path + " must be a number");
    return obj[key].get<double>();
  }
  std::string Str(const Json& obj, const char* key, const std::string& fallback,
                  const std::string& path) const {
    if (!obj.contains(key) || obj[key].is_null()) return fallback;
    if (!obj[key].is_string()) throw Error(name_ + ": " + path + " must be a string");
    return obj[key].get<std::string>();
  }
  // v as an int in [0, 2^30].
  int Narrow(int64_t v, const char* key) const {
    if (v < 0 || v > (int64_t{1} << 30)) {
      throw Error(name_ + ": " + key + " = " + std::to_string(v) + " is out of range");
    }
    return static_cast<int>(v);
  }
  // A required integer field of the top level, narrowed.
  int RequiredInt(const Json& j, const char* key) const {
    return Narrow(Int(j, key, 0, true, key), key);
  }

 private:
  const std::string& name_;
};

Json ParseConfigObject(std::string_view json_text, const std::string& name) {
  CheckJsonLimits(json_text, name);
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const std::exception& e) {
    throw Error(name + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw Error(name + ": the top level must be a JSON object");
  return j;
}

// The LlamaConfig keys: sizes, norm epsilon, context, tying and the init range.
ModelConfig ReadArchitecture(const Json& j, const ConfigFields& f, const std::string& name) {
  ModelConfig c;
  c.vocab_size = f.RequiredInt(j, "vocab_size");
  c.hidden_size = f.RequiredInt(j, "hidden_size");
  c.intermediate_size = f.RequiredInt(j, "intermediate_size");
  c.num_layers = f.RequiredInt(j, "num_hidden_layers");
  c.num_heads = f.RequiredInt(j, "num_attention_heads");
  c.num_kv_heads =
      f.Narrow(f.Int(j, "num_key_value_heads", c.num_heads, false, "num_key_value_heads"),
               "num_key_value_heads");
  c.head_dim = f.Narrow(f.Int(j, "head_dim", 0, false, "head_dim"), "head_dim");
  c.rms_norm_eps = f.Num(j, "rms_norm_eps", 1e-6, "rms_norm_eps");
  c.max_position_embeddings =
      f.Int(j, "max_position_embeddings", 0, true, "max_position_embeddings");
  if (j.contains("tie_word_embeddings")) {
    if (!j["tie_word_embeddings"].is_boolean()) {
      throw Error(name + ": tie_word_embeddings must be true or false");
    }
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  } else {
    c.tie_word_embeddings = false;  // LlamaConfig default
  }
  c.init_std = f.Num(j, "initializer_range", 0.02, "initializer_range");
  return c;
}

// The encoding's fields of the "ropekit" object r (RoPE: the Hugging Face rope keys of the top
// level j, read by ParseHfConfig). Errors may lack the file name; the caller adds it.
void ReadEncodingFields(std::string_view json_text, const Json& j, const Json& r,
                        const ConfigFields& f, PositionEncodingSpec& pe) {
  if (pe.kind == PositionEncodingKind::kRope) {
    HfRopeConfig hf = ParseHfConfig(json_text);
    pe.rope = hf.params;
    pe.rope_layout = ParseLayout(f.Str(r, "rope_layout", "neox", "ropekit.rope_layout"));
    pe.rope_numerics = ParseNumerics(f.Str(r, "rope_numerics", "exact", "ropekit.rope_numerics"));
    if (r.contains("rotary_dim")) {
      pe.rope.rotary_dim =
          f.Narrow(f.Int(r, "rotary_dim", 0, true, "ropekit.rotary_dim"), "ropekit.rotary_dim");
    }
  } else {
    pe.rope.base = f.Num(j, "rope_theta", 10000.0, "rope_theta");
  }
  pe.max_positions = f.Int(r, "max_positions", 0, false, "ropekit.max_positions");
  pe.out_of_range = ParseOutOfRange(f.Str(r, "out_of_range", "error", "ropekit.out_of_range"));
  pe.embedding_scale =
      ParseEmbeddingScale(f.Str(r, "embedding_scale", "none", "ropekit.embedding_scale"));
  pe.sinusoidal_base = f.Num(r, "sinusoidal_base", 10000.0, "ropekit.sinusoidal_base");
  pe.num_buckets =
      f.Narrow(f.Int(r, "num_buckets", 32, false, "ropekit.num_buckets"), "ropekit.num_buckets");
  pe.max_distance = f.Narrow(f.Int(r, "max_distance", 128, false, "ropekit.max_distance"),
                             "ropekit.max_distance");
  if (r.contains("bidirectional")) {
    if (!r["bidirectional"].is_boolean()) {
      throw Error("ropekit.bidirectional must be true or false");
    }
    pe.bidirectional = r["bidirectional"].get<bool>();
  }
  pe.init_std = f.Num(r, "init_std", 0.02, "ropekit.init_std");
}

}  // namespace

ModelConfig ModelConfigFromJson(std::string_view json_text, const std::string& name) {
  const Json j = ParseConfigObject(json_text, name);
  const ConfigFields f(name);
  ModelConfig c = ReadArchitecture(j, f, name);
  const Json r = j.contains("ropekit") ? j["ropekit"] : Json::object();
  if (!r.is_object()) throw Error(name + ": ropekit must be a JSON object");
  PositionEncodingSpec pe;
  try {
    pe.kind = ParsePositionEncodingKind(
        f.Str(r, "position_encoding", "rope", "ropekit.position_encoding"));
  } catch (const Error& e) {
    throw Error(name + ": ropekit.position_encoding: " + e.what());
  }
  try {
    ReadEncodingFields(json_text, j, r, f, pe);
    c.position_encoding = pe;
    return c.Resolved();
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind(name, 0) == 0) throw;
    throw Error(name + ": " + what);
  }
}

std::string ReadTextFiles(const std::vector<std::string>& paths) {
  std::string all;
  for (const std::string& path : paths) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) throw Error(path + ": file not found");
    all += ReadFileToString(path);
  }
  return all;
}

}  // namespace ropekit
