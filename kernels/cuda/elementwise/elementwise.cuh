#pragma once

#include "kernels/cuda/dispatch.cuh"

namespace moleserve::kernels::cuda {

template <typename T>
__global__ void SiluMulKernel(const T* __restrict__ gate, const T* __restrict__ up,
                              T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = ToFloat(gate[i]);
    out[i] = FromFloat<T>(g / (1.0f + __expf(-g)) * ToFloat(up[i]));
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
                              int64_t cols) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = FromFloat<T>(ToFloat(x[i]) + ToFloat(bias[i % cols]));
  }
}

// One block per token; threads copy the embedding row.
template <typename T>
__global__ void EmbeddingKernel(const int32_t* __restrict__ ids, const T* __restrict__ table,
                                T* __restrict__ out, int64_t hidden) {
  const int64_t t = blockIdx.x;
  const T* src = table + static_cast<int64_t>(ids[t]) * hidden;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) out[t * hidden + c] = src[c];
}

}  // namespace moleserve::kernels::cuda
