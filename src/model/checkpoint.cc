// Safetensors reading / writing and checkpoint directories.
//
// Safetensors layout: u64 little-endian N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {string: string}}, then the data (offsets relative to its start). The header
// is padded with spaces to a multiple of 8 bytes. ropekit adds "ropekit.fnv1a64" (FNV-1a 64 of
// the data bytes, hex) to the metadata and verifies it on read when present, so a corrupted
// payload is reported, not silently loaded.
//
// A checkpoint directory commits as one unit:
//   <dir>/step-00000020/       config.json, model.safetensors, optimizer.safetensors,
//                              trainer_state.json and manifest.json (written last): the step and
//                              the size and FNV-1a 64 checksum of every file
//   <dir>/current              symbolic link -> step-00000020: THE commit point, switched by one
//                              atomic rename after the step directory is complete and synced
//   <dir>/config.json ...      fixed symbolic links -> current/<file>, so the directory loads as
//                              a Hugging Face model directory and always shows one step
// The previous step directory is removed only after `current` points at the new one, so a crash
// at any point leaves either the old or the new checkpoint, complete. Loading resolves `current`
// once and checks every file against the manifest (and the step recorded inside each file).
// Directories without `current` (Hugging Face models, older ropekit checkpoints) load as plain
// files; their parts must still agree on the step.
#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "ropekit/file.h"
#include "ropekit/half.h"
#include "ropekit/json_limits.h"
#include "ropekit/model.h"

