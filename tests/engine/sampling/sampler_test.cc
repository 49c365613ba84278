// TokenSampler: greedy, seeded determinism, each truncation rule, penalties and logprobs, with
// expectations computed by hand or from closed-form distributions.

#include "engine/sampling/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

namespace moleserve::engine {
namespace {

std::vector<float> LogitsFromProbs(const std::vector<double>& p) {
  std::vector<float> l;
  for (double x : p) l.push_back(static_cast<float>(std::log(x)));
  return l;
}

TEST(SamplerTest, GreedyPicksArgmaxTiesToLowerId) {
  TokenSampler s({.temperature = 0.0f}, 1, {}, 0);
  EXPECT_EQ(s.Sample(std::vector<float>{0.1f, 3.0f, -1.0f, 3.0f}).id, 1);
  EXPECT_EQ(s.Sample(std::vector<float>{5.0f, 5.0f}).id, 0);
}

TEST(SamplerTest, TemperatureBelowThresholdIsGreedyAndNeverOverflows) {
  const std::vector<float> logits = {1.0f, 30.0f, -20.0f, 29.9f};
  for (float t : {1e-30f, 1e-45f, 9e-6f}) {
    TokenSampler s({.temperature = t, .top_p = 0.9f}, 1, {}, 0);
    for (int i = 0; i < 20; ++i) ASSERT_EQ(s.Sample(logits).id, 1) << t;
  }
  // Just above the threshold with a large gap: still finite, still the argmax.
  TokenSampler s({.temperature = 2e-5f}, 1, {}, 0);
  EXPECT_EQ(s.Sample(logits).id, 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferent) {
  std::vector<float> logits(100);
  for (int i = 0; i < 100; ++i) logits[i] = std::sin(i * 0.7f);
  auto run = [&](uint64_t seed) {
    TokenSampler s({.temperature = 1.0f}, seed, {}, 0);
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.Sample(logits).id);
    return out;
  };
  EXPECT_EQ(run(42), run(42));
  EXPECT_NE(run(42), run(43));
}

// Frequencies of 40000 draws against the exact distribution: each within 5 standard errors.
void ExpectDistribution(const SamplingParams& params, const std::vector<float>& logits,
                        const std::vector<double>& expected) {
  TokenSampler s(params, 7, {}, 0);
  const int n = 40000;
  std::vector<int> counts(logits.size());
  for (int i = 0; i < n; ++i) counts[s.Sample(logits).id]++;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double p = expected[i];
    const double se = std::sqrt(std::max(p * (1 - p), 1e-9) / n);
    EXPECT_NEAR(counts[i] / double{n}, p, 5 * se + 1e-9) << "token " << i;
  }
}

TEST(SamplerTest, TemperatureOneSamplesTheSoftmax) {
  ExpectDistribution({.temperature = 1.0f}, LogitsFromProbs({0.5, 0.3, 0.15, 0.05}),
                     {0.5, 0.3, 0.15, 0.05});
}

TEST(SamplerTest, TemperatureSharpens) {
  // p^(1/T) renormalised, T = 0.5: (0.25, 0.09, 0.0225, 0.0025) / 0.365
  const double z = 0.25 + 0.09 + 0.0225 + 0.0025;
  ExpectDistribution({.temperature = 0.5f}, LogitsFromProbs({0.5, 0.3, 0.15, 0.05}),
                     {0.25 / z, 0.09 / z, 0.0225 / z, 0.0025 / z});
}

TEST(SamplerTest, TopKKeepsTheKLargest) {
  ExpectDistribution({.top_k = 2}, LogitsFromProbs({0.3, 0.5, 0.15, 0.05}),
                     {0.3 / 0.8, 0.5 / 0.8, 0, 0});
}

TEST(SamplerTest, TopPKeepsTheSmallestSetReachingP) {
  // Sorted 0.5, 0.3, 0.15, 0.05; cumulative 0.5, 0.8 >= 0.7 -> keep {0, 1}.
  ExpectDistribution({.top_p = 0.7f}, LogitsFromProbs({0.5, 0.3, 0.15, 0.05}),
                     {0.5 / 0.8, 0.3 / 0.8, 0, 0});
}

TEST(SamplerTest, MinPDropsTokensBelowFractionOfMax) {
  // min_p 0.5 of p_max 0.5 -> keep p >= 0.25: {0, 1}.
  ExpectDistribution({.min_p = 0.5f}, LogitsFromProbs({0.5, 0.3, 0.15, 0.05}),
                     {0.5 / 0.8, 0.3 / 0.8, 0, 0});
}

TEST(SamplerTest, TopKOneEqualsGreedy) {
  std::vector<float> logits = {0.2f, 0.9f, 0.1f, 0.89f};
  TokenSampler s({.temperature = 1.3f, .top_k = 1}, 3, {}, 0);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(s.Sample(logits).id, 1);
}

TEST(SamplerTest, RepetitionPenaltyAppliesToPromptAndOutput) {
  // Token 0 is in the prompt: logit 2.0 / 4 = 0.5 < token 1's 1.0. Token 2 is negative and gets
  // multiplied once generated.
  TokenSampler s({.temperature = 0.0f, .repetition_penalty = 4.0f}, 1, {0}, 0);
  EXPECT_EQ(s.Sample(std::vector<float>{2.0f, 1.0f, -0.1f}).id, 1);
  // Now 1 is penalised too: 0.5 vs 0.25 vs -0.1 -> 0.
  EXPECT_EQ(s.Sample(std::vector<float>{2.0f, 1.0f, -0.1f}).id, 0);
}

TEST(SamplerTest, FrequencyAndPresencePenaltiesCountOutputOnly) {
  TokenSampler s({.temperature = 0.0f, .frequency_penalty = 0.3f, .presence_penalty = 0.2f}, 1,
                 {1, 1, 1}, 0);  // prompt tokens are not penalised
  const std::vector<float> logits = {1.0f, 1.2f};
  EXPECT_EQ(s.Sample(logits).id, 1);  // 1.2 vs 1.0
  EXPECT_EQ(s.Sample(logits).id, 0);  // 1.2 - 0.3 - 0.2 = 0.7 < 1.0
  EXPECT_EQ(s.Sample(logits).id, 1);  // 0: 1.0 - 0.5 = 0.5 < 0.7
}

TEST(SamplerTest, LogprobsAreRawLogSoftmaxWithSortedTop) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f};
  TokenSampler s({.temperature = 0.0f, .repetition_penalty = 2.0f}, 1, {1}, 3);
  SampledToken t = s.Sample(logits);
  EXPECT_EQ(t.id, 3);  // 1 was penalised
  double z = 0;
  for (float l : logits) z += std::exp(l);
  EXPECT_NEAR(t.logprob, 3.0 - std::log(z), 1e-6);  // from the raw logits
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 1);  // tie 3.0/3.0 -> lower id first
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 2);
  EXPECT_NEAR(t.top[2].second, 2.0 - std::log(z), 1e-6);
}

