#pragma once

// Launch configurations of the CUDA kernels whose shapes vary with the model and the batch
// (segmented GEMM, paged attention, routing), as plain host functions: the launchers in
// kernels/cuda use them, and tests/kernels/launch_plan_test.cc checks them on any machine (every
// rank row / column / head covered exactly once, grid and shared-memory limits respected, every
// supported model's sizes accepted, bad shapes refused). No CUDA headers.
//
// A plan with ok == false carries the reason; the launcher then returns cudaErrorInvalidValue.

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels/common/params.h"

#if defined(__CUDACC__)
#define MOLESERVE_PLAN_HD __host__ __device__
#else
#define MOLESERVE_PLAN_HD
#endif

namespace moleserve::kernels {

struct LaunchDims {
  uint32_t x = 1, y = 1, z = 1;
};

struct LaunchPlan {
  bool ok = false;
  const char* error = "";
  LaunchDims grid;
  uint32_t block = 0;       // threads per block (1-D)
  size_t shared_bytes = 0;  // dynamic shared memory
  int32_t vec = 1;          // elements per vector load (1 = scalar path)
};

// Hardware limits every target GPU (sm_80, sm_90) shares.
inline constexpr uint32_t kMaxGridX = 0x7fffffffu;
inline constexpr uint32_t kMaxGridY = 65535u;
inline constexpr size_t kMaxDefaultSharedBytes = 48 * 1024;  // without an opt-in attribute

// Segmented GEMM shrink: one warp per rank row, kShrinkWarps rows per block, one block column per
// segment: grid (num_segments, ceil(v_stride / kShrinkWarps)); warps past a segment's rank exit.
// Each warp walks the segment's pairs kShrinkPairs at a time, so an expert row is read once per
// kShrinkPairs pairs. Vector loads of 16 bytes when `in` is a multiple of the vector width and x
// is 16-byte aligned (rows of the expert cache are then aligned too: pages are `in`-wide rows
// packed into 256-byte-aligned chunks).
inline constexpr int32_t kShrinkWarps = 8;
inline constexpr int32_t kShrinkPairs = 4;
// Expand, owned by output rows: one thread per output column (or per 16-byte vector of
// columns: 8 bf16 / 4 fp32, when out, the row stride and y allow 16-byte loads and stores),
// kExpandCols threads per block on the scalar path and kExpandVecThreads on the vector path, grid
// (num_tokens, column blocks); a thread sums its row's pairs in order and adds the sum to y once,
// so no atomics. Both paths sum each element in the same order, so they give the same bits.
inline constexpr int32_t kExpandCols = 256;
inline constexpr int32_t kExpandVecThreads = 64;
// Widest rank a segment may have (v_stride bound): far past the 8..128 LoRAs use.
inline constexpr int32_t kMaxSgmvRank = 1536;

inline LaunchPlan Refuse(const char* why) {
  LaunchPlan plan;
  plan.error = why;
  return plan;
}

inline int32_t VectorWidth(int64_t width, size_t elem_bytes, const void* base) {
  const int32_t vec = static_cast<int32_t>(16 / elem_bytes);
  const bool aligned = reinterpret_cast<uintptr_t>(base) % 16 == 0;
  return width % vec == 0 && aligned ? vec : 1;
}

inline LaunchPlan PlanSgmvShrink(int32_t num_segments, int32_t v_stride, int64_t in,
                                 size_t elem_bytes, const void* x) {
  if (num_segments < 0 || v_stride < 0 || in < 0) return Refuse("negative size");
  if (v_stride > kMaxSgmvRank) return Refuse("rank (v_stride) above kMaxSgmvRank");
  if (in > 0x7fffffff) return Refuse("input width above 2^31");
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_segments);
  plan.grid.y = static_cast<uint32_t>((v_stride + kShrinkWarps - 1) / kShrinkWarps);
  plan.block = 32 * kShrinkWarps;
  plan.vec = VectorWidth(in, elem_bytes, x);
  return plan;
}

// The bf16 shrink on tensor cores (kernels/cuda/sgmv/sgmv_tensor_core.cuh): one block of
// kShrinkTcWarps warps per (segment, 16 rank rows, split of `in`), walking the segment's pairs 16
// at a time; warp w takes the kShrinkTileK-wide k steps w, w + kShrinkTcWarps, ... of its split.
// Needs bf16, `in` a multiple of 8 and x 16-byte aligned (16-byte loads); otherwise ok == false
// and the launcher runs the warp-per-rank-row kernel (PlanSgmvShrink).
//
// Split-K: when segments x rank tiles < 2 x num_sms and max_pairs is known, `in` is cut into
// `splits` = min(kMaxShrinkSplits, ceil(2 num_sms / blocks), in / (kShrinkTcWarps kShrinkTileK))
// ranges (ShrinkSplitRange), capped so that splits x max_pairs x v_stride floats fit the scratch.
inline constexpr int32_t kShrinkTcWarps = 4;
inline constexpr int32_t kShrinkTileK = 64;
inline constexpr int32_t kMaxShrinkSplits = 16;

