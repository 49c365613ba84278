#pragma once

// CountingBackend: wraps a backend and counts what a step costs in traffic with the device, so
// tests can assert a step's structure without a GPU: ops launched outside graphs, graph launches,
// host -> device and device -> host copies and their bytes, and synchronisations (Synchronize and
// CopyToHost, which waits for the device; CopyToHostAsync does not). Ops recorded while a graph is
// captured are not launches (the replay runs them inside the wrapped backend, as one launch).

#include <cstdint>
#include <memory>
#include <string>

#include "engine/backend/backend.h"

namespace moleserve::test_util {

struct BackendCounts {
  int64_t ops = 0;  // op calls outside graph capture
  int64_t graph_launches = 0;
  int64_t h2d_copies = 0;  // CopyToDevice: the step's tables and inputs
  int64_t h2d_bytes = 0;
  int64_t page_copies = 0;  // CopyToDeviceBulk entries: expert pages copied in on a cache miss
  int64_t page_bytes = 0;
  int64_t pinned_page_copies = 0;  // of which from page-locked host memory (no staging)
  int64_t bulk_calls = 0;          // CopyToDeviceBulk calls
  int64_t d2h_copies = 0;
  int64_t d2h_bytes = 0;
  int64_t syncs = 0;
  int64_t shrinks = 0;      // SgmvShrink calls outside graph capture (also counted in ops)
  int64_t adds = 0;         // Add calls outside graph capture (also counted in ops)
  int64_t fused_norms = 0;  // RmsNorm calls with a residual add fused in (also in ops)
};

class CountingBackend final : public engine::Backend {
 public:
  explicit CountingBackend(std::unique_ptr<engine::Backend> inner) : inner_(std::move(inner)) {}

  BackendCounts counts() const { return counts_; }
  void Reset() { counts_ = {}; }

  std::string name() const override { return inner_->name(); }
  kernels::ScalarType compute_dtype() const override { return inner_->compute_dtype(); }
  absl::StatusOr<engine::DeviceBuffer> Allocate(size_t bytes) override {
    return inner_->Allocate(bytes);
  }
  absl::StatusOr<engine::DeviceBuffer> AllocateHost(size_t bytes) override {
    return inner_->AllocateHost(bytes);
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    ++counts_.h2d_copies;
    counts_.h2d_bytes += static_cast<int64_t>(bytes);
    return inner_->CopyToDevice(dst, src, bytes);
  }
  absl::Status CopyToDeviceBulk(const std::vector<HostToDevice>& copies) override {
    ++counts_.bulk_calls;
    for (const HostToDevice& c : copies) {
      ++counts_.page_copies;
      counts_.page_bytes += static_cast<int64_t>(c.bytes);
      counts_.pinned_page_copies += c.src_pinned ? 1 : 0;
    }
    return inner_->CopyToDeviceBulk(copies);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    ++counts_.d2h_copies;
    counts_.d2h_bytes += static_cast<int64_t>(bytes);
    ++counts_.syncs;
    return inner_->CopyToHost(dst, src, bytes);
  }
  absl::Status CopyToHostAsync(void* dst, const void* src, size_t bytes) override {
    ++counts_.d2h_copies;
    counts_.d2h_bytes += static_cast<int64_t>(bytes);
    return inner_->CopyToHostAsync(dst, src, bytes);
  }
  absl::Status Synchronize() override {
    ++counts_.syncs;
    return inner_->Synchronize();
  }
  absl::StatusOr<int64_t> CaptureGraph(const std::function<absl::Status()>& record) override {
    capturing_ = true;
    absl::StatusOr<int64_t> g = inner_->CaptureGraph(record);
    capturing_ = false;
    return g;
  }
  absl::Status LaunchGraph(int64_t graph) override {
    ++counts_.graph_launches;
    return inner_->LaunchGraph(graph);
  }
  void DestroyGraph(int64_t graph) override { inner_->DestroyGraph(graph); }

#define MOLESERVE_COUNTED_OP(Op, Params)               \
  absl::Status Op(const kernels::Params& p) override { \
    if (!capturing_) ++counts_.ops;                    \
    return inner_->Op(p);                              \
  }
  MOLESERVE_COUNTED_OP(Gemm, GemmParams)
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    if (!capturing_) ++counts_.ops, counts_.fused_norms += p.residual != nullptr ? 1 : 0;
    return inner_->RmsNorm(p);
  }
  MOLESERVE_COUNTED_OP(SiluMul, SiluMulParams)
  MOLESERVE_COUNTED_OP(Embedding, EmbeddingParams)
  absl::Status Add(const kernels::AddParams& p) override {
    if (!capturing_) ++counts_.ops, ++counts_.adds;
    return inner_->Add(p);
  }
  MOLESERVE_COUNTED_OP(BiasAdd, BiasAddParams)
  MOLESERVE_COUNTED_OP(Rope, RopeParams)
  MOLESERVE_COUNTED_OP(KvWrite, KvWriteParams)
  MOLESERVE_COUNTED_OP(PagedAttention, PagedAttentionParams)
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) override {
    if (!capturing_) ++counts_.ops, ++counts_.shrinks;
    return inner_->SgmvShrink(p);
  }
  MOLESERVE_COUNTED_OP(SgmvExpandRows, SgmvExpandRowsParams)
  MOLESERVE_COUNTED_OP(GatherAdd, GatherAddParams)
  MOLESERVE_COUNTED_OP(Convert, ConvertParams)
  MOLESERVE_COUNTED_OP(Route, RouteParams)
  MOLESERVE_COUNTED_OP(RankRoute, RankRouteParams)
  MOLESERVE_COUNTED_OP(SoftmaxGroups, SoftmaxGroupsParams)
  MOLESERVE_COUNTED_OP(MixRouter, MixRouterParams)
  MOLESERVE_COUNTED_OP(OutputGateScale, OutputGateScaleParams)
  absl::Status Zero(void* dst, size_t bytes) override {
    if (!capturing_) ++counts_.ops;
    return inner_->Zero(dst, bytes);
  }
  MOLESERVE_COUNTED_OP(BuildSegments, SegmentBuildParams)
  MOLESERVE_COUNTED_OP(Sample, SampleParams)
#undef MOLESERVE_COUNTED_OP

 private:
  std::unique_ptr<engine::Backend> inner_;
  BackendCounts counts_;
  bool capturing_ = false;
};

}  // namespace moleserve::test_util
