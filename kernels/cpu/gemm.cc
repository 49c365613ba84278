#include <cblas.h>

#include "kernels/cpu/ops.h"

namespace moleserve::kernels::cpu {

KernelStatus Gemm(const GemmParams& p) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.m == 0 || p.n == 0) return KernelStatus::kOk;
  // y[m,n] = x[m,k] * w[n,k]^T: row-major, B transposed.
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(p.m), static_cast<int>(p.n),
              static_cast<int>(p.k), p.alpha, static_cast<const float*>(p.x), static_cast<int>(p.k),
              static_cast<const float*>(p.w), static_cast<int>(p.k), p.beta,
              static_cast<float*>(p.y), static_cast<int>(p.n));
  return KernelStatus::kOk;
}

void SetBlasThreads(int n) { openblas_set_num_threads(n); }

}  // namespace moleserve::kernels::cpu
