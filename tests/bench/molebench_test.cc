// molebench's pure logic: length distributions, adapter popularity, Poisson arrivals, JSONL
// datasets, the workload plan, percentiles and run summaries, goodput, and Prometheus text
// parsing with the server-metric deltas.

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/molebench/stats.h"
#include "bench/molebench/workload.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moleserve::bench {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

// --- percentiles -------------------------------------------------------------------------------

// Expected values are numpy.percentile(values, q) (method="linear"), computed by hand:
// rank = q/100 * (n-1), then interpolate between the sorted neighbours.
TEST(PercentileTest, MatchesNumpyLinear) {
  // sorted [1, 2, 3, 4]: p50 rank 1.5 -> 2.5; p90 rank 2.7 -> 3.7; p99 rank 2.97 -> 3.97.
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 50), 2.5);
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 90), 3.7);
  EXPECT_DOUBLE_EQ(Percentile({4, 1, 3, 2}, 99), 3.97);
  // sorted [15, 20, 35, 40, 50]: p0 15; p40 rank 1.6 -> 29; p50 35; p90 rank 3.6 -> 46;
  // p99 rank 3.96 -> 49.6; p100 50.
  const std::vector<double> v = {35, 15, 50, 20, 40};
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 15);
  EXPECT_DOUBLE_EQ(Percentile(v, 40), 29);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 35);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 46);
  EXPECT_NEAR(Percentile(v, 99), 49.6, 1e-12);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 50);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
}

TEST(PercentileTest, SummaryFields) {
  const Summary s = Summarize({35, 15, 50, 20, 40});
  EXPECT_EQ(s.count, 5);
  EXPECT_DOUBLE_EQ(s.mean, 32);
  EXPECT_DOUBLE_EQ(s.p50, 35);
  EXPECT_DOUBLE_EQ(s.p90, 46);
  EXPECT_NEAR(s.p99, 49.6, 1e-12);
  EXPECT_DOUBLE_EQ(s.max, 50);
  EXPECT_EQ(Summarize({}).count, 0);
}

// --- length distributions ----------------------------------------------------------------------

TEST(LengthDistributionTest, RefusesBadSpecsWithClearMessages) {
  absl::StatusOr<LengthDistribution> bogus = LengthDistribution::Parse("bogus:1");
  ASSERT_FALSE(bogus.ok());
  EXPECT_EQ(bogus.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bogus.status().message(), HasSubstr("unknown kind 'bogus'"));
  EXPECT_THAT(bogus.status().message(), HasSubstr("fixed:N, uniform:A:B or normal:MEAN:STD"));
  for (const char* bad : {"", "fixed", "fixed:0", "fixed:abc", "fixed:1:2", "uniform:5:2",
                          "uniform:0:3", "uniform:3", "normal:3", "normal:3:-1", "normal:x:1"}) {
    EXPECT_FALSE(LengthDistribution::Parse(bad).ok()) << bad;
  }
}

TEST(LengthDistributionTest, Samples) {
  std::mt19937_64 rng(1);
  absl::StatusOr<LengthDistribution> fixed = LengthDistribution::Parse("fixed:7");
  ASSERT_TRUE(fixed.ok());
  EXPECT_EQ(fixed->ToString(), "fixed:7");
  for (int i = 0; i < 100; ++i) EXPECT_EQ(fixed->Sample(rng), 7);

  absl::StatusOr<LengthDistribution> uniform = LengthDistribution::Parse("uniform:3:5");
  ASSERT_TRUE(uniform.ok());
  EXPECT_EQ(uniform->ToString(), "uniform:3:5");
  std::set<int> seen;
  for (int i = 0; i < 1000; ++i) seen.insert(uniform->Sample(rng));
  EXPECT_THAT(seen, ElementsAre(3, 4, 5));

  // Mean 10, std 100: about 46% of raw draws fall below 1 and are clamped to 1.
  absl::StatusOr<LengthDistribution> normal = LengthDistribution::Parse("normal:10:100");
  ASSERT_TRUE(normal.ok());
  int ones = 0;
  for (int i = 0; i < 10000; ++i) {
    const int x = normal->Sample(rng);
    ASSERT_GE(x, 1);
    ones += x == 1;
  }
  EXPECT_GT(ones, 4000);
  EXPECT_LT(ones, 5200);
  // STD 0 is a fixed length.
  absl::StatusOr<LengthDistribution> degenerate = LengthDistribution::Parse("normal:12.4:0");
  ASSERT_TRUE(degenerate.ok());
  EXPECT_EQ(degenerate->Sample(rng), 12);
}

