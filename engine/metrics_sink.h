#pragma once

// MetricsSink: what the engine reports for monitoring. server/metrics implements it with
// prometheus-cpp; the engine never sees Prometheus (DESIGN.md section 2). Calls come from the
// engine loop thread (and OnRequestRejected from Submit callers); implementations must be
// thread-safe and cheap. Units are seconds and counts.

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace moleserve::engine {

struct FinishedRequestMetrics {
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string finish_reason;  // "length", "stop", "stop_token", "eos"; empty when code != kOk
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double queue_seconds = 0;
  double e2e_seconds = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

struct StepMetrics {
  int64_t num_waiting = 0;
  int64_t num_running = 0;
  double kv_cache_usage = 0;  // 0..1
  int64_t batch_tokens = 0;
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  double step_seconds = 0;
};

class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  // Submit refused the request before it entered the queue.
  virtual void OnRequestRejected(absl::StatusCode code) = 0;
  virtual void OnFirstToken(double time_to_first_token_seconds) = 0;
  virtual void OnInterTokenLatency(double seconds) = 0;
  virtual void OnRequestFinished(const FinishedRequestMetrics& m) = 0;
  virtual void OnStep(const StepMetrics& m) = 0;
  // Queue, running and KV state after ingesting requests or finishing a step.
  virtual void OnQueueState(int64_t num_waiting, int64_t num_running, double kv_cache_usage) = 0;
};

}  // namespace moleserve::engine
