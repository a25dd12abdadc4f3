// Safetensors reading / writing and checkpoint directories.
//
// Safetensors layout: u64 little-endian N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {string: string}}, then the data (offsets relative to its start). The header
// is padded with spaces to a multiple of 8 bytes. ropekit adds "ropekit.fnv1a64" (FNV-1a 64 of
// the data bytes, hex) to the metadata and verifies it on read when present, so a corrupted
// payload is reported, not silently loaded.
#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ropekit/model.h"
#include "src/util/half.h"
#include "src/util/npy.h"

namespace ropekit {
namespace {

using Json = nlohmann::ordered_json;
static_assert(std::endian::native == std::endian::little, "little-endian hosts only");

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

std::vector<uint8_t> ReadAll(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) throw Error(path + ": file not found");
  if (!std::filesystem::is_regular_file(path, ec)) throw Error(path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open the file for reading");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(path + ": read error");
  return bytes;
}

std::string ReadString(const std::string& path) {
  const std::vector<uint8_t> b = ReadAll(path);
  return std::string(b.begin(), b.end());
}

void WriteString(const std::string& path, const std::string& text) {
  WriteFileAtomic(path, text.data(), text.size());
}

std::string Join(const std::string& dir, const char* file) {
  return (std::filesystem::path(dir) / file).string();
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
  const std::vector<uint8_t> file = ReadAll(path);
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
  Json header;
  try {
    header = Json::parse(file.begin() + 8, file.begin() + 8 + static_cast<int64_t>(n));
  } catch (const std::exception& e) {
    fail(std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) fail("header is not a JSON object");
  const uint8_t* data = file.data() + 8 + n;
  const size_t data_size = file.size() - 8 - n;
  std::vector<SafeTensor> out;
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
        if (dtype == "BF16") {
          t.data[i] = Bf16ToFloat(bits);
        } else {
          t.data[i] = F16ToFloat(bits);
        }
      }
    }
    out.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) fail("tensor data ranges overlap");
  }
  if (max_end != data_size) {
    fail("the data has " + std::to_string(data_size) + " bytes but the tensors cover " +
         std::to_string(max_end));
  }
  if (header.contains("__metadata__") && header["__metadata__"].is_object() &&
      header["__metadata__"].contains("ropekit.fnv1a64")) {
    const Json& h = header["__metadata__"]["ropekit.fnv1a64"];
    if (!h.is_string() || h.get<std::string>() != Hex(Fnv1a64(data, data_size))) {
      fail("the data checksum (ropekit.fnv1a64) does not match");
    }
  }
  return out;
}

void SaveCheckpoint(const std::string& dir, const Model& model, const OptimizerState* optimizer,
                    const TrainConfig* train_config) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    throw Error(dir + ": cannot create the checkpoint directory" +
                (ec ? " (" + ec.message() + ")" : std::string()));
  }
  const std::string step = std::to_string(optimizer ? optimizer->step : 0);
  WriteString(Join(dir, "config.json"), ModelConfigToJson(model.config()));
  std::vector<SafeTensor> tensors;
  const std::span<const float> p = model.parameters();
  for (const TensorInfo& t : model.tensors()) {
    tensors.push_back(
        {t.name, t.shape, std::vector<float>(p.begin() + t.offset, p.begin() + t.offset + t.size)});
  }
  WriteSafetensors(Join(dir, "model.safetensors"), tensors, {{"ropekit.step", step}});
  if (optimizer) {
    const int64_t P = static_cast<int64_t>(optimizer->m.size());
    WriteSafetensors(Join(dir, "optimizer.safetensors"),
                     {{"adam.m", {P}, optimizer->m}, {"adam.v", {P}, optimizer->v}},
                     {{"ropekit.step", step}});
    Json state;
    state["step"] = optimizer->step;
    if (train_config) state["train_config"] = Json::parse(TrainConfigToJson(*train_config));
    WriteString(Join(dir, "trainer_state.json"), state.dump(2) + "\n");
  }
}

Model LoadModel(const std::string& dir, const LoadOptions& options) {
  const std::string config_path = Join(dir, "config.json");
  ModelConfig config = ModelConfigFromJson(ReadString(config_path), config_path);
  Model model(config, 0);
  if (options.rope_override) model.SetRopeParams(*options.rope_override);
  const std::string weights_path = Join(dir, "model.safetensors");
  std::vector<SafeTensor> tensors = ReadSafetensors(weights_path);
  std::span<float> params = model.parameters();
  std::vector<bool> seen(model.tensors().size(), false);
  for (const SafeTensor& t : tensors) {
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

OptimizerState LoadOptimizerState(const std::string& dir, const Model& model) {
  const std::string path = Join(dir, "optimizer.safetensors");
  const std::string state_path = Join(dir, "trainer_state.json");
  std::vector<SafeTensor> tensors = ReadSafetensors(path);
  OptimizerState state;
  for (SafeTensor& t : tensors) {
    if (t.name == "adam.m")
      state.m = std::move(t.data);
    else if (t.name == "adam.v")
      state.v = std::move(t.data);
  }
  if (state.m.size() != model.parameters().size() || state.v.size() != state.m.size()) {
    throw Error(path + ": adam.m / adam.v must each hold " +
                std::to_string(model.parameters().size()) + " floats for this model");
  }
  Json j;
  try {
    j = Json::parse(ReadString(state_path));
    state.step = j.at("step").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw Error(state_path + ": corrupt trainer state (" + e.what() + ")");
  }
  if (state.step < 0) throw Error(state_path + ": step must be >= 0");
  return state;
}

TrainConfig LoadTrainConfig(const std::string& dir) {
  const std::string path = Join(dir, "trainer_state.json");
  Json j;
  try {
    j = Json::parse(ReadString(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": corrupt trainer state (" + e.what() + ")");
  }
  if (!j.is_object() || !j.contains("train_config")) {
    throw Error(path + ": no train_config recorded");
  }
  return TrainConfigFromJson(j["train_config"].dump(), path);
}

}  // namespace ropekit