// --- adapters ----------------------------------------------------------------------------------

TEST(AdapterListTest, Forms) {
  EXPECT_THAT(*ParseAdapterList(""), ElementsAre(""));
  EXPECT_THAT(*ParseAdapterList("a, b,c"), ElementsAre("a", "b", "c"));
  EXPECT_THAT(*ParseAdapterList("mole:3"), ElementsAre("mole0", "mole1", "mole2"));
  EXPECT_THAT(ParseAdapterList("a,,b").status().message(), HasSubstr("empty name"));
  EXPECT_FALSE(ParseAdapterList("mole:0").ok());
  EXPECT_FALSE(ParseAdapterList("mole:x").ok());
  EXPECT_TRUE(ParsePopularity("zipf").ok());
  EXPECT_THAT(ParsePopularity("pareto").status().message(), HasSubstr("uniform or zipf"));
}

std::map<std::string, int> Draw(const AdapterSampler& sampler, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::map<std::string, int> counts;
  for (int i = 0; i < n; ++i) ++counts[sampler.Sample(rng)];
  return counts;
}

// Zipf s=1 over N=10: rank k gets (1/k) / H_10, H_10 = 2.928968, so the top adapter gets
// 0.341417. 200k draws: the binomial std of a frequency is <= 0.0011; tolerance 0.005 (> 4 sigma).
TEST(AdapterSamplerTest, ZipfFrequencies) {
  absl::StatusOr<AdapterSampler> sampler =
      AdapterSampler::Create(*ParseAdapterList("a:10"), Popularity::kZipf, 1.0, /*seed=*/3);
  ASSERT_TRUE(sampler.ok());
  const int n = 200000;
  const std::map<std::string, int> counts = Draw(*sampler, n, 11);
  const double h10 = 2.9289682539682538;
  EXPECT_NEAR(sampler->probabilities()[0], 1 / h10, 1e-12);
  for (size_t k = 0; k < 10; ++k) {
    const std::string& name = sampler->ranking()[k];
    const double freq = counts.count(name) ? static_cast<double>(counts.at(name)) / n : 0.0;
    EXPECT_NEAR(freq, 1.0 / (static_cast<double>(k + 1) * h10), 0.005) << "rank " << k;
  }
  EXPECT_NEAR(static_cast<double>(counts.at(sampler->ranking()[0])) / n, 0.341417, 0.005);
  // The ranking is a permutation of the names, fixed by the seed.
  std::vector<std::string> sorted = sampler->ranking();
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, *ParseAdapterList("a:10"));
  absl::StatusOr<AdapterSampler> again =
      AdapterSampler::Create(*ParseAdapterList("a:10"), Popularity::kZipf, 1.0, 3);
  EXPECT_EQ(again->ranking(), sampler->ranking());
}

// s = 1.5 over N = 20: top adapter 1 / sum_{k<=20} k^-1.5 = 1 / 2.170682 = 0.460685.
TEST(AdapterSamplerTest, ZipfExponent) {
  absl::StatusOr<AdapterSampler> sampler =
      AdapterSampler::Create(*ParseAdapterList("a:20"), Popularity::kZipf, 1.5, 5);
  ASSERT_TRUE(sampler.ok());
  const int n = 100000;
  const std::map<std::string, int> counts = Draw(*sampler, n, 2);
  EXPECT_NEAR(static_cast<double>(counts.at(sampler->ranking()[0])) / n, 0.460685, 0.007);
}

// Uniform over 8: each 0.125; 80k draws, std 0.0012, tolerance 0.005.
TEST(AdapterSamplerTest, UniformFrequencies) {
  absl::StatusOr<AdapterSampler> sampler =
      AdapterSampler::Create(*ParseAdapterList("u:8"), Popularity::kUniform, 1.0, 9);
  ASSERT_TRUE(sampler.ok());
  const int n = 80000;
  const std::map<std::string, int> counts = Draw(*sampler, n, 4);
  ASSERT_EQ(counts.size(), 8u);
  for (const auto& [name, count] : counts) {
    EXPECT_NEAR(static_cast<double>(count) / n, 0.125, 0.005) << name;
  }
}

