// `ropekit eval`: loss / perplexity of a checkpoint on held-out text at any context length, the
// tail-loss protocol, a per-position loss curve, and (for tests against other implementations)
// dumps of the logits and of every parameter gradient for a given token batch.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "command.h"
#include "model_cli.h"
#include "ropekit/model.h"
#include "ropekit/npy.h"

namespace ropekit::cli {
namespace {

struct EvalArgs {
  std::string model;
  std::vector<std::string> text;
  std::vector<int64_t> contexts;
  int64_t max_windows = 64, bucket = 16, batch = 4;
  // Unset: 64, at most what the text and the smallest context allow.
  std::optional<int64_t> tail_windows, tail;
  int threads = 1;
  bool json = false;
  RopeOverrideArgs rope;
  bool bf16 = false;
  AdapterArgs adapter;
  std::string dump_tokens, dump_logits, dump_grads;
};

// Reads a [B, T + 1] (or [T + 1]) int32 / int64 token array.
std::vector<int32_t> ReadTokens(const std::string& path, int64_t& batch, int64_t& len) {
  const NpyArray a = ReadNpy(path);
  if (a.dtype != NpyDType::kI32 && a.dtype != NpyDType::kI64) {
    throw Error("--dump-tokens " + path + ": dtype " + NpyDTypeName(a.dtype) +
                " is not accepted (int32, int64)");
  }
  if (a.shape.size() == 1) {
    batch = 1;
    len = a.shape[0];
  } else if (a.shape.size() == 2) {
    batch = a.shape[0];
    len = a.shape[1];
  } else {
    throw Error("--dump-tokens " + path + ": expected shape [B, T + 1] or [T + 1]");
  }
  if (batch < 1 || len < 2) throw Error("--dump-tokens " + path + ": need B >= 1 and T + 1 >= 2");
  std::vector<int32_t> out(batch * len);
  for (size_t i = 0; i < out.size(); ++i) {
    int64_t v;
    if (a.dtype == NpyDType::kI32) {
      int32_t x;
      std::memcpy(&x, a.bytes.data() + 4 * i, 4);
      v = x;
    } else {
      std::memcpy(&v, a.bytes.data() + 8 * i, 8);
    }
    if (v < 0 || v > 0x7fffffff) throw Error("--dump-tokens " + path + ": negative token id");
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

int RunDump(const EvalArgs& a, Model& model, ThreadPool* pool) {
  int64_t B = 0, L = 0;
  const std::vector<int32_t> tokens = ReadTokens(a.dump_tokens, B, L);
  const int64_t T = L - 1, V = model.config().vocab_size;
  std::vector<float> grads(model.trainable_parameters().size(), 0.0f);
  const double loss =
      model.ForwardBackward(tokens, B, T, grads, 1.0f / static_cast<float>(B * T), pool);
  if (!a.dump_logits.empty()) {
    std::vector<int32_t> inputs(B * T);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < T; ++t) inputs[b * T + t] = tokens[b * L + t];
    }
    NpyArray out;
    out.dtype = NpyDType::kF32;
    out.shape = {B, T, V};
    out.bytes.resize(B * T * V * 4);
    model.Forward(inputs, B, T, reinterpret_cast<float*>(out.bytes.data()), nullptr, nullptr, pool);
    WriteNpy(a.dump_logits, out);
  }
  if (!a.dump_grads.empty()) {
    std::vector<SafeTensor> tensors;
    for (const TensorInfo& t : model.trainable_tensors()) {
      tensors.push_back(
          {t.name, t.shape,
           std::vector<float>(grads.begin() + t.offset, grads.begin() + t.offset + t.size)});
    }
    WriteSafetensors(a.dump_grads, tensors, {{"loss", std::to_string(loss)}});
  }
  std::printf("loss %.9g\n", loss);
  return 0;
}

int RunEval(const EvalArgs& a) {
  auto pool = MakePool(a.threads);
  Model model = LoadCliModel(a.model, a.rope, a.bf16, a.adapter);
  if (!a.dump_tokens.empty()) return RunDump(a, model, pool.get());
  if (!a.dump_logits.empty() || !a.dump_grads.empty()) {
    throw Error("--dump-logits / --dump-grads need --dump-tokens");
  }
  if (a.text.empty()) throw Error("--text: at least one text file is required");
  ByteTokenizer tok;
  const std::vector<int32_t> tokens = tok.Encode(ReadTextFiles(a.text));
  EvalOptions o;
  o.contexts = a.contexts.empty() ? std::vector<int64_t>{model.config().max_position_embeddings}
                                  : a.contexts;
  o.max_windows = a.max_windows;
  // Defaults that fit any model and text: a model trained at a context under 64 gets a shorter
  // tail, a short text fewer tail windows. Values given explicitly are checked by Evaluate.
  const int64_t cmin = *std::min_element(o.contexts.begin(), o.contexts.end());
  const int64_t cmax = *std::max_element(o.contexts.begin(), o.contexts.end());
  const int64_t n = static_cast<int64_t>(tokens.size());
  o.tail = a.tail.value_or(std::clamp<int64_t>(cmin, 1, 64));
  o.num_tail_windows = a.tail_windows.value_or(std::clamp<int64_t>(n - cmax, 0, 64));
  o.bucket_size = a.bucket;
  o.batch = a.batch;
  const auto results = Evaluate(model, tokens, o, pool.get());
  if (a.json) {
    nlohmann::ordered_json j = nlohmann::ordered_json::array();
    for (const EvalResult& r : results) {
      j.push_back({{"context", r.context},
                   {"windows", r.windows},
                   {"mean_loss", r.mean_loss},
                   {"perplexity", r.perplexity},
                   {"tail_loss", o.num_tail_windows > 0 ? nlohmann::ordered_json(r.tail_loss)
                                                        : nlohmann::ordered_json(nullptr)},
                   {"bucket_size", r.bucket_size},
                   {"position_loss", r.position_loss}});
    }
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("%8s %8s %10s %10s %10s\n", "context", "windows", "loss", "ppl", "tail_loss");
  for (const EvalResult& r : results) {
    std::printf("%8lld %8lld %10.4f %10.3f ", static_cast<long long>(r.context),
                static_cast<long long>(r.windows), r.mean_loss, r.perplexity);
    if (o.num_tail_windows > 0)
      std::printf("%10.4f\n", r.tail_loss);
    else
      std::printf("%10s\n", "-");
  }
  for (const EvalResult& r : results) {
    std::printf("per-position loss, context %lld, buckets of %lld:",
                static_cast<long long>(r.context), static_cast<long long>(r.bucket_size));
    for (double v : r.position_loss) std::printf(" %.3f", v);
    std::printf("\n");
  }
  return 0;
}

const CommandRegistration kEval{
    "eval",
    "Loss, perplexity, tail loss and per-position loss of a checkpoint at any context length",
    [](CLI::App* sub) -> std::function<int()> {
      auto a = std::make_shared<EvalArgs>();
      sub->add_option("--model", a->model, "Checkpoint directory")
          ->required()
          ->check(CLI::ExistingDirectory);
      sub->add_option("--text", a->text, "Held-out text files")->check(CLI::ExistingFile);
      sub->add_option("--context", a->contexts,
                      "Evaluation context lengths, e.g. --context 128 256 512 (default: the "
                      "model's max_position_embeddings)");
      sub->add_option("--max-windows", a->max_windows,
                      "Non-overlapping windows per length for the mean / per-position loss "
                      "(0 = all)")
          ->capture_default_str();
      sub->add_option("--tail-windows", a->tail_windows,
                      "Tail protocol: windows, end offsets fixed by the largest context "
                      "(0 = skip; default 64, fewer when the text is shorter)");
      sub->add_option("--tail", a->tail,
                      "Tail protocol: scored last tokens of each window (default 64, at most the "
                      "smallest context)");
      sub->add_option("--bucket", a->bucket, "Per-position loss bucket size")
          ->capture_default_str();
      sub->add_option("--batch", a->batch, "Windows per forward pass")->capture_default_str();
      sub->add_option("--threads", a->threads, "Worker threads (0 = all cores)")
          ->capture_default_str();
      sub->add_flag("--json", a->json, "Print the results as JSON");
      AddInferenceModelOptions(sub, a->rope, a->adapter, a->bf16);
      auto* d = "Debug dumps (for comparisons with other implementations)";
      sub->add_option("--dump-tokens", a->dump_tokens,
                      "int32/int64 .npy [B, T + 1]: inputs are the first T columns, targets the "
                      "last T; prints the mean loss")
          ->group(d)
          ->check(CLI::ExistingFile);
      sub->add_option("--dump-logits", a->dump_logits, "Write the logits [B, T, V] as float32 .npy")
          ->group(d);
      sub->add_option("--dump-grads", a->dump_grads,
                      "Write d(mean loss)/d(parameter) as safetensors with the parameter names")
          ->group(d);
      return [a] { return RunEval(*a); };
    }};

}  // namespace
}  // namespace ropekit::cli
