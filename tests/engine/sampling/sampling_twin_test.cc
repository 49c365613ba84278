// The device sampler's CPU twin (kernels::cpu::Sample, the per-element math of
// kernels/common/sampling_math.h that the CUDA kernel shares) against engine/sampling's
// TokenSampler, the host sampler. Each sequence has two samplers with the same seed: one samples
// on the host, the other makes the twin's rows (TokenSampler::NextRow) and observes the twin's
// token, so both consume the same random stream. Greedy and seeded tokens must be identical, and
// logprobs agree to 1e-5 (both compute log-softmax in double from the same fp32 logits).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <vector>

#include "engine/sampling/sampler.h"
#include "kernels/cpu/ops.h"

namespace moleserve::engine {
namespace {

constexpr int32_t kTop = kernels::kMaxSampleTopLogprobs;

// Logits on a coarse grid (many ties) with a few spikes.
std::vector<float> RowLogits(std::mt19937& rng, int32_t vocab) {
  std::normal_distribution<float> normal(0.0f, 2.5f);
  std::uniform_int_distribution<int> pick(0, 19);
  std::vector<float> v(vocab);
  for (int32_t i = 0; i < vocab; ++i) {
    v[i] = std::round(normal(rng) * 2.0f) / 2.0f;
    if (pick(rng) == 0) v[i] += 6.0f;
  }
  return v;
}

SamplingParams RandomParams(std::mt19937& rng, int32_t vocab) {
  auto one_of = [&](std::initializer_list<float> xs) {
    std::vector<float> v(xs);
    return v[std::uniform_int_distribution<size_t>(0, v.size() - 1)(rng)];
  };
  SamplingParams p;
  p.temperature = one_of({0.0f, 0.0f, 0.3f, 1.0f, 1.7f});
  p.top_k = static_cast<int32_t>(one_of({0, 0, 1, 5, 40, 100000}));
  p.top_p = one_of({1.0f, 1.0f, 0.9f, 0.5f, 0.05f});
  p.min_p = one_of({0.0f, 0.0f, 0.05f, 0.5f});
  p.repetition_penalty = one_of({1.0f, 1.0f, 1.3f, 0.7f});
  p.frequency_penalty = one_of({0.0f, 0.0f, 0.6f, -0.4f});
  p.presence_penalty = one_of({0.0f, 0.0f, 0.9f});
  if (rng() % 3 == 0) {  // logit bias: distinct ids, a ban, a boost, a nudge
    std::vector<int32_t> ids(vocab);
    for (int32_t i = 0; i < vocab; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), rng);
    const std::vector<float> values = {-100.0f, 100.0f, 2.5f, -0.75f};
    for (size_t i = 0; i < std::min<size_t>(ids.size(), 1 + rng() % 4); ++i) {
      p.logit_bias.emplace_back(ids[i], values[(i + rng()) % values.size()]);
    }
  }
  return p;
}

TEST(SamplingTwinTest, TwinPicksWhatTheHostSamplerPicks) {
  std::mt19937 rng(17);
  int64_t rows_checked = 0, sampled_rows = 0, penalised_rows = 0, biased_rows = 0, scored_rows = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const int32_t vocab = std::vector<int32_t>{1, 2, 9, 300, 2000}[trial % 5];
    const int32_t num_seqs = 1 + trial % 6;
    struct Seq {
      TokenSampler host, twin;
      SamplingParams params;
      int32_t top;
    };
    std::vector<Seq> seqs;
    for (int32_t s = 0; s < num_seqs; ++s) {
      const SamplingParams params = RandomParams(rng, vocab);
      std::vector<int32_t> prompt(1 + rng() % 12);
      for (int32_t& id : prompt) id = static_cast<int32_t>(rng() % vocab);
      const int32_t top = std::vector<int32_t>{0, 0, 1, 5, 20}[rng() % 5];
      const uint64_t seed = rng();
      seqs.push_back({TokenSampler(params, seed, prompt, top),
                      TokenSampler(params, seed, prompt, top), params, top});
    }
    for (int step = 0; step < 6; ++step) {
      std::vector<float> logits;
      std::vector<kernels::SampleRowParams> rows;
      std::vector<int32_t> ids, counts, bias_ids;
      std::vector<float> bias_values;
      // A scored row (a prompt position's logprob, forced_id) ahead of each sequence's sampled
      // one on some steps: it must keep its token and leave the sequence's draws alone.
      std::vector<int32_t> seq_row;
      for (Seq& s : seqs) {
        if (rng() % 3 == 0) {
          const std::vector<float> row = RowLogits(rng, vocab);
          logits.insert(logits.end(), row.begin(), row.end());
          rows.push_back(
              {.num_top_logprobs = s.top, .forced_id = static_cast<int32_t>(rng() % vocab)});
        }
        const std::vector<float> row = RowLogits(rng, vocab);
        logits.insert(logits.end(), row.begin(), row.end());
        seq_row.push_back(static_cast<int32_t>(rows.size()));
        rows.push_back(s.twin.NextRow(&ids, &counts, &bias_ids, &bias_values));
      }
      const auto num_rows = static_cast<int32_t>(rows.size());
      std::vector<float> work(logits.size());
      std::vector<kernels::SampledRow> out(num_rows);
      std::vector<int32_t> top_ids(num_rows * kTop, -1);
      std::vector<float> top_lp(num_rows * kTop);
      kernels::cpu::ThreadPool pool(2);
      ASSERT_EQ(kernels::cpu::Sample({.logits = logits.data(),
                                      .work = work.data(),
                                      .row_params = rows.data(),
                                      .penalty_ids = ids.data(),
                                      .penalty_counts = counts.data(),
                                      .bias_ids = bias_ids.data(),
                                      .bias_values = bias_values.data(),
                                      .out = out.data(),
                                      .top_ids = top_ids.data(),
                                      .top_logprobs = top_lp.data(),
                                      .rows = num_rows,
                                      .vocab = vocab},
                                     &pool),
                kernels::KernelStatus::kOk);
      for (int32_t r = 0; r < num_rows; ++r) {
        if (rows[r].forced_id < 0) continue;
        const auto logits_r = absl::MakeConstSpan(logits.data() + int64_t{r} * vocab, vocab);
        ASSERT_EQ(out[r].id, rows[r].forced_id);
        EXPECT_NEAR(out[r].logprob, LogSoftmaxAt(logits_r, rows[r].forced_id), 1e-5);
        const auto top = TopLogprobs(logits_r, rows[r].num_top_logprobs);
        ASSERT_EQ(out[r].num_top, static_cast<int32_t>(top.size()));
        for (int32_t j = 0; j < out[r].num_top; ++j) {
          EXPECT_EQ(top_ids[r * kTop + j], top[j].first);
        }
        ++scored_rows;
      }
      for (int32_t q = 0; q < num_seqs; ++q) {
        Seq& s = seqs[q];
        const int32_t r = seq_row[q];
        const SampledToken want =
            s.host.Sample(absl::MakeConstSpan(logits.data() + int64_t{r} * vocab, vocab));
        const kernels::SampledRow& got = out[r];
        ASSERT_EQ(got.finite, 1);
        ASSERT_EQ(got.id, want.id)
            << "trial " << trial << " step " << step << " row " << r << " temperature "
            << s.params.temperature << " top_k " << s.params.top_k << " top_p " << s.params.top_p;
        EXPECT_NEAR(got.logprob, want.logprob, 1e-5);
        ASSERT_EQ(got.num_top, static_cast<int32_t>(want.top.size()));
        for (int32_t j = 0; j < got.num_top; ++j) {
          EXPECT_EQ(top_ids[r * kTop + j], want.top[j].first);
          EXPECT_NEAR(top_lp[r * kTop + j], want.top[j].second, 1e-5);
        }
        s.twin.Observe(got.id);
        ++rows_checked;
        sampled_rows += s.params.temperature > 0 ? 1 : 0;
        penalised_rows += rows[r].penalty_end > rows[r].penalty_begin ? 1 : 0;
        biased_rows += rows[r].bias_end > rows[r].bias_begin ? 1 : 0;
      }
    }
  }
  // The random parameters covered what they are meant to.
  EXPECT_GT(sampled_rows, rows_checked / 3);
  EXPECT_GT(penalised_rows, rows_checked / 4);
  EXPECT_GT(biased_rows, rows_checked / 5);
  EXPECT_GT(scored_rows, rows_checked / 5);
}

