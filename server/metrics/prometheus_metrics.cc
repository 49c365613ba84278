#include "server/metrics/prometheus_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <exception>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace moleserve::server {
namespace {

// A counter of the engine's cumulative `now`, last published at `before`: the increment.
void AddIncrement(prometheus::Counter& c, int64_t now, int64_t before) {
  if (now > before) c.Increment(static_cast<double>(now - before));
}

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Latency buckets in seconds, 1 ms .. 60 s.
Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,
          0.5,   0.75,   1.0,   2.5,  5.0,  7.5,  10.0, 20.0, 40.0, 60.0};
}

std::string CodeName(absl::StatusCode code) {
  return absl::AsciiStrToLower(absl::StatusCodeToString(code));
}

}  // namespace

struct PrometheusMetrics::Families {
  explicit Families(prometheus::Registry& r)
      : finished(BuildCounter()
                     .Name("moleserve_requests_finished_total")
                     .Help("Requests that ended, by finish reason or failure code")
                     .Register(r)),
        rejected(BuildCounter()
                     .Name("moleserve_requests_rejected_total")
                     .Help("Requests refused at submission, by gRPC code")
                     .Register(r)),
        prompt_tokens(BuildCounter()
                          .Name("moleserve_prompt_tokens_total")
                          .Help("Prompt tokens of finished requests")
                          .Register(r)
                          .Add({})),
        generation_tokens(BuildCounter()
                              .Name("moleserve_generation_tokens_total")
                              .Help("Generated tokens of finished requests")
                              .Register(r)
                              .Add({})),
        ttft(BuildHistogram()
                 .Name("moleserve_time_to_first_token_seconds")
                 .Help("Arrival to first generated token, seconds")
                 .Register(r)
                 .Add({}, LatencyBuckets())),
        itl(BuildHistogram()
                .Name("moleserve_inter_token_latency_seconds")
                .Help("Time between consecutive generated tokens of a request, seconds")
                .Register(r)
                .Add({}, LatencyBuckets())),
        e2e(BuildHistogram()
                .Name("moleserve_e2e_request_latency_seconds")
                .Help("Arrival to last generated token, seconds")
                .Register(r)
                .Add({}, LatencyBuckets())),
        queue(BuildHistogram()
                  .Name("moleserve_request_queue_time_seconds")
                  .Help("Arrival to admission into the running batch, seconds")
                  .Register(r)
                  .Add({}, LatencyBuckets())),
        prefill(BuildHistogram()
                    .Name("moleserve_request_prefill_time_seconds")
                    .Help("Admission to first generated token, seconds")
                    .Register(r)
                    .Add({}, LatencyBuckets())),
        decode(BuildHistogram()
                   .Name("moleserve_request_decode_time_seconds")
                   .Help("First to last generated token, seconds")
                   .Register(r)
                   .Add({}, LatencyBuckets())),
        running(BuildGauge()
                    .Name("moleserve_num_requests_running")
                    .Help("Requests in the running batch")
                    .Register(r)
                    .Add({})),
        waiting(BuildGauge()
                    .Name("moleserve_num_requests_waiting")
                    .Help("Requests waiting for admission")
                    .Register(r)
                    .Add({})),
        lora_info(BuildGauge()
                      .Name("moleserve_lora_requests_info")
                      .Help("Adapters of the running and waiting requests (labels), and the "
                            "most a step may hold; the value is when it was set (Unix time)")
                      .Register(r)),
        adapter_requests(BuildGauge()
                             .Name("moleserve_adapter_requests")
                             .Help("Requests per adapter (state: running, waiting), for the most "
                                   "active adapters (--metrics-top-adapters); the rest summed "
                                   "as adapter=\"(other)\"")
                             .Register(r)),
        adapter_tokens(BuildCounter()
                           .Name("moleserve_adapter_tokens_total")
                           .Help("Tokens per adapter (kind: prompt, generated) while it is "
                                 "among the most active; the rest counted as "
                                 "adapter=\"(other)\"")
                           .Register(r)),
        kv_usage(BuildGauge()
                     .Name("moleserve_kv_cache_usage_ratio")
                     .Help("Fraction of KV cache blocks allocated, 0..1")
                     .Register(r)
                     .Add({})),
        steps(BuildCounter()
                  .Name("moleserve_steps_total")
                  .Help("Engine steps (forward passes)")
                  .Register(r)
                  .Add({})),
        step_tokens(BuildHistogram()
                        .Name("moleserve_step_tokens")
                        .Help("Tokens per engine step, tokens")
                        .Register(r)
                        .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                             1024, 2048, 4096, 8192})),
        preempted(BuildCounter()
                      .Name("moleserve_requests_preempted_total")
                      .Help("Running requests preempted (KV freed, recomputed later) for room")
                      .Register(r)
                      .Add({})),
        step_experts(BuildHistogram()
                         .Name("moleserve_step_distinct_experts")
                         .Help("Distinct LoRA experts read by a step with adapter tokens, experts")
                         .Register(r)
                         .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128, 256, 512,
                                                              1024, 2048, 4096})),
        tokens_per_expert(BuildHistogram()
                              .Name("moleserve_step_tokens_per_expert")
                              .Help("Adapter tokens of a step per LoRA expert it read, tokens")
                              .Register(r)
                              .Add({}, Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 1, 2,
                                                                   4, 8, 16, 64})),
        cache_lookups(BuildCounter()
                          .Name("moleserve_expert_cache_lookups_total")
                          .Help("Expert cache lookups by tier (device, host) and result")
                          .Register(r)),
        cache_prefetched(BuildCounter()
                             .Name("moleserve_expert_cache_prefetched_total")
                             .Help("Experts copied to the device ahead of queued requests")
                             .Register(r)
                             .Add({})),
        cache_evictions(BuildCounter()
                            .Name("moleserve_expert_cache_evictions_total")
                            .Help("Experts evicted from the device pool, by reason")
                            .Register(r)),
        cache_bytes(BuildCounter()
                        .Name("moleserve_expert_cache_bytes_to_device_total")
                        .Help("Expert bytes copied host to device")
                        .Register(r)
                        .Add({})),
        cache_splits(BuildCounter()
                         .Name("moleserve_expert_cache_split_calls_total")
                         .Help("Segmented-GEMM calls split because their experts did not fit")
                         .Register(r)
                         .Add({})),
        prefix_query_tokens(BuildCounter()
                                .Name("moleserve_prefix_cache_queries_tokens_total")
                                .Help("Prompt tokens looked up in the KV prefix cache at admission")
                                .Register(r)
                                .Add({})),
        prefix_hit_tokens(BuildCounter()
                              .Name("moleserve_prefix_cache_hits_tokens_total")
                              .Help("Prompt tokens whose KV the prefix cache already held")
                              .Register(r)
                              .Add({})),
        prefix_evictions(BuildCounter()
                             .Name("moleserve_prefix_cache_evictions_total")
                             .Help("Cached KV blocks evicted for new ones")
                             .Register(r)
                             .Add({})),
        prefix_blocks(BuildGauge()
                          .Name("moleserve_prefix_cache_blocks")
                          .Help("KV blocks holding a cached prefix (in use or evictable)")
                          .Register(r)
                          .Add({})),
        cache_resident(BuildGauge()
                           .Name("moleserve_expert_cache_resident_experts")
                           .Help("Experts resident in the device pool")
                           .Register(r)
                           .Add({})),
        cache_host_bytes(BuildGauge()
                             .Name("moleserve_expert_cache_host_bytes")
                             .Help("Host bytes of the experts' compute-dtype copies, by memory "
                                   "(pinned: page-locked, copied by DMA; pageable: staged)")
                             .Register(r)),
        cache_pages(BuildGauge()
                        .Name("moleserve_expert_cache_pages")
                        .Help("Pages (rank rows) of the device pool of each row width")
                        .Register(r)),
        cache_free_pages(BuildGauge()
                             .Name("moleserve_expert_cache_free_pages")
                             .Help("Free pages of the device pool of each row width")
                             .Register(r)),
        expert_wait(BuildHistogram()
                        .Name("moleserve_request_expert_wait_seconds")
                        .Help("Time a request's steps spent copying experts in, seconds")
                        .Register(r)
                        .Add({}, Histogram::BucketBoundaries{0, 0.0001, 0.001, 0.005, 0.01, 0.05,
                                                             0.1, 0.5, 1, 5})),
        load_seconds(BuildHistogram()
                         .Name("moleserve_adapter_load_seconds")
                         .Help("Adapter hot-load time by stage (read, attach, publish), seconds")
                         .Register(r)),
        loads(BuildCounter()
                  .Name("moleserve_adapter_loads_total")
                  .Help("Successful adapter hot loads")
                  .Register(r)
                  .Add({})),
        load_failures(BuildCounter()
                          .Name("moleserve_adapter_load_failures_total")
                          .Help("Failed adapter hot loads, by reason")
                          .Register(r)) {}

  prometheus::Family<prometheus::Counter>& finished;
  prometheus::Family<prometheus::Counter>& rejected;
  prometheus::Counter& prompt_tokens;
  prometheus::Counter& generation_tokens;
  Histogram& ttft;
  Histogram& itl;
  Histogram& e2e;
  Histogram& queue;
  Histogram& prefill;
  Histogram& decode;
  prometheus::Gauge& running;
  prometheus::Gauge& waiting;
  prometheus::Family<prometheus::Gauge>& lora_info;
  prometheus::Family<prometheus::Gauge>& adapter_requests;
  prometheus::Family<prometheus::Counter>& adapter_tokens;
  prometheus::Gauge* lora_info_series = nullptr;  // the one series (guarded by lora_mu_)
  prometheus::Gauge& kv_usage;
  prometheus::Counter& steps;
  Histogram& step_tokens;
  prometheus::Counter& preempted;
  Histogram& step_experts;
  Histogram& tokens_per_expert;
  prometheus::Family<prometheus::Counter>& cache_lookups;
  prometheus::Counter& cache_prefetched;
  prometheus::Family<prometheus::Counter>& cache_evictions;
  prometheus::Counter& cache_bytes;
  prometheus::Counter& cache_splits;
  prometheus::Counter& prefix_query_tokens;
  prometheus::Counter& prefix_hit_tokens;
  prometheus::Counter& prefix_evictions;
  prometheus::Gauge& prefix_blocks;
  prometheus::Gauge& cache_resident;
  prometheus::Family<prometheus::Gauge>& cache_host_bytes;
  prometheus::Family<prometheus::Gauge>& cache_pages;
  prometheus::Family<prometheus::Gauge>& cache_free_pages;
  Histogram& expert_wait;
  prometheus::Family<Histogram>& load_seconds;
  prometheus::Counter& loads;
  prometheus::Family<prometheus::Counter>& load_failures;
};

