#pragma once

// The bf16 segmented shrink on tensor cores (launch_plan.h PlanSgmvShrinkTiles): the same
// product as SgmvShrinkKernel, v[p, i] = sum_k x[x_row[p], k] * A_s[i, k], as 16 x 16 x 16 WMMA
// tiles: 16 pairs of a segment by 16 rank rows, over `in` in steps of kShrinkTileK. The rows are
// gathered (x_row, the expert cache's row table), so each warp stages its tiles in shared memory
// with 16-byte loads before the tensor cores read them.
//
// Sums run in a fixed order: within a block, warp w takes the k steps w, w + kShrinkTcWarps, ...
// and the warps' accumulators are added in warp order; with a split over `in` (grid.z), each
// split writes its sums to the scratch and SgmvShrinkReduceKernel adds the splits in split order.
// The same inputs therefore give the same bits on every run.

#include <mma.h>

#include "kernels/common/launch_plan.h"
#include "kernels/cuda/dispatch.cuh"

namespace moleserve::kernels::cuda {

struct SgmvShrinkTileArgs {
  const __nv_bfloat16* x;
  float* out;  // v (one split) or the scratch [splits, max_pairs, v_stride]
  const int32_t* x_row;
  const int32_t* seg_start;
  const int32_t* seg_rank;
  const int64_t* seg_row_offset;
  const void* const* a_rows;
  int64_t in;
  int32_t v_stride;
  int64_t split_stride;  // floats between splits' partial sums in `out` (0: one split)
  int32_t max_pairs;     // with splits: pairs past it have no room in the scratch and are skipped
};

// Block (segment s, rank tile, split z).
__global__ void __launch_bounds__(32 * kShrinkTcWarps) SgmvShrinkTileKernel(SgmvShrinkTileArgs a) {
  using namespace nvcuda;
  constexpr int kTile = 16, kK = kShrinkTileK;
  // Per warp: its 16 x kK tiles of X (pairs) and A (rank rows), row-major; then the block's
  // per-warp accumulators for the fixed-order sum.
  __shared__ __align__(128) __nv_bfloat16 s_x[kShrinkTcWarps][kTile * kK];
  __shared__ __align__(128) __nv_bfloat16 s_a[kShrinkTcWarps][kTile * kK];
  __shared__ __align__(128) float s_c[kShrinkTcWarps][kTile * kTile];
  const int32_t s = blockIdx.x;
  const int32_t rank = min(a.seg_rank[s], a.v_stride);
  const int32_t i0 = blockIdx.y * kTile;
  if (i0 >= rank) return;  // the whole block: uniform
  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t k_begin = 0, k_end = a.in;
  ShrinkSplitRange(a.in, gridDim.z, blockIdx.z, &k_begin, &k_end);
  float* out = a.out + blockIdx.z * a.split_stride;
  const void* const* rows = a.a_rows + a.seg_row_offset[s];
  const int32_t begin = a.seg_start[s], end = a.seg_start[s + 1];

  for (int32_t p0 = begin; p0 < end; p0 += kTile) {
    const int32_t n = min(kTile, end - p0);
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int64_t k0 = k_begin + int64_t{warp} * kK; k0 < k_end;
         k0 += int64_t{kShrinkTcWarps} * kK) {
      // 2 x 16 rows x kK / 8 vectors: vector id u = lane + 32 q -> row u / (kK / 8), columns
      // (u % (kK / 8)) * 8 .. + 8. Rows past the pairs / the rank and columns past k_end are 0.
#pragma unroll
      for (int q = 0; q < kTile * kK / 8 / 32; ++q) {
        const int32_t u = lane + 32 * q, r = u / (kK / 8);
        const int64_t k = k0 + (u % (kK / 8)) * 8;
        uint4 xv = make_uint4(0, 0, 0, 0), av = make_uint4(0, 0, 0, 0);
        if (k < k_end) {
          if (r < n) {
            xv = *reinterpret_cast<const uint4*>(a.x + int64_t{a.x_row[p0 + r]} * a.in + k);
          }
          if (i0 + r < rank) {
            av = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(rows[i0 + r]) +
                                                 k);
          }
        }
        *reinterpret_cast<uint4*>(&s_x[warp][r * kK + (u % (kK / 8)) * 8]) = xv;
        *reinterpret_cast<uint4*>(&s_a[warp][r * kK + (u % (kK / 8)) * 8]) = av;
      }
      __syncwarp();
#pragma unroll
      for (int kk = 0; kk < kK; kk += kTile) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, __nv_bfloat16, wmma::row_major> fx;
        // B = A^T: element (k, i) at s_a[i * kK + k], i.e. column-major with leading dim kK.
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, __nv_bfloat16, wmma::col_major> fa;
        wmma::load_matrix_sync(fx, &s_x[warp][kk], kK);
        wmma::load_matrix_sync(fa, &s_a[warp][kk], kK);
        wmma::mma_sync(acc, fx, fa, acc);
      }
      __syncwarp();  // the tiles are rewritten by the next step
    }
    wmma::store_matrix_sync(&s_c[warp][0], acc, kTile, wmma::mem_row_major);
    __syncthreads();
    for (int32_t e = threadIdx.x; e < kTile * kTile; e += blockDim.x) {
      const int32_t r = e / kTile, c = e % kTile;
      if (r >= n || i0 + c >= rank || (a.split_stride > 0 && p0 + r >= a.max_pairs)) continue;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kShrinkTcWarps; ++w) sum += s_c[w][e];
      out[int64_t{p0 + r} * a.v_stride + i0 + c] = sum;
    }
    __syncthreads();  // s_c is rewritten by the next pair tile
  }
}

// Block (segment s, rank tile): v[p, i] = sum over splits z in order of scratch[z, p, i], for the
// segment's pairs and the tile's rank rows below the segment's rank.
__global__ void SgmvShrinkReduceKernel(const float* __restrict__ scratch, float* __restrict__ v,
                                       const int32_t* __restrict__ seg_start,
                                       const int32_t* __restrict__ seg_rank, int32_t v_stride,
                                       int32_t splits, int64_t split_stride, int32_t max_pairs) {
  const int32_t s = blockIdx.x;
  const int32_t rank = min(seg_rank[s], v_stride);
  const int32_t i0 = blockIdx.y * 16;
  const int32_t begin = seg_start[s], end = min(seg_start[s + 1], max_pairs);
  for (int64_t e = threadIdx.x; e < int64_t{end - begin} * 16; e += blockDim.x) {
    const int64_t p = begin + e / 16;
    const int32_t i = i0 + static_cast<int32_t>(e % 16);
    if (i >= rank) continue;
    float sum = 0.0f;
    for (int32_t z = 0; z < splits; ++z) sum += scratch[z * split_stride + p * v_stride + i];
    v[p * v_stride + i] = sum;
  }
}

}  // namespace moleserve::kernels::cuda
