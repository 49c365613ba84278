#pragma once

// Shared by the CUDA kernel tests: whether a device is present, and the skip that goes with it.

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

namespace moleserve::kernels::test_util {

inline bool HaveCudaDevice() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

}  // namespace moleserve::kernels::test_util

#define SKIP_WITHOUT_GPU() \
  if (!::moleserve::kernels::test_util::HaveCudaDevice()) GTEST_SKIP() << "no CUDA device"
