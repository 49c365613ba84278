#pragma once

// Bf16CpuBackend: a test backend that computes like the CUDA backend without a GPU. Buffers hold
// bf16 (compute_dtype() == kBF16, as on CUDA). Each op reads its bf16 operands into fp32, runs
// the CPU kernel (the oracle, fp32 math) and rounds its bf16 outputs once, which is what the CUDA
// kernels do: fp32 inside, one bf16 rounding per output.
//
// That exercises, on any machine, everything the model, the adapter executor and the expert
// cache do differently in bf16: element sizes, weight and page conversion, logits and router
// logits read back through Convert, and the X-LoRA classifier's round trips. Gathers and copies
// (Embedding, KvWrite) move the bf16 bits as they are. Graphs are not offered (the model then runs
// every step eagerly). Test-only; thread-compatible like the CPU backend.

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/backend/backend.h"
#include "kernels/common/bf16.h"

namespace moleserve::test_util {

class Bf16CpuBackend final : public engine::Backend {
 public:
  static std::unique_ptr<Bf16CpuBackend> Create(int threads = 2) {
    auto inner = engine::CreateCpuBackend({.num_threads = threads});
    if (!inner.ok()) return nullptr;
    return std::unique_ptr<Bf16CpuBackend>(new Bf16CpuBackend(std::move(*inner)));
  }

