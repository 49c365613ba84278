// Launch configurations of the CUDA kernels (kernels/common/launch_plan.h), checked on any
// machine: for the sizes of every supported model family and LoRA ranks 8..128, the plans are
// accepted, stay within the grid and shared-memory limits of sm_80 / sm_90, and the thread ->
// work mapping the kernels use covers every rank row, column and head element exactly once.

#include "kernels/common/launch_plan.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <utility>
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

// The tensor-core shrink's mapping, replayed: rank tiles of 16 over v_stride, splits of `in`,
// each warp's k steps and each lane's 16-byte vectors of a 16 x kShrinkTileK tile.
TEST(LaunchPlanTest, TensorCoreShrinkCoversEveryRankRowAndColumnOnce) {
  alignas(16) static const uint16_t kX[8] = {};
  for (const ModelShape& m : kModels) {
    for (int64_t in : ModuleWidths(m)) {
      for (int32_t rank : {1, 8, 16, 64, 256}) {
        SCOPED_TRACE(std::string(m.name) + " in " + std::to_string(in) + " rank " +
                     std::to_string(rank));
        const LaunchPlan plan = PlanSgmvShrinkTiles(1, rank, in, 2, kX, 132, 64, 1 << 22);
        ASSERT_TRUE(plan.ok) << plan.error;
        std::vector<int> rows(rank, 0);
        for (uint32_t y = 0; y < plan.grid.y; ++y) {
          for (int32_t r = 0; r < 16; ++r) {
            if (static_cast<int32_t>(y) * 16 + r < rank) ++rows[y * 16 + r];
          }
        }
        for (int h : rows) ASSERT_EQ(h, 1);
        std::vector<int> cols(in, 0);
        int64_t prev_end = 0;
        for (uint32_t z = 0; z < plan.grid.z; ++z) {
          int64_t begin = 0, end = 0;
          ShrinkSplitRange(in, static_cast<int32_t>(plan.grid.z), static_cast<int32_t>(z), &begin,
                           &end);
          ASSERT_EQ(begin, prev_end);
          ASSERT_EQ(begin % 8, 0);  // whole 16-byte vectors
          prev_end = end;
          for (int32_t warp = 0; warp < kShrinkTcWarps; ++warp) {
            for (int64_t k0 = begin + int64_t{warp} * kShrinkTileK; k0 < end;
                 k0 += int64_t{kShrinkTcWarps} * kShrinkTileK) {
              for (int32_t u = 0; u < 16 * kShrinkTileK / 8; ++u) {
                if (u / (kShrinkTileK / 8) != 0) continue;  // one row of the tile
                const int64_t k = k0 + (u % (kShrinkTileK / 8)) * 8;
                if (k < end) {
                  for (int e = 0; e < 8; ++e) ++cols.at(k + e);
                }
              }
            }
          }
        }
        ASSERT_EQ(prev_end, in);
        for (int h : cols) ASSERT_EQ(h, 1);
      }
    }
  }
}

TEST(LaunchPlanTest, TensorCoreShrinkSplitsOnlyShortCallsAndFitsItsScratch) {
  alignas(16) static const uint16_t kX[16] = {};
  // One rank-16 LoRA over 4096: 1 block -> 16 splits (by width: 4096 / 256 = 16).
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX, 132, 64, 1 << 22).grid.z, 16u);
  // 32 LoRAs x 1 tile = 32 blocks: ceil(264 / 32) = 9.
  EXPECT_EQ(PlanSgmvShrinkTiles(32, 16, 4096, 2, kX, 132, 64, 1 << 22).grid.z, 9u);
  // Enough blocks, no device count, no pair bound or no scratch: one split.
  EXPECT_EQ(PlanSgmvShrinkTiles(300, 16, 4096, 2, kX, 132, 64, 1 << 22).grid.z, 1u);
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX, 0, 64, 1 << 22).grid.z, 1u);
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX, 132, 0, 1 << 22).grid.z, 1u);
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX, 132, 64, 0).grid.z, 1u);
  // Narrow inputs split less: 896 / 256 = 3.
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 896, 2, kX, 132, 64, 1 << 22).grid.z, 3u);
  // The scratch bounds it: room for 5 x 64 pairs x 16.
  EXPECT_EQ(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX, 132, 64, 5 * 64 * 16 + 3).grid.z, 5u);
  // fp32, odd widths or a misaligned x: the warp-per-row kernel instead.
  EXPECT_FALSE(PlanSgmvShrinkTiles(1, 16, 4096, 4, kX, 132, 64, 1 << 22).ok);
  EXPECT_FALSE(PlanSgmvShrinkTiles(1, 16, 4100, 2, kX, 132, 64, 1 << 22).ok);
  EXPECT_FALSE(PlanSgmvShrinkTiles(1, 16, 4096, 2, kX + 1, 132, 64, 1 << 22).ok);
  EXPECT_TRUE(PlanSgmvShrink(1, 16, 4100, 2, kX).ok);
}

