// `ropekit pe`: prints or writes the tables of every position encoding.
//
//   ropekit pe --kind sinusoidal --seq-len T --dim D [--base N]       -> float32 [T, D]
//   ropekit pe --kind learned --seq-len T --dim D [--seed S] [--init-std X]
//                                                                      -> float32 [T, D]
//   ropekit pe --kind alibi --heads H                                  -> float64 slopes [H]
//   ropekit pe --kind alibi --heads H --seq-len T                      -> float32 bias [H, T, T]
//   ropekit pe --kind t5 --seq-len T [--num-buckets B] [--max-distance M] [--bidirectional]
//                                                                      -> int64 buckets [T, T]
//   ropekit pe --kind rope --seq-len T --dim D [--base N]              -> float32 [T, D]
//   ropekit pe --kind rope --seq-len T --config CONFIG.json            -> float32 [T, R]
//   ropekit pe --kind none
//
// Bias and bucket entry [h, i, j] / [i, j] is for query position i and key position j (bucket of
// j - i); every (i, j) is given, the causal mask is not applied. The rope table row p is
// [cos_0 .. cos_{N-1} | sin_0 .. sin_{N-1}] (RopeTable's row layout, N = R / 2, attention factor
// applied), exact numerics; with --dim/--base the default rope type and R = D, with --config the
// config's rope type, rotary dimension and scaling (length-dependent types use --seq-len). Without
// --output the values are printed (human-readable, or JSON with
// --json); with --output they are written as .npy. Every invalid option is a one-line error
// naming it (exit code 1).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "ropekit/hf_config.h"
#include "ropekit/position_encoding.h"
#include "ropekit/rope.h"
#include "src/util/npy.h"
#include "tools/command.h"

namespace ropekit::cli {
namespace {

// Largest table the command produces, in bytes of its output dtype (2^28 = 256 MiB). The table
// is built directly in its output bytes and written without another copy, so the command's peak
// memory is at most twice this (the sinusoidal and learned tables also hold one float32 copy
// while they are converted), plus the process's baseline.
constexpr int64_t kMaxTableBytes = int64_t{1} << 28;
// Largest table printed as JSON (values): a JSON tree and its text take ~40 bytes per value.
constexpr int64_t kMaxJsonValues = int64_t{1} << 22;
// Rows printed in human-readable output before eliding.
constexpr int64_t kMaxPrintedRows = 32;

struct PeOptions {
  std::string kind;
  std::string seq_len, dim, heads, base, num_buckets, max_distance, seed, init_std;
  bool bidirectional = false;
  std::string config;
  std::string output;
  bool json = false;
};

int64_t ParseInt(const std::string& option, const std::string& text, int64_t lo, int64_t hi) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end || value < lo || value > hi) {
    throw Error(option + ": '" + text + "' is not an integer in [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "]");
  }
  return value;
}

double ParseNumber(const std::string& option, const std::string& text) {
  // strtod accepts what Python's float() accepts (decimal, exponent, inf/nan are rejected below).
  char* end = nullptr;
  const double value = text.empty() ? 0.0 : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(value)) {
    throw Error(option + ": '" + text + "' is not a finite number");
  }
  return value;
}

