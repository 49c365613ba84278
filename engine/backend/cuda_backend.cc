#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda_plugin.h"
#include "engine/backend/cuda_status.h"
#include "engine/core/status_macros.h"
#include "kernels/cuda/blas/blas.h"
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

absl::Status CublasStatus(cublasStatus_t status, absl::string_view context) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  std::string msg = absl::StrCat(context, ": ", kernels::cuda::BlasStatusName(status));
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(msg);
    case CUBLAS_STATUS_INVALID_VALUE:
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::InvalidArgumentError(msg);
    default:
      return absl::InternalError(msg);
  }
}

namespace {

namespace kcu = kernels::cuda;

// Streams, events and the memory pool, shared by the backend and every buffer it handed out, so
// a buffer freed after the backend still frees into a live stream and pool.
struct CudaState {
  int device = 0;
  cudaStream_t compute = nullptr;
  cudaStream_t copy = nullptr;
  cudaEvent_t compute_done = nullptr;  // recorded on compute before a bulk copy
  cudaEvent_t copy_done = nullptr;     // recorded on copy after it
  cudaMemPool_t pool = nullptr;
  // Held while the compute stream is being captured, so that an Allocate from another thread
  // waits instead of enqueueing into the capture.
  std::mutex capture_mu;
  std::atomic<std::thread::id> capturing{};
  std::vector<void*> deferred_frees;  // freed by the capturing thread during a capture
  std::vector<cudaGraphExec_t> graphs;

  // A buffer's free: stream-ordered on compute, never into a capture (the capturing thread's
  // frees wait until the capture ends; other threads wait for it).
  void Free(void* p) {
    if (capturing.load() == std::this_thread::get_id()) {
      deferred_frees.push_back(p);
      return;
    }
    std::lock_guard<std::mutex> lock(capture_mu);
    cudaSetDevice(device);
    cudaFreeAsync(p, compute);
  }

  ~CudaState() {
    cudaSetDevice(device);
    if (compute != nullptr) cudaStreamSynchronize(compute);
    if (copy != nullptr) cudaStreamSynchronize(copy);
    for (cudaGraphExec_t g : graphs) {
      if (g != nullptr) cudaGraphExecDestroy(g);
    }
    if (compute_done != nullptr) cudaEventDestroy(compute_done);
    if (copy_done != nullptr) cudaEventDestroy(copy_done);
    if (compute != nullptr) cudaStreamDestroy(compute);
    if (copy != nullptr) cudaStreamDestroy(copy);
    if (pool != nullptr) cudaMemPoolDestroy(pool);
  }
};

struct PinnedDeleter {
  void operator()(void* p) const { cudaFreeHost(p); }
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<CudaState> state, std::unique_ptr<void, PinnedDeleter> staging,
              size_t staging_bytes)
      : state_(std::move(state)), staging_(std::move(staging)), staging_bytes_(staging_bytes) {}
  ~CudaBackend() override {
    cudaSetDevice(state_->device);
    cudaStreamSynchronize(state_->compute);
    cudaStreamSynchronize(state_->copy);
    for (cudaEvent_t e : segment_done_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }

  absl::Status Init(size_t blas_workspace_bytes, size_t split_workspace_bytes) {
    RETURN_IF_ERROR(CudaStatus(
        cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, state_->device),
        "cudaDeviceGetAttribute (multiprocessors)"));
    if (split_workspace_bytes >= sizeof(float)) {
      void* p = nullptr;
      RETURN_IF_ERROR(CudaStatus(cudaMalloc(&p, split_workspace_bytes), "split scratch"));
      split_scratch_.reset(static_cast<float*>(p));
      split_floats_ = static_cast<int64_t>(split_workspace_bytes / sizeof(float));
    }
    return CublasStatus(blas_.Init(state_->compute, blas_workspace_bytes), "cuBLAS init");
  }