inline LaunchPlan PlanSgmvShrinkTiles(int32_t num_segments, int32_t v_stride, int64_t in,
                                      size_t elem_bytes, const void* x, int32_t num_sms,
                                      int32_t max_pairs, int64_t workspace_floats) {
  const LaunchPlan base = PlanSgmvShrink(num_segments, v_stride, in, elem_bytes, x);
  if (!base.ok) return base;
  if (elem_bytes != 2) return Refuse("tensor-core shrink: bf16 only");
  if (base.vec != 8) return Refuse("tensor-core shrink: in % 8 != 0 or x not 16-byte aligned");
  const int64_t blocks = int64_t{num_segments} * ((v_stride + 15) / 16);
  int32_t splits = 1;
  if (num_sms > 0 && max_pairs > 0 && blocks > 0 && blocks < 2 * int64_t{num_sms}) {
    const int64_t by_sms = (2 * int64_t{num_sms} + blocks - 1) / blocks;
    const int64_t by_width = in / (int64_t{kShrinkTcWarps} * kShrinkTileK);
    const int64_t by_scratch = workspace_floats / (int64_t{max_pairs} * std::max(v_stride, 1));
    splits =
        static_cast<int32_t>(std::min({int64_t{kMaxShrinkSplits}, by_sms, by_width, by_scratch}));
    if (splits < 2) splits = 1;
  }
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_segments);
  plan.grid.y = static_cast<uint32_t>((v_stride + 15) / 16);
  plan.grid.z = static_cast<uint32_t>(splits);
  plan.block = 32 * kShrinkTcWarps;
  plan.vec = 8;
  return plan;
}

// Columns [*begin, *end) of split z of `in`: ranges of ceil(in / splits) rounded up to
// kShrinkTileK, in order (the last ones may be short or empty).
MOLESERVE_PLAN_HD inline void ShrinkSplitRange(int64_t in, int32_t splits, int32_t z,
                                               int64_t* begin, int64_t* end) {
  int64_t chunk = (in + splits - 1) / splits;
  chunk = (chunk + kShrinkTileK - 1) / kShrinkTileK * kShrinkTileK;
  const int64_t b = z * chunk;
  *begin = b < in ? b : in;
  *end = *begin + chunk < in ? *begin + chunk : in;
}

inline LaunchPlan PlanSgmvExpandRows(int64_t num_tokens, int32_t v_stride, int64_t out,
                                     size_t elem_bytes = 4, const void* y = nullptr,
                                     int64_t y_stride = 0) {
  if (num_tokens < 0 || v_stride < 0 || out < 0) return Refuse("negative size");
  if (v_stride > kMaxSgmvRank) return Refuse("rank (v_stride) above kMaxSgmvRank");
  if (num_tokens > kMaxGridX) return Refuse("more rows than the grid holds");
  int32_t vec = VectorWidth(out, elem_bytes, y);
  if (y_stride % vec != 0) vec = 1;
  const int32_t threads = vec > 1 ? kExpandVecThreads : kExpandCols;
  const int64_t cols_per_block = int64_t{threads} * vec;
  const int64_t col_blocks = (out + cols_per_block - 1) / cols_per_block;
  if (col_blocks > kMaxGridY) return Refuse("output width above 65535 column blocks");
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_tokens);
  plan.grid.y = static_cast<uint32_t>(col_blocks);
  plan.block = static_cast<uint32_t>(threads);
  plan.vec = vec;
  return plan;
}

// Paged attention: one block of kAttentionWarps warps per (token, query head); warps take keys
// round-robin with an online softmax, lanes own head_dim elements lane, lane + 32, ...; the warps'
// partial results are merged in shared memory. head_dim up to kMaxHeadDim.
inline constexpr int32_t kAttentionWarps = 4;
inline constexpr int32_t kMaxHeadDim = 256;

inline LaunchPlan PlanPagedAttention(int64_t num_tokens, int32_t num_q_heads, int32_t num_kv_heads,
                                     int32_t head_dim, int32_t block_size) {
  if (num_tokens < 0) return Refuse("negative token count");
  if (num_tokens > kMaxGridX) return Refuse("more than 2^31 - 1 tokens");
  if (num_q_heads < 1 || num_kv_heads < 1 || num_q_heads % num_kv_heads != 0) {
    return Refuse("query heads must be a positive multiple of the KV heads");
  }
  if (num_q_heads > static_cast<int32_t>(kMaxGridY)) return Refuse("more than 65535 query heads");
  if (head_dim < 1 || head_dim > kMaxHeadDim) return Refuse("head_dim outside 1..kMaxHeadDim");
  if (block_size < 1) return Refuse("KV block size must be >= 1");
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_tokens);
  plan.grid.y = static_cast<uint32_t>(num_q_heads);
  plan.block = 32 * kAttentionWarps;
  return plan;
}