// A table to print or write: float32, float64 or int64 values with a shape, held as the .npy
// payload itself and filled in order with Push.
class Table {
 public:
  // Checks the size against kMaxTableBytes (the error names `option`) and allocates the payload.
  void Allocate(const std::string& option, NpyDType dtype, std::vector<int64_t> shape) {
    array_.dtype = dtype;
    long double bytes = static_cast<long double>(array_.ItemSize());
    for (int64_t d : shape) bytes *= static_cast<long double>(d);
    if (bytes > static_cast<long double>(kMaxTableBytes)) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%.0Lf", bytes);
      throw Error(option + ": the table would take " + buf + " bytes as " + NpyDTypeName(dtype) +
                  " (limit " + std::to_string(kMaxTableBytes) + " bytes, 256 MiB)");
    }
    array_.shape = std::move(shape);
    array_.bytes.assign(static_cast<size_t>(bytes), 0);
    size_ = 0;
  }
  void Push(double v) {
    uint8_t* dst = array_.bytes.data() + size_ * array_.ItemSize();
    if (array_.dtype == NpyDType::kF32) {
      const float f = static_cast<float>(v);
      std::memcpy(dst, &f, sizeof(f));
    } else if (array_.dtype == NpyDType::kF64) {
      std::memcpy(dst, &v, sizeof(v));
    } else {
      const int64_t i = static_cast<int64_t>(v);
      std::memcpy(dst, &i, sizeof(i));
    }
    ++size_;
  }
  void Push(const float* values, size_t n) {
    for (size_t k = 0; k < n; ++k) Push(values[k]);
  }
  // Every float32/int64 value of a table is exact in double.
  double Get(size_t k) const {
    const uint8_t* src = array_.bytes.data() + k * array_.ItemSize();
    if (array_.dtype == NpyDType::kF32) {
      float f;
      std::memcpy(&f, src, sizeof(f));
      return f;
    }
    if (array_.dtype == NpyDType::kF64) {
      double d;
      std::memcpy(&d, src, sizeof(d));
      return d;
    }
    int64_t i;
    std::memcpy(&i, src, sizeof(i));
    return static_cast<double>(i);
  }
  size_t size() const { return size_; }
  NpyDType dtype() const { return array_.dtype; }
  const std::vector<int64_t>& shape() const { return array_.shape; }
  const NpyArray& array() const { return array_; }

 private:
  NpyArray array_;
  size_t size_ = 0;  // values pushed so far
};

// Nested JSON arrays in C order.
nlohmann::json ToJson(const Table& table, size_t dim, size_t& offset) {
  nlohmann::json out = nlohmann::json::array();
  const int64_t n = table.shape().empty() ? 1 : table.shape()[dim];
  for (int64_t k = 0; k < n; ++k) {
    if (dim + 1 < table.shape().size()) {
      out.push_back(ToJson(table, dim + 1, offset));
    } else if (table.dtype() == NpyDType::kI64) {
      out.push_back(static_cast<int64_t>(table.Get(offset++)));
    } else {
      out.push_back(table.Get(offset++));
    }
  }
  return out;
}

std::string FormatValue(const Table& table, double v) {
  char buf[40];
  if (table.dtype() == NpyDType::kI64) {
    std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  } else {
    std::snprintf(buf, sizeof(buf), "%.9g", v);
  }
  return buf;
}

// Prints the last dimension as rows, with leading indices, eliding rows beyond kMaxPrintedRows.
void PrintTable(const std::string& name, const Table& table) {
  std::string shape;
  for (size_t d = 0; d < table.shape().size(); ++d) {
    shape += (d ? ", " : "") + std::to_string(table.shape()[d]);
  }
  std::printf("%s: %s [%s]\n", name.c_str(), NpyDTypeName(table.dtype()).c_str(), shape.c_str());
  const int64_t cols = table.shape().back();
  const int64_t rows = cols == 0 ? 0 : static_cast<int64_t>(table.size()) / cols;
  for (int64_t r = 0; r < rows && r < kMaxPrintedRows; ++r) {
    std::string index;
    int64_t rest = r;
    for (int d = static_cast<int>(table.shape().size()) - 2; d >= 0; --d) {
      index = std::to_string(rest % table.shape()[d]) + (index.empty() ? "" : ", ") + index;
      rest /= table.shape()[d];
    }
    std::string line = table.shape().size() > 1 ? "  [" + index + "]" : " ";
    for (int64_t c = 0; c < cols; ++c) {
      line += ' ';
      line += FormatValue(table, table.Get(r * cols + c));
    }
    std::printf("%s\n", line.c_str());
  }
  if (rows > kMaxPrintedRows) {
    std::printf("  ... %lld more rows (use --output FILE.npy or --json)\n",
                static_cast<long long>(rows - kMaxPrintedRows));
  }
}

nlohmann::json ActsOn(PositionEncodingKind kind) {
  nlohmann::json sites = nlohmann::json::array();
  if (ActsOnEmbeddings(kind)) sites.push_back("embeddings");
  if (ActsOnQueryKey(kind)) sites.push_back("query_key");
  if (ActsOnLogits(kind)) sites.push_back("logits");
  return sites;
}