  std::string name() const override { return "cpu-bf16"; }
  kernels::ScalarType compute_dtype() const override { return kernels::ScalarType::kBF16; }
  absl::StatusOr<engine::DeviceBuffer> Allocate(size_t bytes) override {
    return inner_->Allocate(bytes);
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    return inner_->CopyToDevice(dst, src, bytes);
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    return inner_->CopyToHost(dst, src, bytes);
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::StatusOr<int64_t> CaptureGraph(const std::function<absl::Status()>&) override {
    return absl::UnimplementedError("cpu-bf16: no graphs");
  }
  absl::Status LaunchGraph(int64_t) override {
    return absl::UnimplementedError("cpu-bf16: no graphs");
  }

  absl::Status Gemm(const kernels::GemmParams& p) override {
    if (!Bf16(p.dtype)) return inner_->Gemm(p);
    std::vector<float> x = In(p.x, p.m * p.k), w = In(p.w, p.n * p.k);
    kernels::GemmParams q = p;
    q.x = x.data(), q.w = w.data(), q.dtype = kF32;
    if (p.y_f32) return inner_->Gemm(q);  // y is fp32 already: no rounding
    std::vector<float> y = p.beta != 0.0f ? In(p.y, p.m * p.n) : std::vector<float>(p.m * p.n);
    q.y = y.data();
    return Out(inner_->Gemm(q), y, p.y);
  }
  absl::Status RmsNorm(const kernels::RmsNormParams& p) override {
    if (!Bf16(p.dtype)) return inner_->RmsNorm(p);
    std::vector<float> x = In(p.x, p.rows * p.cols), w = In(p.weight, p.cols), y(x.size());
    kernels::RmsNormParams q = p;
    if (p.residual != nullptr) {
      // The fused residual add: the bf16 sum an Add leaves, then the norm over it.
      if (p.y == p.residual || p.y == p.x) return absl::InvalidArgumentError("RmsNorm aliasing");
      std::vector<float> r = In(p.residual, p.rows * p.cols);
      for (size_t i = 0; i < r.size(); ++i) {
        r[i] = kernels::Bf16ToF32(kernels::F32ToBf16(r[i] + x[i]));
      }
      Store(r, p.residual);
      x = std::move(r);
      q.residual = nullptr;
    }
    q.x = x.data(), q.weight = w.data(), q.y = y.data(), q.dtype = kF32;
    return Out(inner_->RmsNorm(q), y, p.y);
  }
  absl::Status SiluMul(const kernels::SiluMulParams& p) override {
    if (!Bf16(p.dtype)) return inner_->SiluMul(p);
    const int64_t n = p.rows * p.cols;
    std::vector<float> g = InRows(p.gate, p.rows, p.cols, p.in_stride);
    std::vector<float> u = InRows(p.up, p.rows, p.cols, p.in_stride), out(n);
    kernels::SiluMulParams q = p;
    q.gate = g.data(), q.up = u.data(), q.out = out.data(), q.dtype = kF32, q.in_stride = 0;
    return Out(inner_->SiluMul(q), out, p.out);
  }
  absl::Status Embedding(const kernels::EmbeddingParams& p) override {
    if (!Bf16(p.dtype)) return inner_->Embedding(p);
    const auto* table = static_cast<const uint16_t*>(p.table);
    auto* out = static_cast<uint16_t*>(p.out);
    const int64_t stride = p.table_stride > 0 ? p.table_stride : p.hidden;
    std::vector<uint16_t> rows(p.num_tokens * p.hidden);  // the table may alias the output
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      std::memcpy(rows.data() + t * p.hidden, table + int64_t{p.ids[t]} * stride, 2 * p.hidden);
    }
    std::memcpy(out, rows.data(), rows.size() * 2);
    return absl::OkStatus();
  }
  absl::Status Add(const kernels::AddParams& p) override {
    if (!Bf16(p.dtype)) return inner_->Add(p);
    std::vector<float> a = In(p.a, p.n), b = In(p.b, p.n), out(p.n);
    kernels::AddParams q = p;
    q.a = a.data(), q.b = b.data(), q.out = out.data(), q.dtype = kF32;
    return Out(inner_->Add(q), out, p.out);
  }
  absl::Status BiasAdd(const kernels::BiasAddParams& p) override {
    if (!Bf16(p.dtype)) return inner_->BiasAdd(p);
    std::vector<float> x = In(p.x, p.rows * p.cols);
    std::vector<float> b = p.bias == nullptr ? std::vector<float>() : In(p.bias, p.cols);
    kernels::BiasAddParams q = p;
    q.x = x.data(), q.bias = p.bias == nullptr ? nullptr : b.data(), q.dtype = kF32;
    return Out(inner_->BiasAdd(q), x, p.x);
  }
  absl::Status Rope(const kernels::RopeParams& p) override {
    if (!Bf16(p.dtype)) return inner_->Rope(p);
    const int64_t q_width = int64_t{p.num_q_heads} * p.head_dim;
    const int64_t k_width = int64_t{p.num_kv_heads} * p.head_dim;
    std::vector<float> q_ = InRows(p.q, p.num_tokens, q_width, p.q_stride);
    std::vector<float> k_ = InRows(p.k, p.num_tokens, k_width, p.k_stride);
    kernels::RopeParams q = p;
    q.q = q_.data(), q.k = k_.data(), q.dtype = kF32, q.q_stride = 0, q.k_stride = 0;
    absl::Status s = inner_->Rope(q);
    if (s.ok()) {
      StoreRows(k_, p.k, p.num_tokens, k_width, p.k_stride);
      StoreRows(q_, p.q, p.num_tokens, q_width, p.q_stride);
    }
    return s;
  }
  absl::Status KvWrite(const kernels::KvWriteParams& p) override {
    if (!Bf16(p.dtype)) return inner_->KvWrite(p);
    if (p.rope_inv_freq != nullptr) {  // the fused RoPE: Rope in bf16, then the write
      const absl::Status rope = Rope(kernels::FusedRopeOf(p));
      if (!rope.ok()) return rope;
    }
    const int64_t width = int64_t{p.kv.num_kv_heads} * p.kv.head_dim;
    const int64_t stride = p.kv_stride > 0 ? p.kv_stride : width;
    for (int64_t t = 0; t < p.num_tokens; ++t) {
      const int64_t off = RowOffset(p.kv, p.token_seq[t], p.positions[t]);
      std::memcpy(static_cast<uint16_t*>(p.kv.k_cache) + off,
                  static_cast<const uint16_t*>(p.k) + t * stride, 2 * width);
      std::memcpy(static_cast<uint16_t*>(p.kv.v_cache) + off,
                  static_cast<const uint16_t*>(p.v) + t * stride, 2 * width);
    }
    return absl::OkStatus();
  }
  absl::Status PagedAttention(const kernels::PagedAttentionParams& p) override {
    if (!Bf16(p.dtype)) return inner_->PagedAttention(p);
    // The blocks the batch reads, renumbered 0..n-1 into fp32 copies of K and V.
    const kernels::PagedKvLayout& kv = p.kv;
    const int64_t block_elems = int64_t{kv.block_size} * kv.num_kv_heads * kv.head_dim;
    const int32_t table_len = kv.block_table_offsets[kv.num_seqs];
    std::map<int32_t, int32_t> renumber;
    std::vector<int32_t> tables(table_len);
    for (int32_t i = 0; i < table_len; ++i) {
      auto [it, added] =
          renumber.emplace(kv.block_tables[i], static_cast<int32_t>(renumber.size()));
      tables[i] = it->second;
    }
    std::vector<float> k(renumber.size() * block_elems), v(k.size());
    for (const auto& [block, index] : renumber) {
      for (int64_t e = 0; e < block_elems; ++e) {
        k[index * block_elems + e] =
            kernels::Bf16ToF32(static_cast<const uint16_t*>(kv.k_cache)[block * block_elems + e]);
        v[index * block_elems + e] =
            kernels::Bf16ToF32(static_cast<const uint16_t*>(kv.v_cache)[block * block_elems + e]);
      }
    }
    const int64_t q_width = int64_t{p.num_q_heads} * kv.head_dim;
    std::vector<float> q = InRows(p.q, p.num_tokens, q_width, p.q_stride);
    std::vector<float> out(p.num_tokens * q_width);
    kernels::PagedAttentionParams a = p;
    a.kv.k_cache = k.data(), a.kv.v_cache = v.data(), a.kv.block_tables = tables.data();
    a.q = q.data(), a.out = out.data(), a.dtype = kF32, a.q_stride = 0;
    return Out(inner_->PagedAttention(a), out, p.out);
  }
  absl::Status SgmvShrink(const kernels::SgmvShrinkParams& p) override {
    if (!Bf16(p.dtype)) return inner_->SgmvShrink(p);
    std::vector<float> x = In(p.x, RowsReached(p.x_row, Pairs(p)) * p.in);
    std::vector<std::vector<float>> a;
    std::vector<const void*> table = RowTable(p.a_rows, p, p.in, &a);
    kernels::SgmvShrinkParams q = p;
    q.x = x.data(), q.a_rows = table.data(), q.dtype = kF32;
    return inner_->SgmvShrink(q);  // v is fp32 on every backend
  }
  absl::Status SgmvExpandRows(const kernels::SgmvExpandRowsParams& p) override {
    if (!Bf16(p.dtype)) return inner_->SgmvExpandRows(p);
    const int64_t rows = p.y_row == nullptr ? p.num_tokens : RowsReached(p.y_row, p.num_tokens);
    std::vector<float> y = InRows(p.y, rows, p.out, p.y_stride);
    std::vector<std::vector<float>> b;
    std::vector<const void*> table = RowTable(p.b_rows, p, p.out, &b);
    kernels::SgmvExpandRowsParams q = p;
    q.y = y.data(), q.b_rows = table.data(), q.dtype = kF32, q.y_stride = 0;
    absl::Status s = inner_->SgmvExpandRows(q);
    if (s.ok()) StoreRows(y, p.y, rows, p.out, p.y_stride);
    return s;
  }
  absl::Status GatherAdd(const kernels::GatherAddParams& p) override {
    if (!Bf16(p.dtype)) return inner_->GatherAdd(p);
    std::vector<float> x = In(p.x, p.x_rows * p.cols);
    std::vector<float> y = In(p.y, RowsReached(p.y_row, p.rows) * p.cols);
    kernels::GatherAddParams q = p;
    q.x = x.data(), q.y = y.data(), q.dtype = kF32;
    return Out(inner_->GatherAdd(q), y, p.y);
  }
  absl::Status Convert(const kernels::ConvertParams& p) override { return inner_->Convert(p); }
  absl::Status Route(const kernels::RouteParams& p) override { return inner_->Route(p); }
  absl::Status BuildSegments(const kernels::SegmentBuildParams& p) override {
    return inner_->BuildSegments(p);
  }
  absl::Status Sample(const kernels::SampleParams& p) override { return inner_->Sample(p); }
  absl::Status SoftmaxGroups(const kernels::SoftmaxGroupsParams& p) override {
    return inner_->SoftmaxGroups(p);  // fp32
  }
  absl::Status OutputGateScale(const kernels::OutputGateScaleParams& p) override {
    if (!Bf16(p.dtype)) return inner_->OutputGateScale(p);
    std::vector<float> d = In(p.d, p.rows * p.width);
    kernels::OutputGateScaleParams q = p;
    q.d = d.data(), q.dtype = kF32;
    return inner_->OutputGateScale(q);  // logits are fp32 on every backend
  }
  absl::Status Zero(void* dst, size_t bytes) override { return inner_->Zero(dst, bytes); }
  absl::Status MixRouter(const kernels::MixRouterParams& p) override {
    return inner_->MixRouter(p);  // fp32
  }
  absl::Status RankRoute(const kernels::RankRouteParams& p) override {
    return inner_->RankRoute(p);
  }

