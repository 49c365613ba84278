#pragma once

// OpenAiApi: the OpenAI-compatible HTTP API (issue 18) over the engine, served by HttpServer.
//
//   OpenAiApi api(engine.get(), {});
//   ASSIGN_OR_RETURN(auto http, HttpServer::Start(options, [&api](HttpRequest r,
//       std::shared_ptr<HttpResponder> out) { api.Handle(std::move(r), std::move(out)); }));
//
// Routes: GET /health (200, 503 once draining), GET /v1/models (the base model and every ready
// adapter, `parent` = the base), GET /v1/models/{id}, POST /v1/completions (streaming with
// Server-Sent Events when `stream` is true, `stream_options.include_usage`). `model` names the
// base model or an adapter (vLLM's convention); an unknown one is 404 `model_not_found`.
// Parameters keep OpenAI's names and semantics (max_tokens default 16, temperature, top_p, n,
// stop, seed, frequency/presence_penalty, logprobs, user); extensions in the body: top_k, min_p,
// repetition_penalty, ignore_eos, stop_token_ids, priority. Every bad value is 400 with OpenAI's
// error object naming the parameter; parameters not implemented yet (echo, logit_bias,
// response_format, suffix, best_of > n) are refused the same way rather than ignored. A client
// that disconnects cancels its requests in the engine.
//
// Thread safety: Handle may be called from any thread.

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "server/http/http_server.h"

namespace moleserve::server {

struct OpenAiApiOptions {
  int32_t max_n = 16;  // choices per request
  // When set, GET /metrics answers its text here too: the Gateway API Inference Extension's
  // endpoint picker scrapes the port it routes to (InferencePool targetPorts), as vLLM serves.
  std::function<std::string()> metrics_text;
};

class OpenAiApi {
 public:
  OpenAiApi(engine::Engine* engine, OpenAiApiOptions options);

  void Handle(HttpRequest request, std::shared_ptr<HttpResponder> out);
  // New requests get 503 and /health reports it (SIGTERM); in-flight ones finish.
  void StartDrain() { draining_.store(true); }
  // Readiness: while false (start-up adapters still loading), /health answers 503 "loading" so
  // that a load balancer does not route here yet; requests are served meanwhile.
  void SetReady(bool ready) { ready_.store(ready); }

 private:
  void Models(const HttpRequest& request, HttpResponder& out) const;
  void Completions(const HttpRequest& request, std::shared_ptr<HttpResponder> out);

  engine::Engine* engine_;  // not owned
  OpenAiApiOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> ready_{true};
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace moleserve::server