  std::string name() const override { return "cuda"; }
  ScalarType compute_dtype() const override { return ScalarType::kBF16; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    RETURN_IF_ERROR(NotCapturing("Allocate"));
    if (bytes == 0) return DeviceBuffer();
    std::lock_guard<std::mutex> lock(state_->capture_mu);
    RETURN_IF_ERROR(CudaStatus(cudaSetDevice(state_->device), "cudaSetDevice"));
    void* p = nullptr;
    if (cudaError_t err = cudaMallocFromPoolAsync(&p, bytes, state_->pool, state_->compute);
        err != cudaSuccess) {
      cudaGetLastError();  // clear it so a later launch check does not report it again
      return CudaStatus(err, absl::StrCat("cuda backend: allocating ", bytes, " bytes"));
    }
    std::shared_ptr<CudaState> state = state_;
    DeviceBuffer buf(p, bytes, [state](void* q) { state->Free(q); });
    RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(p, 0, bytes, state_->compute), "cudaMemsetAsync"));
    return buf;
  }

  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(NotCapturing("CopyToDevice"));
    RETURN_IF_ERROR(Bind());
    return Copy(dst, src, bytes, state_->compute, "CopyToDevice");
  }

  absl::Status CopyToDeviceBulk(const std::vector<HostToDevice>& copies) override {
    RETURN_IF_ERROR(NotCapturing("CopyToDeviceBulk"));
    if (copies.empty()) return absl::OkStatus();
    RETURN_IF_ERROR(Bind());
    // The copies after every op issued so far (their pages may have been read by them), the ops
    // issued from now on after the copies, also when one of them fails.
    RETURN_IF_ERROR(CudaStatus(cudaEventRecord(state_->compute_done, state_->compute),
                               "CopyToDeviceBulk: record"));
    RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(state_->copy, state_->compute_done, 0),
                               "CopyToDeviceBulk: wait"));
    absl::Status copied;
    for (const HostToDevice& c : copies) {
      // Page-locked sources go to the DMA engine as they are; others through the staging ring.
      copied = c.src_pinned ? CudaStatus(cudaMemcpyAsync(c.dst, c.src, c.bytes,
                                                         cudaMemcpyHostToDevice, state_->copy),
                                         "CopyToDeviceBulk")
                            : Copy(c.dst, c.src, c.bytes, state_->copy, "CopyToDeviceBulk");
      if (!copied.ok()) break;
    }
    RETURN_IF_ERROR(
        CudaStatus(cudaEventRecord(state_->copy_done, state_->copy), "CopyToDeviceBulk: record"));
    RETURN_IF_ERROR(CudaStatus(cudaStreamWaitEvent(state_->compute, state_->copy_done, 0),
                               "CopyToDeviceBulk: wait"));
    return copied;
  }

  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    if (bytes == 0) return DeviceBuffer();
    RETURN_IF_ERROR(NotCapturing("AllocateHost"));
    RETURN_IF_ERROR(Bind());
    void* p = nullptr;
    if (cudaError_t err = cudaHostAlloc(&p, bytes, cudaHostAllocDefault); err != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrCat("cuda backend: cudaHostAlloc of ", bytes,
                                                       " bytes failed: ", cudaGetErrorName(err)));
    }
    std::memset(p, 0, bytes);
    return DeviceBuffer(p, bytes, [](void* q) { cudaFreeHost(q); });
  }

  absl::Status CopyToHostAsync(void* dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(NotCapturing("CopyToHostAsync"));
    RETURN_IF_ERROR(Bind());
    return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, state_->compute),
                      "CopyToHostAsync");
  }

  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(NotCapturing("CopyToHost"));
    RETURN_IF_ERROR(Bind());
    RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, state_->compute), "CopyToHost"));
    return Synchronize();
  }

  absl::Status Synchronize() override {
    RETURN_IF_ERROR(NotCapturing("Synchronize"));
    RETURN_IF_ERROR(Bind());
    RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(state_->compute), "Synchronize"));
    RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(state_->copy), "Synchronize (copy stream)"));
    // Every copy that read the staging buffer is done.
    segment_pending_.fill(false);
    segment_used_ = 0;
    return absl::OkStatus();
  }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    RETURN_IF_ERROR(Bind());
    return CublasStatus(kcu::Gemm(p, blas_), "Gemm");
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    return Launch("RmsNorm", &kcu::RmsNorm, p);
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    return Launch("SiluMul", &kcu::SiluMul, p);
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    return Launch("Embedding", &kcu::Embedding, p);
  }
  absl::Status Add(const kernels::AddParams& p) override { return Launch("Add", &kcu::Add, p); }
  absl::Status BiasAdd(const kernels::BiasAddParams& p) override {
    return Launch("BiasAdd", &kcu::BiasAdd, p);
  }
  absl::Status Rope(const kernels::RopeParams& p) override { return Launch("Rope", &kcu::Rope, p); }
  absl::Status KvWrite(const kernels::KvWriteParams& p) override {
    return Launch("KvWrite", &kcu::KvWrite, p);
  }
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override {
    return Launch("PagedAttention", &kcu::PagedAttention, WithSplitScratch(p));
  }
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) override {
    return Launch("SgmvShrink", &kcu::SgmvShrink, WithSplitScratch(p));
  }
  absl::Status SgmvExpandRows(const kernels::SgmvExpandRowsParams& p) override {
    return Launch("SgmvExpandRows", &kcu::SgmvExpandRows, p);
  }
  absl::Status GatherAdd(const kernels::GatherAddParams& p) override {
    return Launch("GatherAdd", &kcu::GatherAdd, p);
  }
  absl::Status Convert(const kernels::ConvertParams& p) override {
    return Launch("Convert", &kcu::Convert, p);
  }
  absl::Status Route(const kernels::RouteParams& p) override {
    return Launch("Route", &kcu::Route, p);
  }
  absl::Status BuildSegments(const kernels::SegmentBuildParams& p) override {
    return Launch("BuildSegments", &kcu::BuildSegments, p);
  }
  absl::Status MixRouter(const kernels::MixRouterParams& p) override {
    return Launch("MixRouter", &kcu::MixRouter, p);
  }
  absl::Status OutputGateScale(const kernels::OutputGateScaleParams& p) override {
    return Launch("OutputGateScale", &kcu::OutputGateScale, p);
  }
  absl::Status Zero(void* dst, size_t bytes) override {
    RETURN_IF_ERROR(Bind());
    if (bytes == 0) return absl::OkStatus();
    return CudaStatus(cudaMemsetAsync(dst, 0, bytes, state_->compute), "Zero");
  }
  absl::Status SoftmaxGroups(const kernels::SoftmaxGroupsParams& p) override {
    return Launch("SoftmaxGroups", &kcu::SoftmaxGroups, p);
  }
  absl::Status RankRoute(const kernels::RankRouteParams& p) override {
    return Launch("RankRoute", &kcu::RankRoute, p);
  }
  absl::Status Sample(const kernels::SampleParams& p) override {
    return Launch("Sample", &kcu::Sample, p);
  }

  absl::StatusOr<int64_t> CaptureGraph(const std::function<absl::Status()>& record) override {
    RETURN_IF_ERROR(NotCapturing("CaptureGraph"));
    RETURN_IF_ERROR(Bind());
    std::unique_lock<std::mutex> lock(state_->capture_mu);
    RETURN_IF_ERROR(
        CudaStatus(cudaStreamBeginCapture(state_->compute, cudaStreamCaptureModeThreadLocal),
                   "graph capture"));
    state_->capturing = std::this_thread::get_id();
    const absl::Status recorded = record();
    state_->capturing = std::thread::id();
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(state_->compute, &graph);
    lock.unlock();
    std::vector<void*> deferred;
    deferred.swap(state_->deferred_frees);
    for (void* p : deferred) state_->Free(p);
    if (!recorded.ok() || ended != cudaSuccess) {
      if (graph != nullptr) cudaGraphDestroy(graph);
      cudaGetLastError();
      RETURN_IF_ERROR(recorded);
      return CudaStatus(ended, "graph capture");
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    RETURN_IF_ERROR(CudaStatus(made, "graph instantiate"));
    state_->graphs.push_back(exec);
    return static_cast<int64_t>(state_->graphs.size() - 1);
  }

  absl::Status LaunchGraph(int64_t graph) override {
    RETURN_IF_ERROR(NotCapturing("LaunchGraph"));
    RETURN_IF_ERROR(Bind());
    if (graph < 0 || graph >= static_cast<int64_t>(state_->graphs.size())) {
      return absl::InvalidArgumentError(absl::StrCat("cuda backend: no graph ", graph));
    }
    if (state_->graphs[graph] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("cuda backend: graph ", graph, " destroyed"));
    }
    return CudaStatus(cudaGraphLaunch(state_->graphs[graph], state_->compute), "graph launch");
  }

  void DestroyGraph(int64_t graph) override {
    if (graph < 0 || graph >= static_cast<int64_t>(state_->graphs.size())) return;
    if (state_->graphs[graph] == nullptr) return;
    cudaSetDevice(state_->device);
    cudaStreamSynchronize(state_->compute);  // a launch in flight finishes first
    cudaGraphExecDestroy(state_->graphs[graph]);
    state_->graphs[graph] = nullptr;
  }

 private:
  // The CUDA runtime's current device is per thread: the engine loop is not the thread that
  // created the backend, so every entry point binds the backend's device first.
  absl::Status Bind() const { return CudaStatus(cudaSetDevice(state_->device), "cudaSetDevice"); }

  template <typename P>
  absl::Status Launch(const char* op, cudaError_t (*launcher)(const P&, cudaStream_t), const P& p) {
    RETURN_IF_ERROR(Bind());
    return Launched(launcher(p, state_->compute), op);
  }

  // The op's params with the backend's split scratch and multiprocessor count filled in.
  template <typename P>
  P WithSplitScratch(P p) const {
    p.split_workspace = split_scratch_.get();
    p.split_workspace_floats = split_floats_;
    p.num_sms = num_sms_;
    return p;
  }

  // Copies, allocation and synchronization are not ops: a capture may not contain them.
  absl::Status NotCapturing(const char* what) const {
    if (state_->capturing.load() != std::this_thread::get_id()) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("cuda backend: ", what, " while a graph is being captured"));
  }

  static absl::Status Launched(cudaError_t err, const char* op) {
    if (err == cudaErrorInvalidValue) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: ", op, " refused its arguments (dtype or shape)"));
    }
    return CudaStatus(err, absl::StrCat("cuda backend: ", op));
  }

  // The staging buffer is a ring of kStagingSegments segments. When a segment is full, an event
  // is recorded on the stream of the copy that found it full, and the next segment is reused
  // only once the event recorded when it was last closed has completed: a wrap waits for copies
  // issued a whole ring ago, never for the device to drain.
  static constexpr int kStagingSegments = 8;
  static constexpr size_t kAlign = 256;
  size_t segment_bytes() const { return staging_bytes_ / kStagingSegments / kAlign * kAlign; }

  absl::Status NextSegment(cudaStream_t stream) {
    cudaEvent_t& done = segment_done_[segment_];
    if (done == nullptr) {
      RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&done, cudaEventDisableTiming),
                                 "staging: create event"));
    }
    // On the stream of the copy being issued: the copy stream is ordered after every compute op
    // issued so far (CopyToDeviceBulk waits for compute_done) and the compute stream after every
    // finished bulk (copy_done), so the event follows every copy that read the segment, also
    // those of a bulk still being issued.
    RETURN_IF_ERROR(CudaStatus(cudaEventRecord(done, stream), "staging: record"));
    segment_pending_[segment_] = true;
    segment_ = (segment_ + 1) % kStagingSegments;
    segment_used_ = 0;
    if (segment_pending_[segment_]) {
      RETURN_IF_ERROR(
          CudaStatus(cudaEventSynchronize(segment_done_[segment_]), "staging: wait for reuse"));
      segment_pending_[segment_] = false;
    }
    return absl::OkStatus();
  }

  // Host -> device on `stream`: through the pinned staging ring when the copy fits a segment
  // (the host returns at once), else straight from pageable memory (the driver stages it).
  absl::Status Copy(void* dst, const void* src, size_t bytes, cudaStream_t stream,
                    const char* what) {
    if (bytes == 0) return absl::OkStatus();
    if (bytes > segment_bytes()) {
      return CudaStatus(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream), what);
    }
    if (segment_used_ + bytes > segment_bytes()) RETURN_IF_ERROR(NextSegment(stream));
    char* slot = static_cast<char*>(staging_.get()) + segment_ * segment_bytes() + segment_used_;
    std::memcpy(slot, src, bytes);
    segment_used_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return CudaStatus(cudaMemcpyAsync(dst, slot, bytes, cudaMemcpyHostToDevice, stream), what);
  }

  std::shared_ptr<CudaState> state_;
  std::unique_ptr<void, PinnedDeleter> staging_;
  size_t staging_bytes_;
  int segment_ = 0;          // the ring segment small copies go to
  size_t segment_used_ = 0;  // bytes of it taken since it became current
  std::array<cudaEvent_t, kStagingSegments> segment_done_{};
  std::array<bool, kStagingSegments> segment_pending_{};
  kcu::BlasContext blas_;
  struct CudaFreeDeleter {
    void operator()(float* p) const { cudaFree(p); }
  };
  std::unique_ptr<float, CudaFreeDeleter> split_scratch_;
  int64_t split_floats_ = 0;
  int num_sms_ = 0;
};

}  // namespace