TEST(AdapterSamplerTest, RefusesBadInput) {
  EXPECT_FALSE(AdapterSampler::Create({}, Popularity::kUniform, 1.0, 0).ok());
  EXPECT_FALSE(AdapterSampler::Create({"a"}, Popularity::kZipf, -1.0, 0).ok());
  EXPECT_FALSE(AdapterSampler::Create({"a"}, Popularity::kZipf, NAN, 0).ok());
}

// --- arrivals ----------------------------------------------------------------------------------

// Rate 50/s: gaps are exponential with mean 0.02 s and std 0.02 s. Over 100k gaps the mean's std
// is 0.02/sqrt(1e5) = 6.3e-5 (0.3%); tolerance 2%. The coefficient of variation of an
// exponential is 1 (fixed gaps would give 0); tolerance 0.05.
TEST(PoissonArrivalsTest, MeanGapAndDeterminism) {
  const int n = 100001;
  const std::vector<double> t = PoissonArrivals(n, 50.0, 7);
  ASSERT_EQ(t.size(), static_cast<size_t>(n));
  EXPECT_EQ(t[0], 0);
  double sum = 0, sum_sq = 0;
  for (int i = 1; i < n; ++i) {
    const double gap = t[i] - t[i - 1];
    ASSERT_GE(gap, 0);
    sum += gap;
    sum_sq += gap * gap;
  }
  const double mean = sum / (n - 1);
  const double stddev = std::sqrt(sum_sq / (n - 1) - mean * mean);
  EXPECT_NEAR(mean, 0.02, 0.02 * 0.02);
  EXPECT_NEAR(stddev / mean, 1.0, 0.05);
  EXPECT_EQ(PoissonArrivals(1000, 50.0, 7), std::vector<double>(t.begin(), t.begin() + 1000));
  EXPECT_NE(PoissonArrivals(1000, 50.0, 8), std::vector<double>(t.begin(), t.begin() + 1000));
  EXPECT_EQ(PoissonArrivals(5, INFINITY, 7), std::vector<double>(5, 0.0));
}

// --- datasets ----------------------------------------------------------------------------------

TEST(DatasetTest, ParsesGoodLines) {
  absl::StatusOr<std::vector<DatasetEntry>> d = ParseDatasetJsonl(
      "{\"prompt\": \"hello world\"}\n"
      "\n"
      "{\"prompt_ids\": [1, 2, 300], \"output_len\": 16, \"adapter\": \"mole3\"}\r\n"
      "{\"prompt\": \"x\", \"adapter\": \"\", \"extra\": true}\n",
      "d.jsonl");
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_EQ(d->size(), 3u);
  EXPECT_EQ((*d)[0].prompt, "hello world");
  EXPECT_TRUE((*d)[0].prompt_ids.empty());
  EXPECT_FALSE((*d)[0].output_len.has_value());
  EXPECT_FALSE((*d)[0].adapter.has_value());
  EXPECT_THAT((*d)[1].prompt_ids, ElementsAre(1, 2, 300));
  EXPECT_EQ((*d)[1].output_len, 16);
  EXPECT_EQ((*d)[1].adapter, "mole3");
  EXPECT_EQ((*d)[2].adapter, "");
}

TEST(DatasetTest, BadLineReportsItsNumber) {
  const std::string good = "{\"prompt\": \"ok\"}\n";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"prompt\": \"unterminated}", "not valid JSON"},
      {"[1, 2]", "expected a JSON object"},
      {"{\"output_len\": 3}", "exactly one of"},
      {"{\"prompt\": \"a\", \"prompt_ids\": [1]}", "exactly one of"},
      {"{\"prompt\": 5}", "\"prompt\" must be a string"},
      {"{\"prompt\": \"\"}", "\"prompt\" is empty"},
      {"{\"prompt_ids\": []}", "non-empty array"},
      {"{\"prompt_ids\": [1, -2]}", "holds -2"},
      {"{\"prompt_ids\": [1.5]}", "not a token id"},
      {"{\"prompt\": \"a\", \"output_len\": 0}", "\"output_len\" must be an integer >= 1"},
      {"{\"prompt\": \"a\", \"adapter\": 3}", "\"adapter\" must be a string"},
  };
  for (const auto& [line, why] : cases) {
    // Line 3: two good lines, then a blank one that still counts.
    absl::StatusOr<std::vector<DatasetEntry>> d =
        ParseDatasetJsonl(good + good + "\n" + line + "\n" + good, "p.jsonl");
    ASSERT_FALSE(d.ok()) << line;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(d.status().message(), HasSubstr("p.jsonl:4: ")) << line;
    EXPECT_THAT(d.status().message(), HasSubstr(why)) << line;
  }
  EXPECT_EQ(LoadDatasetJsonl("/nonexistent/molebench.jsonl").status().code(),
            absl::StatusCode::kNotFound);
}