PrometheusMetrics::PrometheusMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      families_(std::make_unique<Families>(*registry_)) {}

PrometheusMetrics::~PrometheusMetrics() = default;

absl::StatusOr<std::unique_ptr<PrometheusMetrics>> PrometheusMetrics::Create(
    const std::string& bind_address, int top_adapters) {
  std::unique_ptr<PrometheusMetrics> m(new PrometheusMetrics());
  m->top_adapters_ = std::max(0, top_adapters);
  try {
    // civetweb reports bind failures by throwing; contain it at this boundary.
    m->exposer_ = std::make_unique<prometheus::Exposer>(bind_address, /*num_threads=*/2);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve /metrics on ", bind_address, ": ", e.what()));
  }
  m->exposer_->RegisterCollectable(m->registry_);
  std::vector<int> ports = m->exposer_->GetListeningPorts();
  m->port_ = ports.empty() ? 0 : ports[0];
  return m;
}

std::string PrometheusMetrics::Text() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

void PrometheusMetrics::OnRequestRejected(absl::StatusCode code, engine::ClientProtocol protocol) {
  families_->rejected
      .Add({{"code", CodeName(code)}, {"protocol", engine::ClientProtocolName(protocol)}})
      .Increment();
}

void PrometheusMetrics::OnFirstToken(double seconds) { families_->ttft.Observe(seconds); }