// logit_bias as OpenAI defines it: added to the logits before sampling; -100 bans a token, 100
// forces it; the reported logprob stays that of the raw logits.
TEST(SamplingTwinTest, LogitBiasBansAndForcesTokens) {
  const std::vector<float> logits = {0.0f, 3.0f, 1.0f, 2.0f};
  SamplingParams ban{.temperature = 0.0f};
  ban.logit_bias = {{1, -100.0f}};
  TokenSampler host(ban, 1, {}, 0);
  SampledToken t = host.Sample(logits);
  EXPECT_EQ(t.id, 3);  // 1 banned: the next best
  EXPECT_NEAR(t.logprob, LogSoftmaxAt(logits, 3), 1e-6);
  SamplingParams force{.temperature = 1.0f};
  force.logit_bias = {{0, 100.0f}};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    TokenSampler s(force, seed, {}, 0);
    EXPECT_EQ(s.Sample(logits).id, 0) << "seed " << seed;
  }
  // The twin does the same with the row NextRow makes.
  std::vector<int32_t> ids, counts, bias_ids;
  std::vector<float> bias_values;
  TokenSampler twin(ban, 1, {}, 0);
  const std::vector<kernels::SampleRowParams> rows = {
      twin.NextRow(&ids, &counts, &bias_ids, &bias_values)};
  EXPECT_EQ(bias_ids, std::vector<int32_t>{1});
  std::vector<float> work(4);
  std::vector<kernels::SampledRow> out(1);
  ASSERT_EQ(kernels::cpu::Sample({.logits = logits.data(),
                                  .work = work.data(),
                                  .row_params = rows.data(),
                                  .bias_ids = bias_ids.data(),
                                  .bias_values = bias_values.data(),
                                  .out = out.data(),
                                  .rows = 1,
                                  .vocab = 4},
                                 nullptr),
            kernels::KernelStatus::kOk);
  EXPECT_EQ(out[0].id, 3);
}