// --- workload plan -----------------------------------------------------------------------------

TEST(PlanWorkloadTest, RandomPromptsAreDeterministic) {
  WorkloadConfig c;
  c.num_requests = 200;
  c.seed = 42;
  c.prompt_len = *LengthDistribution::Parse("uniform:4:9");
  c.output_len = *LengthDistribution::Parse("fixed:5");
  c.adapters = *ParseAdapterList("m:4");
  c.popularity = Popularity::kZipf;
  c.rate = 10.0;
  absl::StatusOr<std::vector<PlannedRequest>> plan = PlanWorkload(c);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->size(), 200u);
  std::set<std::string> adapters;
  for (int i = 0; i < 200; ++i) {
    const PlannedRequest& r = (*plan)[i];
    EXPECT_EQ(r.index, i);
    EXPECT_GE(r.prompt_ids.size(), 4u);
    EXPECT_LE(r.prompt_ids.size(), 9u);
    for (uint32_t id : r.prompt_ids) {
      EXPECT_GE(id, 10u);
      EXPECT_LT(id, 250u);
    }
    EXPECT_EQ(r.output_len, 5);
    if (i > 0) {
      EXPECT_GE(r.send_offset_s, (*plan)[i - 1].send_offset_s);
    }
    adapters.insert(r.adapter);
  }
  EXPECT_EQ(adapters.size(), 4u);
  // Same seed, same plan; another rate changes only the send offsets.
  c.rate = 99.0;
  absl::StatusOr<std::vector<PlannedRequest>> other = PlanWorkload(c);
  ASSERT_TRUE(other.ok());
  for (int i = 0; i < 200; ++i) {
    EXPECT_EQ((*other)[i].prompt_ids, (*plan)[i].prompt_ids);
    EXPECT_EQ((*other)[i].adapter, (*plan)[i].adapter);
  }
  EXPECT_NE((*other)[199].send_offset_s, (*plan)[199].send_offset_s);
  // Closed loop: no offsets.
  c.rate.reset();
  absl::StatusOr<std::vector<PlannedRequest>> closed = PlanWorkload(c);
  ASSERT_TRUE(closed.ok());
  for (const PlannedRequest& r : *closed) EXPECT_EQ(r.send_offset_s, 0);
}

TEST(PlanWorkloadTest, DatasetIsCycledAndItsFieldsWin) {
  WorkloadConfig c;
  c.dataset = *ParseDatasetJsonl(
      "{\"prompt\": \"a\"}\n{\"prompt_ids\": [5, 6], \"output_len\": 3, \"adapter\": \"x\"}\n",
      "d");
  c.output_len = *LengthDistribution::Parse("fixed:9");
  c.adapters = {"y"};
  absl::StatusOr<std::vector<PlannedRequest>> plan = PlanWorkload(c);  // 0 = one per line
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 2u);
  c.num_requests = 5;
  plan = PlanWorkload(c);
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->size(), 5u);
  EXPECT_EQ((*plan)[0].prompt_text, "a");
  EXPECT_EQ((*plan)[0].output_len, 9);
  EXPECT_EQ((*plan)[0].adapter, "y");
  EXPECT_THAT((*plan)[1].prompt_ids, ElementsAre(5, 6));
  EXPECT_EQ((*plan)[1].output_len, 3);
  EXPECT_EQ((*plan)[1].adapter, "x");
  EXPECT_EQ((*plan)[4].prompt_text, "a");
}

