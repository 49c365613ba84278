#include "server/metrics/prometheus_metrics.h"

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <exception>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace moleserve::server {
namespace {

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
                                                             1024, 2048, 4096, 8192})) {}

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
  prometheus::Gauge& kv_usage;
  prometheus::Counter& steps;
  Histogram& step_tokens;
};

PrometheusMetrics::PrometheusMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      families_(std::make_unique<Families>(*registry_)) {}

PrometheusMetrics::~PrometheusMetrics() = default;

absl::StatusOr<std::unique_ptr<PrometheusMetrics>> PrometheusMetrics::Create(
    const std::string& bind_address) {
  std::unique_ptr<PrometheusMetrics> m(new PrometheusMetrics());
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

void PrometheusMetrics::OnRequestRejected(absl::StatusCode code) {
  families_->rejected.Add({{"code", CodeName(code)}}).Increment();
}

void PrometheusMetrics::OnFirstToken(double seconds) { families_->ttft.Observe(seconds); }

void PrometheusMetrics::OnInterTokenLatency(double seconds) { families_->itl.Observe(seconds); }

void PrometheusMetrics::OnRequestFinished(const engine::FinishedRequestMetrics& m) {
  const std::string outcome = m.code == absl::StatusCode::kOk ? m.finish_reason : CodeName(m.code);
  families_->finished.Add({{"outcome", outcome}}).Increment();
  families_->prompt_tokens.Increment(static_cast<double>(m.prompt_tokens));
  families_->generation_tokens.Increment(static_cast<double>(m.generated_tokens));
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
  families_->kv_usage.Set(m.kv_cache_usage);
  families_->running.Set(static_cast<double>(m.num_running));
  families_->waiting.Set(static_cast<double>(m.num_waiting));
}

void PrometheusMetrics::OnQueueState(int64_t num_waiting, int64_t num_running,
                                     double kv_cache_usage) {
  families_->kv_usage.Set(kv_cache_usage);
  families_->running.Set(static_cast<double>(num_running));
  families_->waiting.Set(static_cast<double>(num_waiting));
}

}  // namespace moleserve::server
