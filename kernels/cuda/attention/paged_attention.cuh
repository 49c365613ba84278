#pragma once

// Paged KV-cache write and causal grouped-query attention over it, for flat batches of mixed
// prefill and decode tokens (params.h PagedKvLayout). Launch shape: launch_plan.h
// PlanPagedAttention.

#include "kernels/common/launch_plan.h"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/elementwise/rope.cuh"

namespace moleserve::kernels::cuda {

// Element offset of (position, kv head 0) of sequence s in a cache tensor.
__device__ __forceinline__ int64_t KvRowOffset(const PagedKvLayout& kv, int32_t s, int32_t pos) {
  const int32_t block = kv.block_tables[kv.block_table_offsets[s] + pos / kv.block_size];
  return (static_cast<int64_t>(block) * kv.block_size + pos % kv.block_size) * kv.num_kv_heads *
         kv.head_dim;
}

// One block per token; threads copy its K and V rows (num_kv_heads * head_dim) into the cache.
// With RoPE fused in (inv_freq set), the block first rotates the token's q and k in place
// (RopeToken), then copies the rotated k.
template <typename T>
__global__ void KvWriteKernel(PagedKvLayout kv, T* __restrict__ k, const T* __restrict__ v,
                              const int32_t* __restrict__ token_seq,
                              const int32_t* __restrict__ positions, int64_t stride,
                              const float* __restrict__ inv_freq, T* __restrict__ q,
                              int32_t num_q_heads, int64_t q_stride) {
  const int64_t t = blockIdx.x;
  if (inv_freq != nullptr) {
    RopeToken(q, k, positions, inv_freq, num_q_heads, kv.num_kv_heads, kv.head_dim, q_stride,
              stride, t);
    __syncthreads();  // the copy below reads elements other threads rotated
  }
  const int64_t width = int64_t{kv.num_kv_heads} * kv.head_dim;
  const int64_t dst = KvRowOffset(kv, token_seq[t], positions[t]);
  T* kc = static_cast<T*>(kv.k_cache) + dst;
  T* vc = static_cast<T*>(kv.v_cache) + dst;
  for (int64_t e = threadIdx.x; e < width; e += blockDim.x) {
    kc[e] = k[t * stride + e];
    vc[e] = v[t * stride + e];
  }
}

// Block (t, h): query head h of token t over keys [start, positions[t]] of its sequence. Warp w
// takes keys start + w, start + w + kAttentionWarps, ... with an online softmax (running max m,
// sum l, accumulator acc); lane owns elements lane + 32 e of the head. The warps' (m, l, acc) are
// merged through shared memory at the end. fp32 throughout.
template <typename T>
__global__ void PagedAttentionKernel(PagedKvLayout kv, const T* __restrict__ q, T* __restrict__ out,
                                     const int32_t* __restrict__ token_seq,
                                     const int32_t* __restrict__ positions, int32_t num_q_heads,
                                     float scale, int32_t sliding_window, int64_t q_stride) {
  constexpr int kPerLane = kMaxHeadDim / 32;
  __shared__ float warp_m[kAttentionWarps], warp_l[kAttentionWarps];
  __shared__ float warp_acc[kAttentionWarps][kMaxHeadDim];
  const int64_t t = blockIdx.x;
  const int32_t h = blockIdx.y;
  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t d = kv.head_dim;
  const int32_t kv_head = h / (num_q_heads / kv.num_kv_heads);
  const int32_t s = token_seq[t];
  const int32_t pos = positions[t];
  const int32_t start = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;

  const T* qh = q + t * q_stride + int64_t{h} * d;
  float qr[kPerLane], acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + 32 * e;
    qr[e] = c < d ? ToFloat(qh[c]) * scale : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  const T* kc = static_cast<const T*>(kv.k_cache);
  const T* vc = static_cast<const T*>(kv.v_cache);
  for (int32_t j = start + warp; j <= pos; j += kAttentionWarps) {
    const int64_t row = KvRowOffset(kv, s, j) + int64_t{kv_head} * d;
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + 32 * e;
      if (c < d) dot += qr[e] * ToFloat(kc[row + c]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    const float m_new = fmaxf(m, dot);
    const float correction = expf(m - m_new);  // 0 on the first key (m = -inf)
    const float weight = expf(dot - m_new);
    l = l * correction + weight;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int c = lane + 32 * e;
      if (c < d) acc[e] = acc[e] * correction + weight * ToFloat(vc[row + c]);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int c = lane + 32 * e;
    if (c < d) warp_acc[warp][c] = acc[e];
  }
  __syncthreads();
  float m_all = -INFINITY;
  for (int w = 0; w < kAttentionWarps; ++w) m_all = fmaxf(m_all, warp_m[w]);
  float l_all = 0.0f;
  float factor[kAttentionWarps];
  for (int w = 0; w < kAttentionWarps; ++w) {
    // A warp that saw no key has m = -inf and l = 0: its factor is 0.
    factor[w] = warp_m[w] == -INFINITY ? 0.0f : expf(warp_m[w] - m_all);
    l_all += warp_l[w] * factor[w];
  }
  T* oh = out + (t * num_q_heads + h) * d;
  for (int32_t c = threadIdx.x; c < d; c += blockDim.x) {
    float o = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) o += warp_acc[w][c] * factor[w];
    oh[c] = FromFloat<T>(o / l_all);
  }
}

}  // namespace moleserve::kernels::cuda
