#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "kernels/cpu/ops.h"

namespace moleserve::engine {
namespace {

namespace kc = kernels::cpu;

absl::Status FromKernel(kernels::KernelStatus s, const char* op) {
  if (s == kernels::KernelStatus::kOk) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("cpu backend: ", op, " refused its arguments: ", kernels::KernelStatusName(s)));
}

// fp32 host memory; every op runs synchronously on the calling thread plus the pool.
class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : pool_(num_threads) { kc::SetBlasThreads(num_threads); }

  std::string name() const override { return "cpu"; }
  ScalarType compute_dtype() const override { return ScalarType::kF32; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    constexpr size_t kAlign = 64;
    void* p = std::aligned_alloc(kAlign, (bytes + kAlign - 1) / kAlign * kAlign);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cpu backend: out of memory allocating ", bytes, " bytes"));
    }
    std::memset(p, 0, bytes);
    return DeviceBuffer(p, bytes, [](void* q) { std::free(q); });
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    return FromKernel(kc::Gemm(p), "Gemm");
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    return FromKernel(kc::RmsNorm(p, &pool_), "RmsNorm");
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    return FromKernel(kc::SiluMul(p, &pool_), "SiluMul");
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    return FromKernel(kc::Embedding(p, &pool_), "Embedding");
  }
  absl::Status Add(const kernels::AddParams& p) override {
    return FromKernel(kc::Add(p, &pool_), "Add");
  }
  absl::Status BiasAdd(const kernels::BiasAddParams& p) override {
    return FromKernel(kc::BiasAdd(p, &pool_), "BiasAdd");
  }
  absl::Status Rope(const kernels::RopeParams& p) override {
    return FromKernel(kc::Rope(p, &pool_), "Rope");
  }
  absl::Status KvWrite(const kernels::KvWriteParams& p) override {
    return FromKernel(kc::KvWrite(p, &pool_), "KvWrite");
  }
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override {
    return FromKernel(kc::PagedAttention(p, &pool_), "PagedAttention");
  }
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) override {
    return FromKernel(kc::SgmvShrink(p, &pool_), "SgmvShrink");
  }
  absl::Status SgmvExpand(const kernels::SgmvExpandParams& p) override {
    return FromKernel(kc::SgmvExpand(p, &pool_), "SgmvExpand");
  }
  absl::Status ScatterAdd(const kernels::ScatterAddParams& p) override {
    return FromKernel(kc::ScatterAdd(p, &pool_), "ScatterAdd");
  }
  absl::Status Convert(const kernels::ConvertParams& p) override {
    return FromKernel(kc::Convert(p, &pool_), "Convert");
  }
  absl::Status Route(const kernels::RouteParams& p) override {
    return FromKernel(kc::Route(p, &pool_), "Route");
  }
  absl::Status RankRoute(const kernels::RankRouteParams& p) override {
    return FromKernel(kc::RankRoute(p, &pool_), "RankRoute");
  }

 private:
  kc::ThreadPool pool_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options) {
  int threads = options.num_threads;
  if (threads < 0) return absl::InvalidArgumentError("cpu backend: num_threads must be >= 0");
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::unique_ptr<Backend>(new CpuBackend(threads));
}

}  // namespace moleserve::engine