// Grouped (GQA) attention, in the manner of FlashInfer's decode kernels: one block of kGqaWarps
// warps per (token, KV head, split) covers the whole group of query heads that share the KV head,
// so each K/V row is read once per group rather than once per query head. A key row is read with
// 16-byte loads by lanes_per_key = head_dim / vec lanes (vec = 16 / element size), so a warp
// takes 32 / lanes_per_key keys at a time; the warps' and the lane groups' online-softmax states
// are merged in shared memory in a fixed order. Applies when lanes_per_key is a power of two up
// to 32 and the group has at most kMaxGqaGroup heads (every supported model); otherwise
// ok == false and the launcher runs the one-block-per-query-head kernel above.
//
// Split-KV: when tokens x KV heads < 2 x num_sms, the keys of each token are cut into
// `splits` = min(kMaxAttentionSplits, ceil(2 num_sms / (tokens x KV heads))) contiguous ranges
// (AttentionSplitRange), one block each (grid.z), capped by the scratch: splits x tokens x
// query heads x (head_dim + 2) floats. The split count depends on the shapes only.
inline constexpr int32_t kGqaWarps = 4;
inline constexpr int32_t kMaxGqaGroup = 8;
inline constexpr int32_t kMaxAttentionSplits = 16;

// Floats of split-KV scratch `splits` partial states take: per (split, token, query head) the
// unnormalised output (head_dim) then the running max and sum.
inline int64_t AttentionSplitFloats(int32_t splits, int64_t num_tokens, int32_t num_q_heads,
                                    int32_t head_dim) {
  return int64_t{splits} * num_tokens * num_q_heads * (int64_t{head_dim} + 2);
}

inline LaunchPlan PlanGroupedAttention(int64_t num_tokens, int32_t num_q_heads,
                                       int32_t num_kv_heads, int32_t head_dim, size_t elem_bytes,
                                       int32_t num_sms, int64_t workspace_floats) {
  const LaunchPlan base =
      PlanPagedAttention(num_tokens, num_q_heads, num_kv_heads, head_dim, /*block_size=*/1);
  if (!base.ok) return base;
  const int32_t vec = static_cast<int32_t>(16 / elem_bytes);
  if (head_dim % vec != 0) return Refuse("head_dim not a multiple of the vector width");
  const int32_t lanes = head_dim / vec;
  if (lanes > 32 || (lanes & (lanes - 1)) != 0) {
    return Refuse("head_dim / vector width not a power of two up to 32");
  }
  if (num_q_heads / num_kv_heads > kMaxGqaGroup) return Refuse("query group above kMaxGqaGroup");
  if (num_kv_heads > static_cast<int32_t>(kMaxGridY)) return Refuse("more than 65535 KV heads");
  int32_t splits = 1;
  const int64_t cells = num_tokens * num_kv_heads;
  if (num_sms > 0 && cells > 0 && cells < 2 * int64_t{num_sms}) {
    splits = static_cast<int32_t>(
        std::min<int64_t>(kMaxAttentionSplits, (2 * int64_t{num_sms} + cells - 1) / cells));
    const int64_t per_split = AttentionSplitFloats(1, num_tokens, num_q_heads, head_dim);
    splits = static_cast<int32_t>(std::min<int64_t>(splits, workspace_floats / per_split));
    if (splits < 2) splits = 1;
  }
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_tokens);
  plan.grid.y = static_cast<uint32_t>(num_kv_heads);
  plan.grid.z = static_cast<uint32_t>(splits);
  plan.block = 32 * kGqaWarps;
  plan.vec = vec;
  return plan;
}

// Keys [*begin, *end) of split z of the keys [first, last) of one token: contiguous ranges of
// ceil(n / splits) keys in order (the last ones may be short or empty).
MOLESERVE_PLAN_HD inline void AttentionSplitRange(int32_t first, int32_t last, int32_t splits,
                                                  int32_t z, int32_t* begin, int32_t* end) {
  const int32_t chunk = (last - first + splits - 1) / splits;
  const int32_t b = first + z * chunk;
  *begin = b < last ? b : last;
  *end = *begin + chunk < last ? *begin + chunk : last;
}

// Routing: one thread per token (per-token work is O(E^2) on E <= kMaxRouteWidth values).
inline constexpr int32_t kRouteThreads = 64;

inline LaunchPlan PlanRoute(int64_t num_tokens, int32_t width, int32_t k) {
  if (num_tokens < 0) return Refuse("negative token count");
  if (width < 1 || width > kMaxRouteWidth) return Refuse("router width outside 1..kMaxRouteWidth");
  if (k < 1 || k > width) return Refuse("k outside 1..width");
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>((num_tokens + kRouteThreads - 1) / kRouteThreads);
  plan.block = kRouteThreads;
  return plan;
}

}  // namespace moleserve::kernels
