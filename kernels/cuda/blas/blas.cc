#include "kernels/cuda/blas/blas.h"

#include <climits>

namespace moleserve::kernels::cuda {

BlasContext::~BlasContext() {
  if (handle_ != nullptr) cublasDestroy(handle_);
  if (workspace_ != nullptr) cudaFree(workspace_);
}

cublasStatus_t BlasContext::Init(cudaStream_t stream, size_t workspace_bytes) {
  if (handle_ != nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  if (cublasStatus_t s = cublasCreate(&handle_); s != CUBLAS_STATUS_SUCCESS) {
    handle_ = nullptr;
    return s;
  }
  if (cublasStatus_t s = cublasSetStream(handle_, stream); s != CUBLAS_STATUS_SUCCESS) return s;
  if (workspace_bytes > 0) {
    if (cudaMalloc(&workspace_, workspace_bytes) != cudaSuccess) {
      cudaGetLastError();
      workspace_ = nullptr;
      return CUBLAS_STATUS_ALLOC_FAILED;
    }
    if (cublasStatus_t s = cublasSetWorkspace(handle_, workspace_, workspace_bytes);
        s != CUBLAS_STATUS_SUCCESS) {
      return s;
    }
  }
  // Exact fp32 products for fp32 operands (the CPU backend is the oracle); bf16 uses tensor cores.
  return cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH);
}

cublasStatus_t Gemm(const GemmParams& p, BlasContext& ctx) {
  if (ctx.handle() == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.m > INT_MAX || p.n > INT_MAX || p.k > INT_MAX) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  cudaDataType_t type;
  switch (p.dtype) {
    case ScalarType::kF32:
      type = CUDA_R_32F;
      break;
    case ScalarType::kBF16:
      type = CUDA_R_16BF;
      break;
    default:
      return CUBLAS_STATUS_INVALID_VALUE;
  }
  // cuBLAS is column-major: the row-major buffers are x^T (k x m, ld k), w^T (k x n, ld k) and
  // y^T (n x m, ld n), and y^T = w x^T = op_T(w^T) * x^T.
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
  return cublasGemmEx(ctx.handle(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &p.alpha, p.w, type, k,
                      p.x, type, k, &p.beta, p.y, type, n, CUBLAS_COMPUTE_32F,
                      CUBLAS_GEMM_DEFAULT);
}

const char* BlasStatusName(cublasStatus_t s) { return cublasGetStatusName(s); }

}  // namespace moleserve::kernels::cuda
