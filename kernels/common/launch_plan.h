#pragma once

// Launch configurations of the CUDA kernels whose shapes vary with the model and the batch
// (segmented GEMM, paged attention, routing), as plain host functions: the launchers in
// kernels/cuda use them, and tests/kernels/launch_plan_test.cc checks them on any machine (every
// rank row / column / head covered exactly once, grid and shared-memory limits respected, every
// supported model's sizes accepted, bad shapes refused). No CUDA headers.
//
// A plan with ok == false carries the reason; the launcher then returns cudaErrorInvalidValue.

#include <cstddef>
#include <cstdint>

#include "kernels/common/params.h"

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
// Expand, owned by output rows: one thread per output column, kExpandCols columns per block,
// grid (num_tokens, ceil(out / kExpandCols)); a thread sums its row's pairs in order and adds the
// sum to y once, so no atomics.
inline constexpr int32_t kExpandCols = 256;
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

inline LaunchPlan PlanSgmvExpandRows(int64_t num_tokens, int32_t v_stride, int64_t out) {
  if (num_tokens < 0 || v_stride < 0 || out < 0) return Refuse("negative size");
  if (v_stride > kMaxSgmvRank) return Refuse("rank (v_stride) above kMaxSgmvRank");
  if (num_tokens > kMaxGridX) return Refuse("more rows than the grid holds");
  const int64_t col_blocks = (out + kExpandCols - 1) / kExpandCols;
  if (col_blocks > kMaxGridY) return Refuse("output width above 65535 * kExpandCols");
  LaunchPlan plan;
  plan.ok = true;
  plan.grid.x = static_cast<uint32_t>(num_tokens);
  plan.grid.y = static_cast<uint32_t>(col_blocks);
  plan.block = kExpandCols;
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