namespace ropekit {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
static_assert(std::endian::native == std::endian::little, "little-endian hosts only");

constexpr const char* kCurrent = "current";
constexpr const char* kManifest = "manifest.json";
constexpr const char* kCheckpointFiles[] = {"config.json",
                                            "model.safetensors",
                                            "adapter_config.json",
                                            "adapter_model.safetensors",
                                            "optimizer.safetensors",
                                            "trainer_state.json",
                                            "prefix_encoder.safetensors"};
// Prefix tuning with prefix_projection: the reparameterisation MLP, for --resume (PEFT saves
// only its output, in adapter_model.safetensors).
constexpr const char* kPrefixEncoder = "prefix_encoder.safetensors";
constexpr const char* kAdapterConfig = "adapter_config.json";
constexpr const char* kAdapterWeights = "adapter_model.safetensors";

uint64_t Fnv1a64(const uint8_t* data, size_t size) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < size; ++i) {
    h ^= data[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string Join(const std::string& dir, const std::string& file) {
  return (fs::path(dir) / file).string();
}

std::string ReadExisting(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(path + ": file not found");
  return ReadFileToString(path);
}

struct ParsedSafetensors {
  std::vector<SafeTensor> tensors;
  std::map<std::string, std::string> metadata;
};

ParsedSafetensors ParseSafetensorsWithMetadata(std::string_view file, const std::string& path) {
  auto fail = [&](const std::string& what) -> void {
    throw Error(path + ": corrupt or truncated safetensors file: " + what);
  };
  if (file.size() < 8) fail("shorter than the 8-byte header length");
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  if (n > file.size() - 8) {
    fail("header length " + std::to_string(n) + " exceeds the file size " +
         std::to_string(file.size()));
  }
  const std::string_view header_text(file.data() + 8, n);
  CheckJsonLimits(header_text, path + ": safetensors header");
  Json header;
  try {
    header = Json::parse(header_text);
  } catch (const std::exception& e) {
    fail(std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) fail("header is not a JSON object");
  const auto* data = reinterpret_cast<const uint8_t*>(file.data()) + 8 + n;
  const size_t data_size = file.size() - 8 - n;
  ParsedSafetensors out;
  if (header.contains("__metadata__")) {
    const Json& meta = header["__metadata__"];
    if (!meta.is_object()) fail("__metadata__ must be an object of strings, got " + meta.dump());
    for (auto it = meta.begin(); it != meta.end(); ++it) {
      if (!it.value().is_string()) fail("__metadata__ value of " + it.key() + " is not a string");
      out.metadata[it.key()] = it.value().get<std::string>();
    }
  }
  size_t max_end = 0;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const Json& e = it.value();
    const std::string name = it.key();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets") || !e["dtype"].is_string() || !e["shape"].is_array() ||
        !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
      fail("tensor " + name + " lacks a valid dtype, shape or data_offsets");
    }
    const std::string dtype = e["dtype"].get<std::string>();
    size_t item = 0;
    if (dtype == "F32")
      item = 4;
    else if (dtype == "BF16" || dtype == "F16")
      item = 2;
    else
      throw Error(path + ": tensor " + name + " has dtype " + dtype +
                  "; F32, BF16 and F16 are supported");
    SafeTensor t;
    t.name = name;
    uint64_t numel = 1;
    for (const Json& s : e["shape"]) {
      if (!s.is_number_unsigned() || s.get<uint64_t>() > (uint64_t{1} << 40)) {
        fail("tensor " + name + " has an invalid shape " + e["shape"].dump());
      }
      t.shape.push_back(s.get<int64_t>());
      numel *= s.get<uint64_t>();
      if (numel > (uint64_t{1} << 40)) fail("tensor " + name + " is too large");
    }
    if (!e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned()) {
      fail("tensor " + name + " has invalid data_offsets");
    }
    const uint64_t b = e["data_offsets"][0].get<uint64_t>();
    const uint64_t en = e["data_offsets"][1].get<uint64_t>();
    if (b > en || en - b != numel * item) {
      fail("tensor " + name + " data_offsets [" + std::to_string(b) + ", " + std::to_string(en) +
           "] do not match its shape and dtype");
    }
    if (en > data_size) {
      fail("tensor " + name + " ends at byte " + std::to_string(en) + " of the data, which has " +
           std::to_string(data_size) + " bytes");
    }
    ranges.push_back({b, en});
    max_end = std::max<size_t>(max_end, en);
    t.data.resize(numel);
    const uint8_t* src = data + b;
    if (item == 4) {
      if (numel) std::memcpy(t.data.data(), src, numel * 4);
    } else {
      for (uint64_t i = 0; i < numel; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        t.data[i] = dtype == "BF16" ? Bf16ToFloat(bits) : F16ToFloat(bits);
      }
    }
    out.tensors.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) fail("tensor data ranges overlap");
  }
  if (max_end != data_size) {
    fail("the data has " + std::to_string(data_size) + " bytes but the tensors cover " +
         std::to_string(max_end));
  }
  if (auto it = out.metadata.find("ropekit.fnv1a64"); it != out.metadata.end()) {
    if (it->second != Hex(Fnv1a64(data, data_size))) {
      fail("the data checksum (ropekit.fnv1a64) does not match");
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The committed state of a checkpoint directory.

struct FileRecord {
  uint64_t bytes = 0;
  std::string fnv1a64;
};

struct Resolved {
  std::string dir;   // the directory the files are read from (a step directory or `dir` itself)
  std::string link;  // target of `current` ("" for a plain directory)
  std::optional<int64_t> step;              // from the manifest
  std::map<std::string, FileRecord> files;  // from the manifest
};

std::string ReadLink(const std::string& path) {
  std::error_code ec;
  const fs::path target = fs::read_symlink(path, ec);
  return ec ? std::string() : target.string();
}

std::vector<std::string> StepDirectories(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind("step-", 0) == 0 && it->is_directory(ec) && !it->is_symlink(ec)) {
      out.push_back(name);
    }
  }
  return out;
}

Resolved Resolve(const std::string& dir) {
  Resolved r;
  const std::string current = Join(dir, kCurrent);
  std::error_code ec;
  if (!fs::is_symlink(current, ec)) {
    r.dir = dir;
    if (!fs::exists(Join(dir, "config.json"), ec)) {
      const std::vector<std::string> steps = StepDirectories(dir);
      if (!steps.empty()) {
        throw Error(dir + ": no committed checkpoint (" + steps.front() +
                    " is the remains of an interrupted first save, and `current` is missing)");
      }
    }
    return r;
  }
  r.link = ReadLink(current);
  if (r.link.empty() || r.link.find('/') != std::string::npos || r.link.rfind("step-", 0) != 0) {
    throw Error(current + ": expected a link to a step-* directory, got '" + r.link + "'");
  }
  r.dir = Join(dir, r.link);
  const std::string manifest_path = Join(r.dir, kManifest);
  const std::string text = ReadExisting(manifest_path);
  CheckJsonLimits(text, manifest_path);
  try {
    const Json m = Json::parse(text);
    if (!m.is_object() || m.value("format", "") != "ropekit-checkpoint") {
      throw Error("not a ropekit checkpoint manifest");
    }
    if (!m.at("step").is_number_integer()) throw Error("step must be an integer");
    r.step = m.at("step").get<int64_t>();
    for (auto it = m.at("files").begin(); it != m.at("files").end(); ++it) {
      const Json& f = it.value();
      if (!f.at("bytes").is_number_unsigned() || !f.at("fnv1a64").is_string()) {
        throw Error("files." + it.key() + " needs bytes and fnv1a64");
      }
      r.files[it.key()] = {f.at("bytes").get<uint64_t>(), f.at("fnv1a64").get<std::string>()};
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(manifest_path + ": corrupt checkpoint manifest (" + e.what() + ")");
  } catch (const Error& e) {
    throw Error(manifest_path + ": corrupt checkpoint manifest (" + e.what() + ")");
  }
  return r;
}

std::string ReadPart(const Resolved& r, const std::string& name) {
  return ReadExisting(Join(r.dir, name));
}

// Checks a part against the manifest. Called after the part's own parser accepted it, so that
// a damaged file is reported as such (truncated, bad JSON) and a foreign one as a mismatch.
void VerifyPart(const Resolved& r, const std::string& name, const std::string& bytes) {
  const std::string path = Join(r.dir, name);
  if (!r.step) return;
  const auto it = r.files.find(name);
  if (it == r.files.end()) {
    throw Error(path + ": not part of the checkpoint committed at step " + std::to_string(*r.step) +
                " (" + kManifest + " does not list it)");
  }
  const std::string sum =
      Hex(Fnv1a64(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  if (bytes.size() != it->second.bytes || sum != it->second.fnv1a64) {
    throw Error(path + ": does not match the checkpoint manifest of step " +
                std::to_string(*r.step) + " (" + std::to_string(bytes.size()) +
                " bytes, checksum " + sum + "; the manifest records " +
                std::to_string(it->second.bytes) + " bytes, checksum " + it->second.fnv1a64 +
                "): the file was changed or replaced after the checkpoint was saved");
  }
}

// The "ropekit.step" a safetensors file records, if any.
std::optional<int64_t> RecordedStep(const ParsedSafetensors& st, const std::string& path) {
  const auto it = st.metadata.find("ropekit.step");
  if (it == st.metadata.end()) return std::nullopt;
  const std::string& s = it->second;
  if (s.empty() || s.size() > 18 || !std::all_of(s.begin(), s.end(), ::isdigit)) {
    throw Error(path + ": __metadata__ ropekit.step must be a non-negative integer, got '" + s +
                "'");
  }
  return std::stoll(s);
}

void RequireStep(std::optional<int64_t> expected, const std::string& expected_from,
                 std::optional<int64_t> got, const std::string& path) {
  if (expected && got && *expected != *got) {
    throw Error(path + " is from step " + std::to_string(*got) + " but " + expected_from +
                " is from step " + std::to_string(*expected) +
                ": the checkpoint mixes two saves and cannot be resumed");
  }
}

// A lower bound of the weight bytes `config` implies (the matrices every position encoding has,
// at 2 bytes per value, the narrowest dtype read). 128-bit arithmetic: each factor is below 2^24
// (ModelConfig::Resolved() bounds them), so no product comes near 2^128.
unsigned __int128 MinWeightBytes(const ModelConfig& c) {
  using U = unsigned __int128;
  const U d = static_cast<U>(c.hidden_size), V = static_cast<U>(c.vocab_size);
  const U L = static_cast<U>(c.num_layers), F = static_cast<U>(c.intermediate_size);
  const U HD = static_cast<U>(c.num_heads) * static_cast<U>(c.resolved_head_dim());
  const U KD = static_cast<U>(c.num_kv_heads) * static_cast<U>(c.resolved_head_dim());
  return 2 * (V * d + L * (d * (2 * HD + 2 * KD) + 3 * d * F));
}

std::string U128ToString(unsigned __int128 v) {
  std::string s;
  do {
    s.insert(s.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  } while (v != 0);
  return s;
}

Model LoadModelFrom(const Resolved& r, const LoadOptions& options, std::optional<int64_t>* step) {
  const std::string config_path = Join(r.dir, "config.json");
  const std::string config_text = ReadPart(r, "config.json");
  ModelConfig config = ModelConfigFromJson(config_text, config_path).Resolved();
  VerifyPart(r, "config.json", config_text);
  const std::string weights_path = Join(r.dir, "model.safetensors");
  const std::string weights = ReadPart(r, "model.safetensors");
  const ParsedSafetensors parsed = ParseSafetensorsWithMetadata(weights, weights_path);
  VerifyPart(r, "model.safetensors", weights);
  *step = RecordedStep(parsed, weights_path);
  RequireStep(r.step, Join(r.dir, kManifest), *step, weights_path);
  // Before the model (whose size the config alone decides) is allocated.
  if (weights.size() < MinWeightBytes(config)) {
    throw Error(weights_path + ": " + std::to_string(weights.size()) + " bytes, but " +
                config_path + " (hidden_size " + std::to_string(config.hidden_size) + ", " +
                std::to_string(config.num_layers) + " layers) implies at least " +
                U128ToString(MinWeightBytes(config)) +
                " bytes of weights: the weights do not belong to this config");
  }
  Model model(config, 0);
  if (options.rope_override) model.SetRopeParams(*options.rope_override);
  std::span<float> params = model.parameters();
  std::vector<bool> seen(model.tensors().size(), false);
  for (const SafeTensor& t : parsed.tensors) {
    size_t index = model.tensors().size();
    for (size_t i = 0; i < model.tensors().size(); ++i) {
      if (model.tensors()[i].name == t.name) index = i;
    }
    if (index == model.tensors().size()) {
      if (t.name == "lm_head.weight" && model.config().tie_word_embeddings) continue;
      throw Error(weights_path + ": unexpected tensor " + t.name + " for this config.json");
    }
    const TensorInfo& info = model.tensors()[index];
    if (t.shape != info.shape) {
      std::string want, got;
      for (int64_t s : info.shape) want += std::to_string(s) + " ";
      for (int64_t s : t.shape) got += std::to_string(s) + " ";
      throw Error(weights_path + ": tensor " + t.name + " has shape [ " + got +
                  "], config.json implies [ " + want + "]");
    }
    std::copy(t.data.begin(), t.data.end(), params.begin() + info.offset);
    seen[index] = true;
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) throw Error(weights_path + ": tensor " + model.tensors()[i].name + " is missing");
  }
  return model;
}

Json ParseTrainerState(const Resolved& r) {
  const std::string path = Join(r.dir, "trainer_state.json");
  const std::string text = ReadPart(r, "trainer_state.json");
  CheckJsonLimits(text, path);
  Json j;
  try {
    j = Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": corrupt trainer state (" + e.what() + ")");
  }
  VerifyPart(r, "trainer_state.json", text);
  if (!j.is_object() || !j.contains("step") || !j["step"].is_number_integer() ||
      j["step"].get<int64_t>() < 0) {
    throw Error(path + ": step must be an integer >= 0" +
                (j.is_object() && j.contains("step") ? ", got " + j["step"].dump() : ""));
  }
  RequireStep(r.step, Join(r.dir, kManifest), j["step"].get<int64_t>(), path);
  return j;
}

OptimizerState LoadOptimizerFrom(const Resolved& r, const Model& model,
                                 std::optional<int64_t> model_step) {
  const std::string path = Join(r.dir, "optimizer.safetensors");
  const std::string state_path = Join(r.dir, "trainer_state.json");
  const std::string bytes = ReadPart(r, "optimizer.safetensors");
  ParsedSafetensors parsed = ParseSafetensorsWithMetadata(bytes, path);
  VerifyPart(r, "optimizer.safetensors", bytes);
  const std::optional<int64_t> opt_step = RecordedStep(parsed, path);
  RequireStep(r.step, Join(r.dir, kManifest), opt_step, path);
  OptimizerState state;
  for (SafeTensor& t : parsed.tensors) {
    if (t.name == "adam.m")
      state.m = std::move(t.data);
    else if (t.name == "adam.v")
      state.v = std::move(t.data);
  }
  if (state.m.size() != model.trainable_parameters().size() || state.v.size() != state.m.size()) {
    throw Error(path + ": adam.m / adam.v must each hold " +
                std::to_string(model.trainable_parameters().size()) +
                " floats for this model's trainable parameters");
  }
  state.step = ParseTrainerState(r)["step"].get<int64_t>();
  RequireStep(state.step, state_path, opt_step, path);
  RequireStep(state.step, state_path, model_step, Join(r.dir, "model.safetensors"));
  return state;
}

TrainConfig LoadTrainConfigFrom(const Resolved& r) {
  const Json j = ParseTrainerState(r);
  const std::string path = Join(r.dir, "trainer_state.json");
  if (!j.contains("train_config")) throw Error(path + ": no train_config recorded");
  return TrainConfigFromJson(j["train_config"].dump(), path);
}

// A prompt-learning adapter_config.json's model fields against the base.
// Prefix tuning follows PEFT's GQA rule: token_dim = Hkv * D, num_attention_heads = Hkv.
void CheckPromptFields(const Resolved& r, const ModelConfig& c, PeftType type) {
  const std::string path = Join(r.dir, kAdapterConfig);
  const Json j = Json::parse(ReadPart(r, kAdapterConfig));
  const bool prefix = type == PeftType::kPrefixTuning;
  const std::pair<const char*, int> fields[] = {
      {"token_dim", prefix ? c.num_kv_heads * c.head_dim : c.hidden_size},
      {"num_layers", c.num_layers},
      {"num_attention_heads", prefix ? c.num_kv_heads : c.num_heads}};
  for (const auto& [field, want] : fields) {
    if (!j.contains(field) || j[field].is_null()) continue;
    if (!j[field].is_number_integer() || j[field].get<int64_t>() != want) {
      throw Error(path + ": " + field + " " + j[field].dump() + " does not match the base model (" +
                  std::to_string(want) +
                  " accepted): the adapter was saved for another base shape");
    }
  }
}

// Adds the adapter of `r` (adapter_config.json as `config`, adapter_model.safetensors) to
// `model` and loads its tensors.
void ApplyAdapter(const Resolved& r, Model& model, const LoraConfig& config_in,
                  std::optional<int64_t>* step) {
  std::string path = Join(r.dir, kAdapterWeights);
  const std::string bytes = ReadPart(r, kAdapterWeights);
  ParsedSafetensors parsed = ParseSafetensorsWithMetadata(bytes, path);
  VerifyPart(r, kAdapterWeights, bytes);
  *step = RecordedStep(parsed, path);
  RequireStep(r.step, Join(r.dir, kManifest), *step, path);
  if (config_in.type != PeftType::kLora) CheckPromptFields(r, model.config(), config_in.type);
  LoraConfig config = config_in;
  if (config.prefix_projection) {
    // A training directory holds the encoder (resume trains it further); a plain PEFT adapter
    // only its output table, which inference needs.
    std::error_code ec;
    if (fs::exists(Join(r.dir, kPrefixEncoder), ec)) {
      path = Join(r.dir, kPrefixEncoder);
      const std::string enc = ReadPart(r, kPrefixEncoder);
      parsed = ParseSafetensorsWithMetadata(enc, path);
      VerifyPart(r, kPrefixEncoder, enc);
      RequireStep(r.step, Join(r.dir, kManifest), RecordedStep(parsed, path), path);
    } else {
      config.prefix_projection = false;
      config.prefix_hidden = 0;
    }
  }
  model.AddLora(config, 0);
  const std::vector<TensorInfo>& infos = model.trainable_tensors();
  std::span<float> params = model.trainable_parameters();
  std::vector<bool> seen(infos.size(), false);
  const ModelConfig& c = model.config();
  const std::string base = "the base model (hidden_size " + std::to_string(c.hidden_size) + ", " +
                           std::to_string(c.num_layers) + " layers, intermediate_size " +
                           std::to_string(c.intermediate_size) + ", vocab " +
                           std::to_string(c.vocab_size) + ")";
  for (const SafeTensor& t : parsed.tensors) {
    size_t index = infos.size();
    for (size_t i = 0; i < infos.size(); ++i) {
      if (infos[i].name == t.name) index = i;
    }
    if (index == infos.size()) {
      throw Error(path + ": tensor " + t.name + " has no place in " + base + " with " +
                  kAdapterConfig + "'s targets: the adapter was saved for another base or config");
    }
    const TensorInfo& info = infos[index];
    if (t.shape != info.shape) {
      std::string want, got;
      for (int64_t v : info.shape) want += std::to_string(v) + " ";
      for (int64_t v : t.shape) got += std::to_string(v) + " ";
      const std::string with =
          config.type == PeftType::kLora
              ? " with r = " + std::to_string(config.rank)
              : " with num_virtual_tokens = " + std::to_string(config.num_virtual_tokens);
      throw Error(path + ": tensor " + t.name + " has shape [ " + got + "], " + base + with +
                  " needs [ " + want + "]: the adapter was saved for another base shape");
    }
    std::copy(t.data.begin(), t.data.end(), params.begin() + info.offset);
    seen[index] = true;
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) throw Error(path + ": tensor " + infos[i].name + " is missing");
  }
}

LoraConfig ReadAdapterConfig(const Resolved& r) {
  const std::string path = Join(r.dir, kAdapterConfig);
  const std::string text = ReadPart(r, kAdapterConfig);
  LoraConfig config = LoraConfigFromPeftJson(text, path);
  VerifyPart(r, kAdapterConfig, text);
  return config;
}

bool HasAdapter(const Resolved& r) {
  std::error_code ec;
  return fs::exists(Join(r.dir, kAdapterConfig), ec);
}

// A training directory with an adapter: the base it names (with the base config recorded at
// training, RoPE scaling included), quantized again for QLoRA, plus the adapter.
Model LoadAdapterCheckpointModel(const Resolved& r, std::optional<int64_t>* step) {
  const Json state = ParseTrainerState(r);
  const std::string state_path = Join(r.dir, "trainer_state.json");
  if (!state.contains("adapter") || !state["adapter"].is_object() ||
      !state["adapter"].contains("base_config") || !state["adapter"].contains("qlora") ||
      !state["adapter"]["qlora"].is_boolean()) {
    throw Error(state_path + ": an adapter checkpoint needs adapter.qlora and adapter.base_config");
  }
  LoraConfig config = ReadAdapterConfig(r);
  config.qlora = state["adapter"]["qlora"].get<bool>();
  const std::string recorded = state["adapter"]["base_config"].dump();
  const ModelConfig trained = ModelConfigFromJson(recorded, state_path + " adapter.base_config");
  LoadOptions lo;
  if (trained.position_encoding.kind == PositionEncodingKind::kRope) {
    lo.rope_override = trained.position_encoding.rope;
  }
  if (config.base_model.empty()) {
    throw Error(Join(r.dir, kAdapterConfig) + ": base_model_name_or_path is not set");
  }
  Model model = LoadModel(config.base_model, lo);
  if (ModelConfigToJson(model.config()) != ModelConfigToJson(trained.Resolved())) {
    throw Error("base model " + config.base_model +
                " no longer matches the config the adapter in " + r.dir + " was trained on (" +
                state_path + " adapter.base_config)");
  }
  ApplyAdapter(r, model, config, step);
  return model;
}

// Runs `load` on the resolved checkpoint; if it fails because a concurrent save switched
// `current` (and removed the step directory being read), resolves again and retries.
template <typename F>
auto WithResolved(const std::string& dir, F&& load) {
  for (int attempt = 0;; ++attempt) {
    const Resolved r = Resolve(dir);
    try {
      return load(r);
    } catch (const Error&) {
      if (attempt >= 3 || r.link.empty() || ReadLink(Join(dir, kCurrent)) == r.link) throw;
    }
  }
}

void RemoveOtherStepDirectories(const std::string& dir, const std::string& keep) {
  for (const std::string& name : StepDirectories(dir)) {
    if (name == keep) continue;
    if (FaultPoint("remove", Join(dir, name)) != 0) continue;  // retried at the next save
    std::error_code ec;
    fs::remove_all(Join(dir, name), ec);
  }
}

}  // namespace

void WriteSafetensors(const std::string& path, const std::vector<SafeTensor>& tensors,
                      const std::vector<std::pair<std::string, std::string>>& metadata) {
  Json header = Json::object();
  size_t offset = 0;
  for (const SafeTensor& t : tensors) {
    int64_t numel = 1;
    for (int64_t s : t.shape) numel *= s;
    if (numel != static_cast<int64_t>(t.data.size())) {
      throw Error("safetensors: tensor " + t.name + " has " + std::to_string(t.data.size()) +
                  " values for its shape's " + std::to_string(numel));
    }
    if (header.contains(t.name) || t.name == "__metadata__") {
      throw Error("safetensors: duplicate or reserved tensor name " + t.name);
    }
    Json e;
    e["dtype"] = "F32";
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + t.data.size() * 4};
    header[t.name] = e;
    offset += t.data.size() * 4;
  }
  std::vector<uint8_t> data(offset);
  size_t at = 0;
  for (const SafeTensor& t : tensors) {
    if (!t.data.empty()) std::memcpy(data.data() + at, t.data.data(), t.data.size() * 4);
    at += t.data.size() * 4;
  }
  Json meta = Json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  meta["format"] = "pt";
  meta["ropekit.fnv1a64"] = Hex(Fnv1a64(data.data(), data.size()));
  header["__metadata__"] = meta;
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::vector<uint8_t> file(8 + text.size() + data.size());
  const uint64_t n = text.size();
  std::memcpy(file.data(), &n, 8);
  std::memcpy(file.data() + 8, text.data(), text.size());
  if (!data.empty()) std::memcpy(file.data() + 8 + text.size(), data.data(), data.size());
  WriteFileAtomic(path, file.data(), file.size());
}

