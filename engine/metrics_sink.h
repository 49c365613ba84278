#pragma once

// MetricsSink: what the engine reports for monitoring. server/metrics implements it with
// prometheus-cpp; the engine never sees Prometheus (DESIGN.md section 2). Calls come from the
// engine loop thread (and OnRequestRejected from Submit callers); implementations must be
// thread-safe and cheap. Units are seconds and counts.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "engine/request.h"

namespace moleserve::engine {

// One adapter's requests now and its tokens since the previous report (OnAdapterActivity).
struct AdapterActivity {
  std::string adapter;
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t prompt_tokens = 0;     // prefilled since the previous report
  int64_t generated_tokens = 0;  // sampled since the previous report
};

struct FinishedRequestMetrics {
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string finish_reason;  // "length", "stop", "stop_token", "eos"; empty when code != kOk
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double queue_seconds = 0;
  double e2e_seconds = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
  // Time the steps it took part in spent copying LoRA experts into the device pool.
  double expert_wait_seconds = 0;
  ClientProtocol protocol = ClientProtocol::kGrpc;
};

struct StepMetrics {
  int64_t num_waiting = 0;
  int64_t num_running = 0;
  double kv_cache_usage = 0;  // 0..1
  int64_t batch_tokens = 0;
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  double step_seconds = 0;
  // Tokens of the step that ran an adapter, and the distinct LoRA experts the step read (both 0
  // for a base-model-only step).
  int64_t adapter_tokens = 0;
  int64_t distinct_experts = 0;
};

// The KV prefix cache. Counters are cumulative since start (sinks publish the increments); the
// block count is a gauge.
struct PrefixCacheMetrics {
  int64_t query_tokens = 0;   // prompt tokens looked up at admission
  int64_t hit_tokens = 0;     // of those, found computed
  int64_t evictions = 0;      // cached blocks whose KV was overwritten by a new owner
  int64_t cached_blocks = 0;  // blocks holding a registered prefix (in use or evictable)
};

// The paged expert cache after a step. Counters are cumulative since start (sinks publish the
// increments); gauges are the current state.
struct ExpertCacheMetrics {
  int64_t device_hits = 0;
  int64_t device_misses = 0;  // each miss is a host-tier hit (host memory holds every adapter)
  int64_t prefetched = 0;
  int64_t evicted_lru = 0;
  int64_t evicted_unload = 0;
  int64_t evicted_resize = 0;
  int64_t bytes_to_device = 0;
  int64_t split_calls = 0;  // SGMV calls split because their experts did not fit at once
  int64_t resident_experts = 0;
  // Host bytes of the experts' compute-dtype images (0 when the compute dtype is fp32: the
  // adapters' own stacks are copied from).
  int64_t host_pinned_bytes = 0;
  int64_t host_pageable_bytes = 0;
  struct Pool {
    int64_t width = 0;
    int64_t pages = 0;
    int64_t free_pages = 0;
  };
  std::vector<Pool> pools;
};

// One hot load (or reload) through Engine::LoadAdapter.
struct AdapterLoadMetrics {
  // Empty on success, else why it failed: invalid_name, invalid_path, not_found, too_large,
  // digest_mismatch, invalid_adapter, already_exists, does_not_fit, disabled.
  std::string failure_reason;
  double read_seconds = 0;     // read, parse and validate into host memory (off the engine loop)
  double attach_seconds = 0;   // waiting for and attaching on the engine loop
  double publish_seconds = 0;  // registry publish
};

class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  // Submit refused the request before it entered the queue.
  virtual void OnRequestRejected(absl::StatusCode code, ClientProtocol protocol) = 0;
  virtual void OnFirstToken(double time_to_first_token_seconds) = 0;
  virtual void OnInterTokenLatency(double seconds) = 0;
  virtual void OnRequestFinished(const FinishedRequestMetrics& m) = 0;
  virtual void OnStep(const StepMetrics& m) = 0;
  // `n` running sequences were preempted (KV freed, recomputed later) to make room.
  virtual void OnPreempted(int64_t n) { (void)n; }
  // Queue, running and KV state after ingesting requests or finishing a step.
  virtual void OnQueueState(int64_t num_waiting, int64_t num_running, double kv_cache_usage) = 0;
  // After each step that ran adapter tokens or prefetched experts.
  virtual void OnExpertCache(const ExpertCacheMetrics& m) { (void)m; }
  // The prefix cache, after each engine loop iteration.
  virtual void OnPrefixCache(const PrefixCacheMetrics& m) { (void)m; }
  // The adapters of the running and of the waiting requests (distinct names, sorted; the base
  // model is not an adapter) and the most adapters one step may hold, when that changes (what
  // the Gateway API Inference Extension's endpoint picker reads to route by adapter).
  virtual void OnAdapterQueue(const std::vector<std::string>& running,
                              const std::vector<std::string>& waiting, int64_t max_adapters) {
    (void)running, (void)waiting, (void)max_adapters;
  }
  // After each LoadAdapter call (from the caller's thread).
  virtual void OnAdapterLoad(const AdapterLoadMetrics& m) { (void)m; }
  // Per adapter with requests running or waiting now, or tokens processed since the last call
  // (never more entries than requests in the engine, whatever the number of loaded adapters):
  // after each step, and once more with zeros when an adapter goes idle.
  virtual void OnAdapterActivity(const std::vector<AdapterActivity>& active) { (void)active; }
};

}  // namespace moleserve::engine