void PrometheusMetrics::OnInterTokenLatency(double seconds) { families_->itl.Observe(seconds); }

void PrometheusMetrics::OnRequestFinished(const engine::FinishedRequestMetrics& m) {
  const std::string outcome = m.code == absl::StatusCode::kOk ? m.finish_reason : CodeName(m.code);
  families_->finished
      .Add({{"outcome", outcome}, {"protocol", engine::ClientProtocolName(m.protocol)}})
      .Increment();
  families_->prompt_tokens.Increment(static_cast<double>(m.prompt_tokens));
  families_->generation_tokens.Increment(static_cast<double>(m.generated_tokens));
  families_->expert_wait.Observe(m.expert_wait_seconds);
  if (m.code == absl::StatusCode::kOk) {
    families_->e2e.Observe(m.e2e_seconds);
    families_->queue.Observe(m.queue_seconds);
    families_->prefill.Observe(m.prefill_seconds);
    families_->decode.Observe(m.decode_seconds);
  }
}

void PrometheusMetrics::OnStep(const engine::StepMetrics& m) {
  families_->steps.Increment();
  families_->step_tokens.Observe(static_cast<double>(m.batch_tokens));
  if (m.adapter_tokens > 0 && m.distinct_experts > 0) {
    families_->step_experts.Observe(static_cast<double>(m.distinct_experts));
    families_->tokens_per_expert.Observe(static_cast<double>(m.adapter_tokens) /
                                         static_cast<double>(m.distinct_experts));
  }
  families_->kv_usage.Set(m.kv_cache_usage);
  families_->running.Set(static_cast<double>(m.num_running));
  families_->waiting.Set(static_cast<double>(m.num_waiting));
}