TEST(SamplingTwinTest, NonFiniteRowsAreReportedAndOthersStillSampled) {
  const int32_t vocab = 5;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> logits = {0, 1,   nan, 2, 3,  //
                               0, inf, 1,   2, 3,  //
                               0, 1,   4,   4, -inf + 1.0f, 3, 1, 0, 0, 0};
  logits.resize(4 * vocab);
  logits[14] = 1.0f;  // row 2: 0 1 4 4 1 -> argmax 2 (tie with 3: the lower id)
  logits[15] = -inf;  // row 3 holds -inf: not finite either
  std::vector<kernels::SampleRowParams> rows(4);
  std::vector<kernels::SampledRow> out(4);
  std::vector<float> work(logits.size());
  ASSERT_EQ(kernels::cpu::Sample({.logits = logits.data(),
                                  .work = work.data(),
                                  .row_params = rows.data(),
                                  .out = out.data(),
                                  .rows = 4,
                                  .vocab = vocab},
                                 nullptr),
            kernels::KernelStatus::kOk);
  EXPECT_EQ(out[0].finite, 0);
  EXPECT_EQ(out[0].id, -1);
  EXPECT_EQ(out[1].finite, 0);
  EXPECT_EQ(out[2].finite, 1);
  EXPECT_EQ(out[2].id, 2);
  EXPECT_EQ(out[3].finite, 0);
}

TEST(SamplingTwinTest, RefusesRowsItCannotServe) {
  std::vector<float> logits(4, 0.0f), work(4);
  std::vector<kernels::SampledRow> out(1);
  std::vector<kernels::SampleRowParams> rows(1);
  kernels::SampleParams p{.logits = logits.data(),
                          .work = work.data(),
                          .row_params = rows.data(),
                          .out = out.data(),
                          .rows = 1,
                          .vocab = 4};
  rows[0].num_top_logprobs = 2;  // alternatives asked, no buffers given
  EXPECT_EQ(kernels::cpu::Sample(p, nullptr), kernels::KernelStatus::kInvalidArgument);
  rows[0] = {};
  rows[0].penalty_begin = 2;  // reversed range
  rows[0].penalty_end = 1;
  EXPECT_EQ(kernels::cpu::Sample(p, nullptr), kernels::KernelStatus::kInvalidArgument);
  rows[0] = {};
  rows[0].bias_end = 1;  // bias entries, no buffers given
  EXPECT_EQ(kernels::cpu::Sample(p, nullptr), kernels::KernelStatus::kInvalidArgument);
  rows[0] = {};
  rows[0].forced_id = 4;  // scored token outside the vocabulary
  EXPECT_EQ(kernels::cpu::Sample(p, nullptr), kernels::KernelStatus::kInvalidArgument);
  rows[0] = {};
  p.vocab = 0;
  EXPECT_EQ(kernels::cpu::Sample(p, nullptr), kernels::KernelStatus::kInvalidShape);
}

TEST(SamplingTwinTest, NextRowListsThePenaltyEntriesTheParametersNeed) {
  const std::vector<int32_t> prompt = {3, 3, 7};
  std::vector<int32_t> ids, counts, bias_ids;
  std::vector<float> bias_values;
  TokenSampler none({.temperature = 0.0f}, 1, prompt, 0);
  none.Observe(9);
  kernels::SampleRowParams r = none.NextRow(&ids, &counts, &bias_ids, &bias_values);
  EXPECT_EQ(r.penalty_end - r.penalty_begin, 0);  // no penalties: no entries

  TokenSampler freq({.temperature = 0.0f, .frequency_penalty = 0.5f}, 1, prompt, 0);
  freq.Observe(9);
  freq.Observe(9);
  r = freq.NextRow(&ids, &counts, &bias_ids, &bias_values);
  ASSERT_EQ(r.penalty_end - r.penalty_begin, 1);  // output ids only
  EXPECT_EQ(ids[r.penalty_begin], 9);
  EXPECT_EQ(counts[r.penalty_begin], 2);

  TokenSampler rep({.temperature = 0.0f, .repetition_penalty = 1.2f}, 1, prompt, 0);
  rep.Observe(9);
  r = rep.NextRow(&ids, &counts, &bias_ids, &bias_values);
  std::map<int32_t, int32_t> entries;
  for (int32_t e = r.penalty_begin; e < r.penalty_end; ++e) entries[ids[e]] = counts[e];
  EXPECT_EQ(entries, (std::map<int32_t, int32_t>{{3, 0}, {7, 0}, {9, 1}}));  // prompt and output
}

}  // namespace
}  // namespace moleserve::engine
