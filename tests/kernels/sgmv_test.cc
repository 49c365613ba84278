// SgmvShrink / SgmvExpandRows / GatherAdd against a naive per-pair double-precision loop written
// independently here, on seeded random inputs: mixed ranks (including 0 and a rank above the
// expand kernel's stack buffer), empty segments, tokens routed to several experts (several pairs
// adding into one y row), expert rows at scattered addresses (as a paged cache places them) and in
// the stacked layout, v_stride > rank, segments small enough for the direct kernels and large
// enough for the sgemm path, inline and on a pool. Plus argument validation.
//
// Tolerance: max abs error <= 1e-4 * max(1, max |reference|) (fp32 accumulation over at most a
// few hundred terms of O(1) values; measured errors are ~1e-6 relative). Columns of v at or past
// a segment's rank must be untouched (bit-exact).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/ops.h"
#include "tests/kernels/random_inputs.h"

namespace moleserve::kernels::cpu {
namespace {

using test_util::Random;

constexpr float kSentinel = -12345.0f;

double MaxAbs(const std::vector<double>& v) {
  double m = 1.0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

double MaxAbsDiff(const float* a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

// Every expert's rank rows live in a shared "page pool" of rows; the row tables point at them.
// Scattered: each row in its own randomly chosen slot (a paged cache). Stacked: expert e's rows
// are consecutive rows of one block (the mole/1 [E, r, width] layout).
struct RowStore {
  std::vector<float> pool;
  std::vector<const void*> table;  // row-table entries, segment by segment
  std::vector<int64_t> offset;     // [num_experts] first entry of expert e
  std::vector<const float*> row_of(int e, int rank) const {
    std::vector<const float*> rows;
    for (int i = 0; i < rank; ++i) rows.push_back(static_cast<const float*>(table[offset[e] + i]));
    return rows;
  }
};

RowStore MakeRows(const std::vector<int32_t>& ranks, int64_t width, bool scattered, uint32_t seed) {
  RowStore s;
  const int64_t total = std::accumulate(ranks.begin(), ranks.end(), int64_t{0});
  const int64_t slots = scattered ? 2 * total + 3 : total;
  s.pool = Random(slots * width, seed);
  std::vector<int64_t> slot(slots);
  std::iota(slot.begin(), slot.end(), 0);
  if (scattered) std::shuffle(slot.begin(), slot.end(), std::mt19937(seed + 1));
  int64_t next = 0;
  for (int32_t r : ranks) {
    s.offset.push_back(static_cast<int64_t>(s.table.size()));
    for (int32_t i = 0; i < r; ++i) s.table.push_back(s.pool.data() + slot[next++] * width);
  }
  return s;
}

// The row-owned expand's tables for pairs whose y rows are pair_y: the distinct rows (first-use
// order), each row's pairs (pair order) and their count.
struct RowTables {
  std::vector<int32_t> y_row, pairs, count;
  int32_t stride = 0;
};

RowTables TablesFor(const std::vector<int32_t>& pair_y) {
  RowTables t;
  std::vector<std::vector<int32_t>> lists;
  for (size_t q = 0; q < pair_y.size(); ++q) {
    auto it = std::find(t.y_row.begin(), t.y_row.end(), pair_y[q]);
    if (it == t.y_row.end()) {
      t.y_row.push_back(pair_y[q]);
      lists.emplace_back();
      it = t.y_row.end() - 1;
    }
    lists[it - t.y_row.begin()].push_back(static_cast<int32_t>(q));
  }
  for (const auto& l : lists) t.stride = std::max(t.stride, static_cast<int32_t>(l.size()));
  for (const auto& l : lists) {
    t.count.push_back(static_cast<int32_t>(l.size()));
    for (int32_t i = 0; i < t.stride; ++i)
      t.pairs.push_back(static_cast<size_t>(i) < l.size() ? l[i] : 0);
  }
  return t;
}

struct Case {
  const char* name;
  int64_t in, out;
  int32_t v_stride;
  std::vector<int32_t> ranks;  // per expert
  int num_tokens;
  int k;           // experts per token
  bool skew;       // every token also goes to expert 0 (a segment on the sgemm path)
  bool scattered;  // row placement
  int threads;     // 0: no pool
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Pairs {
  std::vector<int32_t> token, seg_start, expert_of_segment;
  std::vector<float> weight;
};

// Routes each token to k distinct experts and sorts the pairs by expert (stable by token), so
// segment s is expert s (empty when no token chose it).
Pairs Route(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int num_experts = static_cast<int>(c.ranks.size());
  std::vector<std::vector<int32_t>> by_expert(num_experts);
  for (int t = 0; t < c.num_tokens; ++t) {
    std::vector<int32_t> e(num_experts);
    std::iota(e.begin(), e.end(), 0);
    std::shuffle(e.begin(), e.end(), rng);
    if (c.skew) std::iter_swap(e.begin(), std::find(e.begin(), e.end(), 0));
    for (int j = 0; j < c.k; ++j) by_expert[e[j]].push_back(t);
  }
  Pairs p;
  p.seg_start.push_back(0);
  for (int e = 0; e < num_experts; ++e) {
    for (int32_t t : by_expert[e]) p.token.push_back(t);
    p.seg_start.push_back(static_cast<int32_t>(p.token.size()));
  }
  std::uniform_real_distribution<float> w(0.1f, 2.0f);
  for (size_t i = 0; i < p.token.size(); ++i) p.weight.push_back(w(rng));
  return p;
}

class SgmvTest : public ::testing::TestWithParam<Case> {};

TEST_P(SgmvTest, ShrinkAndExpandMatchNaive) {
  const Case& c = GetParam();
  const int num_experts = static_cast<int>(c.ranks.size());
  const Pairs pairs = Route(c, 7);
  const int64_t num_pairs = static_cast<int64_t>(pairs.token.size());
  // x has spare rows and token t reads row 2t + 1, so x_row is never the identity...
  // ...except for k = 1 on one expert, where consecutive rows exercise the in-place sgemm path.
  const bool identity_rows = num_experts == 1;
  std::vector<int32_t> x_row(num_pairs), y_row(num_pairs);
  for (int64_t q = 0; q < num_pairs; ++q) {
    x_row[q] = identity_rows ? pairs.token[q] : 2 * pairs.token[q] + 1;
    y_row[q] = identity_rows ? pairs.token[q] : 3 * pairs.token[q] + 2;
  }
  const auto x = Random((2 * c.num_tokens + 2) * c.in, 11);
  const RowStore a = MakeRows(c.ranks, c.in, c.scattered, 21);
  const RowStore b = MakeRows(c.ranks, c.out, c.scattered, 31);
  std::unique_ptr<ThreadPool> pool;
  if (c.threads > 0) pool = std::make_unique<ThreadPool>(c.threads);

  // Shrink.
  std::vector<float> v(num_pairs * c.v_stride, kSentinel);
  SgmvShrinkParams sp{.x = x.data(),
                      .v = v.data(),
                      .x_row = x_row.data(),
                      .seg_start = pairs.seg_start.data(),
                      .seg_rank = c.ranks.data(),
                      .seg_row_offset = a.offset.data(),
                      .a_rows = a.table.data(),
                      .num_segments = num_experts,
                      .in = c.in,
                      .v_stride = c.v_stride};
  ASSERT_EQ(SgmvShrink(sp, pool.get()), KernelStatus::kOk);
  std::vector<double> v_ref;
  std::vector<float> v_got;
  for (int e = 0; e < num_experts; ++e) {
    const std::vector<const float*> rows = a.row_of(e, c.ranks[e]);
    for (int32_t q = pairs.seg_start[e]; q < pairs.seg_start[e + 1]; ++q) {
      const float* xr = x.data() + int64_t{x_row[q]} * c.in;
      for (int32_t i = 0; i < c.v_stride; ++i) {
        const float got = v[int64_t{q} * c.v_stride + i];
        if (i >= c.ranks[e]) {
          ASSERT_EQ(got, kSentinel) << "pair " << q << " column " << i << " past rank";
          continue;
        }
        double acc = 0;
        for (int64_t t = 0; t < c.in; ++t) acc += double{xr[t]} * rows[i][t];
        v_ref.push_back(acc);
        v_got.push_back(got);
      }
    }
  }
  EXPECT_LE(MaxAbsDiff(v_got.data(), v_ref), 1e-4 * MaxAbs(v_ref));

  // Expand, from the kernel's own v (the reference reads the same floats).
  const int64_t y_rows = 3 * c.num_tokens + 3;
  auto y = Random(y_rows * c.out, 41);
  std::vector<double> y_ref(y.begin(), y.end());
  for (int e = 0; e < num_experts; ++e) {
    const std::vector<const float*> rows = b.row_of(e, c.ranks[e]);
    for (int32_t q = pairs.seg_start[e]; q < pairs.seg_start[e + 1]; ++q) {
      for (int64_t j = 0; j < c.out; ++j) {
        double acc = 0;
        for (int32_t i = 0; i < c.ranks[e]; ++i) {
          acc += double{v[int64_t{q} * c.v_stride + i]} * rows[i][j];
        }
        y_ref[int64_t{y_row[q]} * c.out + j] += double{pairs.weight[q]} * acc;
      }
    }
  }
  const RowTables rt = TablesFor(y_row);
  SgmvExpandRowsParams ep{.v = v.data(),
                          .y = y.data(),
                          .y_row = rt.y_row.data(),
                          .token_pair = rt.pairs.data(),
                          .count = rt.count.data(),
                          .weight = pairs.weight.data(),
                          .seg_start = pairs.seg_start.data(),
                          .seg_rank = c.ranks.data(),
                          .seg_row_offset = b.offset.data(),
                          .b_rows = b.table.data(),
                          .num_tokens = static_cast<int64_t>(rt.y_row.size()),
                          .pair_stride = rt.stride,
                          .num_segments = num_experts,
                          .out = c.out,
                          .v_stride = c.v_stride};
  ASSERT_EQ(SgmvExpandRows(ep, pool.get()), KernelStatus::kOk);
  EXPECT_LE(MaxAbsDiff(y.data(), y_ref), 1e-4 * MaxAbs(y_ref));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, SgmvTest,
    ::testing::Values(
        // Widths off the 8-lane grid, a rank-0 expert, an expert nobody picks.
        Case{"tails_rank0", 67, 45, 8, {3, 8, 0, 5, 2}, 5, 2, false, true, 0},
        Case{"decode", 256, 256, 16, {16, 16, 16, 16, 16, 16, 16, 16}, 4, 2, false, true, 2},
        // Expert 0 gets every token (40 pairs of rank 16: sgemm path, packed A/B rows, gathered x
        // and scattered y); ranks below 16 stay on the direct path.
        Case{"mixed_gemm_scattered", 300, 520, 20, {16, 4, 7, 12, 1, 20}, 40, 3, true, true, 3},
        Case{"mixed_gemm_stacked", 300, 520, 20, {16, 4, 7, 12, 1, 20}, 40, 3, true, false, 2},
        // One expert, token order: consecutive x and y rows (sgemm in place, beta = 1).
        Case{"plain_lora_gemm", 128, 200, 24, {24}, 70, 1, false, false, 2},
        Case{"plain_lora_direct", 128, 200, 24, {24}, 9, 1, false, true, 0},
        // Ranks past the expand kernel's 128-entry stack buffer.
        Case{"wide_rank", 64, 96, 200, {200, 130}, 6, 2, false, true, 2},
        Case{"many_experts", 96, 72, 8, std::vector<int32_t>(33, 8), 12, 2, false, true, 2}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

TEST(SgmvTest, ExpandSameRowTwiceInOneSegment) {
  // Three pairs of one expert, the first two writing the same y row (summed, then added once),
  // the third another row.
  const int64_t out = 40;
  const int32_t rank = 3;
  const RowStore b = MakeRows({rank}, out, true, 5);
  const std::vector<float> v = {1, 2, 3, -1, 0.5f, 2, 4, 0, 1};
  const std::vector<int32_t> y_row = {1, 1, 0}, seg_start = {0, 3}, ranks = {rank};
  const std::vector<float> w = {0.5f, 2.0f, 1.0f};
  auto y = Random(2 * out, 6);
  std::vector<double> ref(y.begin(), y.end());
  const std::vector<const float*> rows = b.row_of(0, rank);
  for (int q = 0; q < 3; ++q) {
    for (int64_t j = 0; j < out; ++j) {
      double acc = 0;
      for (int i = 0; i < rank; ++i) acc += double{v[q * rank + i]} * rows[i][j];
      ref[y_row[q] * out + j] += w[q] * acc;
    }
  }
  const RowTables rt = TablesFor(y_row);
  ASSERT_EQ(SgmvExpandRows({.v = v.data(),
                            .y = y.data(),
                            .y_row = rt.y_row.data(),
                            .token_pair = rt.pairs.data(),
                            .count = rt.count.data(),
                            .weight = w.data(),
                            .seg_start = seg_start.data(),
                            .seg_rank = ranks.data(),
                            .seg_row_offset = b.offset.data(),
                            .b_rows = b.table.data(),
                            .num_tokens = static_cast<int64_t>(rt.y_row.size()),
                            .pair_stride = rt.stride,
                            .num_segments = 1,
                            .out = out,
                            .v_stride = rank},
                           nullptr),
            KernelStatus::kOk);
  EXPECT_LE(MaxAbsDiff(y.data(), ref), 1e-5);
}

TEST(GatherAddTest, MatchesNaiveWithSharedRows) {
  ThreadPool pool(3);
  for (int64_t cols : {1, 13, 700}) {
    for (bool weighted : {false, true}) {
      const int64_t rows = 37, y_rows = 5;
      const auto x = Random(rows * cols, 1);
      auto y = Random(y_rows * cols, 2);
      std::vector<int32_t> y_row(rows);
      std::vector<float> w(rows);
      for (int64_t r = 0; r < rows; ++r) {
        y_row[r] = static_cast<int32_t>((r * 7) % y_rows);
        w[r] = 0.25f * static_cast<float>(r % 5) - 0.3f;
      }
      std::vector<double> ref(y.begin(), y.end());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          ref[y_row[r] * cols + c] += (weighted ? w[r] : 1.0) * x[r * cols + c];
        }
      }
      const RowTables rt = TablesFor(y_row);
      ASSERT_EQ(GatherAdd({.x = x.data(),
                           .y = y.data(),
                           .y_row = rt.y_row.data(),
                           .src = rt.pairs.data(),
                           .count = rt.count.data(),
                           .weight = weighted ? w.data() : nullptr,
                           .rows = static_cast<int64_t>(rt.y_row.size()),
                           .src_stride = rt.stride,
                           .x_rows = rows,
                           .cols = cols},
                          &pool),
                KernelStatus::kOk);
      EXPECT_LE(MaxAbsDiff(y.data(), ref), 1e-5 * MaxAbs(ref)) << cols << " " << weighted;
    }
  }
}

// A valid two-segment problem that the validation tests break one field at a time.
struct Valid {
  std::vector<float> x = Random(4 * 16, 3), v = std::vector<float>(3 * 4, kSentinel);
  std::vector<float> y = std::vector<float>(4 * 16, 0.0f), w = {1, 1, 1};
  std::vector<int32_t> rows = {0, 2, 3}, seg_start = {0, 1, 3}, ranks = {2, 4};
  std::vector<int64_t> offsets = {0, 2};
  std::vector<float> store = Random(6 * 16, 4);
  std::vector<const void*> table;
  Valid() {
    for (int i = 0; i < 6; ++i) table.push_back(store.data() + i * 16);
  }
  SgmvShrinkParams Shrink() {
    return {.x = x.data(),
            .v = v.data(),
            .x_row = rows.data(),
            .seg_start = seg_start.data(),
            .seg_rank = ranks.data(),
            .seg_row_offset = offsets.data(),
            .a_rows = table.data(),
            .num_segments = 2,
            .in = 16,
            .v_stride = 4};
  }
  std::vector<int32_t> row_pairs = {0, 1, 2}, row_counts = {1, 1, 1};
  SgmvExpandRowsParams Expand() {
    return {.v = v.data(),
            .y = y.data(),
            .y_row = rows.data(),
            .token_pair = row_pairs.data(),
            .count = row_counts.data(),
            .weight = w.data(),
            .seg_start = seg_start.data(),
            .seg_rank = ranks.data(),
            .seg_row_offset = offsets.data(),
            .b_rows = table.data(),
            .num_tokens = 3,
            .pair_stride = 1,
            .num_segments = 2,
            .out = 16,
            .v_stride = 4};
  }
};

TEST(SgmvValidationTest, ValidProblemPasses) {
  Valid ok;
  EXPECT_EQ(SgmvShrink(ok.Shrink(), nullptr), KernelStatus::kOk);
  EXPECT_EQ(SgmvExpandRows(ok.Expand(), nullptr), KernelStatus::kOk);
}

TEST(SgmvValidationTest, ShrinkRefusesBadArgumentsAndWritesNothing) {
  auto expect = [](KernelStatus want, auto&& edit) {
    Valid s;
    SgmvShrinkParams p = s.Shrink();
    edit(s, p);
    EXPECT_EQ(SgmvShrink(p, nullptr), want);
    for (float f : s.v) ASSERT_EQ(f, kSentinel);
  };
  using P = SgmvShrinkParams;
  expect(KernelStatus::kUnsupportedDtype, [](Valid&, P& p) { p.dtype = ScalarType::kBF16; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.in = -1; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.num_segments = -1; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.v_stride = -4; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.v_stride = 3; });  // rank 4 > 3
  expect(KernelStatus::kInvalidShape, [](Valid& s, P&) { s.ranks[0] = -1; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.x = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.v = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.x_row = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.seg_start = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.seg_rank = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.seg_row_offset = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.a_rows = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.table[3] = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.seg_start[0] = 1; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) {
    s.seg_start[1] = 3;
    s.seg_start[2] = 1;
  });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.rows[2] = -1; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.offsets[1] = -2; });
}

TEST(SgmvValidationTest, ExpandRefusesBadArgumentsAndWritesNothing) {
  auto expect = [](KernelStatus want, auto&& edit) {
    Valid s;
    SgmvExpandRowsParams p = s.Expand();
    edit(s, p);
    EXPECT_EQ(SgmvExpandRows(p, nullptr), want);
    for (float f : s.y) ASSERT_EQ(f, 0.0f);
  };
  using P = SgmvExpandRowsParams;
  expect(KernelStatus::kUnsupportedDtype, [](Valid&, P& p) { p.dtype = ScalarType::kF16; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.out = -1; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.v_stride = 2; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.v = nullptr; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.num_tokens = -1; });
  expect(KernelStatus::kInvalidShape, [](Valid&, P& p) { p.pair_stride = -1; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.token_pair = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.count = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.rows[2] = 0; });  // row twice
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.row_pairs[1] = 3; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.row_pairs[1] = -1; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.row_counts[2] = 2; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.weight = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid&, P& p) { p.b_rows = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) {
    s.seg_start[1] = 2;
    s.seg_start[2] = 1;
  });
  expect(KernelStatus::kInvalidArgument, [](Valid& s, P&) { s.rows[0] = -5; });
}

TEST(SgmvValidationTest, EmptyWorkNeedsNoBuffers) {
  EXPECT_EQ(SgmvShrink({.num_segments = 0}, nullptr), KernelStatus::kOk);
  EXPECT_EQ(SgmvExpandRows({.num_segments = 0}, nullptr), KernelStatus::kOk);
  EXPECT_EQ(SgmvExpandRows({.num_tokens = 0, .out = 8}, nullptr), KernelStatus::kOk);
  EXPECT_EQ(GatherAdd({.rows = 0, .cols = 8}, nullptr), KernelStatus::kOk);
  // Segments without pairs, or of rank 0, need no row table.
  const std::vector<int32_t> seg_start = {0, 0, 0}, ranks = {4, 0};
  const std::vector<int64_t> offsets = {0, 4};
  EXPECT_EQ(SgmvShrink({.seg_start = seg_start.data(),
                        .seg_rank = ranks.data(),
                        .seg_row_offset = offsets.data(),
                        .num_segments = 2,
                        .in = 8,
                        .v_stride = 4},
                       nullptr),
            KernelStatus::kOk);
}

TEST(GatherAddTest, RefusesBadArgumentsAndWritesNothing) {
  std::vector<float> x(3 * 4, 1.0f), y(4 * 4, 0.0f);
  std::vector<int32_t> rows = {0, 3}, src = {0, 2, 1, 0}, count = {2, 1};
  auto params = [&] {
    return GatherAddParams{.x = x.data(),
                           .y = y.data(),
                           .y_row = rows.data(),
                           .src = src.data(),
                           .count = count.data(),
                           .rows = 2,
                           .src_stride = 2,
                           .x_rows = 3,
                           .cols = 4};
  };
  EXPECT_EQ(GatherAdd(params(), nullptr), KernelStatus::kOk);
  EXPECT_EQ(y[0], 2.0f);      // row 0: sources 0 and 2
  EXPECT_EQ(y[3 * 4], 1.0f);  // row 3: source 1
  EXPECT_EQ(y[1 * 4], 0.0f);
  std::fill(y.begin(), y.end(), 0.0f);
  auto expect = [&](KernelStatus want, auto&& edit) {
    GatherAddParams p = params();
    std::vector<int32_t> keep_rows = rows, keep_src = src, keep_count = count;
    edit(p);
    EXPECT_EQ(GatherAdd(p, nullptr), want);
    for (float f : y) ASSERT_EQ(f, 0.0f);
    rows = keep_rows, src = keep_src, count = keep_count;
  };
  using P = GatherAddParams;
  expect(KernelStatus::kUnsupportedDtype, [](P& p) { p.dtype = ScalarType::kBF16; });
  expect(KernelStatus::kInvalidShape, [](P& p) { p.rows = -1; });
  expect(KernelStatus::kInvalidShape, [](P& p) { p.cols = -1; });
  expect(KernelStatus::kInvalidShape, [](P& p) { p.src_stride = -1; });
  expect(KernelStatus::kInvalidArgument, [](P& p) { p.x = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](P& p) { p.y_row = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](P& p) { p.src = nullptr; });
  expect(KernelStatus::kInvalidArgument, [](P& p) { p.count = nullptr; });
  expect(KernelStatus::kInvalidArgument, [&](P&) { rows[1] = -1; });
  expect(KernelStatus::kInvalidArgument, [&](P&) { rows[1] = 0; });   // a row twice
  expect(KernelStatus::kInvalidArgument, [&](P&) { src[1] = 3; });    // past x_rows
  expect(KernelStatus::kInvalidArgument, [&](P&) { count[1] = 3; });  // past the stride
}

}  // namespace
}  // namespace moleserve::kernels::cpu