int RunPe(const PeOptions& o, const std::map<std::string, bool>& given) {
  PositionEncodingKind kind;
  try {
    kind = ParsePositionEncodingKind(o.kind);
  } catch (const Error& e) {
    throw Error(std::string("--kind: ") + e.what());
  }
  const std::string kind_name(PositionEncodingKindName(kind));
  // Options each kind accepts; any other given option is an error rather than silently ignored.
  static const std::map<PositionEncodingKind, std::set<std::string>> kAccepted = {
      {PositionEncodingKind::kNone, {}},
      {PositionEncodingKind::kSinusoidal, {"--seq-len", "--dim", "--base"}},
      {PositionEncodingKind::kLearned, {"--seq-len", "--dim", "--seed", "--init-std"}},
      {PositionEncodingKind::kAlibi, {"--heads", "--seq-len"}},
      {PositionEncodingKind::kT5,
       {"--seq-len", "--num-buckets", "--max-distance", "--bidirectional"}},
      {PositionEncodingKind::kRope, {"--seq-len", "--dim", "--base", "--config"}},
  };
  for (const auto& [option, present] : given) {
    if (present && !kAccepted.at(kind).count(option)) {
      throw Error(option + ": does not apply to --kind " + kind_name);
    }
  }
  auto require = [&](const char* option) {
    if (!given.at(option)) throw Error(std::string(option) + ": required for --kind " + kind_name);
  };

  nlohmann::json info;
  info["kind"] = kind_name;
  info["acts_on"] = ActsOn(kind);
  Table table;
  std::string table_name;

  switch (kind) {
    case PositionEncodingKind::kNone:
      if (!o.output.empty()) throw Error("--output: kind none has no table to write");
      if (o.json) {
        std::printf("%s\n", info.dump().c_str());
      } else {
        std::printf("none: no position information; attention relies on the causal mask only\n");
      }
      return 0;
    case PositionEncodingKind::kSinusoidal:
    case PositionEncodingKind::kLearned: {
      require("--seq-len");
      require("--dim");
      const int64_t seq_len = ParseInt("--seq-len", o.seq_len, 1, kMaxPosition + 1);
      const int64_t dim = ParseInt("--dim", o.dim, 1, 1 << 20);
      table.Allocate("--seq-len", NpyDType::kF32, {seq_len, dim});
      info["seq_len"] = seq_len;
      info["dim"] = dim;
      std::vector<float> values;
      if (kind == PositionEncodingKind::kSinusoidal) {
        const double base = given.at("--base") ? ParseNumber("--base", o.base) : 10000.0;
        if (!(base > 1.0)) throw Error("--base: " + o.base + " must be > 1");
        values = SinusoidalTable(seq_len, static_cast<int>(dim), base);
        info["base"] = base;
        table_name = "table";
      } else {
        PositionEncodingSpec spec;
        spec.kind = kind;
        spec.dim = static_cast<int>(dim);
        spec.max_positions = seq_len;
        if (given.at("--init-std")) {
          spec.init_std = ParseNumber("--init-std", o.init_std);
          if (spec.init_std < 0) throw Error("--init-std: " + o.init_std + " must be >= 0");
        }
        const uint64_t seed = given.at("--seed")
                                  ? static_cast<uint64_t>(ParseInt(
                                        "--seed", o.seed, 0, std::numeric_limits<int64_t>::max()))
                                  : 0;
        const PositionEncoding pe(spec);
        values.resize(pe.num_parameters());
        pe.InitParameters(seed, values);
        info["seed"] = seed;
        info["init_std"] = spec.init_std;
        table_name = "table";
      }
      table.Push(values.data(), values.size());
      break;
    }
    case PositionEncodingKind::kAlibi: {
      require("--heads");
      const int heads = static_cast<int>(ParseInt("--heads", o.heads, 1, 1 << 20));
      const std::vector<double> slopes = AlibiSlopes(heads);
      info["heads"] = heads;
      info["slopes"] = slopes;
      if (!given.at("--seq-len")) {
        table.Allocate("--heads", NpyDType::kF64, {heads});
        for (double s : slopes) table.Push(s);
        table_name = "slopes";
        break;
      }
      const int64_t seq_len = ParseInt("--seq-len", o.seq_len, 1, kMaxPosition + 1);
      table.Allocate("--seq-len", NpyDType::kF32, {heads, seq_len, seq_len});
      info["seq_len"] = seq_len;
      PositionEncodingSpec spec;
      spec.kind = kind;
      spec.num_heads = heads;
      const PositionEncoding pe(spec);
      std::vector<int64_t> keys(seq_len);
      for (int64_t j = 0; j < seq_len; ++j) keys[j] = j;
      std::vector<float> row(seq_len);
      for (int h = 0; h < heads; ++h) {
        for (int64_t i = 0; i < seq_len; ++i) {
          std::fill(row.begin(), row.end(), 0.0f);
          pe.AddLogitBias(i, keys, h, {}, row.data());
          table.Push(row.data(), row.size());
        }
      }
      table_name = "bias";
      break;
    }
    case PositionEncodingKind::kT5: {
      require("--seq-len");
      const int64_t seq_len = ParseInt("--seq-len", o.seq_len, 1, kMaxPosition + 1);
      const int buckets =
          given.at("--num-buckets")
              ? static_cast<int>(ParseInt("--num-buckets", o.num_buckets, 1, 1 << 20))
              : 32;
      const int max_distance =
          given.at("--max-distance")
              ? static_cast<int>(ParseInt("--max-distance", o.max_distance, 1, kMaxPosition))
              : 128;
      table.Allocate("--seq-len", NpyDType::kI64, {seq_len, seq_len});
      PositionEncodingSpec spec;
      spec.kind = kind;
      spec.num_heads = 1;
      spec.num_buckets = buckets;
      spec.max_distance = max_distance;
      spec.bidirectional = o.bidirectional;
      try {
        spec.Validate();
      } catch (const Error& e) {
        // Name the command-line option rather than the struct field.
        const std::string what = e.what();
        throw Error((what.rfind("max_distance", 0) == 0 ? "--max-distance (" : "--num-buckets (") +
                    what + ")");
      }
      const PositionEncoding pe(spec);
      for (int64_t i = 0; i < seq_len; ++i) {
        for (int64_t j = 0; j < seq_len; ++j) table.Push(pe.Bucket(j - i));
      }
      info["seq_len"] = seq_len;
      info["num_buckets"] = buckets;
      info["max_distance"] = max_distance;
      info["bidirectional"] = o.bidirectional;
      table_name = "buckets";
      break;
    }
    case PositionEncodingKind::kRope: {
      require("--seq-len");
      const int64_t seq_len = ParseInt("--seq-len", o.seq_len, 1, kMaxPosition + 1);
      RopeParams params;
      if (given.at("--config")) {
        for (const char* option : {"--dim", "--base"}) {
          if (given.at(option)) {
            throw Error(std::string(option) +
                        ": does not apply with --config (the config sets it)");
          }
        }
        params = LoadHfConfig(o.config).params;
        info["config"] = o.config;
        info["rope_type"] = std::string(RopeTypeName(params.type));
      } else {
        require("--dim");
        params.head_dim = static_cast<int>(ParseInt("--dim", o.dim, 2, 1 << 20));
        if (params.head_dim % 2 != 0) throw Error("--dim: " + o.dim + " must be even for rope");
        params.rotary_dim = params.head_dim;
        if (given.at("--base")) params.base = ParseNumber("--base", o.base);
        if (!(params.base > 1.0)) throw Error("--base: " + o.base + " must be > 1");
        params.max_position_embeddings = seq_len;
      }
      // seq_len selects the length-dependent frequencies (dynamic NTK, LongRoPE long factors).
      const RopeTable rope(ComputeFrequencies(params, Numerics::kExact, seq_len));
      const int n = rope.num_pairs();
      table.Allocate("--seq-len", NpyDType::kF32, {seq_len, 2 * n});
      std::vector<float> cos(n), sin(n);
      for (int64_t p = 0; p < seq_len; ++p) {
        rope.ComputeRow(p, cos.data(), sin.data());
        table.Push(cos.data(), cos.size());
        table.Push(sin.data(), sin.size());
      }
      info["attention_factor"] = rope.frequencies().attention_factor;
      info["seq_len"] = seq_len;
      info["dim"] = params.head_dim;
      info["rotary_dim"] = params.rotary_dim;
      info["base"] = params.base;
      info["row_layout"] = "[cos_0..cos_{N-1} | sin_0..sin_{N-1}]";
      table_name = "table";
      break;
    }
    case PositionEncodingKind::kSentinel:
      break;
  }

  info["shape"] = table.shape();
  info["dtype"] = NpyDTypeName(table.dtype());
  if (!o.output.empty()) {
    WriteNpy(o.output, table.array());
    info["output"] = o.output;
    info["content"] = table_name;
    if (o.json) {
      std::printf("%s\n", info.dump().c_str());
    } else {
      std::printf("%s: wrote %s %s to %s\n", kind_name.c_str(), table_name.c_str(),
                  info["shape"].dump().c_str(), o.output.c_str());
    }
    return 0;
  }
  if (o.json) {
    if (static_cast<int64_t>(table.size()) > kMaxJsonValues) {
      throw Error("--json: the table has " + std::to_string(table.size()) +
                  " values, more than the " + std::to_string(kMaxJsonValues) +
                  " that JSON output holds; use --output FILE.npy");
    }
    size_t offset = 0;
    info[table_name] = ToJson(table, 0, offset);
    std::printf("%s\n", info.dump().c_str());
    return 0;
  }
  std::printf("kind: %s (acts on: %s)\n", kind_name.c_str(),
              info["acts_on"].empty() ? "nothing" : info["acts_on"][0].get<std::string>().c_str());
  if (kind == PositionEncodingKind::kAlibi && table_name == "bias") {
    std::string line = "slopes:";
    for (double s : info["slopes"]) {
      line += ' ';
      line += FormatValue(table, s);
    }
    std::printf("%s\n", line.c_str());
  }
  PrintTable(table_name, table);
  return 0;
}

