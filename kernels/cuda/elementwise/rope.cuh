#pragma once

// RoPE of one token, by the threads of a block (RopeKernel, and KvWriteKernel when RoPE is fused
// in front of the cache write). Angles: kernels/common/rope_math.h.

#include "kernels/common/rope_math.h"
#include "kernels/cuda/dispatch.cuh"

namespace moleserve::kernels::cuda {

// Thread i rotates the pairs (i, i + half) of every head of token t, in place, q then k.
template <typename T>
__device__ void RopeToken(T* __restrict__ q, T* __restrict__ k,
                          const int32_t* __restrict__ positions, const float* __restrict__ inv_freq,
                          int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
                          int64_t q_stride, int64_t k_stride, int64_t t) {
  const int32_t half = head_dim / 2;
  for (int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    float c, s;
    rope_math::CosSin(positions[t], inv_freq[i], &c, &s);
    auto rotate = [&](T* head) {
      const float x0 = ToFloat(head[i]), x1 = ToFloat(head[i + half]);
      head[i] = FromFloat<T>(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
      head[i + half] = FromFloat<T>(__fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s)));
    };
    for (int32_t h = 0; h < num_q_heads; ++h) rotate(q + t * q_stride + h * head_dim);
    for (int32_t h = 0; h < num_kv_heads; ++h) rotate(k + t * k_stride + h * head_dim);
  }
}

}  // namespace moleserve::kernels::cuda