TEST(PlanWorkloadTest, RefusesBadConfig) {
  WorkloadConfig c;
  EXPECT_FALSE(PlanWorkload(c).ok());  // no requests
  c.num_requests = 1;
  c.rate = 0.0;
  EXPECT_THAT(PlanWorkload(c).status().message(), HasSubstr("rate must be > 0"));
  c.rate.reset();
  c.token_id_min = 5;
  c.token_id_max = 5;
  EXPECT_FALSE(PlanWorkload(c).ok());
}

// --- run summaries and goodput -----------------------------------------------------------------

RequestRecord Ok(std::string adapter, double send, std::vector<double> tokens, double end) {
  RequestRecord r;
  r.adapter = std::move(adapter);
  r.code = absl::StatusCode::kOk;
  r.prompt_tokens = 10;
  r.send_s = send;
  r.token_times_s = std::move(tokens);
  r.end_s = end;
  return r;
}

TEST(SummarizeRunTest, GoodputAndLatencies) {
  std::vector<RequestRecord> records = {
      // TTFT 50, E2E 69, TPOT (69-50)/2 = 9.5: meets ttft<=100 and tpot<=10.
      Ok("a", 0.0, {0.05, 0.06, 0.069}, 0.069),
      // TTFT 150 (TPOT 9): misses.
      Ok("a", 0.1, {0.25, 0.259}, 0.259),
      // TTFT 50, TPOT 20: misses. Two tokens in one message: ITL gaps 0 then 40.
      Ok("b", 0.2, {0.25, 0.25, 0.29}, 0.29),
      // One token: TPOT undefined, meets; TTFT 20.
      Ok("b", 0.3, {0.32}, 0.32),
  };
  RequestRecord rejected;
  rejected.adapter = "c";
  rejected.code = absl::StatusCode::kResourceExhausted;
  rejected.error_message = "queue full";
  rejected.send_s = 0.4;
  rejected.end_s = 0.5;
  records.push_back(rejected);

  const SloConfig slo{.ttft_ms = 100, .tpot_ms = 10};
  EXPECT_TRUE(MeetsSlo(records[0], slo));
  EXPECT_FALSE(MeetsSlo(records[1], slo));
  EXPECT_FALSE(MeetsSlo(records[2], slo));
  EXPECT_TRUE(MeetsSlo(records[3], slo));
  EXPECT_FALSE(MeetsSlo(records[4], slo));
  EXPECT_TRUE(MeetsSlo(records[1], SloConfig{.tpot_ms = 10}));  // TTFT SLO unset

  const BenchSummary s = SummarizeRun(records, slo);
  EXPECT_EQ(s.requests, 5);
  EXPECT_EQ(s.completed, 4);
  EXPECT_EQ(s.failed, 1);
  EXPECT_THAT(s.status_counts, UnorderedElementsAre(Pair("OK", 4), Pair("RESOURCE_EXHAUSTED", 1)));
  EXPECT_THAT(s.first_errors, ElementsAre(Pair("RESOURCE_EXHAUSTED", "queue full")));
  EXPECT_DOUBLE_EQ(s.duration_s, 0.5);  // first send 0 -> last end 0.5 (the rejected one)
  EXPECT_EQ(s.good_requests, 2);
  ASSERT_TRUE(s.goodput.has_value());
  EXPECT_DOUBLE_EQ(*s.goodput, 4.0);
  EXPECT_DOUBLE_EQ(s.request_throughput, 8.0);
  EXPECT_EQ(s.input_tokens, 40);  // completed requests only
  EXPECT_EQ(s.output_tokens, 9);
  EXPECT_DOUBLE_EQ(s.output_token_throughput, 18.0);
  EXPECT_DOUBLE_EQ(s.total_token_throughput, 98.0);
  // TTFT {50, 150, 50, 20}; E2E {69, 159, 90, 20}; TPOT {9.5, 9, 20}.
  EXPECT_EQ(s.ttft_ms.count, 4);
  EXPECT_NEAR(s.ttft_ms.mean, 67.5, 1e-9);
  EXPECT_NEAR(s.ttft_ms.p50, 50, 1e-9);
  EXPECT_NEAR(s.ttft_ms.max, 150, 1e-9);
  EXPECT_EQ(s.tpot_ms.count, 3);
  EXPECT_NEAR(s.tpot_ms.p50, 9.5, 1e-9);
  EXPECT_NEAR(s.e2e_ms.max, 159, 1e-9);
  // ITL: {10, 9}, {9}, {0, 40}.
  EXPECT_EQ(s.itl_ms.count, 5);
  EXPECT_NEAR(s.itl_ms.mean, 13.6, 1e-9);
  EXPECT_NEAR(s.itl_ms.p50, 9, 1e-9);
  // Per adapter: a and b (2 each, name order), then c (failed only).
  ASSERT_EQ(s.per_adapter.size(), 3u);
  EXPECT_EQ(s.per_adapter[0].adapter, "a");
  EXPECT_EQ(s.per_adapter[0].completed, 2);
  EXPECT_NEAR(s.per_adapter[0].ttft_ms.p99, 50 + 0.99 * 100, 1e-9);
  EXPECT_EQ(s.per_adapter[1].adapter, "b");
  EXPECT_EQ(s.per_adapter[2].adapter, "c");
  EXPECT_EQ(s.per_adapter[2].requests, 1);
  EXPECT_EQ(s.per_adapter[2].completed, 0);
  EXPECT_EQ(s.per_adapter[2].ttft_ms.count, 0);

  EXPECT_FALSE(SummarizeRun(records, SloConfig{}).goodput.has_value());
  const nlohmann::json j = BenchSummaryToJson(s);
  EXPECT_EQ(j["totals"]["status_counts"]["RESOURCE_EXHAUSTED"], 1);
  EXPECT_EQ(j["totals"]["good_requests"], 2);
  EXPECT_EQ(j["per_adapter"][0]["adapter"], "a");
}

