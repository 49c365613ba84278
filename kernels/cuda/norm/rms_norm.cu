#include "kernels/cuda/norm/rms_norm.cuh"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {

cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.rows > 0x7fffffff || p.cols <= 0) return cudaErrorInvalidValue;
  if (p.residual != nullptr && (p.y == p.residual || p.y == p.x)) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    constexpr int kBlockSize = 256;
    RmsNormKernel<T, kBlockSize><<<static_cast<unsigned int>(p.rows), kBlockSize, 0, stream>>>(
        static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<T*>(p.y),
        static_cast<T*>(p.residual), p.cols, p.eps);
    return cudaGetLastError();
  });
}

}  // namespace moleserve::kernels::cuda