TEST(LaunchPlanTest, SgmvExpandRowsCoversEveryRowAndColumnOnce) {
  alignas(16) static const float kY[8] = {};
  for (const ModelShape& m : kModels) {
    for (int64_t out : ModuleWidths(m)) {
      for (int32_t rank : {8, 16, 32, 64, 128}) {
        for (size_t elem : {size_t{2}, size_t{4}}) {
          for (const void* y : {static_cast<const void*>(kY), static_cast<const void*>(kY + 1)}) {
            SCOPED_TRACE(::testing::Message() << m.name << " out=" << out << " rank=" << rank
                                              << " elem=" << elem << " y=" << y);
            // A fused projection's columns: y_stride the whole width (here 3 x out).
            const LaunchPlan plan = PlanSgmvExpandRows(7, rank, out, elem, y, 3 * out);
            ASSERT_TRUE(plan.ok) << plan.error;
            const bool aligned = y == static_cast<const void*>(kY);
            EXPECT_EQ(plan.vec, aligned && out % (16 / elem) == 0 ? int32_t(16 / elem) : 1);
            EXPECT_EQ(plan.grid.x, 7u);
            EXPECT_LE(plan.grid.y, kMaxGridY);
            EXPECT_EQ(plan.shared_bytes, 0u);
            // Thread t of column block b owns columns (b * block + t) * vec .. + vec.
            std::vector<int> hits(out, 0);
            for (uint32_t b = 0; b < plan.grid.y; ++b) {
              for (uint32_t t = 0; t < plan.block; ++t) {
                const int64_t j = (int64_t{b} * plan.block + t) * plan.vec;
                if (j >= out) continue;  // the kernel's exit condition
                for (int32_t e = 0; e < plan.vec; ++e) ++hits.at(j + e);
              }
            }
            for (int h : hits) ASSERT_EQ(h, 1);
          }
        }
      }
    }
  }
  // A row stride that breaks the vectors' alignment: scalar.
  alignas(16) static const uint16_t kYb[8] = {};
  EXPECT_EQ(PlanSgmvExpandRows(7, 16, 4096, 2, kYb, 4100).vec, 1);
  EXPECT_EQ(PlanSgmvExpandRows(7, 16, 4096, 2, kYb, 12288).vec, 8);
}