void PrometheusMetrics::OnPreempted(int64_t n) {
  families_->preempted.Increment(static_cast<double>(n));
}

void PrometheusMetrics::OnQueueState(int64_t num_waiting, int64_t num_running,
                                     double kv_cache_usage) {
  families_->kv_usage.Set(kv_cache_usage);
  families_->running.Set(static_cast<double>(num_running));
  families_->waiting.Set(static_cast<double>(num_waiting));
}

void PrometheusMetrics::OnAdapterQueue(const std::vector<std::string>& running,
                                       const std::vector<std::string>& waiting,
                                       int64_t max_adapters) {
  Families& f = *families_;
  std::lock_guard<std::mutex> lock(lora_mu_);
  // One series at a time: the previous label set goes away, as vLLM's does.
  if (f.lora_info_series != nullptr) f.lora_info.Remove(f.lora_info_series);
  auto join = [](const std::vector<std::string>& names) {
    std::string out;
    for (const std::string& n : names) out += (out.empty() ? "" : ",") + n;
    return out;
  };
  f.lora_info_series = &f.lora_info.Add({{"running_lora_adapters", join(running)},
                                         {"waiting_lora_adapters", join(waiting)},
                                         {"max_lora", std::to_string(max_adapters)}});
  f.lora_info_series->SetToCurrentTime();
}

void PrometheusMetrics::OnAdapterActivity(const std::vector<engine::AdapterActivity>& active) {
  Families& f = *families_;
  std::lock_guard<std::mutex> lock(activity_mu_);
  // The most active first: requests now, then tokens, then name (a stable order).
  std::vector<const engine::AdapterActivity*> order;
  for (const engine::AdapterActivity& a : active) order.push_back(&a);
  std::sort(order.begin(), order.end(), [](const auto* x, const auto* y) {
    const int64_t rx = x->running + x->waiting, ry = y->running + y->waiting;
    if (rx != ry) return rx > ry;
    const int64_t tx = x->prompt_tokens + x->generated_tokens;
    const int64_t ty = y->prompt_tokens + y->generated_tokens;
    if (tx != ty) return tx > ty;
    return x->adapter < y->adapter;
  });
  // An adapter gone idle (all zeros, reported once) loses its series like one out of the top.
  engine::AdapterActivity other{.adapter = kOtherAdapters};
  std::set<std::string> named;
  for (const engine::AdapterActivity* a : order) {
    const bool idle = a->running + a->waiting + a->prompt_tokens + a->generated_tokens == 0;
    if (static_cast<int>(named.size()) < top_adapters_ && !idle) {
      named.insert(a->adapter);
      continue;
    }
    other.running += a->running;
    other.waiting += a->waiting;
    other.prompt_tokens += a->prompt_tokens;
    other.generated_tokens += a->generated_tokens;
  }
  // Series of adapters no longer named go away (their later tokens count in "(other)").
  for (const std::string& name : adapter_series_) {
    if (named.count(name)) continue;
    for (const char* state : {"running", "waiting"}) {
      f.adapter_requests.Remove(&f.adapter_requests.Add({{"adapter", name}, {"state", state}}));
    }
    for (const char* kind : {"prompt", "generated"}) {
      f.adapter_tokens.Remove(&f.adapter_tokens.Add({{"adapter", name}, {"kind", kind}}));
    }
  }
  adapter_series_ = named;
  auto publish = [&](const engine::AdapterActivity& a) {
    f.adapter_requests.Add({{"adapter", a.adapter}, {"state", "running"}})
        .Set(static_cast<double>(a.running));
    f.adapter_requests.Add({{"adapter", a.adapter}, {"state", "waiting"}})
        .Set(static_cast<double>(a.waiting));
    f.adapter_tokens.Add({{"adapter", a.adapter}, {"kind", "prompt"}})
        .Increment(static_cast<double>(a.prompt_tokens));
    f.adapter_tokens.Add({{"adapter", a.adapter}, {"kind", "generated"}})
        .Increment(static_cast<double>(a.generated_tokens));
  };
  for (const engine::AdapterActivity& a : active) {
    if (named.count(a.adapter)) publish(a);
  }
  publish(other);
}

