// Launch configurations of the CUDA kernels (kernels/common/launch_plan.h), checked on any
// machine: for the sizes of every supported model family and LoRA ranks 8..128, the plans are
// accepted, stay within the grid and shared-memory limits of sm_80 / sm_90, and the thread ->
// work mapping the kernels use covers every rank row, column and head element exactly once.

#include "kernels/common/launch_plan.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace moleserve::kernels {
namespace {

struct ModelShape {
  const char* name;
  int64_t hidden, intermediate;
  int32_t heads, kv_heads, head_dim;
};

// Llama 2 / 3 / 3.2, Mistral, Qwen2 (HF config.json values) and the two built-in demo models.
const ModelShape kModels[] = {
    {"llama-2-7b", 4096, 11008, 32, 32, 128}, {"llama-2-13b", 5120, 13824, 40, 40, 128},
    {"llama-2-70b", 8192, 28672, 64, 8, 128}, {"llama-3-8b", 4096, 14336, 32, 8, 128},
    {"llama-3.2-1b", 2048, 8192, 32, 8, 64},  {"llama-3.2-3b", 3072, 8192, 24, 8, 128},
    {"mistral-7b", 4096, 14336, 32, 8, 128},  {"qwen2-0.5b", 896, 4864, 14, 2, 64},
    {"qwen2-1.5b", 1536, 8960, 12, 2, 128},   {"qwen2-7b", 3584, 18944, 28, 4, 128},
    {"qwen2-72b", 8192, 29568, 64, 8, 128},   {"demo", 256, 688, 8, 4, 32},
    {"demo-large", 1024, 2816, 16, 8, 64},
};

// Every input and output width a LoRA module of the model can have.
std::vector<int64_t> ModuleWidths(const ModelShape& m) {
  return {m.hidden, m.intermediate, int64_t{m.heads} * m.head_dim,
          int64_t{m.kv_heads} * m.head_dim};
}

// How many times the shrink's warps touch each rank row of a segment of rank `rank`.
std::vector<int> ShrinkRowCoverage(const LaunchPlan& plan, int32_t rank, int32_t v_stride) {
  std::vector<int> hits(v_stride, 0);
  for (uint32_t y = 0; y < plan.grid.y; ++y) {
    for (int32_t w = 0; w < kShrinkWarps; ++w) {
      const int32_t i = static_cast<int32_t>(y) * kShrinkWarps + w;
      if (i >= rank || i >= v_stride) continue;  // the kernel's exit condition
      ++hits[i];
    }
  }
  return hits;
}

// How many times the shrink's lanes load each element of an `in`-wide row.
std::vector<int> ShrinkColumnCoverage(int64_t in, int32_t vec) {
  std::vector<int> hits(in, 0);
  for (int32_t lane = 0; lane < 32; ++lane) {
    for (int64_t k = int64_t{lane} * vec; k < in; k += 32 * vec) {
      for (int32_t e = 0; e < vec; ++e) ++hits.at(k + e);
    }
  }
  return hits;
}

TEST(LaunchPlanTest, SgmvShrinkCoversEveryRankRowAndColumnOnce) {
  alignas(16) static const uint16_t aligned_row[16] = {};
  for (const ModelShape& m : kModels) {
    for (int64_t in : ModuleWidths(m)) {
      for (int32_t rank : {8, 16, 32, 64, 128}) {
        for (size_t elem : {size_t{2}, size_t{4}}) {
          SCOPED_TRACE(::testing::Message()
                       << m.name << " in=" << in << " rank=" << rank << " elem=" << elem);
          const LaunchPlan plan = PlanSgmvShrink(64, rank, in, elem, aligned_row);
          ASSERT_TRUE(plan.ok) << plan.error;
          EXPECT_EQ(plan.grid.x, 64u);
          EXPECT_LE(plan.grid.y, kMaxGridY);
          EXPECT_EQ(plan.block, 32u * kShrinkWarps);
          EXPECT_EQ(plan.shared_bytes, 0u);
          // Every width the models use is a multiple of 8: 16-byte loads.
          EXPECT_EQ(plan.vec, static_cast<int32_t>(16 / elem));
          for (int32_t seg_rank : {rank, rank / 2, 1}) {
            for (int h : ShrinkRowCoverage(plan, seg_rank, rank)) EXPECT_LE(h, 1);
            const std::vector<int> rows = ShrinkRowCoverage(plan, seg_rank, rank);
            for (int32_t i = 0; i < seg_rank; ++i) ASSERT_EQ(rows[i], 1) << "row " << i;
          }
          for (int h : ShrinkColumnCoverage(in, plan.vec)) ASSERT_EQ(h, 1);
        }
      }
    }
  }
}

TEST(LaunchPlanTest, SgmvShrinkFallsBackToScalarLoadsForOddWidthsAndMisalignment) {
  alignas(16) static const float row[8] = {};
  EXPECT_EQ(PlanSgmvShrink(1, 16, 4100, 2, row).vec, 1);  // 4100 % 8 != 0 for bf16
  EXPECT_EQ(PlanSgmvShrink(1, 16, 4100, 4, row).vec, 4);  // but a multiple of 4 for fp32
  EXPECT_EQ(PlanSgmvShrink(1, 16, 4096, 4, row + 1).vec, 1);
  for (int64_t in : {1, 7, 33, 1001, 4099}) {
    const LaunchPlan plan = PlanSgmvShrink(3, 8, in, 2, row);
    ASSERT_TRUE(plan.ok);
    EXPECT_EQ(plan.vec, 1);
    for (int h : ShrinkColumnCoverage(in, plan.vec)) ASSERT_EQ(h, 1) << "in=" << in;
  }
}

TEST(LaunchPlanTest, SgmvExpandRowsCoversEveryRowAndColumnOnce) {
  for (const ModelShape& m : kModels) {
    for (int64_t out : ModuleWidths(m)) {
      for (int32_t rank : {8, 16, 32, 64, 128}) {
        SCOPED_TRACE(::testing::Message() << m.name << " out=" << out << " rank=" << rank);
        const LaunchPlan plan = PlanSgmvExpandRows(7, rank, out);
        ASSERT_TRUE(plan.ok) << plan.error;
        EXPECT_EQ(plan.grid.x, 7u);
        EXPECT_LE(plan.grid.y, kMaxGridY);
        EXPECT_EQ(plan.shared_bytes, 0u);
        std::vector<int> hits(out, 0);
        for (uint32_t y = 0; y < plan.grid.y; ++y) {
          for (uint32_t t = 0; t < plan.block; ++t) {
            const int64_t j = int64_t{y} * kExpandCols + t;
            if (j < out) ++hits[j];
          }
        }
        for (int h : hits) ASSERT_EQ(h, 1);
      }
    }
  }
}

TEST(LaunchPlanTest, SgmvRefusesShapesItCannotRun) {
  EXPECT_FALSE(PlanSgmvShrink(1, kMaxSgmvRank + 1, 4096, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvShrink(-1, 16, 4096, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvShrink(1, 16, int64_t{1} << 32, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(1, kMaxSgmvRank + 1, 4096).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(1, 16, int64_t{kMaxGridY} * kExpandCols + 1).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(int64_t{kMaxGridX} + 1, 16, 4096).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(-1, 16, 4096).ok);
  EXPECT_TRUE(PlanSgmvExpandRows(1, kMaxSgmvRank, int64_t{kMaxGridY} * kExpandCols).ok);
  // Ranks up to kMaxSgmvRank: far past the 8..128 LoRAs use.
  EXPECT_GE(kMaxSgmvRank, 1024);
  // Empty calls are valid plans with nothing to launch.
  EXPECT_TRUE(PlanSgmvShrink(0, 0, 0, 2, nullptr).ok);
  EXPECT_EQ(PlanSgmvExpandRows(5, 16, 0).grid.y, 0u);
  EXPECT_EQ(PlanSgmvExpandRows(0, 16, 4096).grid.x, 0u);
}

TEST(LaunchPlanTest, PagedAttentionAcceptsEveryModelAndCoversTheHead) {
  for (const ModelShape& m : kModels) {
    SCOPED_TRACE(m.name);
    const LaunchPlan plan = PlanPagedAttention(300, m.heads, m.kv_heads, m.head_dim, 16);
    ASSERT_TRUE(plan.ok) << plan.error;
    EXPECT_EQ(plan.grid.x, 300u);
    EXPECT_EQ(plan.grid.y, static_cast<uint32_t>(m.heads));
    EXPECT_EQ(plan.block, 32u * kAttentionWarps);
    // Lane l owns elements l + 32 e, e < kMaxHeadDim / 32, of the head.
    std::vector<int> hits(m.head_dim, 0);
    for (int lane = 0; lane < 32; ++lane) {
      for (int e = 0; e < kMaxHeadDim / 32; ++e) {
        if (lane + 32 * e < m.head_dim) ++hits[lane + 32 * e];
      }
    }
    for (int h : hits) ASSERT_EQ(h, 1);
  }
  for (int32_t d : {1, 2, 80, 96, 160, 256}) EXPECT_TRUE(PlanPagedAttention(1, 8, 2, d, 16).ok);
}

TEST(LaunchPlanTest, PagedAttentionRefusesShapesItCannotRun) {
  EXPECT_FALSE(PlanPagedAttention(1, 32, 5, 128, 16).ok);  // 32 query heads over 5 KV heads
  EXPECT_FALSE(PlanPagedAttention(1, 32, 8, 257, 16).ok);
  EXPECT_FALSE(PlanPagedAttention(1, 32, 8, 0, 16).ok);
  EXPECT_FALSE(PlanPagedAttention(1, 0, 8, 128, 16).ok);
  EXPECT_FALSE(PlanPagedAttention(1, 32, 8, 128, 0).ok);
  EXPECT_FALSE(PlanPagedAttention(-1, 32, 8, 128, 16).ok);
  EXPECT_FALSE(PlanPagedAttention(int64_t{1} << 31, 32, 8, 128, 16).ok);
}

TEST(LaunchPlanTest, RouteCoversEveryTokenOnce) {
  for (int64_t tokens : {0, 1, 63, 64, 65, 1000, 8192}) {
    const LaunchPlan plan = PlanRoute(tokens, 8, 2);
    ASSERT_TRUE(plan.ok);
    EXPECT_GE(int64_t{plan.grid.x} * plan.block, tokens);
    EXPECT_LT(int64_t{plan.grid.x} * plan.block, tokens + plan.block);
  }
  EXPECT_TRUE(PlanRoute(5, kMaxRouteWidth, kMaxRouteWidth).ok);
  EXPECT_FALSE(PlanRoute(5, kMaxRouteWidth + 1, 2).ok);
  EXPECT_FALSE(PlanRoute(5, 8, 9).ok);
  EXPECT_FALSE(PlanRoute(5, 8, 0).ok);
}

}  // namespace
}  // namespace moleserve::kernels