TEST(SamplingParamsTest, ValidationNamesTheField) {
  EXPECT_TRUE(ValidateSamplingParams({}).ok());
  struct Case {
    SamplingParams p;
    const char* field;
  };
  for (const Case& c :
       {Case{{.temperature = -1}, "temperature"}, Case{{.top_p = 0}, "top_p"},
        Case{{.top_p = 1.5f}, "top_p"}, Case{{.top_k = -1}, "top_k"}, Case{{.min_p = 2}, "min_p"},
        Case{{.repetition_penalty = 0}, "repetition_penalty"},
        Case{{.frequency_penalty = 3}, "frequency_penalty"},
        Case{{.presence_penalty = -3}, "presence_penalty"},
        Case{{.temperature = NAN}, "temperature"}}) {
    absl::Status s = ValidateSamplingParams(c.p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_NE(s.message().find(c.field), std::string::npos) << s;
  }
  // logit_bias: ids within the vocabulary, each once; values in [-100, 100].
  for (const std::vector<std::pair<int32_t, float>>& bias :
       std::vector<std::vector<std::pair<int32_t, float>>>{
           {{260, 1.0f}}, {{-1, 1.0f}}, {{3, 1.0f}, {3, 2.0f}}, {{3, 101.0f}}, {{3, NAN}}}) {
    SamplingParams p;
    p.logit_bias = bias;
    absl::Status s = ValidateSamplingParams(p, 260);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("logit_bias"), std::string::npos) << s;
  }
  SamplingParams many;
  for (int32_t id = 0; id <= kMaxLogitBiasEntries; ++id) many.logit_bias.emplace_back(id, 1.0f);
  EXPECT_NE(ValidateSamplingParams(many, 100000).message().find("at most"), std::string::npos);
  many.logit_bias.pop_back();
  EXPECT_TRUE(ValidateSamplingParams(many, 100000).ok());
  SamplingParams fine;
  fine.logit_bias = {{0, -100.0f}, {259, 100.0f}};
  EXPECT_TRUE(ValidateSamplingParams(fine, 260).ok());
  EXPECT_FALSE(ValidateStoppingParams({.stop_token_ids = {300}}, 260).ok());
  EXPECT_FALSE(ValidateStoppingParams({.stop = {""}}, 260).ok());
  EXPECT_FALSE(ValidateStoppingParams({.stop = std::vector<std::string>(17, "x")}, 260).ok());
  EXPECT_TRUE(ValidateStoppingParams({.stop = {"ab"}, .stop_token_ids = {259}}, 260).ok());
}

}  // namespace
}  // namespace moleserve::engine
