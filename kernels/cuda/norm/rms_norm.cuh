#pragma once

#include "kernels/cuda/dispatch.cuh"

namespace moleserve::kernels::cuda {

// One block per row; each thread strides over the row, fp32 sum of squares reduced through
// warp shuffles then shared memory. With `residual` (params.h: the fused residual add), each
// thread first adds x into its elements of the residual row, rounded as AddKernel rounds, and
// normalises those; it reads back only elements it wrote itself, so no barrier is needed.
template <typename T, int kBlockSize>
__global__ void RmsNormKernel(const T* __restrict__ x, const T* __restrict__ weight,
                              T* __restrict__ y, T* __restrict__ residual, int64_t cols,
                              float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  T* rr = residual == nullptr ? nullptr : residual + row * cols;
  float sum_sq = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kBlockSize) {
    float v = ToFloat(xr[c]);
    if (rr != nullptr) {
      const T sum = FromFloat<T>(ToFloat(rr[c]) + v);
      rr[c] = sum;
      v = ToFloat(sum);
    }
    sum_sq += v * v;
  }
  const T* src = rr != nullptr ? rr : xr;
  for (int offset = 16; offset > 0; offset /= 2)
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  __shared__ float warp_sums[kBlockSize / 32];
  __shared__ float inv_rms;
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum_sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kBlockSize / 32; ++w) total += warp_sums[w];
    inv_rms = rsqrtf(total / static_cast<float>(cols) + eps);
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += kBlockSize) {
    yr[c] = FromFloat<T>(ToFloat(src[c]) * inv_rms * ToFloat(weight[c]));
  }
}

}  // namespace moleserve::kernels::cuda
