#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda_status.h"
#include "engine/core/status_macros.h"
#include "kernels/cuda/ops.h"

namespace moleserve::engine {

absl::Status CudaStatus(cudaError_t err, absl::string_view context) {
  if (err == cudaSuccess) return absl::OkStatus();
  std::string msg =
      absl::StrCat(context, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::InternalError(msg);
  }
}

namespace {

namespace kcu = kernels::cuda;

absl::Status Unimplemented(const char* op) {
  return absl::UnimplementedError(
      absl::StrCat("cuda backend: op ", op, " has no CUDA kernel yet; use --backend=cpu"));
}

// Device memory through cudaMalloc; ops enqueue on one compute stream owned by the backend.
// Copies are synchronous with respect to that stream (cudaMemcpyAsync + stream sync at
// Synchronize()).
class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream) : device_(device), stream_(stream) {}
  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  ScalarType compute_dtype() const override { return ScalarType::kBF16; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
    void* p = nullptr;
    if (cudaError_t err = cudaMalloc(&p, bytes); err != cudaSuccess) {
      cudaGetLastError();  // clear it so a later launch check does not report it again
      return CudaStatus(err, absl::StrCat("cudaMalloc(", bytes, ")"));
    }
    absl::Status zero = CudaStatus(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync");
    if (!zero.ok()) {
      cudaFree(p);
      return zero;
    }
    const int device = device_;
    return DeviceBuffer(p, bytes, [device](void* q) {
      cudaSetDevice(device);
      cudaFree(q);
    });
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_),
                      "CopyToDevice");
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_),
                               "CopyToHost"));
    return CudaStatus(cudaStreamSynchronize(stream_), "CopyToHost sync");
  }
  absl::Status Synchronize() override {
    return CudaStatus(cudaStreamSynchronize(stream_), "Synchronize");
  }

  absl::Status Gemm(const kernels::GemmParams&) override { return Unimplemented("Gemm"); }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    return CudaStatus(kcu::RmsNorm(p, stream_), "RmsNorm");
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    return CudaStatus(kcu::SiluMul(p, stream_), "SiluMul");
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    return CudaStatus(kcu::Embedding(p, stream_), "Embedding");
  }
  absl::Status Add(const kernels::AddParams& p) override {
    return CudaStatus(kcu::Add(p, stream_), "Add");
  }
  absl::Status BiasAdd(const kernels::BiasAddParams& p) override {
    return CudaStatus(kcu::BiasAdd(p, stream_), "BiasAdd");
  }
  absl::Status Rope(const kernels::RopeParams&) override { return Unimplemented("Rope"); }
  absl::Status KvWrite(const kernels::KvWriteParams&) override { return Unimplemented("KvWrite"); }
  absl::Status PagedAttention(const kernels::PagedAttentionParams&) override {
    return Unimplemented("PagedAttention");
  }
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams&) override {
    return Unimplemented("SgmvShrink");
  }
  absl::Status SgmvExpand(const kernels::SgmvExpandParams&) override {
    return Unimplemented("SgmvExpand");
  }
  absl::Status ScatterAdd(const kernels::ScatterAddParams&) override {
    return Unimplemented("ScatterAdd");
  }

 private:
  int device_;
  cudaStream_t stream_;
};

}  // namespace

bool CudaBackendCompiled() { return true; }

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  const int count = CudaDeviceCount();
  if (count == 0) return absl::FailedPreconditionError("cuda backend: no CUDA device is visible");
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: device ", options.device, " out of range [0, ", count, ")"));
  }
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  cudaStream_t stream = nullptr;
  RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"));
  return std::unique_ptr<Backend>(new CudaBackend(options.device, stream));
}

}  // namespace moleserve::engine
