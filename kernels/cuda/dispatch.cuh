#pragma once

// Runtime -> compile-time dispatch helpers, kept in one file (cf. FlashInfer utils.cuh).

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/common/params.h"

namespace moleserve::kernels::cuda {

// Calls fn.template operator()<T>() with T the C++ type of `dtype`; returns
// cudaErrorInvalidValue for a dtype without a kernel.
template <typename Fn>
cudaError_t DispatchFloat(ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case ScalarType::kF32:
      return fn.template operator()<float>();
    case ScalarType::kBF16:
      return fn.template operator()<__nv_bfloat16>();
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
__device__ __forceinline__ float ToFloat(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T FromFloat(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// kVec elements of T as fp32 from a 16-byte load (kVec == 16 / sizeof(T)) or a scalar load.
template <typename T, int kVec>
__device__ __forceinline__ void LoadVec(const T* p, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = ToFloat(p[0]);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = ToFloat(v[i]);
  }
}

inline unsigned int CeilDiv(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace moleserve::kernels::cuda
