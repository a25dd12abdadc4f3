// ropekit serve: an OpenAI-compatible HTTP server for the tiny LLaMA with continuous batching.
//
// Endpoints (request and response shapes follow the OpenAI API reference):
//   GET  /health               {"status": "ok"}
//   GET  /v1/models            one model, id = ServeOptions::model_id
//   POST /v1/completions       prompt (string, strings, token ids), max_tokens, temperature,
//                              top_p, top_k (extension), seed, stop, n, stream, logprobs, echo
//   POST /v1/chat/completions  messages through the chat template below, stream with
//                              stream_options.include_usage, logprobs / top_logprobs
//   POST /tokenize, /detokenize  extensions as in llama.cpp's server
//   GET  /                     a self-contained chat page
// Streaming is Server-Sent Events: `data: {json}` frames, then `data: [DONE]`. Errors are
// {"error": {"message", "type", "param", "code"}} with status 400 (malformed JSON, wrong types,
// prompt longer than the context: code "context_length_exceeded"), 401 (missing or wrong bearer
// key), 404 (unknown model or route), 413 (body over max_body_bytes), 503 + Retry-After (queue
// full).
//
// Chat template (the model is byte-level and has no special tokens, so roles are plain text):
// each message becomes "<Role>: <content>\n" with Role one of System, User, Assistant, Tool
// ("developer" renders as System), and the prompt ends with "Assistant:". Generation also stops
// at "\nUser:" and "\nSystem:" (not included in the reply).
#ifndef ROPEKIT_SERVE_H_
#define ROPEKIT_SERVE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ropekit/model.h"

namespace ropekit::serve {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;         // 0 = any free port (see Server::port())
  int threads = 1;         // compute threads (0 = all cores)
  int64_t max_batch = 32;  // sequences decoded together
  int64_t max_queue = 64;  // sequences waiting for admission; more gets 503
  // Tokens of the KV page pool every sequence draws its cache pages from (rounded up to whole
  // pages of kv_page_size tokens); 0 = max_batch * context, the memory of one full-context cache
  // per running sequence. A request waits in the queue until the pool can reserve
  // min(prompt + max_tokens, context) tokens (context with a context shift) for each choice.
  int64_t kv_cache_tokens = 0;
  int64_t kv_page_size = 16;
  std::string api_key;  // non-empty: /v1/*, /tokenize, /detokenize need "Bearer <key>"
  std::string model_id = "ropekit";
  int64_t context = 0;       // tokens per sequence (prompt + completion); 0 = the model's
                             // max_position_embeddings
  int64_t max_tokens = 0;    // cap on a request's max_tokens; 0 = the context
  double timeout_s = 300.0;  // per request, queueing included; then finish_reason "length"
  int64_t max_body_bytes = 1 << 20;
  // Context shift, as `ropekit generate --context-shift`: a sequence whose context is full drops
  // n_discard tokens after the n_keep sink tokens (0 = half of the rest) and goes on; a prompt
  // may then fill the whole context. max_tokens still caps each request (raise it to generate
  // past the context).
  bool context_shift = false;
  int64_t n_keep = 4;
  int64_t n_discard = 0;
};

// Renders chat messages (role, content) with the template above.
std::string RenderChat(const std::vector<std::pair<std::string, std::string>>& messages);
// The stop strings the chat template adds.
const std::vector<std::string>& ChatTemplateStops();

class Server {
 public:
  // Validates the options (Error naming the option) and binds the socket.
  Server(Model model, const ServeOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const;  // the bound port
  // Serves until Stop() (from another thread or a signal handler thread).
  void Run();
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ropekit::serve

#endif  // ROPEKIT_SERVE_H_
