#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/core/status_macros.h"
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
    RETURN_IF_ERROR(NotRecording("Allocate"));
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
    RETURN_IF_ERROR(NotRecording("CopyToDevice"));
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(NotRecording("CopyToHost"));
    if (bytes) std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return NotRecording("Synchronize"); }

  absl::StatusOr<int64_t> CaptureGraph(const std::function<absl::Status()>& record) override {
    RETURN_IF_ERROR(NotRecording("CaptureGraph"));
    std::vector<std::function<absl::Status()>> ops;
    recording_ = &ops;
    absl::Status recorded = record();
    recording_ = nullptr;
    RETURN_IF_ERROR(recorded);
    graphs_.push_back(std::move(ops));
    return static_cast<int64_t>(graphs_.size() - 1);
  }
  absl::Status LaunchGraph(int64_t graph) override {
    RETURN_IF_ERROR(NotRecording("LaunchGraph"));
    if (graph < 0 || graph >= static_cast<int64_t>(graphs_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("cpu backend: no graph ", graph));
    }
    if (destroyed_.count(graph)) {
      return absl::InvalidArgumentError(absl::StrCat("cpu backend: graph ", graph, " destroyed"));
    }
    for (const auto& op : graphs_[graph]) RETURN_IF_ERROR(op());
    return absl::OkStatus();
  }
  void DestroyGraph(int64_t graph) override {
    if (graph < 0 || graph >= static_cast<int64_t>(graphs_.size())) return;
    graphs_[graph].clear();
    graphs_[graph].shrink_to_fit();
    destroyed_.insert(graph);
  }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    return Run("Gemm", [p] { return kc::Gemm(p); });
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    return Run("RmsNorm", [this, p] { return kc::RmsNorm(p, &pool_); });
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    return Run("SiluMul", [this, p] { return kc::SiluMul(p, &pool_); });
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    return Run("Embedding", [this, p] { return kc::Embedding(p, &pool_); });
  }
  absl::Status Add(const kernels::AddParams& p) override {
    return Run("Add", [this, p] { return kc::Add(p, &pool_); });
  }
  absl::Status BiasAdd(const kernels::BiasAddParams& p) override {
    return Run("BiasAdd", [this, p] { return kc::BiasAdd(p, &pool_); });
  }
  absl::Status Rope(const kernels::RopeParams& p) override {
    return Run("Rope", [this, p] { return kc::Rope(p, &pool_); });
  }
  absl::Status KvWrite(const kernels::KvWriteParams& p) override {
    return Run("KvWrite", [this, p] { return kc::KvWrite(p, &pool_); });
  }
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override {
    return Run("PagedAttention", [this, p] { return kc::PagedAttention(p, &pool_); });
  }
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) override {
    return Run("SgmvShrink", [this, p] { return kc::SgmvShrink(p, &pool_); });
  }
  absl::Status SgmvExpandRows(const kernels::SgmvExpandRowsParams& p) override {
    return Run("SgmvExpandRows", [this, p] { return kc::SgmvExpandRows(p, &pool_); });
  }
  absl::Status GatherAdd(const kernels::GatherAddParams& p) override {
    return Run("GatherAdd", [this, p] { return kc::GatherAdd(p, &pool_); });
  }
  absl::Status Convert(const kernels::ConvertParams& p) override {
    return Run("Convert", [this, p] { return kc::Convert(p, &pool_); });
  }
  absl::Status Route(const kernels::RouteParams& p) override {
    return Run("Route", [this, p] { return kc::Route(p, &pool_); });
  }
  absl::Status BuildSegments(const kernels::SegmentBuildParams& p) override {
    return Run("BuildSegments", [this, p] { return kc::BuildSegments(p, &pool_); });
  }
  absl::Status Sample(const kernels::SampleParams& p) override {
    return Run("Sample", [this, p] { return kc::Sample(p, &pool_); });
  }
  absl::Status MixRouter(const kernels::MixRouterParams& p) override {
    return Run("MixRouter", [this, p] { return kc::MixRouter(p, &pool_); });
  }
  absl::Status OutputGateScale(const kernels::OutputGateScaleParams& p) override {
    return Run("OutputGateScale", [this, p] { return kc::OutputGateScale(p, &pool_); });
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    return Run("Zero", [dst, bytes] {
      if (bytes) std::memset(dst, 0, bytes);
      return kernels::KernelStatus::kOk;
    });
  }
  absl::Status SoftmaxGroups(const kernels::SoftmaxGroupsParams& p) override {
    return Run("SoftmaxGroups", [this, p] { return kc::SoftmaxGroups(p, &pool_); });
  }
  absl::Status RankRoute(const kernels::RankRouteParams& p) override {
    return Run("RankRoute", [this, p] { return kc::RankRoute(p, &pool_); });
  }

 private:
  // Runs the op, or records it while a graph is captured.
  template <typename F>
  absl::Status Run(const char* op, F f) {
    if (recording_ != nullptr) {
      recording_->push_back([op, f] { return FromKernel(f(), op); });
      return absl::OkStatus();
    }
    return FromKernel(f(), op);
  }
  absl::Status NotRecording(const char* what) const {
    if (recording_ == nullptr) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("cpu backend: ", what, " while a graph is being captured"));
  }

  kc::ThreadPool pool_;
  std::vector<std::function<absl::Status()>>* recording_ = nullptr;  // while capturing
  std::vector<std::vector<std::function<absl::Status()>>> graphs_;
  std::set<int64_t> destroyed_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options) {
  int threads = options.num_threads;
  if (threads < 0) return absl::InvalidArgumentError("cpu backend: num_threads must be >= 0");
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::unique_ptr<Backend>(new CpuBackend(threads));
}

}  // namespace moleserve::engine