// --- Prometheus --------------------------------------------------------------------------------

constexpr char kScrape[] = R"(# HELP moleserve_expert_cache_lookups_total Expert cache lookups
# TYPE moleserve_expert_cache_lookups_total counter
moleserve_expert_cache_lookups_total{result="hit",tier="device"} 100
moleserve_expert_cache_lookups_total{result="miss",tier="device"} 7
moleserve_expert_cache_lookups_total{result="miss",tier="host"} 3
moleserve_requests_rejected_total{code="resource_exhausted"} 4
moleserve_requests_rejected_total{code="invalid_argument"} 1
# TYPE moleserve_step_distinct_experts histogram
moleserve_step_distinct_experts_bucket{le="4"} 6
moleserve_step_distinct_experts_bucket{le="+Inf"} 10
moleserve_step_distinct_experts_sum 55
moleserve_step_distinct_experts_count 10
moleserve_generation_tokens_total 1000 1700000000000
moleserve_expert_cache_bytes_to_device_total 5e5
weird{path="a \"b\", c} d\\e",x="1"} -Inf
)";

TEST(PrometheusTest, ParsesSamplesAndLabels) {
  absl::StatusOr<std::vector<MetricSample>> samples = ParsePrometheusText(kScrape);
  ASSERT_TRUE(samples.ok()) << samples.status();
  ASSERT_EQ(samples->size(), 12u);
  EXPECT_EQ((*samples)[1].name, "moleserve_expert_cache_lookups_total");
  EXPECT_THAT((*samples)[1].labels,
              UnorderedElementsAre(Pair("result", "miss"), Pair("tier", "device")));
  EXPECT_EQ((*samples)[1].value, 7);
  EXPECT_THAT((*samples)[6].labels, ElementsAre(Pair("le", "+Inf")));
  EXPECT_EQ((*samples)[9].value, 1000);  // timestamp ignored
  EXPECT_EQ((*samples)[10].value, 5e5);
  EXPECT_THAT(samples->back().labels,
              ElementsAre(Pair("path", "a \"b\", c} d\\e"), Pair("x", "1")));
  EXPECT_TRUE(std::isinf(samples->back().value) && samples->back().value < 0);

  const MetricSelector device_miss = {"moleserve_expert_cache_lookups_total",
                                      {{"tier", "device"}, {"result", "miss"}}};
  EXPECT_EQ(device_miss.ToString(),
            "moleserve_expert_cache_lookups_total{tier=\"device\",result=\"miss\"}");
  EXPECT_EQ(SumSamples(*samples, device_miss), 7);
  EXPECT_EQ(SumSamples(*samples, {"moleserve_expert_cache_lookups_total", {{"result", "miss"}}}),
            10);
  EXPECT_EQ(SumSamples(*samples, {"moleserve_requests_rejected_total", {}}), 5);
  EXPECT_EQ(SumSamples(*samples, {"moleserve_step_distinct_experts_sum", {}}), 55);
  EXPECT_EQ(SumSamples(*samples, {"moleserve_step_distinct_experts_count", {}}), 10);
  EXPECT_FALSE(SumSamples(*samples, {"moleserve_requests_preempted_total", {}}).has_value());
  EXPECT_FALSE(SumSamples(*samples, {"moleserve_expert_cache_lookups_total",
                                     {{"tier", "disk"}, {"result", "miss"}}})
                   .has_value());
}

