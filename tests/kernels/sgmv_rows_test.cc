// SgmvExpandRows (the row-owned, atomic-free expand of routed groups) on the CPU: segments built
// from real routing decisions (Route + BuildSegments with token_pair, under a token mask), against
// a naive double-precision loop over each token's decisions; with a y_row permutation each row
// lands where y_row says with the same bits. Inactive tokens' rows stay untouched (bit-exact) and
// count as neither routed nor undefined; a pair index outside the segments, or an output row
// named twice, is refused before anything is written.
// Tolerance: max abs error <= 1e-5 * max(1, max |reference|).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/cpu/ops.h"
#include "tests/kernels/random_inputs.h"

namespace moleserve::kernels::cpu {
namespace {

using test_util::Random;

TEST(SgmvExpandRowsTest, MatchesNaiveUnderAMaskAndFollowsYRow) {
  constexpr int32_t kTokens = 37, kExperts = 6, kRank = 5, kOut = 300, kK = 3;
  ThreadPool pool(2);
  const std::vector<float> logits = Random(kTokens * kExperts, 1, 2.0f);
  std::vector<int32_t> active(kTokens);
  for (int32_t t = 0; t < kTokens; ++t) active[t] = t % 3 == 1 ? 0 : 1;
  std::vector<int32_t> experts(kTokens * kExperts), count(kTokens, -1);
  std::vector<float> weights(kTokens * kExperts);
  RouteParams route{.logits = logits.data(),
                    .experts = experts.data(),
                    .weights = weights.data(),
                    .count = count.data(),
                    .active = active.data(),
                    .num_tokens = kTokens,
                    .num_experts = kExperts,
                    .k = kK};
  ASSERT_EQ(Route(route, &pool), KernelStatus::kOk);
  std::vector<int32_t> rows(kTokens), pair_row(kTokens * kExperts), seg_start(kExperts + 1),
      seg_rank(kExperts), token_pair(kTokens * kExperts, -1), undefined(1, 0);
  std::vector<int64_t> seg_off(kExperts);
  std::vector<float> scale(kExperts), pair_w(kTokens * kExperts);
  for (int32_t t = 0; t < kTokens; ++t) rows[t] = t;
  for (int32_t e = 0; e < kExperts; ++e) scale[e] = 0.5f + 0.25f * e;
  ASSERT_EQ(BuildSegments({.experts = experts.data(),
                           .weights = weights.data(),
                           .count = count.data(),
                           .rows = rows.data(),
                           .scale = scale.data(),
                           .active = active.data(),
                           .pair_row = pair_row.data(),
                           .pair_weight = pair_w.data(),
                           .seg_start = seg_start.data(),
                           .seg_rank = seg_rank.data(),
                           .seg_row_offset = seg_off.data(),
                           .token_pair = token_pair.data(),
                           .undefined = undefined.data(),
                           .num_tokens = kTokens,
                           .num_experts = kExperts,
                           .rank = kRank},
                          &pool),
            KernelStatus::kOk);
  EXPECT_EQ(undefined[0], 0);  // masked tokens are not undefined
  const int32_t pairs = seg_start[kExperts];
  int32_t active_tokens = 0;
  for (int32_t t = 0; t < kTokens; ++t) active_tokens += active[t];
  ASSERT_EQ(pairs, active_tokens * kK);
  const std::vector<float> v = Random(int64_t{pairs} * kRank, 2, 1.0f);
  const std::vector<float> b_store = Random(int64_t{kExperts} * kRank * kOut, 3, 0.3f);
  std::vector<const void*> b_rows(kExperts * kRank);
  for (int32_t i = 0; i < kExperts * kRank; ++i) b_rows[i] = b_store.data() + int64_t{i} * kOut;
  const std::vector<float> y0 = Random(int64_t{kTokens} * kOut, 4, 1.0f);

  // Naive: per active token, its decisions in order.
  std::vector<double> want(y0.begin(), y0.end());
  for (int32_t t = 0; t < kTokens; ++t) {
    if (!active[t]) continue;
    for (int32_t q = 0; q < count[t]; ++q) {
      const int32_t e = experts[t * kExperts + q];
      const double w = double{weights[t * kExperts + q]} * scale[e];
      const int32_t p = token_pair[t * kExperts + q];
      ASSERT_GE(p, seg_start[e]);
      ASSERT_LT(p, seg_start[e + 1]);
      for (int32_t i = 0; i < kRank; ++i) {
        for (int32_t j = 0; j < kOut; ++j) {
          want[int64_t{t} * kOut + j] +=
              w * v[int64_t{p} * kRank + i] * b_store[(int64_t{e} * kRank + i) * kOut + j];
        }
      }
    }
  }
  std::vector<float> rows_y = y0;
  const SgmvExpandRowsParams params{.v = v.data(),
                                    .y = rows_y.data(),
                                    .token_pair = token_pair.data(),
                                    .count = count.data(),
                                    .active = active.data(),
                                    .weight = pair_w.data(),
                                    .seg_start = seg_start.data(),
                                    .seg_rank = seg_rank.data(),
                                    .seg_row_offset = seg_off.data(),
                                    .b_rows = b_rows.data(),
                                    .num_tokens = kTokens,
                                    .pair_stride = kExperts,
                                    .num_segments = kExperts,
                                    .out = kOut,
                                    .v_stride = kRank};
  ASSERT_EQ(SgmvExpandRows(params, &pool), KernelStatus::kOk);
  double max_ref = 1.0;
  for (double x : want) max_ref = std::max(max_ref, std::fabs(x));
  for (int64_t i = 0; i < int64_t{kTokens} * kOut; ++i) {
    ASSERT_NEAR(rows_y[i], want[i], 1e-5 * max_ref) << i;
    if (!active[i / kOut]) {
      ASSERT_EQ(rows_y[i], y0[i]) << "masked row " << i / kOut;
    }
  }
  // Twice from the same inputs: the same bits.
  std::vector<float> again = y0;
  SgmvExpandRowsParams twice = params;
  twice.y = again.data();
  ASSERT_EQ(SgmvExpandRows(twice, &pool), KernelStatus::kOk);
  EXPECT_EQ(again, rows_y);
  // Row t written to y row kTokens - 1 - t: the same bits, reversed.
  std::vector<int32_t> reversed(kTokens);
  std::vector<float> rev_y(y0.size());
  for (int32_t t = 0; t < kTokens; ++t) {
    reversed[t] = kTokens - 1 - t;
    std::copy(y0.begin() + int64_t{t} * kOut, y0.begin() + int64_t{t + 1} * kOut,
              rev_y.begin() + int64_t{reversed[t]} * kOut);
  }
  SgmvExpandRowsParams moved = params;
  moved.y = rev_y.data();
  moved.y_row = reversed.data();
  ASSERT_EQ(SgmvExpandRows(moved, &pool), KernelStatus::kOk);
  for (int32_t t = 0; t < kTokens; ++t) {
    ASSERT_TRUE(std::equal(rows_y.begin() + int64_t{t} * kOut,
                           rows_y.begin() + int64_t{t + 1} * kOut,
                           rev_y.begin() + int64_t{reversed[t]} * kOut))
        << "row " << t;
  }
  // Into columns [7, 7 + kOut) of rows kOut + 9 wide (a module of a fused projection): the same
  // bits there, the other columns untouched (the GEMM path when the rows are consecutive and the
  // direct path otherwise both see the stride).
  for (const int32_t* y_row : std::vector<const int32_t*>{nullptr, reversed.data()}) {
    constexpr int64_t kWide = kOut + 9, kFirst = 7;
    const std::vector<float> wide0 = Random(int64_t{kTokens} * kWide, 5, 1.0f);
    std::vector<float> wide = wide0;
    for (int32_t t = 0; t < kTokens; ++t) {
      const int64_t r = y_row == nullptr ? t : y_row[t];
      std::copy(y0.begin() + int64_t{t} * kOut, y0.begin() + int64_t{t + 1} * kOut,
                wide.begin() + r * kWide + kFirst);
    }
    const std::vector<float> before = wide;
    SgmvExpandRowsParams strided = params;
    strided.y = wide.data() + kFirst;
    strided.y_row = y_row;
    strided.y_stride = kWide;
    ASSERT_EQ(SgmvExpandRows(strided, &pool), KernelStatus::kOk);
    for (int32_t t = 0; t < kTokens; ++t) {
      const int64_t r = y_row == nullptr ? t : y_row[t];
      for (int64_t c = 0; c < kWide; ++c) {
        const bool mine = c >= kFirst && c < kFirst + kOut;
        ASSERT_EQ(wide[r * kWide + c],
                  mine ? rows_y[int64_t{t} * kOut + c - kFirst] : before[r * kWide + c])
            << "token " << t << " column " << c;
      }
    }
    strided.y_stride = kOut - 1;
    EXPECT_EQ(SgmvExpandRows(strided, &pool), KernelStatus::kInvalidShape);
  }
  // An output row named twice: refused, nothing written.
  std::vector<int32_t> twice_named = reversed;
  twice_named[1] = twice_named[0];
  std::vector<float> still = y0;
  SgmvExpandRowsParams dup = params;
  dup.y = still.data();
  dup.y_row = twice_named.data();
  EXPECT_EQ(SgmvExpandRows(dup, &pool), KernelStatus::kInvalidArgument);
  EXPECT_EQ(still, y0);
  // A pair outside the segments: refused, nothing written.
  std::vector<int32_t> bad_pairs = token_pair;
  bad_pairs[0] = pairs;
  std::vector<float> untouched = y0;
  SgmvExpandRowsParams bad = params;
  bad.y = untouched.data();
  bad.token_pair = bad_pairs.data();
  EXPECT_EQ(SgmvExpandRows(bad, &pool), KernelStatus::kInvalidArgument);
  EXPECT_EQ(untouched, y0);
}

}  // namespace
}  // namespace moleserve::kernels::cpu