const CommandRegistration kRegistration(
    "pe", "print or write position-encoding tables (sinusoidal, learned, alibi, t5, rope, none)",
    [](CLI::App* sub) -> std::function<int()> {
      auto o = std::make_shared<PeOptions>();
      auto options = std::make_shared<std::map<std::string, CLI::Option*>>();
      sub->add_option("--kind", o->kind, "none|nope|rope|sinusoidal|learned|alibi|t5")->required();
      (*options)["--seq-len"] =
          sub->add_option("--seq-len", o->seq_len, "positions T (table rows; alibi: bias [H,T,T])");
      (*options)["--dim"] = sub->add_option("--dim", o->dim, "width d (rope: head_dim)");
      (*options)["--heads"] = sub->add_option("--heads", o->heads, "heads H (alibi)");
      (*options)["--base"] =
          sub->add_option("--base", o->base, "sinusoid / rope base n (default 10000)");
      (*options)["--num-buckets"] =
          sub->add_option("--num-buckets", o->num_buckets, "t5 buckets (default 32)");
      (*options)["--max-distance"] =
          sub->add_option("--max-distance", o->max_distance, "t5 max_distance (default 128)");
      (*options)["--bidirectional"] =
          sub->add_flag("--bidirectional", o->bidirectional, "t5 encoder buckets");
      (*options)["--seed"] = sub->add_option("--seed", o->seed, "learned init seed (default 0)");
      (*options)["--init-std"] =
          sub->add_option("--init-std", o->init_std, "learned init std (default 0.02)");
      (*options)["--config"] = sub->add_option(
          "--config", o->config, "rope: Hugging Face config.json (instead of --dim/--base)");
      sub->add_option("--output", o->output, "write the table as .npy instead of printing");
      sub->add_flag("--json", o->json, "print JSON");
      return [o, options]() {
        std::map<std::string, bool> given;
        for (const auto& [name, option] : *options) given[name] = option->count() > 0;
        return RunPe(*o, given);
      };
    });

}  // namespace
}  // namespace ropekit::cli