std::vector<SafeTensor> ReadSafetensors(const std::string& path) {
  return ParseSafetensorsWithMetadata(ReadExisting(path), path).tensors;
}

std::vector<SafeTensor> ParseSafetensors(std::string_view bytes, const std::string& name) {
  return ParseSafetensorsWithMetadata(bytes, name).tensors;
}

void SaveCheckpoint(const std::string& dir, const Model& model, const OptimizerState* optimizer,
                    const TrainConfig* train_config) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    throw Error(dir + ": cannot create the checkpoint directory" +
                (ec ? " (" + ec.message() + ")" : std::string()));
  }
  const int64_t step_number = optimizer ? optimizer->step : 0;
  const std::string step = std::to_string(step_number);
  // The step directory: step-<8 digits>, or with a suffix when that name is the committed one.
  const std::string committed = ReadLink(Join(dir, kCurrent));
  char base[32];
  std::snprintf(base, sizeof(base), "step-%08lld", static_cast<long long>(step_number));
  std::string name = base;
  for (int k = 2; name == committed; ++k) name = std::string(base) + "." + std::to_string(k);
  const std::string step_dir = Join(dir, name);
  fs::remove_all(step_dir, ec);  // the remains of an interrupted save of the same step
  if (int err = FaultPoint("mkdir", step_dir); err != 0 || !fs::create_directory(step_dir, ec)) {
    throw Error(step_dir + ": cannot create the step directory (" +
                (err ? std::string(std::strerror(err)) : ec.message()) + ")");
  }
  std::map<std::string, FileRecord> records;
  auto record = [&](const std::string& file) {
    const std::string bytes = ReadFileToString(Join(step_dir, file));
    records[file] = {bytes.size(),
                     Hex(Fnv1a64(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()))};
  };
  const LoraConfig* lora = model.lora_config();
  const std::string config_file = lora ? kAdapterConfig : "config.json";
  const std::string weights_file = lora ? kAdapterWeights : "model.safetensors";
  WriteFileAtomic(Join(step_dir, config_file), lora ? AdapterConfigToPeftJson(*lora, model.config())
                                                    : ModelConfigToJson(model.config()));
  record(config_file);
  std::vector<SafeTensor> tensors;
  const std::span<const float> p = model.trainable_parameters();
  for (const TensorInfo& t : model.trainable_tensors()) {
    tensors.push_back(
        {t.name, t.shape, std::vector<float>(p.begin() + t.offset, p.begin() + t.offset + t.size)});
  }
  if (lora && lora->type == PeftType::kPrefixTuning && lora->prefix_projection) {
    // PEFT saves the encoder's output; the encoder itself goes beside it for --resume.
    WriteSafetensors(Join(step_dir, kPrefixEncoder), tensors, {{"ropekit.step", step}});
    record(kPrefixEncoder);
    const int64_t K = model.num_virtual_tokens();
    std::vector<float> table = model.prefix_table();
    const int64_t width = static_cast<int64_t>(table.size()) / K;
    tensors = {{"prompt_embeddings", {K, width}, std::move(table)}};
  }
  WriteSafetensors(Join(step_dir, weights_file), tensors, {{"ropekit.step", step}});
  record(weights_file);
  if (optimizer) {
    const int64_t P = static_cast<int64_t>(optimizer->m.size());
    WriteSafetensors(Join(step_dir, "optimizer.safetensors"),
                     {{"adam.m", {P}, optimizer->m}, {"adam.v", {P}, optimizer->v}},
                     {{"ropekit.step", step}});
    record("optimizer.safetensors");
    Json state;
    state["step"] = optimizer->step;
    if (train_config) state["train_config"] = Json::parse(TrainConfigToJson(*train_config));
    if (lora) {
      state["adapter"] = {{"qlora", lora->qlora},
                          {"base_config", Json::parse(ModelConfigToJson(model.config()))}};
    }
    WriteFileAtomic(Join(step_dir, "trainer_state.json"), state.dump(2) + "\n");
    record("trainer_state.json");
  }
  Json manifest;
  manifest["format"] = "ropekit-checkpoint";
  manifest["version"] = 1;
  manifest["step"] = step_number;
  manifest["files"] = Json::object();
  for (const auto& [file, rec] : records) {
    manifest["files"][file] = {{"bytes", rec.bytes}, {"fnv1a64", rec.fnv1a64}};
  }
  WriteFileAtomic(Join(step_dir, kManifest), manifest.dump(2) + "\n");
  SyncDirectory(step_dir);
  // The Hugging Face view: fixed links through `current` (created once; a plain file left by an
  // older layout is replaced; a link to a file this checkpoint lacks is removed).
  bool changed = false;
  for (const char* file : kCheckpointFiles) {
    const std::string link = Join(dir, file);
    const std::string target = std::string(kCurrent) + "/" + file;
    if (records.count(file)) {
      if (!fs::is_symlink(link, ec) || ReadLink(link) != target) {
        ReplaceSymlink(link, target);
        changed = true;
      }
    } else if (fs::is_symlink(link, ec) || fs::exists(link, ec)) {
      if (int err = FaultPoint("unlink", link); err != 0 || !fs::remove(link, ec)) {
        throw Error(link + ": cannot remove (" + (err ? std::strerror(err) : ec.message()) + ")");
      }
      changed = true;
    }
  }
  if (changed) SyncDirectory(dir);
  // The commit point.
  ReplaceSymlink(Join(dir, kCurrent), name);
  SyncDirectory(dir);
  RemoveOtherStepDirectories(dir, name);
}