TEST(PrometheusTest, MalformedLineNamesIt) {
  for (const char* bad : {"metric", "metric{a=\"1\" 3", "metric{a=1} 3", "metric{a=\"1\"} x",
                          "metric 1 2 3", "{a=\"1\"} 3"}) {
    absl::StatusOr<std::vector<MetricSample>> s =
        ParsePrometheusText(absl::StrCat("# c\nok 1\n", bad, "\n"));
    ASSERT_FALSE(s.ok()) << bad;
    EXPECT_THAT(s.status().message(), HasSubstr("metrics line 3:")) << bad;
  }
}

TEST(PrometheusTest, ServerMetricDeltas) {
  const std::vector<MetricSample> before = *ParsePrometheusText(
      "moleserve_generation_tokens_total 200\n"
      "moleserve_expert_cache_bytes_to_device_total 1000\n"
      "moleserve_expert_cache_lookups_total{result=\"miss\",tier=\"device\"} 2\n"
      "moleserve_expert_cache_lookups_total{result=\"miss\",tier=\"host\"} 50\n"
      "moleserve_step_distinct_experts_sum 10\n"
      "moleserve_step_distinct_experts_count 5\n"
      "moleserve_steps_total 5\n");
  const std::vector<MetricSample> after = *ParsePrometheusText(
      "moleserve_generation_tokens_total 1200\n"
      "moleserve_expert_cache_bytes_to_device_total 51000\n"
      "moleserve_expert_cache_lookups_total{result=\"miss\",tier=\"device\"} 12\n"
      "moleserve_expert_cache_lookups_total{result=\"miss\",tier=\"host\"} 90\n"
      "moleserve_expert_cache_prefetched_total 3\n"
      "moleserve_step_distinct_experts_sum 90\n"
      "moleserve_step_distinct_experts_count 25\n"
      "moleserve_steps_total 25\n"
      "moleserve_requests_rejected_total{code=\"resource_exhausted\"} 6\n"
      "moleserve_requests_rejected_total{code=\"not_found\"} 1\n");
  const ServerMetricsDelta d = DiffServerMetrics(before, after);
  EXPECT_EQ(d.deltas.at("moleserve_generation_tokens_total"), 1000);
  EXPECT_EQ(d.deltas.at("moleserve_expert_cache_lookups_total{tier=\"device\",result=\"miss\"}"),
            10);
  EXPECT_EQ(d.deltas.at("moleserve_expert_cache_prefetched_total"), 3);  // absent before: 0
  EXPECT_EQ(d.deltas.at("moleserve_requests_rejected_total"), 7);
  EXPECT_EQ(d.deltas.at("moleserve_requests_preempted_total"), 0);
  EXPECT_THAT(d.missing, ElementsAre("moleserve_requests_preempted_total"));
  EXPECT_DOUBLE_EQ(*d.expert_bytes_per_token, 50.0);         // 50000 bytes / 1000 tokens
  EXPECT_DOUBLE_EQ(*d.swaps_per_1k_tokens, 13.0);            // (10 misses + 3 prefetched) per 1000
  EXPECT_DOUBLE_EQ(*d.mean_distinct_experts_per_step, 4.0);  // 80 / 20
  EXPECT_EQ(d.preemptions, 0);

  // Nothing generated: the per-token ratios are undefined, not infinite.
  const ServerMetricsDelta idle = DiffServerMetrics(after, after);
  EXPECT_FALSE(idle.expert_bytes_per_token.has_value());
  EXPECT_FALSE(idle.swaps_per_1k_tokens.has_value());
  const nlohmann::json j = ServerMetricsDeltaToJson(idle);
  EXPECT_TRUE(j["derived"]["expert_bytes_per_generated_token"].is_null());
  EXPECT_EQ(j["missing"].size(), 1u);
}

}  // namespace
}  // namespace moleserve::bench
