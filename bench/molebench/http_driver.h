#pragma once

// molebench's HTTP mode: the plan of a run sent through moleserve's OpenAI-compatible API
// (POST /v1/completions, streamed with usage) instead of gRPC, so the two front ends can be
// compared at the same load (bench/http_overhead/run.sh).
//
// Each request is greedy with ignore_eos, max_tokens = its output length, the prompt as token
// ids and `model` = its adapter or the base model, exactly what the gRPC driver asks. Every
// Server-Sent Event that carries a choice is one token (the server sends one per engine step
// and sequence), stamped with its arrival; the final usage frame gives the prompt and completion
// token counts (a count the events do not match is reconciled at the end time).
//
// Lifecycle: RunHttpPlan() sends every request (one thread per request in flight, over HTTP/1.1
// keep-alive connections reused from a pool) and returns when all have ended.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/molebench/stats.h"
#include "bench/molebench/workload.h"

namespace moleserve::bench {

struct HttpEndpoint {
  std::string host;
  std::string port;
};

// "host:port" or "http://host:port[/...]"; INVALID_ARGUMENT otherwise.
absl::StatusOr<HttpEndpoint> ParseHttpEndpoint(const std::string& addr);

// GET /v1/models: the ids it lists, the base model first. UNAVAILABLE when the server cannot be
// reached or answers otherwise.
absl::StatusOr<std::vector<std::string>> HttpListModels(const HttpEndpoint& endpoint,
                                                        absl::Duration timeout);

// The /v1/completions body of one planned request; `model` is used when it names no adapter.
std::string CompletionBody(const PlannedRequest& request, const std::string& base_model);

// max_in_flight 0 = no cap; paced = honour send offsets (open loop). Times are seconds from the
// start of the run.
std::vector<RequestRecord> RunHttpPlan(const HttpEndpoint& endpoint, const std::string& base_model,
                                       const std::vector<PlannedRequest>& plan, int max_in_flight,
                                       bool paced, absl::Duration timeout);

}  // namespace moleserve::bench