int CleanCheckpointDirectory(const std::string& dir) {
  int removed = RemoveStaleTempFiles(dir);
  const std::string committed = ReadLink(Join(dir, kCurrent));
  for (const std::string& name : StepDirectories(dir)) {
    if (name == committed) continue;
    std::error_code ec;
    if (fs::remove_all(Join(dir, name), ec) > 0) ++removed;
  }
  return removed;
}

std::optional<int64_t> FindCheckpoint(const std::string& dir) {
  std::error_code ec;
  if (fs::is_symlink(Join(dir, kCurrent), ec)) {
    return WithResolved(dir, [](const Resolved& r) { return r.step.value_or(0); });
  }
  for (const char* file : kCheckpointFiles) {
    // A link through a missing `current` is the remains of an interrupted first save.
    if (fs::exists(Join(dir, file), ec)) return 0;
  }
  return std::nullopt;
}

void RemoveCheckpoint(const std::string& dir) {
  std::error_code ec;
  fs::remove(Join(dir, kCurrent), ec);  // first: from here on nothing is committed
  if (ec) throw Error(Join(dir, kCurrent) + ": cannot remove (" + ec.message() + ")");
  for (const char* file : kCheckpointFiles) {
    fs::remove(Join(dir, file), ec);
    if (ec) throw Error(Join(dir, file) + ": cannot remove (" + ec.message() + ")");
  }
  CleanCheckpointDirectory(dir);
  SyncDirectory(dir);
}

