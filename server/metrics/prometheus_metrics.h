#pragma once

// PrometheusMetrics: engine::MetricsSink on prometheus-cpp, exposed over HTTP at /metrics.
//
// Families (vLLM semantics where they exist; no adapter label on any series):
//   moleserve_requests_finished_total{outcome,protocol}  counter; outcome = finish reason
//                                                ("length", "stop", "stop_token", "eos") or the
//                                                gRPC code name of a failure ("cancelled", ...);
//                                                protocol = "grpc" or "http" (the front end)
//   moleserve_requests_rejected_total{code,protocol}  counter; refused at submission
//   moleserve_prompt_tokens_total                counter, tokens
//   moleserve_generation_tokens_total            counter, tokens
//   moleserve_time_to_first_token_seconds        histogram, arrival -> first token
//   moleserve_inter_token_latency_seconds        histogram, between consecutive tokens
//   moleserve_e2e_request_latency_seconds        histogram, arrival -> last token
//   moleserve_request_queue_time_seconds         histogram, arrival -> admission
//   moleserve_request_prefill_time_seconds       histogram, admission -> first token
//   moleserve_request_decode_time_seconds        histogram, first -> last token
//   moleserve_num_requests_running               gauge
//   moleserve_num_requests_waiting               gauge
//   moleserve_lora_requests_info{running_lora_adapters,waiting_lora_adapters,max_lora}  gauge:
//                                                the adapters of the running and waiting requests
//                                                (comma-separated) and the most a step may hold;
//                                                one series, its value the Unix time it was set
//                                                (vLLM's vllm:lora_requests_info, which the
//                                                Gateway API Inference Extension reads)
//   moleserve_kv_cache_usage_ratio               gauge, 0..1 of KV blocks allocated
//   moleserve_steps_total                        counter, engine steps
//   moleserve_step_tokens                        histogram, tokens per step
//   moleserve_requests_preempted_total           counter, running requests preempted (KV freed
//                                                and recomputed later) to make room
// Paged expert cache and hot loading (what no peer publishes):
//   moleserve_expert_cache_lookups_total{tier,result}  counter; tier="device" hit|miss, and
//                                                tier="host" hit (each device miss is served from
//                                                host memory, which holds every loaded adapter)
//   moleserve_expert_cache_prefetched_total      counter, experts copied in for queued requests
//   moleserve_expert_cache_evictions_total{reason}  counter; lru, unload, resize
//   moleserve_expert_cache_bytes_to_device_total counter, host -> device bytes
//   moleserve_expert_cache_split_calls_total     counter, SGMV calls split to fit the pool
//   moleserve_expert_cache_resident_experts      gauge
//   moleserve_expert_cache_host_bytes{memory}    gauge, the experts' compute-dtype copies in host
//                                                memory; pinned (DMA) or pageable (staged)
//   moleserve_expert_cache_pages{width}          gauge, pages of the pool of rank rows `width`
//   moleserve_expert_cache_free_pages{width}     gauge
//   moleserve_step_distinct_experts             histogram, LoRA experts a step read (steps with
//                                                adapter tokens only)
//   moleserve_step_tokens_per_expert             histogram, adapter tokens per expert read in a
//                                                step (how well grouping shares each read)
//   moleserve_request_expert_wait_seconds        histogram, per request: time its steps spent
//                                                copying experts in
//   moleserve_adapter_load_seconds{stage}        histogram; read (disk -> validated host
//                                                memory), attach, publish
//   moleserve_adapter_loads_total                counter, successful hot loads
//   moleserve_adapter_load_failures_total{reason}  counter (engine::AdapterLoadMetrics reasons)
// Thread safety: all methods are thread-safe (prometheus-cpp metrics are atomic).

#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "absl/status/statusor.h"
#include "engine/metrics_sink.h"

namespace prometheus {
class Exposer;
class Registry;
}  // namespace prometheus

namespace moleserve::server {

// The adapter label of the adapters summed together in the per-adapter series (no adapter name
// has parentheses).
inline constexpr char kOtherAdapters[] = "(other)";

class PrometheusMetrics final : public engine::MetricsSink {
 public:
  // Serves /metrics on `bind_address` ("host:port"; port 0 picks a free one). kUnavailable when
  // the address cannot be bound.
  // Per-adapter series (moleserve_adapter_requests, moleserve_adapter_tokens_total) name the
  // `top_adapters` most active adapters (running + waiting requests, then tokens); the rest are
  // summed under adapter="(other)", which no adapter name can be. 0: everything in "(other)".
  static absl::StatusOr<std::unique_ptr<PrometheusMetrics>> Create(const std::string& bind_address,
                                                                   int top_adapters = 10);
  ~PrometheusMetrics() override;

  int port() const { return port_; }
  // The text exposition /metrics serves (for serving it on another listener too).
  std::string Text() const;

  void OnRequestRejected(absl::StatusCode code, engine::ClientProtocol protocol) override;
  void OnFirstToken(double seconds) override;
  void OnInterTokenLatency(double seconds) override;
  void OnRequestFinished(const engine::FinishedRequestMetrics& m) override;
  void OnStep(const engine::StepMetrics& m) override;
  void OnPreempted(int64_t n) override;
  void OnQueueState(int64_t num_waiting, int64_t num_running, double kv_cache_usage) override;
  void OnExpertCache(const engine::ExpertCacheMetrics& m) override;
  void OnPrefixCache(const engine::PrefixCacheMetrics& m) override;
  void OnAdapterQueue(const std::vector<std::string>& running,
                      const std::vector<std::string>& waiting, int64_t max_adapters) override;
  void OnAdapterLoad(const engine::AdapterLoadMetrics& m) override;
  void OnAdapterActivity(const std::vector<engine::AdapterActivity>& active) override;

 private:
  struct Families;
  PrometheusMetrics();

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<Families> families_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::mutex lora_mu_;   // moleserve_lora_requests_info's one series
  std::mutex cache_mu_;  // the last cumulative expert cache counters, for increments
  engine::ExpertCacheMetrics last_cache_;
  std::mutex prefix_mu_;  // the last cumulative prefix cache counters
  engine::PrefixCacheMetrics last_prefix_;
  int port_ = 0;
  int top_adapters_ = 10;
  std::mutex activity_mu_;                // the adapters with their own series now
  std::set<std::string> adapter_series_;  // guarded by activity_mu_
};

}  // namespace moleserve::server
