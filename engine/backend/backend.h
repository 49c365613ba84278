#pragma once

// Backend: the device a model runs on. It owns device memory and the compute op table; engine
// modules above it never see kernels/ or CUDA directly (DESIGN.md section 2).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateCpuBackend({.num_threads = 2}));
//   ASSIGN_OR_RETURN(DeviceBuffer buf, backend->Allocate(1 << 20));
//   RETURN_IF_ERROR(backend->RmsNorm({.x = buf.data(), ...}));
//
// Ops take the Params structs of kernels/common/params.h with device pointers, run in stream
// order on the backend's compute stream, and return a Status naming the op when the kernel
// refuses its arguments. Results are visible to the host after Synchronize() (a no-op on CPU).
//
// Thread safety: Allocate/Free may be called from any thread. Ops and copies are issued by one
// thread at a time (the engine loop); the backend does not serialize them.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/params.h"

namespace moleserve::engine {

using kernels::ScalarType;

// Bytes per element of a ScalarType.
size_t ScalarTypeSize(ScalarType t);
const char* ScalarTypeName(ScalarType t);

// Owning handle to device memory; frees on destruction. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(void* data, size_t bytes, std::function<void(void*)> free_fn)
      : data_(data), bytes_(bytes), free_(std::move(free_fn)) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  void Reset();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> free_;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual std::string name() const = 0;
  // Element type of weights and activations on this backend (fp32 on CPU, bf16 on CUDA).
  virtual ScalarType compute_dtype() const = 0;

  // Device memory, zero-initialised. kResourceExhausted when the device is out of memory.
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  // Host memory the device copies into directly (CUDA: page-locked, so a device -> host copy
  // is one DMA, not staged through the driver), zero-initialised; for what comes back every step.
  // CPU: ordinary memory.
  virtual absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes);
  virtual absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* dst, const void* src, size_t bytes) = 0;
  // Device -> host in stream order without waiting: `dst` (AllocateHost memory, so the copy is
  // asynchronous on CUDA) holds the data once the next CopyToHost or Synchronize returns. For
  // what a step brings back besides its main result (routing decisions), so the step still
  // synchronises once. Default (and CPU): CopyToHost.
  virtual absl::Status CopyToHostAsync(void* dst, const void* src, size_t bytes) {
    return CopyToHost(dst, src, bytes);
  }
  // A batch of host -> device copies (an expert's pages) on the backend's copy stream: ordered
  // after every op issued so far (so it never overwrites memory a pending kernel still reads)
  // and before every op issued after it. Ordinary sources may be reused once the call returns;
  // a source marked `src_pinned` (AllocateHost memory) is read by the device directly (no
  // staging) and must stay unchanged until the next Synchronize. CPU: memcpys.
  struct HostToDevice {
    void* dst;
    const void* src;
    size_t bytes;
    bool src_pinned = false;
  };
  virtual absl::Status CopyToDeviceBulk(const std::vector<HostToDevice>& copies) {
    for (const HostToDevice& c : copies) {
      if (absl::Status s = CopyToDevice(c.dst, c.src, c.bytes); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  // Waits for every op issued so far.
  virtual absl::Status Synchronize() = 0;

  // Op table: see kernels/common/params.h for each op's math and layouts.
  virtual absl::Status Gemm(const kernels::GemmParams& p) = 0;
  virtual absl::Status RmsNorm(const kernels::RmsNormParams& p) = 0;
  virtual absl::Status SiluMul(const kernels::SiluMulParams& p) = 0;
  virtual absl::Status Embedding(const kernels::EmbeddingParams& p) = 0;
  virtual absl::Status Add(const kernels::AddParams& p) = 0;
  virtual absl::Status BiasAdd(const kernels::BiasAddParams& p) = 0;
  virtual absl::Status Rope(const kernels::RopeParams& p) = 0;
  virtual absl::Status KvWrite(const kernels::KvWriteParams& p) = 0;
  virtual absl::Status PagedAttention(const kernels::PagedAttentionParams& p) = 0;
  // Segmented LoRA GEMMs over (row, expert) pairs and the weighted gather-add. Sums into an
  // output row are owned by that row (no atomics): the same inputs give the same bits.
  virtual absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) = 0;
  virtual absl::Status SgmvExpandRows(const kernels::SgmvExpandRowsParams& p) = 0;
  virtual absl::Status GatherAdd(const kernels::GatherAddParams& p) = 0;
  virtual absl::Status Convert(const kernels::ConvertParams& p) = 0;
  // Routing of lora-granular and rank-granular groups (kernels/common/routing_math.h).
  virtual absl::Status Route(const kernels::RouteParams& p) = 0;
  virtual absl::Status RankRoute(const kernels::RankRouteParams& p) = 0;
  // X-LoRA's classifier softmax, per group of columns, fp32.
  virtual absl::Status SoftmaxGroups(const kernels::SoftmaxGroupsParams& p) = 0;
  // A Mixture of Routers' logits (the log of its mixed probabilities), fp32.
  virtual absl::Status MixRouter(const kernels::MixRouterParams& p) = 0;
  // An output gate's logits from the GEMM over its experts' outputs: L2-normalised and masked.
  virtual absl::Status OutputGateScale(const kernels::OutputGateScaleParams& p) = 0;
  // Sets `bytes` bytes at `dst` (device memory) to 0, in stream order (recorded in graphs).
  virtual absl::Status Zero(void* dst, size_t bytes) = 0;
  // SGMV segments from Route's decisions, on the device (no host round trip).
  virtual absl::Status BuildSegments(const kernels::SegmentBuildParams& p) = 0;
  // The next token of each row from fp32 logits (kernels/common/sampling_math.h), so that only
  // the chosen ids, their logprobs and any asked-for alternatives leave the device.
  virtual absl::Status Sample(const kernels::SampleParams& p) = 0;

  // Graphs (the decode fast path: CUDA graphs). CaptureGraph calls `record`, during which ops are
  // recorded instead of run, and returns a handle; LaunchGraph replays the recorded ops with the
  // Params they were given (so the inputs must be in the same buffers, updated before the
  // launch). Inside `record` only ops are allowed: Allocate, copies and Synchronize fail with
  // kFailedPrecondition. The CPU backend records a list of op calls (so the rules are checked and
  // the replay is testable without a GPU); CUDA captures its compute stream.
  virtual absl::StatusOr<int64_t> CaptureGraph(const std::function<absl::Status()>& record) = 0;
  virtual absl::Status LaunchGraph(int64_t graph) = 0;
  // Frees a captured graph (after any launch of it finishes); launching it afterwards fails.
  // Unknown or already destroyed handles are ignored. Default: nothing to free.
  virtual void DestroyGraph(int64_t graph) {}
};

struct CpuBackendOptions {
  // Threads for the CPU kernels and OpenBLAS; 0 = all hardware threads.
  int num_threads = 0;
};

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options);