Model LoadModel(const std::string& dir, const LoadOptions& options) {
  return WithResolved(dir, [&](const Resolved& r) {
    std::optional<int64_t> step;
    return LoadModelFrom(r, options, &step);
  });
}

TrainingCheckpoint LoadCheckpoint(const std::string& dir) {
  return WithResolved(dir, [&](const Resolved& r) {
    std::optional<int64_t> model_step;
    Model model = HasAdapter(r) ? LoadAdapterCheckpointModel(r, &model_step)
                                : LoadModelFrom(r, {}, &model_step);
    OptimizerState state = LoadOptimizerFrom(r, model, model_step);
    TrainConfig config = LoadTrainConfigFrom(r);
    return TrainingCheckpoint{std::move(model), std::move(state), std::move(config)};
  });
}

OptimizerState LoadOptimizerState(const std::string& dir, const Model& model) {
  return WithResolved(dir,
                      [&](const Resolved& r) { return LoadOptimizerFrom(r, model, std::nullopt); });
}

TrainConfig LoadTrainConfig(const std::string& dir) {
  return WithResolved(dir, [&](const Resolved& r) { return LoadTrainConfigFrom(r); });
}

}  // namespace ropekit

namespace ropekit {

namespace {

// The fields of peft's PromptLearningConfig (config.py) common to prompt and prefix tuning, as
// save_pretrained writes them for a causal LM (one transformer submodule).
nlohmann::json PromptLearningJson(const char* peft_type, const LoraConfig& c) {
  nlohmann::json j;
  j["peft_type"] = peft_type;
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = c.base_model;
  j["revision"] = nullptr;
  j["inference_mode"] = true;
  j["num_virtual_tokens"] = c.num_virtual_tokens;
  j["num_transformer_submodules"] = 1;
  j["modules_to_save"] = nullptr;
  return j;
}

// peft PromptLearningConfig / PromptTuningConfig fields (config.py, tuners/prompt_tuning/
// config.py) as save_pretrained writes them for a causal LM (num_transformer_submodules 1;
// token_dim, num_layers and num_attention_heads filled from the model config as
// _prepare_prompt_learning_config does).
std::string PromptConfigToPeftJson(const LoraConfig& c, const ModelConfig& m) {
  nlohmann::json j = PromptLearningJson("PROMPT_TUNING", c);
  j["token_dim"] = m.hidden_size;
  j["num_layers"] = m.num_layers;
  j["num_attention_heads"] = m.num_heads;
  const bool text = !c.prompt_init_text.empty();
  j["prompt_tuning_init"] = text ? "TEXT" : "RANDOM";
  j["prompt_tuning_init_text"] = text ? nlohmann::json(c.prompt_init_text) : nlohmann::json();
  // PEFT requires a tokenizer name with TEXT; ropekit's is byte-level (one id per byte), named
  // by the base checkpoint.
  j["tokenizer_name_or_path"] = text ? nlohmann::json(c.base_model) : nlohmann::json();
  j["tokenizer_kwargs"] = nullptr;
  return j.dump(2) + "\n";
}

}  // namespace

// peft PrefixTuningConfig (tuners/prefix_tuning/config.py) with PEFT's GQA rule applied as
// _prepare_prompt_learning_config does: token_dim = head_dim * num_key_value_heads,
// num_attention_heads = num_key_value_heads.
std::string PrefixConfigToPeftJson(const LoraConfig& c, const ModelConfig& m) {
  const int td = m.num_kv_heads * m.head_dim;
  nlohmann::json j = PromptLearningJson("PREFIX_TUNING", c);
  j["token_dim"] = td;
  j["num_layers"] = m.num_layers;
  j["num_attention_heads"] = m.num_kv_heads;
  j["encoder_hidden_size"] = c.prefix_hidden > 0 ? c.prefix_hidden : td;
  j["prefix_projection"] = c.prefix_projection;
  return j.dump(2) + "\n";
}

std::string AdapterConfigToPeftJson(const LoraConfig& c, const ModelConfig& model) {
  if (c.type == PeftType::kPromptTuning) return PromptConfigToPeftJson(c, model.Resolved());
  if (c.type == PeftType::kPrefixTuning) return PrefixConfigToPeftJson(c, model.Resolved());
  return LoraConfigToPeftJson(c);
}

std::string LoraConfigToPeftJson(const LoraConfig& c) {
  // peft LoraConfig fields (tuners/lora/config.py) with their defaults where ropekit has no
  // counterpart; nlohmann::json keeps keys sorted, as PEFT's sort_keys=True.
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = c.base_model;
  j["revision"] = nullptr;
  j["inference_mode"] = true;
  j["r"] = c.rank;
  j["lora_alpha"] = c.alpha;
  j["lora_dropout"] = c.dropout;
  j["target_modules"] = c.target_modules;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["use_rslora"] = false;
  j["use_dora"] = false;
  j["init_lora_weights"] = true;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  std::vector<std::string> save;
  if (c.train_embeddings) save.push_back("embed_tokens");
  if (c.train_norms) {
    for (const char* n : {"input_layernorm", "post_attention_layernorm", "norm"}) save.push_back(n);
  }
  j["modules_to_save"] = save.empty() ? nlohmann::json(nullptr) : nlohmann::json(save);
  return j.dump(2) + "\n";
}

LoraConfig LoraConfigFromPeftJson(std::string_view text, const std::string& name) {
  CheckJsonLimits(text, name);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw Error(name + ": not valid JSON (" + e.what() + ")");
  }
  LoraConfig c;
  try {
    if (!j.is_object()) throw Error("the top level must be a JSON object");
    const std::string type = j.value("peft_type", std::string());
    if (type == "PROMPT_TUNING") {
      c.type = PeftType::kPromptTuning;
      c.num_virtual_tokens = j.at("num_virtual_tokens").get<int>();
      if (j.value("prompt_tuning_init", std::string("RANDOM")) == "TEXT" &&
          j.contains("prompt_tuning_init_text") && j["prompt_tuning_init_text"].is_string()) {
        c.prompt_init_text = j["prompt_tuning_init_text"].get<std::string>();
      }
      if (j.value("num_transformer_submodules", 1) != 1) {
        throw Error("num_transformer_submodules must be 1 (a causal LM)");
      }
      if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
        c.base_model = j["base_model_name_or_path"].get<std::string>();
      }
      return c;
    }
    if (type == "PREFIX_TUNING") {
      c.type = PeftType::kPrefixTuning;
      c.num_virtual_tokens = j.at("num_virtual_tokens").get<int>();
      if (j.value("num_transformer_submodules", 1) != 1) {
        throw Error("num_transformer_submodules must be 1 (a causal LM)");
      }
      c.prefix_projection = j.value("prefix_projection", false);
      if (c.prefix_projection && j.contains("encoder_hidden_size") &&
          !j["encoder_hidden_size"].is_null()) {
        c.prefix_hidden = j["encoder_hidden_size"].get<int>();
      }
      if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
        c.base_model = j["base_model_name_or_path"].get<std::string>();
      }
      return c;
    }
    if (type != "LORA") {
      throw Error("peft_type is '" + type + "'; supported: LORA, PROMPT_TUNING, PREFIX_TUNING");
    }
    c.rank = j.at("r").get<int>();
    c.alpha = j.value("lora_alpha", 8.0);
    c.dropout = j.value("lora_dropout", 0.0);
    if (j.value("bias", std::string("none")) != "none") throw Error("bias must be \"none\"");
    if (j.value("use_dora", false) || j.value("use_rslora", false) ||
        j.value("fan_in_fan_out", false)) {
      throw Error("use_dora, use_rslora and fan_in_fan_out are not supported");
    }
    const nlohmann::json& t = j.at("target_modules");
    c.target_modules.clear();
    if (t.is_string()) {
      throw Error("target_modules as a regular expression is not supported; give a list");
    }
    for (const nlohmann::json& m : t) c.target_modules.push_back(m.get<std::string>());
    if (j.contains("modules_to_save") && !j["modules_to_save"].is_null()) {
      for (const nlohmann::json& m : j["modules_to_save"]) {
        const std::string n = m.get<std::string>();
        if (n == "embed_tokens") {
          c.train_embeddings = true;
        } else if (n == "input_layernorm" || n == "post_attention_layernorm" || n == "norm") {
          c.train_norms = true;
        } else {
          throw Error("modules_to_save entry '" + n +
                      "' is not supported (embed_tokens, input_layernorm, "
                      "post_attention_layernorm, norm)");
        }
      }
    }
    if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
      c.base_model = j["base_model_name_or_path"].get<std::string>();
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(name + ": " + e.what());
  } catch (const Error& e) {
    throw Error(name + ": " + e.what());
  }
  return c;
}

void LoadLoraAdapter(Model& model, const std::string& dir, bool qlora) {
  std::error_code ec;
  if (!fs::exists(Join(dir, kAdapterConfig), ec)) {
    throw Error("--adapter " + dir + ": no " + kAdapterConfig + " (not a PEFT adapter directory)");
  }
  WithResolved(dir, [&](const Resolved& r) {
    LoraConfig config = ReadAdapterConfig(r);
    config.qlora = qlora;
    std::optional<int64_t> step;
    ApplyAdapter(r, model, config, &step);
    return 0;
  });
}

}  // namespace ropekit
