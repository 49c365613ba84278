#pragma once

// Segmented LoRA GEMMs over expert-sorted (row, expert) pairs: the shrink gathers its x rows, the
// expand and the gather-add are owned by output rows (no atomics). Experts are read through the
// row tables of the paged expert cache. Launch shapes and their rationale:
// kernels/common/launch_plan.h.

#include "kernels/common/launch_plan.h"
#include "kernels/cuda/dispatch.cuh"

namespace moleserve::kernels::cuda {

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// v[p, i] = sum_k x[x_row[p], k] * A_s[i, k]: warp w of block (s, y) owns rank row
// i = y * kShrinkWarps + w of segment s and walks the segment's pairs kShrinkPairs at a time.
template <typename T, int kVec>
__global__ void SgmvShrinkKernel(const T* __restrict__ x, float* __restrict__ v,
                                 const int32_t* __restrict__ x_row,
                                 const int32_t* __restrict__ seg_start,
                                 const int32_t* __restrict__ seg_rank,
                                 const int64_t* __restrict__ seg_row_offset,
                                 const void* const* __restrict__ a_rows, int64_t in,
                                 int32_t v_stride) {
  const int32_t s = blockIdx.x;
  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t i = blockIdx.y * kShrinkWarps + warp;
  if (i >= seg_rank[s] || i >= v_stride) return;  // a rank above v_stride writes nothing
  const T* a = static_cast<const T*>(a_rows[seg_row_offset[s] + i]);
  const int32_t begin = seg_start[s], end = seg_start[s + 1];
  for (int32_t p0 = begin; p0 < end; p0 += kShrinkPairs) {
    const int32_t n = min(kShrinkPairs, end - p0);
    const T* xr[kShrinkPairs];
#pragma unroll
    for (int q = 0; q < kShrinkPairs; ++q) {
      xr[q] = x + static_cast<int64_t>(x_row[p0 + (q < n ? q : 0)]) * in;
    }
    float acc[kShrinkPairs] = {};
    for (int64_t k = int64_t{lane} * kVec; k < in; k += 32 * kVec) {
      float av[kVec];
      LoadVec<T, kVec>(a + k, av);
#pragma unroll
      for (int q = 0; q < kShrinkPairs; ++q) {
        if (q < n) {
          float xv[kVec];
          LoadVec<T, kVec>(xr[q] + k, xv);
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[q] += av[e] * xv[e];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kShrinkPairs; ++q) {
      const float sum = WarpSum(acc[q]);
      if (lane == 0 && q < n) v[static_cast<int64_t>(p0 + q) * v_stride + i] = sum;
    }
  }
}

// y[y_row[t], j] += sum over t's pairs (token_pair order) of w * v . Bt[:, j]: thread x of block
// (t, column block) owns columns j = (block * blockDim + x) * kVec .. + kVec (kVec 1: one
// column; otherwise one 16-byte vector of B rows and of y), so no atomics; each element's fp32
// sum runs in the CPU twin's order (the multiply-adds may fuse on the device) whatever kVec is,
// and is added to y once.
template <typename T, int kVec>
__global__ void SgmvExpandRowsKernel(SgmvExpandRowsParams p) {
  const int64_t t = blockIdx.x;
  const int64_t j = (int64_t{blockIdx.y} * blockDim.x + threadIdx.x) * kVec;
  if (j >= p.out) return;
  if (p.active != nullptr && p.active[t] == 0) return;
  const int32_t count = p.count[t];
  if (count <= 0) return;
  float acc[kVec] = {};
  for (int32_t q = 0; q < count; ++q) {
    const int32_t pair = p.token_pair[t * p.pair_stride + q];
    int32_t lo = 0, hi = p.num_segments;  // the segment s with seg_start[s] <= pair < [s + 1]
    while (hi - lo > 1) {
      const int32_t mid = (lo + hi) / 2;
      if (p.seg_start[mid] <= pair) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    while (lo + 1 < p.num_segments && p.seg_start[lo + 1] <= pair) ++lo;  // empty segments
    const int32_t rank = min(p.seg_rank[lo], p.v_stride);
    const float w = p.weight[pair];
    const void* const* rows = p.b_rows + p.seg_row_offset[lo];
    for (int32_t i = 0; i < rank; ++i) {
      const float coef = w * p.v[static_cast<int64_t>(pair) * p.v_stride + i];
      float b[kVec];
      LoadVec<T, kVec>(static_cast<const T*>(rows[i]) + j, b);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] += coef * b[e];
    }
  }
  const int64_t row = p.y_row != nullptr ? p.y_row[t] : t;
  T* y = static_cast<T*>(p.y) + row * (p.y_stride > 0 ? p.y_stride : p.out) + j;
  if constexpr (kVec == 1) {
    *y = FromFloat<T>(ToFloat(*y) + acc[0]);
  } else {
    uint4 raw = *reinterpret_cast<const uint4*>(y);
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = FromFloat<T>(ToFloat(v[e]) + acc[e]);
    *reinterpret_cast<uint4*>(y) = raw;
  }
}

// y[y_row[r], c] += sum over r's sources (in order) of w * x[src, c]: thread c of block
// (r, column block) owns the element, so no atomics; added to y once.
template <typename T>
__global__ void GatherAddKernel(GatherAddParams p) {
  const int64_t r = blockIdx.x;
  const int64_t c = int64_t{blockIdx.y} * blockDim.x + threadIdx.x;
  if (c >= p.cols) return;
  const int32_t count = p.count[r];
  if (count <= 0) return;
  const T* x = static_cast<const T*>(p.x);
  float acc = 0.0f;
  for (int32_t q = 0; q < count; ++q) {
    const int64_t i = p.src[r * p.src_stride + q];
    const float w = p.weight == nullptr ? 1.0f : p.weight[i];
    acc += w * ToFloat(x[i * p.cols + c]);
  }
  T* y = static_cast<T*>(p.y) + static_cast<int64_t>(p.y_row[r]) * p.cols + c;
  *y = FromFloat<T>(ToFloat(*y) + acc);
}

}  // namespace moleserve::kernels::cuda
