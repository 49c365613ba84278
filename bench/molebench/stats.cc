#include "bench/molebench/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace moleserve::bench {

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (rank - static_cast<double>(lo)) * (values[hi] - values[lo]);
}

Summary Summarize(std::vector<double> values) {
  Summary s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = static_cast<int64_t>(values.size());
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(s.count);
  s.p50 = Percentile(values, 50);
  s.p90 = Percentile(values, 90);
  s.p99 = Percentile(values, 99);
  s.max = values.back();
  return s;
}

nlohmann::json SummaryToJson(const Summary& s) {
  return {{"count", s.count}, {"mean", s.mean}, {"p50", s.p50},
          {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
}

std::optional<double> TtftMs(const RequestRecord& r) {
  if (r.token_times_s.empty()) return std::nullopt;
  return (r.token_times_s.front() - r.send_s) * 1e3;
}

std::optional<double> TpotMs(const RequestRecord& r) {
  if (r.token_times_s.size() < 2) return std::nullopt;
  return (E2eMs(r) - *TtftMs(r)) / static_cast<double>(r.token_times_s.size() - 1);
}

double E2eMs(const RequestRecord& r) { return (r.end_s - r.send_s) * 1e3; }

bool MeetsSlo(const RequestRecord& r, const SloConfig& slo) {
  if (!r.ok()) return false;
  if (slo.ttft_ms > 0) {
    const std::optional<double> ttft = TtftMs(r);
    if (!ttft.has_value() || *ttft > slo.ttft_ms) return false;
  }
  if (slo.tpot_ms > 0) {
    const std::optional<double> tpot = TpotMs(r);
    if (tpot.has_value() && *tpot > slo.tpot_ms) return false;
  }
  return true;
}

BenchSummary SummarizeRun(const std::vector<RequestRecord>& records, const SloConfig& slo) {
  BenchSummary s;
  s.requests = static_cast<int64_t>(records.size());
  std::vector<double> ttft, tpot, itl, e2e;
  struct PerAdapter {
    int64_t requests = 0, completed = 0;
    std::vector<double> ttft, e2e;
  };
  std::map<std::string, PerAdapter> by_adapter;
  double first_send = std::numeric_limits<double>::infinity();
  double last_end = -std::numeric_limits<double>::infinity();
  for (const RequestRecord& r : records) {
    first_send = std::min(first_send, r.send_s);
    last_end = std::max(last_end, r.end_s);
    const std::string code = absl::StatusCodeToString(r.code);
    ++s.status_counts[code];
    PerAdapter& a = by_adapter[r.adapter];
    ++a.requests;
    if (!r.ok()) {
      ++s.failed;
      s.first_errors.emplace(code, r.error_message);
      continue;
    }
    ++s.completed;
    ++a.completed;
    s.input_tokens += r.prompt_tokens;
    s.output_tokens += r.output_tokens();
    if (slo.any() && MeetsSlo(r, slo)) ++s.good_requests;
    e2e.push_back(E2eMs(r));
    a.e2e.push_back(e2e.back());
    if (const std::optional<double> t = TtftMs(r); t.has_value()) {
      ttft.push_back(*t);
      a.ttft.push_back(*t);
    }
    if (const std::optional<double> t = TpotMs(r); t.has_value()) tpot.push_back(*t);
    for (size_t i = 1; i < r.token_times_s.size(); ++i) {
      itl.push_back((r.token_times_s[i] - r.token_times_s[i - 1]) * 1e3);
    }
  }
  if (!records.empty()) s.duration_s = std::max(last_end - first_send, 0.0);
  if (s.duration_s > 0) {
    s.request_throughput = static_cast<double>(s.completed) / s.duration_s;
    s.output_token_throughput = static_cast<double>(s.output_tokens) / s.duration_s;
    s.total_token_throughput = static_cast<double>(s.input_tokens + s.output_tokens) / s.duration_s;
    if (slo.any()) s.goodput = static_cast<double>(s.good_requests) / s.duration_s;
  } else if (slo.any()) {
    s.goodput = 0;
  }
  s.ttft_ms = Summarize(std::move(ttft));
  s.tpot_ms = Summarize(std::move(tpot));
  s.itl_ms = Summarize(std::move(itl));
  s.e2e_ms = Summarize(std::move(e2e));
  for (auto& [name, a] : by_adapter) {
    s.per_adapter.push_back({.adapter = name,
                             .requests = a.requests,
                             .completed = a.completed,
                             .ttft_ms = Summarize(std::move(a.ttft)),
                             .e2e_ms = Summarize(std::move(a.e2e))});
  }
  // std::map iteration gave name order; stable_sort keeps it among equal counts.
  std::stable_sort(
      s.per_adapter.begin(), s.per_adapter.end(),
      [](const AdapterStats& x, const AdapterStats& y) { return x.requests > y.requests; });
  return s;
}

nlohmann::json BenchSummaryToJson(const BenchSummary& s) {
  nlohmann::json per_adapter = nlohmann::json::array();
  for (const AdapterStats& a : s.per_adapter) {
    per_adapter.push_back({{"adapter", a.adapter},
                           {"requests", a.requests},
                           {"completed", a.completed},
                           {"ttft_p50_ms", a.ttft_ms.p50},
                           {"ttft_p99_ms", a.ttft_ms.p99},
                           {"e2e_p50_ms", a.e2e_ms.p50},
                           {"e2e_p99_ms", a.e2e_ms.p99}});
  }
  return {
      {"totals",
       {{"requests", s.requests},
        {"completed", s.completed},
        {"failed", s.failed},
        {"status_counts", s.status_counts},
        {"first_errors", s.first_errors},
        {"duration_s", s.duration_s},
        {"input_tokens", s.input_tokens},
        {"output_tokens", s.output_tokens},
        {"request_throughput", s.request_throughput},
        {"output_token_throughput", s.output_token_throughput},
        {"total_token_throughput", s.total_token_throughput},
        {"goodput", s.goodput.has_value() ? nlohmann::json(*s.goodput) : nlohmann::json()},
        {"good_requests", s.good_requests}}},
      {"latency_ms",
       {{"ttft", SummaryToJson(s.ttft_ms)},
        {"tpot", SummaryToJson(s.tpot_ms)},
        {"itl", SummaryToJson(s.itl_ms)},
        {"e2e", SummaryToJson(s.e2e_ms)}}},
      {"per_adapter", per_adapter},
  };
}

// --- Prometheus --------------------------------------------------------------------------------

namespace {

bool IsNameChar(char c, bool first) {
  return absl::ascii_isalpha(c) || c == '_' || c == ':' || (!first && absl::ascii_isdigit(c));
}

bool ParseSampleValue(absl::string_view text, double* value) {
  if (text == "+Inf" || text == "Inf") {
    *value = std::numeric_limits<double>::infinity();
    return true;
  }
  if (text == "-Inf") {
    *value = -std::numeric_limits<double>::infinity();
    return true;
  }
  if (text == "NaN") {
    *value = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  return absl::SimpleAtod(text, value);
}

// Parses `{k="v",...}` at the start of `*rest`, consuming it.
absl::Status ParseLabels(absl::string_view* rest, std::map<std::string, std::string>* labels) {
  absl::string_view s = *rest;
  s.remove_prefix(1);  // '{'
  while (true) {
    s = absl::StripLeadingAsciiWhitespace(s);
    if (s.empty()) return absl::InvalidArgumentError("unterminated label set");
    if (s[0] == '}') {
      s.remove_prefix(1);
      break;
    }
    size_t n = 0;
    while (n < s.size() && IsNameChar(s[n], n == 0)) ++n;
    if (n == 0) return absl::InvalidArgumentError("bad label name");
    std::string key(s.substr(0, n));
    s.remove_prefix(n);
    s = absl::StripLeadingAsciiWhitespace(s);
    if (s.size() < 2 || s[0] != '=' || s[1] != '"') {
      return absl::InvalidArgumentError(absl::StrCat("label ", key, ": expected =\"value\""));
    }
    s.remove_prefix(2);
    std::string value;
    bool closed = false;
    while (!s.empty()) {
      const char c = s[0];
      s.remove_prefix(1);
      if (c == '"') {
        closed = true;
        break;
      }
      if (c == '\\' && !s.empty()) {
        const char e = s[0];
        s.remove_prefix(1);
        value.push_back(e == 'n' ? '\n' : e);  // \\ -> \, \" -> ", \n -> newline
        continue;
      }
      value.push_back(c);
    }
    if (!closed) return absl::InvalidArgumentError(absl::StrCat("label ", key, ": unclosed value"));
    if (!labels->emplace(std::move(key), std::move(value)).second) {
      return absl::InvalidArgumentError("repeated label name");
    }
    s = absl::StripLeadingAsciiWhitespace(s);
    if (!s.empty() && s[0] == ',') s.remove_prefix(1);
  }
  *rest = s;
  return absl::OkStatus();
}

absl::StatusOr<MetricSample> ParseSampleLine(absl::string_view line) {
  MetricSample sample;
  size_t n = 0;
  while (n < line.size() && IsNameChar(line[n], n == 0)) ++n;
  if (n == 0) return absl::InvalidArgumentError("bad metric name");
  sample.name = std::string(line.substr(0, n));
  absl::string_view rest = line.substr(n);
  if (!rest.empty() && rest[0] == '{') {
    if (absl::Status s = ParseLabels(&rest, &sample.labels); !s.ok()) return s;
  }
  std::vector<absl::string_view> fields =
      absl::StrSplit(rest, absl::ByAnyChar(" \t"), absl::SkipEmpty());
  if (fields.empty() || fields.size() > 2) {
    return absl::InvalidArgumentError("expected a value and an optional timestamp");
  }
  if (!ParseSampleValue(fields[0], &sample.value)) {
    return absl::InvalidArgumentError(absl::StrCat("bad value '", fields[0], "'"));
  }
  return sample;
}

}  // namespace

absl::StatusOr<std::vector<MetricSample>> ParsePrometheusText(absl::string_view text) {
  std::vector<MetricSample> samples;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    absl::StatusOr<MetricSample> sample = ParseSampleLine(line);
    if (!sample.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics line ", line_number, ": ", sample.status().message(), ": ", line));
    }
    samples.push_back(*std::move(sample));
  }
  return samples;
}

std::string MetricSelector::ToString() const {
  if (labels.empty()) return name;
  return absl::StrCat(name, "{",
                      absl::StrJoin(labels, ",",
                                    [](std::string* out, const auto& kv) {
                                      absl::StrAppend(out, kv.first, "=\"", kv.second, "\"");
                                    }),
                      "}");
}

std::optional<double> SumSamples(const std::vector<MetricSample>& samples,
                                 const MetricSelector& selector) {
  std::optional<double> sum;
  for (const MetricSample& s : samples) {
    if (s.name != selector.name) continue;
    const bool match = std::all_of(selector.labels.begin(), selector.labels.end(),
                                   [&](const std::pair<std::string, std::string>& kv) {
                                     const auto it = s.labels.find(kv.first);
                                     return it != s.labels.end() && it->second == kv.second;
                                   });
    if (match) sum = sum.value_or(0) + s.value;
  }
  return sum;
}

namespace {

// Indices into ServerMetricSelectors().
enum ServerMetric : size_t {
  kGenerationTokens,
  kBytesToDevice,
  kDeviceMisses,
  kPrefetched,
  kDistinctExpertsSum,
  kDistinctExpertsCount,
  kSteps,
  kPreempted,
  kRejected,
};

}  // namespace

const std::vector<MetricSelector>& ServerMetricSelectors() {
  static const std::vector<MetricSelector>* const kSelectors = new std::vector<MetricSelector>{
      {"moleserve_generation_tokens_total", {}},
      {"moleserve_expert_cache_bytes_to_device_total", {}},
      {"moleserve_expert_cache_lookups_total", {{"tier", "device"}, {"result", "miss"}}},
      {"moleserve_expert_cache_prefetched_total", {}},
      {"moleserve_step_distinct_experts_sum", {}},
      {"moleserve_step_distinct_experts_count", {}},
      {"moleserve_steps_total", {}},
      {"moleserve_requests_preempted_total", {}},
      {"moleserve_requests_rejected_total", {}},
  };
  return *kSelectors;
}

ServerMetricsDelta DiffServerMetrics(const std::vector<MetricSample>& before,
                                     const std::vector<MetricSample>& after) {
  ServerMetricsDelta d;
  const std::vector<MetricSelector>& selectors = ServerMetricSelectors();
  std::vector<double> delta(selectors.size(), 0.0);
  for (size_t i = 0; i < selectors.size(); ++i) {
    const std::optional<double> a = SumSamples(after, selectors[i]);
    if (!a.has_value()) d.missing.push_back(selectors[i].ToString());
    delta[i] = a.value_or(0) - SumSamples(before, selectors[i]).value_or(0);
    d.deltas[selectors[i].ToString()] = delta[i];
  }
  const auto ratio = [](double num, double den) -> std::optional<double> {
    if (den == 0) return std::nullopt;
    return num / den;
  };
  d.expert_bytes_per_token = ratio(delta[kBytesToDevice], delta[kGenerationTokens]);
  d.swaps_per_1k_tokens =
      ratio((delta[kDeviceMisses] + delta[kPrefetched]) * 1000, delta[kGenerationTokens]);
  d.mean_distinct_experts_per_step =
      ratio(delta[kDistinctExpertsSum], delta[kDistinctExpertsCount]);
  d.preemptions = delta[kPreempted];
  return d;
}

nlohmann::json ServerMetricsDeltaToJson(const ServerMetricsDelta& d) {
  const auto opt = [](const std::optional<double>& v) {
    return v.has_value() ? nlohmann::json(*v) : nlohmann::json();
  };
  return {{"deltas", d.deltas},
          {"missing", d.missing},
          {"derived",
           {{"expert_bytes_per_generated_token", opt(d.expert_bytes_per_token)},
            {"swaps_per_1000_generated_tokens", opt(d.swaps_per_1k_tokens)},
            {"mean_distinct_experts_per_step", opt(d.mean_distinct_experts_per_step)},
            {"preemptions", d.preemptions}}}};
}

}  // namespace moleserve::bench