 private:
  static constexpr kernels::ScalarType kF32 = kernels::ScalarType::kF32;

  explicit Bf16CpuBackend(std::unique_ptr<engine::Backend> inner) : inner_(std::move(inner)) {}

  static bool Bf16(kernels::ScalarType t) { return t == kernels::ScalarType::kBF16; }
  static std::vector<float> In(const void* p, int64_t n) {
    std::vector<float> out(n);
    const auto* h = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::Bf16ToF32(h[i]);
    return out;
  }
  // `rows` rows of `width` elements, `stride` apart (0: dense), as dense fp32; and back.
  static std::vector<float> InRows(const void* p, int64_t rows, int64_t width, int64_t stride) {
    if (stride == 0) stride = width;
    std::vector<float> out(rows * width);
    const auto* h = static_cast<const uint16_t*>(p);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c)
        out[r * width + c] = kernels::Bf16ToF32(h[r * stride + c]);
    }
    return out;
  }
  static void StoreRows(const std::vector<float>& v, void* p, int64_t rows, int64_t width,
                        int64_t stride) {
    if (stride == 0) stride = width;
    auto* h = static_cast<uint16_t*>(p);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) h[r * stride + c] = kernels::F32ToBf16(v[r * width + c]);
    }
  }
  static void Store(const std::vector<float>& v, void* p) {
    auto* h = static_cast<uint16_t*>(p);
    for (size_t i = 0; i < v.size(); ++i) h[i] = kernels::F32ToBf16(v[i]);
  }
  static absl::Status Out(absl::Status s, const std::vector<float>& v, void* p) {
    if (s.ok()) Store(v, p);
    return s;
  }
  // Rows of a buffer that row indices idx[0..n) reach; pairs of a segmented GEMM call.
  static int64_t RowsReached(const int32_t* idx, int64_t n) {
    int64_t rows = 0;
    for (int64_t i = 0; i < n; ++i) rows = std::max<int64_t>(rows, idx[i] + 1);
    return rows;
  }
  template <typename P>
  static int64_t Pairs(const P& p) {
    return p.num_segments == 0 ? 0 : p.seg_start[p.num_segments];
  }
  static int64_t RowOffset(const kernels::PagedKvLayout& kv, int32_t seq, int32_t pos) {
    const int32_t block = kv.block_tables[kv.block_table_offsets[seq] + pos / kv.block_size];
    return (int64_t{block} * kv.block_size + pos % kv.block_size) * kv.num_kv_heads * kv.head_dim;
  }
  // fp32 copies of the rows a segmented GEMM's row table reaches, and a table pointing at them.
  // Only each segment's own rows [seg_row_offset, + seg_rank) are read: a planned pass's table
  // leaves the entries between them (ranks below the table's stride, adapters without a LoRA at
  // a site) null.
  template <typename P>
  static std::vector<const void*> RowTable(const void* const* rows, const P& p, int64_t width,
                                           std::vector<std::vector<float>>* storage) {
    int64_t entries = 0;
    for (int32_t s = 0; s < p.num_segments; ++s) {
      entries = std::max<int64_t>(entries, p.seg_row_offset[s] + p.seg_rank[s]);
    }
    std::vector<const void*> table(entries, nullptr);
    storage->reserve(entries);
    for (int32_t s = 0; s < p.num_segments; ++s) {
      for (int64_t i = p.seg_row_offset[s]; i < p.seg_row_offset[s] + p.seg_rank[s]; ++i) {
        if (table[i] != nullptr) continue;  // shared with an earlier segment
        storage->push_back(In(rows[i], width));
        table[i] = storage->back().data();
      }
    }
    return table;
  }

  std::unique_ptr<engine::Backend> inner_;
};

}  // namespace moleserve::test_util