TEST(LaunchPlanTest, SgmvRefusesShapesItCannotRun) {
  EXPECT_FALSE(PlanSgmvShrink(1, kMaxSgmvRank + 1, 4096, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvShrink(-1, 16, 4096, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvShrink(1, 16, int64_t{1} << 32, 2, nullptr).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(1, kMaxSgmvRank + 1, 4096).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(1, 16, int64_t{kMaxGridY} * kExpandCols + 1, 4, nullptr, 1).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(int64_t{kMaxGridX} + 1, 16, 4096).ok);
  EXPECT_FALSE(PlanSgmvExpandRows(-1, 16, 4096).ok);
  EXPECT_TRUE(
      PlanSgmvExpandRows(1, kMaxSgmvRank, int64_t{kMaxGridY} * kExpandCols, 4, nullptr, 1).ok);
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

// The grouped kernel's mapping, replayed on the host: blocks (kv head, split z), warps, lane
// groups of head_dim / vec lanes and their loop over keys (GroupedAttentionKernel).
TEST(LaunchPlanTest, GroupedAttentionTakesEveryModelAndCoversHeadsAndKeysOnce) {
  for (const ModelShape& m : kModels) {
    for (size_t elem : {size_t{2}, size_t{4}}) {
      SCOPED_TRACE(std::string(m.name) + (elem == 2 ? " bf16" : " fp32"));
      const LaunchPlan plan = PlanGroupedAttention(3, m.heads, m.kv_heads, m.head_dim, elem,
                                                   /*num_sms=*/132, /*workspace_floats=*/1 << 22);
      ASSERT_TRUE(plan.ok) << plan.error;
      EXPECT_EQ(plan.block, 32u * kGqaWarps);
      EXPECT_EQ(plan.grid.y, static_cast<uint32_t>(m.kv_heads));
      const int32_t group = m.heads / m.kv_heads;
      // Query heads: block y and g < group give h = y * group + g, each once.
      std::vector<int> head_hits(m.heads, 0);
      for (uint32_t y = 0; y < plan.grid.y; ++y) {
        for (int32_t g = 0; g < group; ++g) ++head_hits[y * group + g];
      }
      for (int h : head_hits) ASSERT_EQ(h, 1);
      // Elements of a key row: lane part p holds p * vec .. + vec.
      const int32_t lanes_per_key = m.head_dim / plan.vec;
      std::vector<int> elem_hits(m.head_dim, 0);
      for (int32_t part = 0; part < lanes_per_key; ++part) {
        for (int32_t e = 0; e < plan.vec; ++e) ++elem_hits.at(part * plan.vec + e);
      }
      for (int h : elem_hits) ASSERT_EQ(h, 1);
      // The kernel's shared memory for the group size rounded up to a power of two.
      int32_t cap = 1;
      while (cap < group) cap *= 2;
      const size_t smem = sizeof(float) * cap * kGqaWarps * 32 * (plan.vec + 2);
      EXPECT_LE(smem, kMaxDefaultSharedBytes);
      // Keys: every key of [first, last) once over splits, warps, lane groups and iterations.
      const int32_t keys_per_warp = 32 / lanes_per_key, num_lg = kGqaWarps * keys_per_warp;
      for (int32_t splits : {1, 3, 9, 16}) {
        for (auto [first, last] : {std::pair{0, 1}, {0, 5}, {10, 300}, {4000, 4096}}) {
          std::vector<int> key_hits(last, 0);
          int32_t prev_end = first;
          for (int32_t z = 0; z < splits; ++z) {
            int32_t begin = 0, end = 0;
            AttentionSplitRange(first, last, splits, z, &begin, &end);
            ASSERT_EQ(begin, prev_end);  // contiguous, in order
            prev_end = end;
            for (int32_t warp = 0; warp < kGqaWarps; ++warp) {
              for (int32_t j0 = begin + warp * keys_per_warp; j0 < end; j0 += num_lg) {
                for (int32_t sub = 0; sub < keys_per_warp; ++sub) {
                  if (j0 + sub < end) ++key_hits.at(j0 + sub);
                }
              }
            }
          }
          ASSERT_EQ(prev_end, last);
          for (int32_t j = 0; j < last; ++j) ASSERT_EQ(key_hits[j], j >= first ? 1 : 0) << j;
        }
      }
    }
  }
}

TEST(LaunchPlanTest, GroupedAttentionSplitsOnlyShortBatchesAndFitsItsScratch) {
  // Llama 2 7B at batch 1 on 132 SMs: 32 blocks, so ceil(264 / 32) = 9 splits.
  LaunchPlan plan = PlanGroupedAttention(1, 32, 32, 128, 2, 132, 1 << 22);
  ASSERT_TRUE(plan.ok);
  EXPECT_EQ(plan.grid.z, 9u);
  // Llama 3 8B at batch 1: 8 KV heads -> capped at kMaxAttentionSplits.
  EXPECT_EQ(PlanGroupedAttention(1, 32, 8, 128, 2, 132, 1 << 22).grid.z,
            static_cast<uint32_t>(kMaxAttentionSplits));
  // Batch 64 x 8 KV heads = 512 blocks fill 132 SMs: no split.
  EXPECT_EQ(PlanGroupedAttention(64, 32, 8, 128, 2, 132, 1 << 22).grid.z, 1u);
  // No device count or no scratch: no split.
  EXPECT_EQ(PlanGroupedAttention(1, 32, 32, 128, 2, 0, 1 << 22).grid.z, 1u);
  EXPECT_EQ(PlanGroupedAttention(1, 32, 32, 128, 2, 132, 0).grid.z, 1u);
  // The scratch bounds the splits: room for 4 splits' states gives 4.
  const int64_t four = AttentionSplitFloats(4, 2, 32, 128);
  plan = PlanGroupedAttention(2, 32, 32, 128, 2, 132, four + 10);
  EXPECT_EQ(plan.grid.z, 4u);
  EXPECT_LE(AttentionSplitFloats(static_cast<int32_t>(plan.grid.z), 2, 32, 128), four + 10);
}

TEST(LaunchPlanTest, GroupedAttentionDeclinesShapesTheOtherKernelRuns) {
  EXPECT_FALSE(PlanGroupedAttention(1, 8, 8, 80, 2, 132, 0).ok);    // 10 lanes per key
  EXPECT_FALSE(PlanGroupedAttention(1, 8, 2, 256, 4, 132, 0).ok);   // 64 lanes per key (fp32)
  EXPECT_FALSE(PlanGroupedAttention(1, 8, 8, 4, 2, 132, 0).ok);     // under one vector
  EXPECT_FALSE(PlanGroupedAttention(1, 36, 4, 128, 2, 132, 0).ok);  // group of 9
  EXPECT_TRUE(PlanPagedAttention(1, 8, 8, 80, 16).ok);              // which runs them instead
  EXPECT_TRUE(PlanPagedAttention(1, 36, 4, 128, 16).ok);
  EXPECT_FALSE(PlanGroupedAttention(1, 32, 5, 128, 2, 132, 0).ok);  // and refuses these
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
