#pragma once

// The device's measured copy bandwidth, the yardstick of the GPU benchmarks: the best of 10
// device-to-device cudaMemcpy of 1 GiB, counting the bytes read and written. 0 on a CUDA error.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>

namespace moleserve::bench {

inline double MeasureCopyBandwidth(size_t bytes = size_t{1} << 30) {
  void *a = nullptr, *b = nullptr;
  if (cudaMalloc(&a, bytes) != cudaSuccess || cudaMalloc(&b, bytes) != cudaSuccess) {
    cudaFree(a);
    return 0.0;
  }
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaMemset(a, 1, bytes);
  cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);  // warm-up
  float best_ms = 1e30f;
  for (int r = 0; r < 10; ++r) {
    cudaEventRecord(start);
    cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  return cudaGetLastError() == cudaSuccess ? 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3)
                                           : 0.0;
}

}  // namespace moleserve::bench
