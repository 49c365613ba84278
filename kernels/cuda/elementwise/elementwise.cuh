#pragma once

#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/elementwise/rope.cuh"

namespace moleserve::kernels::cuda {

// n = rows * cols outputs; gate and up rows are in_stride apart (a fused gate|up projection).
// Not __restrict__: out may alias gate when in_stride == cols.
template <typename T>
__global__ void SiluMulKernel(const T* gate, const T* up, T* out, int64_t n, int64_t cols,
                              int64_t in_stride) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t in = i / cols * in_stride + i % cols;
    const float g = ToFloat(gate[in]);
    out[i] = FromFloat<T>(g / (1.0f + __expf(-g)) * ToFloat(up[in]));
  }
}

template <typename T>
__global__ void AddKernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                          int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = FromFloat<T>(ToFloat(a[i]) + ToFloat(b[i]));
  }
}

template <typename T>
__global__ void BiasAddKernel(T* __restrict__ x, const T* __restrict__ bias, int64_t n,
                              int64_t cols, bool relu) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    float v = ToFloat(x[i]);
    if (bias != nullptr) v += ToFloat(bias[i % cols]);
    x[i] = FromFloat<T>(relu ? fmaxf(v, 0.0f) : v);
  }
}

// One block per token; threads copy the embedding row.
template <typename T>
__global__ void EmbeddingKernel(const int32_t* __restrict__ ids, const T* __restrict__ table,
                                T* __restrict__ out, int64_t hidden, int64_t table_stride) {
  const int64_t t = blockIdx.x;
  const T* src = table + static_cast<int64_t>(ids[t]) * table_stride;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) out[t * hidden + c] = src[c];
}

// Rotary embedding (params.h RopeParams): one block per token; thread i computes the angle of
// frequency i once (in double, like the CPU twin: large positions lose bits in fp32) and rotates
// that pair of every query and key head.
template <typename T>
__global__ void RopeKernel(T* __restrict__ q, T* __restrict__ k,
                           const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq, int32_t num_q_heads,
                           int32_t num_kv_heads, int32_t head_dim, int64_t q_stride,
                           int64_t k_stride) {
  RopeToken(q, k, positions, inv_freq, num_q_heads, num_kv_heads, head_dim, q_stride, k_stride,
            blockIdx.x);
}

template <typename From, typename To>
__global__ void ConvertKernel(const From* __restrict__ src, To* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<To>(ToFloat(src[i]));
  }
}

}  // namespace moleserve::kernels::cuda
