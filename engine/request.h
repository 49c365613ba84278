#pragma once

// The engine's public request/response types (engine/README.md defines the vocabulary).
// A Request is what a client asked for, validated and immutable after Submit; the engine turns
// it into a Sequence (engine-local mutable state) and reports back through a GenerationSink.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/routing/routing.h"
#include "engine/sampling/sampling_params.h"

namespace moleserve::engine {

// The front end a request came through (metrics carry it as a label).
enum class ClientProtocol : uint8_t { kGrpc, kHttp };
const char* ClientProtocolName(ClientProtocol p);  // "grpc", "http"

struct GenerateRequest {
  std::string request_id;  // echoed back; assigned by the server when empty
  ClientProtocol protocol = ClientProtocol::kGrpc;
  std::string adapter;  // empty = base model
  // Exactly one input: text (tokenized by the engine) or token ids.
  std::optional<std::string> text;
  std::vector<int32_t> token_ids;
  std::optional<bool> add_bos;  // text input only; default: when the tokenizer has a BOS token
  SamplingParams sampling;
  StoppingParams stopping;
  bool logprobs = false;
  int32_t top_logprobs = 0;  // 0..kMaxTopLogprobs
  // Report the logprob of every prompt token after the first under the tokens before it (with
  // top_logprobs alternatives), in the first chunk (GenerationChunk::prompt_logprobs).
  bool prompt_logprobs = false;
  // Report, per generated token, the experts each routed site of the adapter chose for the
  // position that produced it (GeneratedToken::routing).
  bool return_routing = false;
  // Replaces the adapter's routing (k, p, algorithm) for this request only.
  RoutingOverride routing_override;
  absl::Time deadline = absl::InfiniteFuture();
  // Scheduling priority: higher is admitted first (and preempted last); 0 = normal.
  int32_t priority = 0;
};

enum class FinishReason { kLength, kStopSequence, kStopToken, kEos };
const char* FinishReasonName(FinishReason r);

struct GeneratedToken {
  int32_t id = -1;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // only when top_logprobs > 0
  std::vector<RoutingRecord> routing;          // only when return_routing
};

struct GenerationChunk {
  std::vector<GeneratedToken> tokens;
  std::string text;  // valid UTF-8; may lag tokens (see OutputText)
  // First chunk only, when the request asked for prompt_logprobs: the prompt's token ids, and
  // one entry per prompt token after the first (prompt_logprobs[i] is prompt_ids[i + 1]).
  std::vector<int32_t> prompt_ids;
  std::vector<GeneratedToken> prompt_logprobs;
};

struct RequestTimings {
  double queue_seconds = 0;
  double time_to_first_token_seconds = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  double total_seconds = 0;
};

struct FinishInfo {
  FinishReason reason = FinishReason::kLength;
  std::string matched_stop;
  int32_t prompt_tokens = 0;
  int32_t generated_tokens = 0;
  RequestTimings timings;
};

// Receives one request's output. Called from the engine loop thread, in order; implementations
// must not block (queue and return). After OnChunk calls, exactly one of OnFinish / OnError is
// called, and nothing after it.
class GenerationSink {
 public:
  virtual ~GenerationSink() = default;
  virtual void OnChunk(GenerationChunk chunk) = 0;
  virtual void OnFinish(GenerationChunk last, FinishInfo info) = 0;
  // kCancelled (client cancelled), kDeadlineExceeded, kUnavailable (shutdown), kInternal.
  virtual void OnError(absl::Status status) = 0;
};

}  // namespace moleserve::engine
