#pragma once

// cuBLAS lives only here (STYLE.md section 5). A BlasContext owns one handle bound to one stream
// and its workspace; the backend owns the context and passes it to Gemm, so nothing is global.
//
//   BlasContext blas;
//   if (blas.Init(stream) != CUBLAS_STATUS_SUCCESS) ...
//   cublasStatus_t s = Gemm({.x = x, .w = w, .y = y, .m = m, .n = n, .k = k,
//                            .dtype = ScalarType::kBF16}, blas);

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "kernels/common/params.h"

namespace moleserve::kernels::cuda {

class BlasContext {
 public:
  BlasContext() = default;
  ~BlasContext();
  BlasContext(const BlasContext&) = delete;
  BlasContext& operator=(const BlasContext&) = delete;

  // Creates the handle on the current device, binds it to `stream` and gives it a workspace of
  // `workspace_bytes` (allocated once here, so no GEMM allocates). CUBLAS_STATUS_ALLOC_FAILED
  // when the workspace cannot be allocated.
  cublasStatus_t Init(cudaStream_t stream, size_t workspace_bytes = size_t{32} << 20);
  cublasHandle_t handle() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
};

// y[m, n] = alpha * x[m, k] w[n, k]^T + beta * y (params.h GemmParams) with fp32 accumulation
// (CUBLAS_COMPUTE_32F, no TF32), fp32 or bf16 operands. CUBLAS_STATUS_INVALID_VALUE for another
// dtype or a size above INT32_MAX.
cublasStatus_t Gemm(const GemmParams& p, BlasContext& ctx);

// "CUBLAS_STATUS_..." for a status.
const char* BlasStatusName(cublasStatus_t s);

}  // namespace moleserve::kernels::cuda