void PrometheusMetrics::OnPrefixCache(const engine::PrefixCacheMetrics& m) {
  Families& f = *families_;
  std::lock_guard<std::mutex> lock(prefix_mu_);
  AddIncrement(f.prefix_query_tokens, m.query_tokens, last_prefix_.query_tokens);
  AddIncrement(f.prefix_hit_tokens, m.hit_tokens, last_prefix_.hit_tokens);
  AddIncrement(f.prefix_evictions, m.evictions, last_prefix_.evictions);
  f.prefix_blocks.Set(static_cast<double>(m.cached_blocks));
  last_prefix_ = m;
}

void PrometheusMetrics::OnExpertCache(const engine::ExpertCacheMetrics& m) {
  Families& f = *families_;
  std::lock_guard<std::mutex> lock(cache_mu_);
  engine::ExpertCacheMetrics& last = last_cache_;
  AddIncrement(f.cache_lookups.Add({{"tier", "device"}, {"result", "hit"}}), m.device_hits,
               last.device_hits);
  AddIncrement(f.cache_lookups.Add({{"tier", "device"}, {"result", "miss"}}), m.device_misses,
               last.device_misses);
  AddIncrement(f.cache_lookups.Add({{"tier", "host"}, {"result", "hit"}}), m.device_misses,
               last.device_misses);
  AddIncrement(f.cache_prefetched, m.prefetched, last.prefetched);
  AddIncrement(f.cache_evictions.Add({{"reason", "lru"}}), m.evicted_lru, last.evicted_lru);
  AddIncrement(f.cache_evictions.Add({{"reason", "unload"}}), m.evicted_unload,
               last.evicted_unload);
  AddIncrement(f.cache_evictions.Add({{"reason", "resize"}}), m.evicted_resize,
               last.evicted_resize);
  AddIncrement(f.cache_bytes, m.bytes_to_device, last.bytes_to_device);
  AddIncrement(f.cache_splits, m.split_calls, last.split_calls);
  f.cache_resident.Set(static_cast<double>(m.resident_experts));
  f.cache_host_bytes.Add({{"memory", "pinned"}}).Set(static_cast<double>(m.host_pinned_bytes));
  f.cache_host_bytes.Add({{"memory", "pageable"}}).Set(static_cast<double>(m.host_pageable_bytes));
  for (const auto& p : last.pools) {  // pools that went away read 0
    f.cache_pages.Add({{"width", std::to_string(p.width)}}).Set(0);
    f.cache_free_pages.Add({{"width", std::to_string(p.width)}}).Set(0);
  }
  for (const auto& p : m.pools) {
    f.cache_pages.Add({{"width", std::to_string(p.width)}}).Set(static_cast<double>(p.pages));
    f.cache_free_pages.Add({{"width", std::to_string(p.width)}})
        .Set(static_cast<double>(p.free_pages));
  }
  last = m;
}

void PrometheusMetrics::OnAdapterLoad(const engine::AdapterLoadMetrics& m) {
  Families& f = *families_;
  if (!m.failure_reason.empty()) {
    f.load_failures.Add({{"reason", m.failure_reason}}).Increment();
    return;
  }
  f.loads.Increment();
  const Histogram::BucketBoundaries buckets = LatencyBuckets();
  f.load_seconds.Add({{"stage", "read"}}, buckets).Observe(m.read_seconds);
  f.load_seconds.Add({{"stage", "attach"}}, buckets).Observe(m.attach_seconds);
  f.load_seconds.Add({{"stage", "publish"}}, buckets).Observe(m.publish_seconds);
}

}  // namespace moleserve::server
