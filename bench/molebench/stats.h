#pragma once

// molebench statistics: per-request records -> latency summaries, throughput, goodput and
// per-adapter aggregates, plus the Prometheus text parsing behind the server-side metric deltas.
// Pure logic (no gRPC, no sockets, no clock); every function is thread-compatible.
//
// Latency definitions (vllm `bench serve`'s), all reported in milliseconds:
//   TTFT  send -> arrival of the first token.
//   TPOT  per request, (E2E - TTFT) / (output_tokens - 1), for requests with > 1 output token.
//   ITL   every gap between consecutive token arrivals of a request. A response message carrying
//         n tokens counts them all at its arrival, so it contributes its gap from the previous
//         message followed by n - 1 zero gaps.
//   E2E   send -> the stream's end (the OK status after the last message).
// Only requests that ended OK enter these; failed ones are counted by status code.

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moleserve::bench {

// The q-th percentile (q in [0, 100]) of `values` with linear interpolation between closest ranks,
// numpy's default (method="linear"): rank q/100 * (n - 1) into the sorted values. 0 when empty.
double Percentile(std::vector<double> values, double q);

struct Summary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;  // all 0 when count == 0
};
Summary Summarize(std::vector<double> values);
nlohmann::json SummaryToJson(const Summary& s);

// What the driver saw of one request. Times are seconds from the start of the run.
struct RequestRecord {
  std::string adapter;
  absl::StatusCode code = absl::StatusCode::kUnknown;  // gRPC codes are absl's canonical codes
  std::string error_message;
  int64_t prompt_tokens = 0;
  double send_s = 0;
  double end_s = 0;
  // Arrival time of every received token, in order (output tokens = its size).
  std::vector<double> token_times_s;

  [[nodiscard]] bool ok() const { return code == absl::StatusCode::kOk; }
  [[nodiscard]] int64_t output_tokens() const { return static_cast<int64_t>(token_times_s.size()); }
};

// Per-request derived latencies in ms; nullopt where undefined (no token / one token).
std::optional<double> TtftMs(const RequestRecord& r);
std::optional<double> TpotMs(const RequestRecord& r);
double E2eMs(const RequestRecord& r);

// Goodput SLOs in ms; 0 = that SLO is not set.
struct SloConfig {
  double ttft_ms = 0;
  double tpot_ms = 0;
  [[nodiscard]] bool any() const { return ttft_ms > 0 || tpot_ms > 0; }
};
// An OK request meets the SLOs when its TTFT <= ttft_ms and its TPOT <= tpot_ms (each when set;
// an undefined TPOT, one output token, meets the TPOT SLO; no token at all misses a TTFT SLO).
bool MeetsSlo(const RequestRecord& r, const SloConfig& slo);

struct AdapterStats {
  std::string adapter;
  int64_t requests = 0;   // sent
  int64_t completed = 0;  // ended OK
  Summary ttft_ms;
  Summary e2e_ms;
};

struct BenchSummary {
  int64_t requests = 0;
  int64_t completed = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> status_counts;  // "OK", "RESOURCE_EXHAUSTED", ...
  // First error message seen per non-OK code, to tell why they failed.
  std::map<std::string, std::string> first_errors;
  double duration_s = 0;  // first send -> last stream end, over all requests
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
  double request_throughput = 0;       // completed / duration
  double output_token_throughput = 0;  // output tokens of completed requests / duration
  double total_token_throughput = 0;   // (input + output tokens of completed) / duration
  std::optional<double> goodput;       // good_requests / duration; set when an SLO is
  int64_t good_requests = 0;
  Summary ttft_ms, tpot_ms, itl_ms, e2e_ms;
  std::vector<AdapterStats> per_adapter;  // by requests descending, then name
};

BenchSummary SummarizeRun(const std::vector<RequestRecord>& records, const SloConfig& slo);
nlohmann::json BenchSummaryToJson(const BenchSummary& s);

// --- Prometheus text format -------------------------------------------------------------------

// One sample line: `name{label="value",...} value [timestamp]`.
struct MetricSample {
  std::string name;
  std::map<std::string, std::string> labels;  // unescaped values
  double value = 0;
};

// Parses exposition text: '#' lines and blank lines are skipped; label values may contain
// escaped quotes, backslashes, newlines, commas, braces and spaces; values may be +Inf, -Inf,
// NaN. INVALID_ARGUMENT "line N: why" for a malformed line.
absl::StatusOr<std::vector<MetricSample>> ParsePrometheusText(absl::string_view text);

// A series selector: a metric name and labels each sample must carry with those values (other
// labels are allowed, and summed over).
struct MetricSelector {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;
  // `name{k="v",...}` as Prometheus writes it.
  [[nodiscard]] std::string ToString() const;
};

// Sum of the values of the samples `selector` matches; nullopt when none does.
std::optional<double> SumSamples(const std::vector<MetricSample>& samples,
                                 const MetricSelector& selector);

// The series molebench diffs across a run, in report order.
const std::vector<MetricSelector>& ServerMetricSelectors();

struct ServerMetricsDelta {
  // after - before for every selector (by ToString()); a series absent from a scrape counts 0.
  std::map<std::string, double> deltas;
  // Selectors that matched nothing in the `after` scrape.
  std::vector<std::string> missing;
  // Derived figures; nullopt when their denominator delta is 0.
  std::optional<double> expert_bytes_per_token;  // bytes to device / generated tokens
  std::optional<double> swaps_per_1k_tokens;     // (device misses + prefetched) * 1000 / gen tokens
  std::optional<double> mean_distinct_experts_per_step;  // distinct experts sum / count
  double preemptions = 0;
};

ServerMetricsDelta DiffServerMetrics(const std::vector<MetricSample>& before,
                                     const std::vector<MetricSample>& after);
nlohmann::json ServerMetricsDeltaToJson(const ServerMetricsDelta& d);

}  // namespace moleserve::bench