namespace {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

absl::StatusOr<std::unique_ptr<Backend>> Create(const CudaBackendOptions& options) {
  const int count = DeviceCount();
  if (count == 0) return absl::FailedPreconditionError("cuda backend: no CUDA device is visible");
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda backend: device ", options.device, " out of range [0, ", count, ")"));
  }
  if (options.staging_bytes < 4096) {
    return absl::InvalidArgumentError("cuda backend: staging_bytes must be >= 4096");
  }
  RETURN_IF_ERROR(CudaStatus(cudaSetDevice(options.device), "cudaSetDevice"));
  auto state = std::make_shared<CudaState>();
  state->device = options.device;
  RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&state->compute, cudaStreamNonBlocking),
                             "cudaStreamCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&state->copy, cudaStreamNonBlocking),
                             "cudaStreamCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&state->compute_done, cudaEventDisableTiming),
                             "cudaEventCreate"));
  RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&state->copy_done, cudaEventDisableTiming),
                             "cudaEventCreate"));
  // A pool of our own that keeps every byte it reserved: once the first steps have sized the
  // scratch buffers, allocations and frees are served without the driver.
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = options.device;
  RETURN_IF_ERROR(CudaStatus(cudaMemPoolCreate(&state->pool, &props), "cudaMemPoolCreate"));
  uint64_t keep = UINT64_MAX;
  RETURN_IF_ERROR(
      CudaStatus(cudaMemPoolSetAttribute(state->pool, cudaMemPoolAttrReleaseThreshold, &keep),
                 "cudaMemPoolSetAttribute"));
  void* staging = nullptr;
  RETURN_IF_ERROR(CudaStatus(cudaHostAlloc(&staging, options.staging_bytes, cudaHostAllocDefault),
                             "cudaHostAlloc (staging)"));
  auto backend = std::make_unique<CudaBackend>(state, std::unique_ptr<void, PinnedDeleter>(staging),
                                               options.staging_bytes);
  RETURN_IF_ERROR(backend->Init(options.blas_workspace_bytes, options.split_workspace_bytes));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace

}  // namespace moleserve::engine

// The plugin's entry point (cuda_plugin.h).
extern "C" __attribute__((visibility("default"))) const moleserve::engine::CudaPluginApi*
moleserve_cuda_plugin() {
  static const moleserve::engine::CudaPluginApi api{moleserve::engine::kCudaPluginApiVersion,
                                                    &moleserve::engine::DeviceCount,
                                                    &moleserve::engine::Create};
  return &api;
}
