#include "kernels/cuda/blas/blas.h"

#include <dlfcn.h>

#include <climits>
#include <type_traits>

namespace moleserve::kernels::cuda {
namespace {

// cuBLAS is opened with dlopen when the first BlasContext is initialised, not linked: a process
// that never creates a CUDA backend never maps it, and libcublasLt's 94 KB of thread-local
// storage then lives in dynamic TLS instead of every thread's static block (a program linked
// against it cannot start threads with small stacks, e.g. civetweb's, which serve /metrics).
struct Cublas {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  decltype(&cublasSetWorkspace_v2) set_workspace = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  // cublasGemmEx is overloaded in C++ (cudaDataType or cublasComputeType_t compute type).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;
  bool ok = false;
};

const Cublas& Library() {
  static const Cublas lib = [] {
    Cublas l;
    void* h = dlopen("libcublas.so.13", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) h = dlopen("libcublas.so", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) return l;
    auto get = [h](auto* fn, const char* name) {
      *fn = reinterpret_cast<std::remove_reference_t<decltype(*fn)>>(dlsym(h, name));
      return *fn != nullptr;
    };
    l.ok = get(&l.create, "cublasCreate_v2") && get(&l.destroy, "cublasDestroy_v2") &&
           get(&l.set_stream, "cublasSetStream_v2") &&
           get(&l.set_workspace, "cublasSetWorkspace_v2") &&
           get(&l.set_math_mode, "cublasSetMathMode") && get(&l.gemm_ex, "cublasGemmEx") &&
           get(&l.status_name, "cublasGetStatusName");
    return l;
  }();
  return lib;
}

}  // namespace

BlasContext::~BlasContext() {
  if (handle_ != nullptr) Library().destroy(handle_);
  if (workspace_ != nullptr) cudaFree(workspace_);
}

cublasStatus_t BlasContext::Init(cudaStream_t stream, size_t workspace_bytes) {
  if (handle_ != nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  const Cublas& lib = Library();
  if (!lib.ok) return CUBLAS_STATUS_NOT_INITIALIZED;  // libcublas.so.13 not found
  if (cublasStatus_t s = lib.create(&handle_); s != CUBLAS_STATUS_SUCCESS) {
    handle_ = nullptr;
    return s;
  }
  if (cublasStatus_t s = lib.set_stream(handle_, stream); s != CUBLAS_STATUS_SUCCESS) return s;
  if (workspace_bytes > 0) {
    if (cudaMalloc(&workspace_, workspace_bytes) != cudaSuccess) {
      cudaGetLastError();
      workspace_ = nullptr;
      return CUBLAS_STATUS_ALLOC_FAILED;
    }
    if (cublasStatus_t s = lib.set_workspace(handle_, workspace_, workspace_bytes);
        s != CUBLAS_STATUS_SUCCESS) {
      return s;
    }
  }
  // Exact fp32 products for fp32 operands (the CPU backend is the oracle); bf16 uses tensor cores.
  return lib.set_math_mode(handle_, CUBLAS_DEFAULT_MATH);
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
  return Library().gemm_ex(ctx.handle(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &p.alpha, p.w, type, k,
                           p.x, type, k, &p.beta, p.y, p.y_f32 ? CUDA_R_32F : type, n,
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

const char* BlasStatusName(cublasStatus_t s) {
  if (s == CUBLAS_STATUS_NOT_INITIALIZED && !Library().ok) {
    return "CUBLAS_STATUS_NOT_INITIALIZED (libcublas.so.13 could not be opened)";
  }
  return Library().ok ? Library().status_name(s) : "CUBLAS_STATUS (libcublas not loaded)";
}

}  // namespace moleserve::kernels::cuda