// True when this binary was built with the CUDA backend (MOLESERVE_ENABLE_CUDA).
bool CudaBackendCompiled();
// Number of CUDA devices visible (0 when none, or when CUDA is not compiled in).
int CudaDeviceCount();

struct CudaBackendOptions {
  int device = 0;
  // Pinned host memory through which small host -> device copies (a step's token, position and
  // segment tables) go, so they never block the host: a ring of 8 segments, each reused once the
  // copies that last read it are done (an event, not a device-wide synchronisation). Copies
  // larger than a segment go straight from pageable memory.
  size_t staging_bytes = size_t{16} << 20;
  // cuBLAS workspace, allocated once.
  size_t blas_workspace_bytes = size_t{32} << 20;
  // Scratch for the partial results of split kernels (split-KV attention, split-K shrink), one
  // buffer allocated once and used by one op at a time on the compute stream. Smaller scratch
  // means fewer splits, never a failure (0: nothing is split).
  size_t split_workspace_bytes = size_t{16} << 20;
};

// The CUDA backend: bf16 compute (fp32 accumulation), every op of the table on the device
// (kernels/cuda, cuBLAS for GEMMs). Memory comes from a stream-ordered pool that keeps what it
// has reserved (after the first steps, Allocate and free do not reach the driver); a compute
// stream runs the ops, a copy stream runs CopyToDeviceBulk, ordered with events. Errors carry the
// op and CUDA's or cuBLAS's error name. kFailedPrecondition when no device is present or CUDA is
// not compiled in.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options);

}  // namespace moleserve::engine
