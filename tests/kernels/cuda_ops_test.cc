// CUDA kernels against their CPU twins (kernels/cpu, the oracle), same Params structs.
// Tolerances: fp32 max abs error 1e-5 x output scale (rsqrtf/__expf vs libm); bf16 outputs within
// 2^-7 relative (one bf16 rounding of the output, inputs identical on both sides); copies exact.
// Skipped without a CUDA device (ctest label `gpu`).

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/ops.h"
#include "tests/kernels/cuda_device.h"
#include "tests/kernels/random_inputs.h"

namespace moleserve::kernels {
namespace {

uint16_t ToBf16(float f) { return F32ToBf16(f); }
float FromBf16(uint16_t h) { return Bf16ToF32(h); }

using test_util::Random;

// Device copy of host data in the requested dtype; inputs are rounded to bf16 first so both
// implementations see identical values.
class DeviceArray {
 public:
  DeviceArray(std::vector<float>& host, ScalarType dtype) : dtype_(dtype), n_(host.size()) {
    if (dtype == ScalarType::kBF16) {
      std::vector<uint16_t> h(n_);
      for (size_t i = 0; i < n_; ++i) {
        h[i] = ToBf16(host[i]);
        host[i] = FromBf16(h[i]);
      }
      EXPECT_EQ(cudaMalloc(&ptr_, n_ * 2), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(ptr_, h.data(), n_ * 2, cudaMemcpyHostToDevice), cudaSuccess);
    } else {
      EXPECT_EQ(cudaMalloc(&ptr_, n_ * 4), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(ptr_, host.data(), n_ * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  ~DeviceArray() { cudaFree(ptr_); }
  void* get() const { return ptr_; }
  std::vector<float> Download() const {
    std::vector<float> out(n_);
    if (dtype_ == ScalarType::kBF16) {
      std::vector<uint16_t> h(n_);
      EXPECT_EQ(cudaMemcpy(h.data(), ptr_, n_ * 2, cudaMemcpyDeviceToHost), cudaSuccess);
      for (size_t i = 0; i < n_; ++i) out[i] = FromBf16(h[i]);
    } else {
      EXPECT_EQ(cudaMemcpy(out.data(), ptr_, n_ * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    }
    return out;
  }

 private:
  ScalarType dtype_;
  size_t n_;
  void* ptr_ = nullptr;
};

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, ScalarType dtype,
                 float abs_tol_f32) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const float tol = dtype == ScalarType::kBF16 ? std::fabs(want[i]) * 0x1p-7f + 1e-6f
                                                 : abs_tol_f32 * std::max(1.0f, std::fabs(want[i]));
    ASSERT_NEAR(got[i], want[i], tol) << "at " << i;
  }
}

struct Case {
  int64_t rows, cols;
  ScalarType dtype;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.rows << "x" << c.cols << (c.dtype == ScalarType::kBF16 ? " bf16" : " f32");
}
class CudaRowOpsTest : public ::testing::TestWithParam<Case> {};

TEST_P(CudaRowOpsTest, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  auto x = Random(rows * cols, 1, 2.0f), w = Random(cols, 2);
  std::vector<float> y(rows * cols, 0.0f);
  DeviceArray dx(x, dtype), dw(w, dtype), dy(y, dtype);
  ASSERT_EQ(cuda::RmsNorm({.x = dx.get(),
                           .weight = dw.get(),
                           .y = dy.get(),
                           .rows = rows,
                           .cols = cols,
                           .eps = 1e-5f,
                           .dtype = dtype},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> ref(rows * cols);
  ASSERT_EQ(cpu::RmsNorm({.x = x.data(),
                          .weight = w.data(),
                          .y = ref.data(),
                          .rows = rows,
                          .cols = cols,
                          .eps = 1e-5f},
                         nullptr),
            KernelStatus::kOk);
  ExpectClose(dy.Download(), ref, dtype, 1e-5f);
}

// The fused residual add against the CPU twin: the residual stream is the dtype's rounding of
// the sum, bit for bit; the normalised rows within the RmsNorm tolerance.
TEST_P(CudaRowOpsTest, RmsNormWithResidualMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  auto x = Random(rows * cols, 5, 2.0f), w = Random(cols, 6), r = Random(rows * cols, 7, 4.0f);
  std::vector<float> y(rows * cols, 0.0f);
  DeviceArray dx(x, dtype), dw(w, dtype), dy(y, dtype), dr(r, dtype);
  // The CPU side starts from the same (rounded) values.
  x = dx.Download(), w = dw.Download(), r = dr.Download();
  ASSERT_EQ(cuda::RmsNorm({.x = dx.get(),
                           .weight = dw.get(),
                           .y = dy.get(),
                           .rows = rows,
                           .cols = cols,
                           .eps = 1e-5f,
                           .dtype = dtype,
                           .residual = dr.get()},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> sum(rows * cols), ref(rows * cols);
  for (size_t i = 0; i < sum.size(); ++i) {
    sum[i] = r[i] + x[i];
    if (dtype == ScalarType::kBF16) sum[i] = Bf16ToF32(F32ToBf16(sum[i]));
  }
  EXPECT_EQ(dr.Download(), sum);
  ASSERT_EQ(cpu::RmsNorm({.x = sum.data(),
                          .weight = w.data(),
                          .y = ref.data(),
                          .rows = rows,
                          .cols = cols,
                          .eps = 1e-5f},
                         nullptr),
            KernelStatus::kOk);
  ExpectClose(dy.Download(), ref, dtype, 1e-5f);
}

TEST_P(CudaRowOpsTest, SiluMulMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  auto g = Random(rows * cols, 3, 3.0f), u = Random(rows * cols, 4);
  std::vector<float> out(rows * cols, 0.0f);
  DeviceArray dg(g, dtype), du(u, dtype), dout(out, dtype);
  ASSERT_EQ(cuda::SiluMul({.gate = dg.get(),
                           .up = du.get(),
                           .out = dout.get(),
                           .rows = rows,
                           .cols = cols,
                           .dtype = dtype},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> ref(rows * cols);
  ASSERT_EQ(cpu::SiluMul(
                {.gate = g.data(), .up = u.data(), .out = ref.data(), .rows = rows, .cols = cols},
                nullptr),
            KernelStatus::kOk);
  ExpectClose(dout.Download(), ref, dtype, 1e-5f);
}

TEST_P(CudaRowOpsTest, EmbeddingIsExactAndAddMatches) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  const int64_t vocab = 97;
  auto table = Random(vocab * cols, 5);
  std::vector<int32_t> ids(rows);
  for (int64_t i = 0; i < rows; ++i) ids[i] = static_cast<int32_t>((i * 31 + 7) % vocab);
  int32_t* dids = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dids), rows * 4), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dids, ids.data(), rows * 4, cudaMemcpyHostToDevice), cudaSuccess);
  std::vector<float> out(rows * cols, 0.0f);
  DeviceArray dtable(table, dtype), dout(out, dtype);
  ASSERT_EQ(cuda::Embedding({.ids = dids,
                             .table = dtable.get(),
                             .out = dout.get(),
                             .num_tokens = rows,
                             .hidden = cols,
                             .dtype = dtype},
                            nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> ref(rows * cols);
  ASSERT_EQ(cpu::Embedding({.ids = ids.data(),
                            .table = table.data(),
                            .out = ref.data(),
                            .num_tokens = rows,
                            .hidden = cols},
                           nullptr),
            KernelStatus::kOk);
  EXPECT_EQ(dout.Download(), ref);  // a gather is exact
  cudaFree(dids);

  auto a = Random(rows * cols, 6), b = Random(rows * cols, 7);
  std::vector<float> sum(rows * cols, 0.0f);
  DeviceArray da(a, dtype), db(b, dtype), dsum(sum, dtype);
  ASSERT_EQ(
      cuda::Add({.a = da.get(), .b = db.get(), .out = dsum.get(), .n = rows * cols, .dtype = dtype},
                nullptr),
      cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> ref_sum(rows * cols);
  ASSERT_EQ(
      cpu::Add({.a = a.data(), .b = b.data(), .out = ref_sum.data(), .n = rows * cols}, nullptr),
      KernelStatus::kOk);
  ExpectClose(dsum.Download(), ref_sum, dtype, 0.0f);
}

TEST_P(CudaRowOpsTest, BiasAddMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  auto x = Random(rows * cols, 8), b = Random(cols, 9);
  DeviceArray dx(x, dtype), db(b, dtype);
  ASSERT_EQ(
      cuda::BiasAdd({.x = dx.get(), .bias = db.get(), .rows = rows, .cols = cols, .dtype = dtype},
                    nullptr),
      cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ASSERT_EQ(cpu::BiasAdd({.x = x.data(), .bias = b.data(), .rows = rows, .cols = cols}, nullptr),
            KernelStatus::kOk);
  ExpectClose(dx.Download(), x, dtype, 0.0f);
}

TEST_P(CudaRowOpsTest, BiasAddReluMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const auto [rows, cols, dtype] = GetParam();
  for (bool with_bias : {true, false}) {
    auto x = Random(rows * cols, 10), b = Random(cols, 11);
    DeviceArray dx(x, dtype), db(b, dtype);
    ASSERT_EQ(cuda::BiasAdd({.x = dx.get(),
                             .bias = with_bias ? db.get() : nullptr,
                             .rows = rows,
                             .cols = cols,
                             .dtype = dtype,
                             .relu = true},
                            nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cpu::BiasAdd({.x = x.data(),
                            .bias = with_bias ? b.data() : nullptr,
                            .rows = rows,
                            .cols = cols,
                            .relu = true},
                           nullptr),
              KernelStatus::kOk);
    ExpectClose(dx.Download(), x, dtype, 0.0f);
  }
}

INSTANTIATE_TEST_SUITE_P(
    ShapesAndDtypes, CudaRowOpsTest,
    ::testing::Values(Case{1, 1, ScalarType::kF32}, Case{1, 4096, ScalarType::kF32},
                      Case{37, 688, ScalarType::kF32}, Case{128, 5120, ScalarType::kF32},
                      Case{1, 4096, ScalarType::kBF16}, Case{37, 688, ScalarType::kBF16},
                      Case{256, 3584, ScalarType::kBF16}, Case{3, 14336, ScalarType::kBF16}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::to_string(info.param.rows) + "x" + std::to_string(info.param.cols) +
             (info.param.dtype == ScalarType::kBF16 ? "_bf16" : "_f32");
    });

TEST(CudaDispatchTest, UnsupportedDtypeIsInvalidValue) {
  SKIP_WITHOUT_GPU();
  EXPECT_EQ(
      cuda::Add({.a = nullptr, .b = nullptr, .out = nullptr, .n = 4, .dtype = ScalarType::kF16},
                nullptr),
      cudaErrorInvalidValue);
}

// The device sampler against its CPU twin (which sampling_twin_test checks against the host
// sampler). Both use sampling_math.h's order and penalties; the device sums probabilities in
// another order (fixed-order block sums of fp32 exp in double), so: non-finite flags, greedy
// tokens and the alternatives' ids are identical; logprobs within 1e-4; seeded tokens identical
// on at least 97% of rows (a draw that lands within rounding of a boundary may go either way);
// two device runs bit-identical.
TEST(CudaSampleTest, MatchesCpuTwinAndRepeatsExactly) {
  SKIP_WITHOUT_GPU();
  constexpr int32_t kTopN = kMaxSampleTopLogprobs;
  for (int32_t vocab : {7, 1000, 32000}) {
    const int32_t rows = 48;
    std::vector<float> logits = Random(int64_t{rows} * vocab, 11 + vocab, 3.0f);
    for (float& v : logits) v = std::round(v * 8.0f) / 8.0f;  // ties
    logits[5 * vocab + 3] = NAN;                              // row 5 is not finite
    std::vector<SampleRowParams> rp(rows);
    std::vector<int32_t> pids, pcounts, bids;
    std::vector<float> bvalues;
    for (int32_t r = 0; r < rows; ++r) {
      SampleRowParams& p = rp[r];
      p.temperature = r % 3 == 0 ? 0.0f : 0.4f + 0.2f * (r % 5);
      p.top_k = r % 4 == 1 ? 1 + r % 50 : 0;
      p.top_p = r % 5 == 2 ? 0.8f : 1.0f;
      p.min_p = r % 7 == 3 ? 0.1f : 0.0f;
      p.repetition_penalty = r % 6 == 4 ? 1.3f : 1.0f;
      p.frequency_penalty = r % 6 == 4 ? 0.5f : 0.0f;
      p.num_top_logprobs = r % 2 == 0 ? std::min<int32_t>(kTopN, vocab) : 0;
      p.uniform = (r * 0.6180339887) - std::floor(r * 0.6180339887);
      p.penalty_begin = static_cast<int32_t>(pids.size());
      if (p.repetition_penalty != 1.0f) {
        for (int32_t i = 0; i < 5; ++i) {
          pids.push_back((r * 31 + i * 7) % vocab);
          pcounts.push_back(i % 2);
        }
        std::sort(pids.begin() + p.penalty_begin, pids.end());
        pids.erase(std::unique(pids.begin() + p.penalty_begin, pids.end()), pids.end());
        pcounts.resize(pids.size());
      }
      p.penalty_end = static_cast<int32_t>(pids.size());
      // Logit bias on some rows (a ban and a boost), scored rows (a forced prompt token) on
      // others.
      p.bias_begin = static_cast<int32_t>(bids.size());
      if (r % 5 == 1 && vocab > 2) {
        bids.insert(bids.end(), {(r * 17) % vocab, (r * 17 + 1) % vocab});
        bvalues.insert(bvalues.end(), {-100.0f, r % 2 == 0 ? 4.5f : 100.0f});
      }
      p.bias_end = static_cast<int32_t>(bids.size());
      if (r % 8 == 6) p.forced_id = (r * 13) % vocab;
    }
    // CPU twin.
    std::vector<float> work(logits.size());
    std::vector<SampledRow> want(rows);
    std::vector<int32_t> want_ids(rows * kTopN);
    std::vector<float> want_lp(rows * kTopN);
    ASSERT_EQ(cpu::Sample({.logits = logits.data(),
                           .work = work.data(),
                           .row_params = rp.data(),
                           .penalty_ids = pids.data(),
                           .penalty_counts = pcounts.data(),
                           .bias_ids = bids.data(),
                           .bias_values = bvalues.data(),
                           .out = want.data(),
                           .top_ids = want_ids.data(),
                           .top_logprobs = want_lp.data(),
                           .rows = rows,
                           .vocab = vocab},
                          nullptr),
              KernelStatus::kOk);
    // Device, twice.
    std::vector<float> l = logits;
    DeviceArray d_logits(l, ScalarType::kF32);
    void *d_work, *d_rp, *d_pid, *d_pc, *d_bid, *d_bv, *d_out, *d_ids, *d_lp;
    ASSERT_EQ(cudaMalloc(&d_work, logits.size() * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_rp, rows * sizeof(SampleRowParams)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_pid, pids.size() * 4 + 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_pc, pids.size() * 4 + 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_bid, bids.size() * 4 + 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_bv, bids.size() * 4 + 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_out, rows * sizeof(SampledRow)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_ids, rows * kTopN * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&d_lp, rows * kTopN * 4), cudaSuccess);
    cudaMemcpy(d_rp, rp.data(), rows * sizeof(SampleRowParams), cudaMemcpyHostToDevice);
    cudaMemcpy(d_pid, pids.data(), pids.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_pc, pcounts.data(), pcounts.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_bid, bids.data(), bids.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(d_bv, bvalues.data(), bvalues.size() * 4, cudaMemcpyHostToDevice);
    std::vector<SampledRow> got[2] = {std::vector<SampledRow>(rows), std::vector<SampledRow>(rows)};
    std::vector<int32_t> got_ids(rows * kTopN);
    std::vector<float> got_lp(rows * kTopN);
    for (int run = 0; run < 2; ++run) {
      ASSERT_EQ(cuda::Sample({.logits = static_cast<const float*>(d_logits.get()),
                              .work = static_cast<float*>(d_work),
                              .row_params = static_cast<const SampleRowParams*>(d_rp),
                              .penalty_ids = static_cast<const int32_t*>(d_pid),
                              .penalty_counts = static_cast<const int32_t*>(d_pc),
                              .bias_ids = static_cast<const int32_t*>(d_bid),
                              .bias_values = static_cast<const float*>(d_bv),
                              .out = static_cast<SampledRow*>(d_out),
                              .top_ids = static_cast<int32_t*>(d_ids),
                              .top_logprobs = static_cast<float*>(d_lp),
                              .rows = rows,
                              .vocab = vocab},
                             nullptr),
                cudaSuccess);
      ASSERT_EQ(
          cudaMemcpy(got[run].data(), d_out, rows * sizeof(SampledRow), cudaMemcpyDeviceToHost),
          cudaSuccess);
    }
    cudaMemcpy(got_ids.data(), d_ids, got_ids.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(got_lp.data(), d_lp, got_lp.size() * 4, cudaMemcpyDeviceToHost);
    int agree = 0, sampled = 0;
    for (int32_t r = 0; r < rows; ++r) {
      EXPECT_EQ(std::memcmp(&got[0][r], &got[1][r], sizeof(SampledRow)), 0) << "row " << r;
      ASSERT_EQ(got[0][r].finite, want[r].finite) << "row " << r;
      if (!want[r].finite) continue;
      EXPECT_NEAR(got[0][r].logprob, want[r].logprob, 1e-4) << "row " << r;
      ASSERT_EQ(got[0][r].num_top, want[r].num_top);
      for (int32_t j = 0; j < want[r].num_top; ++j) {
        EXPECT_EQ(got_ids[r * kTopN + j], want_ids[r * kTopN + j]) << "row " << r << " #" << j;
        EXPECT_NEAR(got_lp[r * kTopN + j], want_lp[r * kTopN + j], 1e-4);
      }
      if (rp[r].forced_id >= 0) {
        EXPECT_EQ(got[0][r].id, rp[r].forced_id) << "scored row " << r;
        EXPECT_EQ(want[r].id, rp[r].forced_id) << "scored row " << r;
      } else if (rp[r].temperature == 0.0f) {
        EXPECT_EQ(got[0][r].id, want[r].id) << "greedy row " << r;
      } else {
        ++sampled;
        agree += got[0][r].id == want[r].id ? 1 : 0;
      }
    }
    EXPECT_GE(agree, sampled * 97 / 100) << "vocab " << vocab;
    for (void* ptr : {d_work, d_rp, d_pid, d_pc, d_bid, d_bv, d_out, d_ids, d_lp}) cudaFree(ptr);
  }
}

}  // namespace
}  // namespace moleserve::kernels
