// The CUDA segmented GEMM, attention, RoPE, GEMM (cuBLAS), conversion and routing kernels against
// their CPU twins (kernels/cpu), over shapes x ranks x expert counts x dtypes. bf16 inputs are
// rounded to bf16 first so both sides see identical values. Tolerances:
//  - fp32 outputs of fp32 math (SGMV v, attention, RoPE, GEMM with fp32 operands): 1e-5 relative
//    to the sum of |terms| of the output (summation order differs);
//  - bf16 outputs: 2^-6 relative to max(1, |want|) (one bf16 rounding per atomic add of each of
//    the <= 2 contributions, plus the output's own rounding);
//  - routing: identical experts and counts, weights within 1e-6 (expf on the device vs libm).
// Skipped without a CUDA device (ctest label `gpu`).

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/launch_plan.h"
#include "kernels/cpu/ops.h"
#include "kernels/cuda/blas/blas.h"
#include "kernels/cuda/ops.h"
#include "tests/kernels/cuda_device.h"
#include "tests/kernels/random_inputs.h"

namespace moleserve::kernels {
namespace {

using test_util::Random;

// Device memory of raw bytes.
class DeviceBytes {
 public:
  explicit DeviceBytes(size_t bytes) : bytes_(bytes) {
    EXPECT_EQ(cudaMalloc(&ptr_, std::max<size_t>(bytes, 16)), cudaSuccess);
  }
  template <typename T>
  explicit DeviceBytes(const std::vector<T>& host) : DeviceBytes(host.size() * sizeof(T)) {
    EXPECT_EQ(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBytes() { cudaFree(ptr_); }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }
  template <typename T>
  std::vector<T> Download(size_t n) const {
    std::vector<T> out(n);
    EXPECT_EQ(cudaMemcpy(out.data(), ptr_, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  size_t bytes_;
  void* ptr_ = nullptr;
};

// Values in `dtype` on the device; `host` is rounded to bf16 in place for kBF16.
std::unique_ptr<DeviceBytes> Upload(std::vector<float>& host, ScalarType dtype) {
  if (dtype == ScalarType::kF32) return std::make_unique<DeviceBytes>(host);
  std::vector<uint16_t> h(host.size());
  for (size_t i = 0; i < host.size(); ++i) {
    h[i] = F32ToBf16(host[i]);
    host[i] = Bf16ToF32(h[i]);
  }
  return std::make_unique<DeviceBytes>(h);
}
std::vector<float> DownloadAs(const DeviceBytes& d, size_t n, ScalarType dtype) {
  if (dtype == ScalarType::kF32) return d.Download<float>(n);
  std::vector<uint16_t> h = d.Download<uint16_t>(n);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = Bf16ToF32(h[i]);
  return out;
}
size_t ElemBytes(ScalarType t) { return t == ScalarType::kF32 ? 4 : 2; }
const char* DtypeName(ScalarType t) { return t == ScalarType::kF32 ? "f32" : "bf16"; }

void ExpectBf16Close(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 0x1p-6f * std::max(1.0f, std::fabs(want[i]))) << "at " << i;
  }
}

// ---------------------------------------------------------------- segmented GEMM

struct SgmvCase {
  int64_t tokens;
  int32_t experts;
  int32_t rank;
  int64_t in, out;
  ScalarType dtype;
};

class CudaSgmvTest : public ::testing::TestWithParam<SgmvCase> {};

// Tokens routed top-2 over `experts` experts of ranks rank and rank/2 alternating; expert rows
// scattered over a page pool in a shuffled order (as the expert cache places them).
TEST_P(CudaSgmvTest, ShrinkAndExpandMatchCpu) {
  SKIP_WITHOUT_GPU();
  const SgmvCase c = GetParam();
  std::mt19937 rng(static_cast<uint32_t>(c.tokens * 131 + c.experts * 7 + c.rank));
  std::vector<int32_t> ranks(c.experts);
  for (int32_t e = 0; e < c.experts; ++e) ranks[e] = e % 2 == 0 ? c.rank : std::max(1, c.rank / 2);
  const int32_t total_rows = std::accumulate(ranks.begin(), ranks.end(), 0);
  // Page pools: A rows (`in` wide) and B^T rows (`out` wide), in a shuffled order.
  std::vector<float> a_pool = Random(size_t(total_rows) * c.in, 11, 0.05f);
  std::vector<float> b_pool = Random(size_t(total_rows) * c.out, 12, 0.05f);
  auto d_a = Upload(a_pool, c.dtype);
  auto d_b = Upload(b_pool, c.dtype);
  std::vector<int32_t> page(total_rows);
  std::iota(page.begin(), page.end(), 0);
  std::shuffle(page.begin(), page.end(), rng);

  // Pairs: each token to min(2, experts) distinct experts, sorted by expert.
  std::vector<std::vector<std::pair<int32_t, float>>> by_expert(c.experts);
  std::uniform_real_distribution<float> w(0.1f, 1.0f);
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int32_t e0 = static_cast<int32_t>(rng() % c.experts);
    by_expert[e0].push_back({static_cast<int32_t>(t), w(rng)});
    if (c.experts > 1) {
      const int32_t e1 = (e0 + 1 + static_cast<int32_t>(rng() % (c.experts - 1))) % c.experts;
      by_expert[e1].push_back({static_cast<int32_t>(t), w(rng)});
    }
  }
  std::vector<int32_t> x_row, seg_start{0}, seg_rank;
  std::vector<float> weight;
  std::vector<int64_t> seg_off;
  std::vector<const void*> a_host, b_host, a_dev, b_dev;
  int32_t first_row = 0;
  for (int32_t e = 0; e < c.experts; ++e) {
    if (!by_expert[e].empty()) {
      seg_off.push_back(static_cast<int64_t>(a_host.size()));
      for (int32_t i = 0; i < ranks[e]; ++i) {
        const int64_t p = page[first_row + i];
        a_host.push_back(a_pool.data() + p * c.in);
        b_host.push_back(b_pool.data() + p * c.out);
        a_dev.push_back(d_a->get<char>() + p * c.in * ElemBytes(c.dtype));
        b_dev.push_back(d_b->get<char>() + p * c.out * ElemBytes(c.dtype));
      }
      for (auto [t, wt] : by_expert[e]) {
        x_row.push_back(t);
        weight.push_back(wt);
      }
      seg_start.push_back(static_cast<int32_t>(x_row.size()));
      seg_rank.push_back(ranks[e]);
    }
    first_row += ranks[e];
  }
  const int32_t segments = static_cast<int32_t>(seg_rank.size());
  const int64_t pairs = static_cast<int64_t>(x_row.size());
  const int32_t v_stride = c.rank;
  // The expand's per-token tables: each token's pairs (at most 2), in pair order.
  constexpr int32_t kStride = 2;
  std::vector<int32_t> token_pair(c.tokens * kStride, 0), token_count(c.tokens, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    token_pair[x_row[p] * kStride + token_count[x_row[p]]++] = static_cast<int32_t>(p);
  }

  std::vector<float> x = Random(c.tokens * c.in, 13);
  std::vector<float> y0 = Random(c.tokens * c.out, 14);
  auto d_x = Upload(x, c.dtype);
  auto d_y = Upload(y0, c.dtype);
  DeviceBytes d_xrow(x_row), d_start(seg_start), d_rank(seg_rank), d_off(seg_off), d_w(weight),
      d_arows(a_dev), d_brows(b_dev), d_v(pairs * v_stride * sizeof(float)), d_tpair(token_pair),
      d_tcount(token_count);
  ASSERT_EQ(cudaMemset(d_v.get(), 0, pairs * v_stride * sizeof(float)), cudaSuccess);

  SgmvShrinkParams shrink{.x = d_x->get(),
                          .v = d_v.get<float>(),
                          .x_row = d_xrow.get<int32_t>(),
                          .seg_start = d_start.get<int32_t>(),
                          .seg_rank = d_rank.get<int32_t>(),
                          .seg_row_offset = d_off.get<int64_t>(),
                          .a_rows = d_arows.get<const void*>(),
                          .num_segments = segments,
                          .in = c.in,
                          .v_stride = v_stride,
                          .dtype = c.dtype};
  ASSERT_EQ(cuda::SgmvShrink(shrink, nullptr), cudaSuccess);
  SgmvExpandRowsParams expand{.v = d_v.get<float>(),
                              .y = d_y->get(),
                              .token_pair = d_tpair.get<int32_t>(),
                              .count = d_tcount.get<int32_t>(),
                              .weight = d_w.get<float>(),
                              .seg_start = d_start.get<int32_t>(),
                              .seg_rank = d_rank.get<int32_t>(),
                              .seg_row_offset = d_off.get<int64_t>(),
                              .b_rows = d_brows.get<const void*>(),
                              .num_tokens = c.tokens,
                              .pair_stride = kStride,
                              .num_segments = segments,
                              .out = c.out,
                              .v_stride = v_stride,
                              .dtype = c.dtype};
  ASSERT_EQ(cuda::SgmvExpandRows(expand, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  // CPU twin, fp32 on the same (rounded) values.
  std::vector<float> v_ref(pairs * v_stride, 0.0f), y_ref = y0;
  SgmvShrinkParams cs = shrink;
  cs.x = x.data();
  cs.v = v_ref.data();
  cs.x_row = x_row.data();
  cs.seg_start = seg_start.data();
  cs.seg_rank = seg_rank.data();
  cs.seg_row_offset = seg_off.data();
  cs.a_rows = a_host.data();
  cs.dtype = ScalarType::kF32;
  ASSERT_EQ(cpu::SgmvShrink(cs, nullptr), KernelStatus::kOk);
  SgmvExpandRowsParams ce = expand;
  ce.v = v_ref.data();
  ce.y = y_ref.data();
  ce.token_pair = token_pair.data();
  ce.count = token_count.data();
  ce.weight = weight.data();
  ce.seg_start = seg_start.data();
  ce.seg_rank = seg_rank.data();
  ce.seg_row_offset = seg_off.data();
  ce.b_rows = b_host.data();
  ce.dtype = ScalarType::kF32;
  ASSERT_EQ(cpu::SgmvExpandRows(ce, nullptr), KernelStatus::kOk);

  const std::vector<float> v = d_v.Download<float>(pairs * v_stride);
  for (int32_t s = 0; s < segments; ++s) {
    for (int32_t p = seg_start[s]; p < seg_start[s + 1]; ++p) {
      for (int32_t i = 0; i < seg_rank[s]; ++i) {
        const float* a = static_cast<const float*>(a_host[seg_off[s] + i]);
        double mag = 0.0;
        for (int64_t k = 0; k < c.in; ++k) mag += std::fabs(a[k] * x[x_row[p] * c.in + k]);
        ASSERT_NEAR(v[p * v_stride + i], v_ref[p * v_stride + i], 1e-5 * mag + 1e-7)
            << "pair " << p << " rank row " << i;
      }
    }
  }
  // Split-K (bf16 on tensor cores, launch_plan.h PlanSgmvShrinkTiles): with scratch and a device
  // size the short calls split `in` over blocks; the same tolerance, and two runs bit for bit.
  const int64_t scratch_floats = int64_t{kMaxShrinkSplits} * pairs * v_stride;
  DeviceBytes scratch(scratch_floats * sizeof(float));
  SgmvShrinkParams split = shrink;
  split.max_pairs = static_cast<int32_t>(pairs);
  split.split_workspace = scratch.get<float>();
  split.split_workspace_floats = scratch_floats;
  split.num_sms = 132;
  std::vector<std::vector<float>> split_runs;
  for (int run = 0; run < 2; ++run) {
    DeviceBytes d_v2(pairs * v_stride * sizeof(float));
    ASSERT_EQ(cudaMemset(d_v2.get(), 0, pairs * v_stride * sizeof(float)), cudaSuccess);
    split.v = d_v2.get<float>();
    ASSERT_EQ(cuda::SgmvShrink(split, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    split_runs.push_back(d_v2.Download<float>(pairs * v_stride));
  }
  EXPECT_EQ(split_runs[0], split_runs[1]) << "split-K shrink differs between two runs";
  const LaunchPlan tiles = PlanSgmvShrinkTiles(segments, v_stride, c.in, ElemBytes(c.dtype),
                                               d_x->get(), 132, split.max_pairs, scratch_floats);
  if (c.dtype == ScalarType::kBF16 && c.in % 8 == 0 && c.tokens <= 64) {
    EXPECT_GT(tiles.grid.z, 1u) << "this case should exercise the split";
  }
  for (int32_t s = 0; s < segments; ++s) {
    for (int32_t p = seg_start[s]; p < seg_start[s + 1]; ++p) {
      for (int32_t i = 0; i < v_stride; ++i) {
        if (i >= seg_rank[s]) {  // columns past the rank are left untouched
          ASSERT_EQ(split_runs[0][p * v_stride + i], 0.0f);
          continue;
        }
        const float* a = static_cast<const float*>(a_host[seg_off[s] + i]);
        double mag = 0.0;
        for (int64_t k = 0; k < c.in; ++k) mag += std::fabs(a[k] * x[x_row[p] * c.in + k]);
        ASSERT_NEAR(split_runs[0][p * v_stride + i], v_ref[p * v_stride + i], 1e-5 * mag + 1e-7)
            << "split: pair " << p << " rank row " << i;
      }
    }
  }

  const std::vector<float> y = DownloadAs(*d_y, y0.size(), c.dtype);
  if (c.dtype == ScalarType::kBF16) {
    ExpectBf16Close(y, y_ref);
  } else {
    for (size_t i = 0; i < y.size(); ++i) {
      ASSERT_NEAR(y[i], y_ref[i], 1e-5f * std::max(1.0f, std::fabs(y_ref[i]))) << "at " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(ShapesRanksExperts, CudaSgmvTest,
                         ::testing::Values(SgmvCase{1, 1, 16, 4096, 4096, ScalarType::kBF16},
                                           SgmvCase{1, 8, 8, 4096, 11008, ScalarType::kBF16},
                                           SgmvCase{7, 4, 16, 896, 4864, ScalarType::kBF16},
                                           SgmvCase{64, 64, 16, 4096, 4096, ScalarType::kBF16},
                                           SgmvCase{256, 8, 64, 4096, 1024, ScalarType::kBF16},
                                           SgmvCase{33, 16, 128, 3584, 18944, ScalarType::kBF16},
                                           SgmvCase{3, 2, 256, 1024, 512, ScalarType::kBF16},
                                           SgmvCase{17, 2, 1, 2048, 64, ScalarType::kBF16},
                                           SgmvCase{5, 3, 32, 4100, 4098,
                                                    ScalarType::kBF16},  // unaligned widths
                                           SgmvCase{1, 1, 8, 4096, 4096, ScalarType::kF32},
                                           SgmvCase{64, 16, 64, 2048, 8192, ScalarType::kF32},
                                           SgmvCase{9, 5, 128, 1001, 333, ScalarType::kF32}),
                         [](const ::testing::TestParamInfo<SgmvCase>& info) {
                           const SgmvCase& c = info.param;
                           return "t" + std::to_string(c.tokens) + "_e" +
                                  std::to_string(c.experts) + "_r" + std::to_string(c.rank) + "_" +
                                  std::to_string(c.in) + "x" + std::to_string(c.out) + "_" +
                                  DtypeName(c.dtype);
                         });

TEST(CudaSgmvTest, GatherAddMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (ScalarType dtype : {ScalarType::kF32, ScalarType::kBF16}) {
    const int64_t rows = 50, cols = 4864, targets = 20;
    std::vector<float> x = Random(rows * cols, 21), y0 = Random(targets * cols, 22);
    std::vector<float> w = Random(rows, 23);
    // Target row g (of 20, in reverse) sums x rows g, g + 20, g + 40 (those below 50).
    constexpr int32_t kStride = 3;
    std::vector<int32_t> y_row(targets), src(targets * kStride, 0), count(targets, 0);
    for (int64_t g = 0; g < targets; ++g) {
      y_row[g] = static_cast<int32_t>(targets - 1 - g);
      for (int64_t r = g; r < rows; r += targets) {
        src[g * kStride + count[g]++] = static_cast<int32_t>(r);
      }
    }
    auto dx = Upload(x, dtype);
    auto dy = Upload(y0, dtype);
    DeviceBytes dr(y_row), ds(src), dc(count), dw(w);
    GatherAddParams p{.x = dx->get(),
                      .y = dy->get(),
                      .y_row = dr.get<int32_t>(),
                      .src = ds.get<int32_t>(),
                      .count = dc.get<int32_t>(),
                      .weight = dw.get<float>(),
                      .rows = targets,
                      .src_stride = kStride,
                      .x_rows = rows,
                      .cols = cols,
                      .dtype = dtype};
    ASSERT_EQ(cuda::GatherAdd(p, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> ref = y0;
    p.x = x.data(), p.y = ref.data(), p.y_row = y_row.data(), p.src = src.data();
    p.count = count.data(), p.weight = w.data(), p.dtype = ScalarType::kF32;
    ASSERT_EQ(cpu::GatherAdd(p, nullptr), KernelStatus::kOk);
    const std::vector<float> got = DownloadAs(*dy, ref.size(), dtype);
    // Up to 3 rows add into each target, summed in fp32: one bf16 rounding of values around 3
    // (and the inputs' own rounding).
    for (size_t i = 0; i < got.size(); ++i) {
      const float tol = dtype == ScalarType::kBF16 ? 0x1p-5f * std::max(1.0f, std::fabs(ref[i]))
                                                   : 1e-5f * std::max(1.0f, std::fabs(ref[i]));
      ASSERT_NEAR(got[i], ref[i], tol) << DtypeName(dtype) << " at " << i;
    }
  }
}

// ---------------------------------------------------------------- attention

struct AttentionCase {
  int32_t q_heads, kv_heads, head_dim, block_size, sliding_window;
  ScalarType dtype;
};
class CudaAttentionTest : public ::testing::TestWithParam<AttentionCase> {};

// Three sequences: a 70-token prefill, a decode at position 300 and a chunked prefill of 9 tokens
// at 120..128, block tables shuffled over the pool. KvWrite then PagedAttention on both sides.
TEST_P(CudaAttentionTest, KvWriteAndPagedAttentionMatchCpu) {
  SKIP_WITHOUT_GPU();
  const AttentionCase c = GetParam();
  const int32_t bs = c.block_size;
  const std::vector<std::pair<int32_t, int32_t>> seqs = {{0, 70}, {300, 1}, {120, 9}};  // start,n
  std::vector<int32_t> token_seq, positions, tables, offsets{0};
  int32_t next_block = 0;
  std::vector<int32_t> perm(4096);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(3));
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto [start, n] = seqs[s];
    for (int32_t i = 0; i < n; ++i) {
      token_seq.push_back(static_cast<int32_t>(s));
      positions.push_back(start + i);
    }
    const int32_t blocks = (start + n + bs - 1) / bs;
    for (int32_t b = 0; b < blocks; ++b) tables.push_back(perm[next_block++]);
    offsets.push_back(static_cast<int32_t>(tables.size()));
  }
  const int32_t num_blocks = *std::max_element(tables.begin(), tables.end()) + 1;
  const int64_t t = static_cast<int64_t>(positions.size());
  const int64_t kvw = int64_t{c.kv_heads} * c.head_dim, qw = int64_t{c.q_heads} * c.head_dim;
  const int64_t cache_elems = int64_t{num_blocks} * bs * kvw;
  // The history before each sequence's first new token is written first (as earlier steps
  // would have), the new tokens by the KvWrite under test.
  std::vector<float> k_cache = Random(cache_elems, 31), v_cache = Random(cache_elems, 32);
  std::vector<float> q = Random(t * qw, 33), k = Random(t * kvw, 34), v = Random(t * kvw, 35);
  auto dkc = Upload(k_cache, c.dtype);
  auto dvc = Upload(v_cache, c.dtype);
  auto dq = Upload(q, c.dtype);
  auto dk = Upload(k, c.dtype);
  auto dv = Upload(v, c.dtype);
  std::vector<float> out0(t * qw, 0.0f);
  auto dout = Upload(out0, c.dtype);
  DeviceBytes dseq(token_seq), dpos(positions), dtab(tables), doff(offsets);
  PagedKvLayout kv{.k_cache = dkc->get(),
                   .v_cache = dvc->get(),
                   .block_tables = dtab.get<int32_t>(),
                   .block_table_offsets = doff.get<int32_t>(),
                   .num_seqs = static_cast<int32_t>(seqs.size()),
                   .block_size = bs,
                   .num_kv_heads = c.kv_heads,
                   .head_dim = c.head_dim};
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  ASSERT_EQ(cuda::KvWrite({.kv = kv,
                           .k = dk->get(),
                           .v = dv->get(),
                           .token_seq = dseq.get<int32_t>(),
                           .positions = dpos.get<int32_t>(),
                           .num_tokens = t,
                           .dtype = c.dtype},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::PagedAttention({.kv = kv,
                                  .q = dq->get(),
                                  .out = dout->get(),
                                  .token_seq = dseq.get<int32_t>(),
                                  .positions = dpos.get<int32_t>(),
                                  .num_tokens = t,
                                  .num_q_heads = c.q_heads,
                                  .scale = scale,
                                  .sliding_window = c.sliding_window,
                                  .dtype = c.dtype},
                                 nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  PagedKvLayout hkv = kv;
  hkv.k_cache = k_cache.data();
  hkv.v_cache = v_cache.data();
  hkv.block_tables = tables.data();
  hkv.block_table_offsets = offsets.data();
  ASSERT_EQ(cpu::KvWrite({.kv = hkv,
                          .k = k.data(),
                          .v = v.data(),
                          .token_seq = token_seq.data(),
                          .positions = positions.data(),
                          .num_tokens = t},
                         nullptr),
            KernelStatus::kOk);
  std::vector<float> ref(t * qw);
  ASSERT_EQ(cpu::PagedAttention({.kv = hkv,
                                 .q = q.data(),
                                 .out = ref.data(),
                                 .token_seq = token_seq.data(),
                                 .positions = positions.data(),
                                 .num_tokens = t,
                                 .num_q_heads = c.q_heads,
                                 .scale = scale,
                                 .sliding_window = c.sliding_window},
                                nullptr),
            KernelStatus::kOk);
  // The cache itself: KvWrite is a copy, exact.
  EXPECT_EQ(DownloadAs(*dkc, cache_elems, c.dtype), k_cache);
  EXPECT_EQ(DownloadAs(*dvc, cache_elems, c.dtype), v_cache);
  const std::vector<float> got = DownloadAs(*dout, ref.size(), c.dtype);
  for (size_t i = 0; i < got.size(); ++i) {
    // Outputs are convex combinations of V rows (|v| <~ 4): fp32 1e-5, bf16 one rounding.
    const float tol = c.dtype == ScalarType::kBF16 ? 0x1p-7f * std::max(1.0f, std::fabs(ref[i]))
                                                   : 1e-5f * std::max(1.0f, std::fabs(ref[i]));
    ASSERT_NEAR(got[i], ref[i], tol) << "at " << i;
  }

  // The three sequences' last tokens alone, as a decode step: 3 tokens x KV heads blocks leave a
  // 132-SM device idle, so with scratch the keys are split (PlanGroupedAttention) and merged in
  // split order. Same tolerance against the CPU; two runs bit for bit; the unsplit kernel agrees.
  const std::vector<size_t> last = {69, 70, 79};
  std::vector<int32_t> dec_seq, dec_pos;
  std::vector<float> dec_q;
  for (size_t i : last) {
    dec_seq.push_back(token_seq[i]);
    dec_pos.push_back(positions[i]);
    dec_q.insert(dec_q.end(), q.begin() + static_cast<int64_t>(i) * qw,
                 q.begin() + static_cast<int64_t>(i + 1) * qw);
  }
  const int64_t n = static_cast<int64_t>(last.size());
  auto ddq = Upload(dec_q, c.dtype);
  DeviceBytes ddseq(dec_seq), ddpos(dec_pos);
  const int64_t scratch_floats =
      AttentionSplitFloats(kMaxAttentionSplits, n, c.q_heads, c.head_dim);
  DeviceBytes scratch(scratch_floats * sizeof(float));
  std::vector<float> zeros(n * qw, 0.0f);
  std::vector<std::vector<float>> runs;
  for (int32_t num_sms : {132, 132, 0}) {
    auto dout2 = Upload(zeros, c.dtype);
    ASSERT_EQ(cuda::PagedAttention({.kv = kv,
                                    .q = ddq->get(),
                                    .out = dout2->get(),
                                    .token_seq = ddseq.get<int32_t>(),
                                    .positions = ddpos.get<int32_t>(),
                                    .num_tokens = n,
                                    .num_q_heads = c.q_heads,
                                    .scale = scale,
                                    .sliding_window = c.sliding_window,
                                    .dtype = c.dtype,
                                    .split_workspace = scratch.get<float>(),
                                    .split_workspace_floats = scratch_floats,
                                    .num_sms = num_sms},
                                   nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    runs.push_back(DownloadAs(*dout2, zeros.size(), c.dtype));
  }
  EXPECT_EQ(runs[0], runs[1]) << "split-KV attention differs between two runs";
  for (size_t r = 0; r < runs.size(); ++r) {
    for (int64_t i = 0; i < n * qw; ++i) {
      const float want = ref[last[i / qw] * qw + i % qw];
      const float tol = c.dtype == ScalarType::kBF16 ? 0x1p-7f * std::max(1.0f, std::fabs(want))
                                                     : 1e-5f * std::max(1.0f, std::fabs(want));
      ASSERT_NEAR(runs[r][i], want, tol) << "run " << r << " at " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Heads, CudaAttentionTest,
    ::testing::Values(AttentionCase{32, 8, 128, 16, 0, ScalarType::kBF16},   // Llama 3 / Mistral
                      AttentionCase{32, 32, 128, 16, 0, ScalarType::kBF16},  // Llama 2 (MHA)
                      AttentionCase{14, 2, 64, 16, 0, ScalarType::kBF16},    // Qwen2-0.5B
                      AttentionCase{8, 4, 32, 8, 0, ScalarType::kF32},       // demo model
                      AttentionCase{8, 2, 256, 16, 0, ScalarType::kF32},
                      AttentionCase{8, 8, 80, 32, 0, ScalarType::kF32},
                      AttentionCase{28, 4, 128, 16, 0, ScalarType::kBF16},    // Qwen2-7B (7)
                      AttentionCase{64, 8, 128, 16, 0, ScalarType::kF32},     // 70B group, fp32
                      AttentionCase{32, 8, 128, 16, 64, ScalarType::kBF16}),  // sliding window
    [](const ::testing::TestParamInfo<AttentionCase>& info) {
      const AttentionCase& c = info.param;
      return "q" + std::to_string(c.q_heads) + "_kv" + std::to_string(c.kv_heads) + "_d" +
             std::to_string(c.head_dim) + "_bs" + std::to_string(c.block_size) + "_w" +
             std::to_string(c.sliding_window) + "_" + DtypeName(c.dtype);
    });

// ---------------------------------------------------------------- RoPE, GEMM, conversion

TEST(CudaElementwiseTest, RopeMatchesCpuIncludingLargePositions) {
  SKIP_WITHOUT_GPU();
  for (ScalarType dtype : {ScalarType::kF32, ScalarType::kBF16}) {
    const int64_t t = 6;
    const int32_t hq = 8, hkv = 2, d = 128;
    std::vector<int32_t> pos = {0, 1, 17, 4095, 65536, 131071};
    std::vector<float> inv_freq(d / 2);
    for (int i = 0; i < d / 2; ++i) {
      inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / d));  // llama3 base
    }
    std::vector<float> q = Random(t * hq * d, 41), k = Random(t * hkv * d, 42);
    auto dq = Upload(q, dtype);
    auto dk = Upload(k, dtype);
    DeviceBytes dpos(pos), dfreq(inv_freq);
    ASSERT_EQ(cuda::Rope({.q = dq->get(),
                          .k = dk->get(),
                          .positions = dpos.get<int32_t>(),
                          .inv_freq = dfreq.get<float>(),
                          .num_tokens = t,
                          .num_q_heads = hq,
                          .num_kv_heads = hkv,
                          .head_dim = d,
                          .dtype = dtype},
                         nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cpu::Rope({.q = q.data(),
                         .k = k.data(),
                         .positions = pos.data(),
                         .inv_freq = inv_freq.data(),
                         .num_tokens = t,
                         .num_q_heads = hq,
                         .num_kv_heads = hkv,
                         .head_dim = d},
                        nullptr),
              KernelStatus::kOk);
    for (auto [dev, ref] : {std::pair{dq.get(), &q}, std::pair{dk.get(), &k}}) {
      const std::vector<float> got = DownloadAs(*dev, ref->size(), dtype);
      for (size_t i = 0; i < got.size(); ++i) {
        const float tol = dtype == ScalarType::kBF16
                              ? 0x1p-7f * std::max(1.0f, std::fabs((*ref)[i]))
                              : 1e-5f * std::max(1.0f, std::fabs((*ref)[i]));
        ASSERT_NEAR(got[i], (*ref)[i], tol) << DtypeName(dtype) << " at " << i;
      }
    }
  }
}

// RoPE fused into the cache write against the CPU twin (Rope then KvWrite on the same rounded
// inputs): rotated q in place and the rotated k and the v in the cache (the angles at large
// positions: RopeMatchesCpuIncludingLargePositions). fp32 within 1e-5 relative, bf16 within its
// rounding (one bf16 ulp).
TEST(CudaElementwiseTest, RopeFusedIntoKvWriteMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (ScalarType dtype : {ScalarType::kF32, ScalarType::kBF16}) {
    const int32_t hq = 8, hkv = 2, d = 128, bs = 16;
    const std::vector<int32_t> pos = {0, 1, 5, 9, 14, 15};  // rows of one block each
    const int64_t t = static_cast<int64_t>(pos.size());
    const int64_t width = int64_t{hq + 2 * hkv} * d;
    std::vector<int32_t> seq(t), tables, offsets = {0};
    for (int64_t i = 0; i < t; ++i) {  // one sequence per token, one block each
      seq[i] = static_cast<int32_t>(i);
      tables.push_back(static_cast<int32_t>(i));
      offsets.push_back(static_cast<int32_t>(i + 1));
    }
    std::vector<float> inv_freq(d / 2);
    for (int i = 0; i < d / 2; ++i) {
      inv_freq[i] = static_cast<float>(std::pow(500000.0, -2.0 * i / d));
    }
    std::vector<float> qkv = Random(t * width, 43);
    const int64_t cache = t * bs * hkv * d;
    std::vector<float> kc(cache, 0.0f), vc(cache, 0.0f);
    auto dqkv = Upload(qkv, dtype);
    auto dkc = Upload(kc, dtype);
    auto dvc = Upload(vc, dtype);
    DeviceBytes dpos(pos), dfreq(inv_freq), dseq(seq), dtab(tables), doff(offsets);
    const int64_t es = dtype == ScalarType::kF32 ? 4 : 2;
    char* base = dqkv->get<char>();
    const PagedKvLayout dkv{.k_cache = dkc->get(),
                            .v_cache = dvc->get(),
                            .block_tables = dtab.get<int32_t>(),
                            .block_table_offsets = doff.get<int32_t>(),
                            .num_seqs = static_cast<int32_t>(t),
                            .block_size = bs,
                            .num_kv_heads = hkv,
                            .head_dim = d};
    ASSERT_EQ(cuda::KvWrite({.kv = dkv,
                             .k = base + hq * d * es,
                             .v = base + (hq + hkv) * d * es,
                             .token_seq = dseq.get<int32_t>(),
                             .positions = dpos.get<int32_t>(),
                             .num_tokens = t,
                             .dtype = dtype,
                             .kv_stride = width,
                             .rope_inv_freq = dfreq.get<float>(),
                             .q = base,
                             .num_q_heads = hq,
                             .q_stride = width},
                            nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const PagedKvLayout kv{.k_cache = kc.data(),
                           .v_cache = vc.data(),
                           .block_tables = tables.data(),
                           .block_table_offsets = offsets.data(),
                           .num_seqs = static_cast<int32_t>(t),
                           .block_size = bs,
                           .num_kv_heads = hkv,
                           .head_dim = d};
    ASSERT_EQ(cpu::KvWrite({.kv = kv,
                            .k = qkv.data() + hq * d,
                            .v = qkv.data() + (hq + hkv) * d,
                            .token_seq = seq.data(),
                            .positions = pos.data(),
                            .num_tokens = t,
                            .kv_stride = width,
                            .rope_inv_freq = inv_freq.data(),
                            .q = qkv.data(),
                            .num_q_heads = hq,
                            .q_stride = width},
                           nullptr),
              KernelStatus::kOk);
    for (auto [dev, ref] :
         {std::pair{dqkv.get(), &qkv}, std::pair{dkc.get(), &kc}, std::pair{dvc.get(), &vc}}) {
      const std::vector<float> got = DownloadAs(*dev, ref->size(), dtype);
      for (size_t i = 0; i < got.size(); ++i) {
        const float tol = dtype == ScalarType::kBF16
                              ? 0x1p-7f * std::max(1.0f, std::fabs((*ref)[i]))
                              : 1e-5f * std::max(1.0f, std::fabs((*ref)[i]));
        ASSERT_NEAR(got[i], (*ref)[i], tol) << DtypeName(dtype) << " at " << i;
      }
    }
  }
}

// The fused q|k|v and gate|up projections: each op given strided columns of the fused rows gives
// the bits it gives on dense copies of them (same kernel, same inputs), on the device, and leaves
// the other columns alone. (Dense against the CPU twin: the tests above.)
TEST(CudaElementwiseTest, FusedProjectionStridesGiveTheDenseBits) {
  SKIP_WITHOUT_GPU();
  const ScalarType bf16 = ScalarType::kBF16;
  const int32_t nq = 8, nkv = 2, d = 64, bs = 16;
  const int64_t t = 5, qw = nq * d, kvw = nkv * d, w = qw + 2 * kvw, inter = 96;
  std::vector<float> fused = Random(t * w, 51);
  auto dfused = Upload(fused, bf16);  // rounds `fused` to bf16 values
  auto columns = [&](int64_t first, int64_t width) {
    std::vector<float> out(t * width);
    for (int64_t r = 0; r < t; ++r) {
      std::copy_n(fused.begin() + r * w + first, width, out.begin() + r * width);
    }
    return out;
  };
  std::vector<float> q = columns(0, qw), k = columns(qw, kvw), v = columns(qw + kvw, kvw);
  auto dq = Upload(q, bf16);
  auto dk = Upload(k, bf16);
  auto dv = Upload(v, bf16);
  const std::vector<int32_t> pos = {0, 1, 2, 3, 4}, seq(t, 0), table = {3, 1}, offsets = {0, 2};
  std::vector<float> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) inv_freq[i] = static_cast<float>(std::pow(1e4, -2.0 * i / d));
  DeviceBytes dpos(pos), dseq(seq), dtable(table), doffsets(offsets), dfreq(inv_freq);
  char* f = dfused->get<char>();
  RopeParams rope{.positions = dpos.get<int32_t>(),
                  .inv_freq = dfreq.get<float>(),
                  .num_tokens = t,
                  .num_q_heads = nq,
                  .num_kv_heads = nkv,
                  .head_dim = d,
                  .dtype = bf16};
  RopeParams dense = rope, strided = rope;
  dense.q = dq->get(), dense.k = dk->get();
  strided.q = f, strided.k = f + qw * 2, strided.q_stride = w, strided.k_stride = w;
  ASSERT_EQ(cuda::Rope(dense, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::Rope(strided, nullptr), cudaSuccess);
  // KV write and attention over 4 blocks of the cache, dense and strided into separate caches.
  const int64_t cache_elems = 4 * bs * kvw;
  DeviceBytes kc1(cache_elems * 2), vc1(cache_elems * 2), kc2(cache_elems * 2),
      vc2(cache_elems * 2);
  PagedKvLayout kv{.block_tables = dtable.get<int32_t>(),
                   .block_table_offsets = doffsets.get<int32_t>(),
                   .num_seqs = 1,
                   .block_size = bs,
                   .num_kv_heads = nkv,
                   .head_dim = d};
  PagedKvLayout kv1 = kv, kv2 = kv;
  kv1.k_cache = kc1.get(), kv1.v_cache = vc1.get(), kv2.k_cache = kc2.get(),
  kv2.v_cache = vc2.get();
  ASSERT_EQ(cuda::KvWrite({.kv = kv1,
                           .k = dk->get(),
                           .v = dv->get(),
                           .token_seq = dseq.get<int32_t>(),
                           .positions = dpos.get<int32_t>(),
                           .num_tokens = t,
                           .dtype = bf16},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::KvWrite({.kv = kv2,
                           .k = f + qw * 2,
                           .v = f + (qw + kvw) * 2,
                           .token_seq = dseq.get<int32_t>(),
                           .positions = dpos.get<int32_t>(),
                           .num_tokens = t,
                           .dtype = bf16,
                           .kv_stride = w},
                          nullptr),
            cudaSuccess);
  DeviceBytes out1(t * qw * 2), out2(t * qw * 2);
  PagedAttentionParams attn{.token_seq = dseq.get<int32_t>(),
                            .positions = dpos.get<int32_t>(),
                            .num_tokens = t,
                            .num_q_heads = nq,
                            .scale = 0.125f,
                            .dtype = bf16};
  PagedAttentionParams a1 = attn, a2 = attn;
  a1.kv = kv1, a1.q = dq->get(), a1.out = out1.get();
  a2.kv = kv2, a2.q = f, a2.out = out2.get(), a2.q_stride = w;
  ASSERT_EQ(cuda::PagedAttention(a1, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::PagedAttention(a2, nullptr), cudaSuccess);
  // SwiGLU over gate|up halves and the embedding gather from the up half.
  std::vector<float> gate_up = Random(t * 2 * inter, 52);
  auto dgu = Upload(gate_up, bf16);
  std::vector<float> gate(t * inter), up(t * inter);
  for (int64_t r = 0; r < t; ++r) {
    std::copy_n(gate_up.begin() + r * 2 * inter, inter, gate.begin() + r * inter);
    std::copy_n(gate_up.begin() + r * 2 * inter + inter, inter, up.begin() + r * inter);
  }
  auto dgate = Upload(gate, bf16);
  auto dup = Upload(up, bf16);
  DeviceBytes act1(t * inter * 2), act2(t * inter * 2), emb1(3 * inter * 2), emb2(3 * inter * 2);
  const std::vector<int32_t> ids = {4, 0, 2};
  DeviceBytes dids(ids);
  char* gu = dgu->get<char>();
  ASSERT_EQ(cuda::SiluMul({.gate = dgate->get(),
                           .up = dup->get(),
                           .out = act1.get(),
                           .rows = t,
                           .cols = inter,
                           .dtype = bf16},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::SiluMul({.gate = gu,
                           .up = gu + inter * 2,
                           .out = act2.get(),
                           .rows = t,
                           .cols = inter,
                           .dtype = bf16,
                           .in_stride = 2 * inter},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::Embedding({.ids = dids.get<int32_t>(),
                             .table = dup->get(),
                             .out = emb1.get(),
                             .num_tokens = 3,
                             .hidden = inter,
                             .dtype = bf16},
                            nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::Embedding({.ids = dids.get<int32_t>(),
                             .table = gu + inter * 2,
                             .out = emb2.get(),
                             .num_tokens = 3,
                             .hidden = inter,
                             .dtype = bf16,
                             .table_stride = 2 * inter},
                            nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> fused_after = dfused->Download<uint16_t>(t * w);
  const std::vector<uint16_t> q_after = dq->Download<uint16_t>(t * qw);
  const std::vector<uint16_t> k_after = dk->Download<uint16_t>(t * kvw);
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t c = 0; c < w; ++c) {
      const uint16_t want = c < qw         ? q_after[r * qw + c]
                            : c < qw + kvw ? k_after[r * kvw + c - qw]
                                           : F32ToBf16(v[r * kvw + c - qw - kvw]);
      ASSERT_EQ(fused_after[r * w + c], want) << "token " << r << " column " << c;
    }
  }
  EXPECT_EQ(kc1.Download<uint16_t>(cache_elems), kc2.Download<uint16_t>(cache_elems));
  EXPECT_EQ(vc1.Download<uint16_t>(cache_elems), vc2.Download<uint16_t>(cache_elems));
  EXPECT_EQ(out1.Download<uint16_t>(t * qw), out2.Download<uint16_t>(t * qw));
  EXPECT_EQ(act1.Download<uint16_t>(t * inter), act2.Download<uint16_t>(t * inter));
  EXPECT_EQ(emb1.Download<uint16_t>(3 * inter), emb2.Download<uint16_t>(3 * inter));
  // A stride narrower than the row is refused.
  strided.q_stride = qw - 1;
  EXPECT_EQ(cuda::Rope(strided, nullptr), cudaErrorInvalidValue);
}

TEST(CudaElementwiseTest, CublasGemmMatchesCpu) {
  SKIP_WITHOUT_GPU();
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  cuda::BlasContext blas;
  ASSERT_EQ(blas.Init(stream), CUBLAS_STATUS_SUCCESS);
  for (ScalarType dtype : {ScalarType::kF32, ScalarType::kBF16}) {
    for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 4096, 4096},
                           {7, 688, 256},
                           {64, 1000, 333},
                           {300, 32000, 128}}) {
      SCOPED_TRACE(::testing::Message() << DtypeName(dtype) << " " << m << "x" << n << "x" << k);
      std::vector<float> x = Random(m * k, 51), w = Random(n * k, 52, 0.05f);
      std::vector<float> y0 = Random(m * n, 53);
      auto dx = Upload(x, dtype);
      auto dw = Upload(w, dtype);
      auto dy = Upload(y0, dtype);
      const GemmParams p{.x = dx->get(),
                         .w = dw->get(),
                         .y = dy->get(),
                         .m = m,
                         .n = n,
                         .k = k,
                         .alpha = 1.0f,
                         .beta = 0.5f,
                         .dtype = dtype};
      ASSERT_EQ(cuda::Gemm(p, blas), CUBLAS_STATUS_SUCCESS);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      std::vector<float> ref = y0;
      ASSERT_EQ(cpu::Gemm({.x = x.data(),
                           .w = w.data(),
                           .y = ref.data(),
                           .m = m,
                           .n = n,
                           .k = k,
                           .alpha = 1.0f,
                           .beta = 0.5f}),
                KernelStatus::kOk);
      const std::vector<float> got = DownloadAs(*dy, ref.size(), dtype);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          double mag = 0.5 * std::fabs(y0[r * n + j]);
          for (int64_t i = 0; i < k; ++i) mag += std::fabs(x[r * k + i] * w[j * k + i]);
          const double tol =
              dtype == ScalarType::kBF16
                  ? 0x1p-7 * std::max(1.0, std::fabs(double{ref[r * n + j]})) + 1e-5 * mag
                  : 1e-5 * mag + 1e-6;
          ASSERT_NEAR(got[r * n + j], ref[r * n + j], tol) << "at " << r << "," << j;
        }
      }
    }
  }
  EXPECT_EQ(cuda::Gemm({.m = 1, .n = 1, .k = 1, .dtype = ScalarType::kF16}, blas),
            CUBLAS_STATUS_INVALID_VALUE);
  cudaStreamDestroy(stream);
}

TEST(CudaElementwiseTest, ConvertRoundsLikeTheHost) {
  SKIP_WITHOUT_GPU();
  std::vector<float> v = Random(100000, 61, 100.0f);
  v.push_back(std::numeric_limits<float>::quiet_NaN());
  v.push_back(std::numeric_limits<float>::infinity());
  v.push_back(3.4e38f);  // past the largest bf16: rounds to inf
  DeviceBytes src(v), dst(v.size() * 2), back(v.size() * 4);
  const int64_t n = static_cast<int64_t>(v.size());
  ASSERT_EQ(cuda::Convert({.src = src.get(),
                           .dst = dst.get(),
                           .n = n,
                           .src_dtype = ScalarType::kF32,
                           .dst_dtype = ScalarType::kBF16},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cuda::Convert({.src = dst.get(),
                           .dst = back.get(),
                           .n = n,
                           .src_dtype = ScalarType::kBF16,
                           .dst_dtype = ScalarType::kF32},
                          nullptr),
            cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint16_t> bits = dst.Download<uint16_t>(v.size());
  const std::vector<float> round_trip = back.Download<float>(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (std::isnan(v[i])) {
      EXPECT_TRUE(std::isnan(round_trip[i]));
      continue;
    }
    ASSERT_EQ(bits[i], F32ToBf16(v[i])) << "at " << i << " value " << v[i];
    ASSERT_EQ(round_trip[i], Bf16ToF32(bits[i]));
  }
}

// ---------------------------------------------------------------- routing

TEST(CudaRoutingTest, EveryRuleMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  const int64_t t = 300;
  for (int32_t e : {2, 8, 64, 128}) {
    std::vector<float> logits = Random(t * e, 71 + e, 2.0f);
    for (int64_t i = 0; i < t * e; i += 7) logits[i] = std::round(logits[i]);  // ties
    DeviceBytes dl(logits), de(t * e * 4), dw(t * e * 4), dc(t * 4);
    std::vector<RouteParams> rules;
    rules.push_back({.rule = RouteRule::kTopK, .k = std::min(2, e)});
    rules.push_back({.rule = RouteRule::kTopP, .p = 0.6f});
    rules.push_back({.rule = RouteRule::kTopP, .p = 0.8f, .prob_temperature = 1.5f});
    rules.push_back(
        {.rule = RouteRule::kDynMole, .p = 0.75f, .min_k = std::min(2, e), .entropy_gate = true});
    rules.push_back({.rule = RouteRule::kSoft, .temperature = 0.7f});
    rules.push_back({.rule = RouteRule::kSwitch});
    rules.push_back({.rule = RouteRule::kXlora, .k = std::min(3, e), .renormalize = true});
    rules.push_back({.rule = RouteRule::kXlora, .k = 0, .renormalize = false});
    for (RouteParams p : rules) {
      SCOPED_TRACE(::testing::Message() << "E=" << e << " rule=" << static_cast<int>(p.rule));
      p.num_tokens = t;
      p.num_experts = e;
      RouteParams dp = p;
      dp.logits = dl.get<float>();
      dp.experts = de.get<int32_t>();
      dp.weights = dw.get<float>();
      dp.count = dc.get<int32_t>();
      ASSERT_EQ(cuda::Route(dp, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<int32_t> experts(t * e), count(t);
      std::vector<float> weights(t * e);
      p.logits = logits.data();
      p.experts = experts.data();
      p.weights = weights.data();
      p.count = count.data();
      ASSERT_EQ(cpu::Route(p, nullptr), KernelStatus::kOk);
      const auto got_e = de.Download<int32_t>(t * e);
      const auto got_w = dw.Download<float>(t * e);
      const auto got_c = dc.Download<int32_t>(t);
      for (int64_t i = 0; i < t; ++i) {
        ASSERT_EQ(got_c[i], count[i]) << "token " << i;
        for (int32_t j = 0; j < count[i]; ++j) {
          ASSERT_EQ(got_e[i * e + j], experts[i * e + j]) << "token " << i;
          ASSERT_NEAR(got_w[i * e + j], weights[i * e + j], 1e-6f) << "token " << i;
        }
      }
    }
  }
}

TEST(CudaRoutingTest, MixRouterMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 150;
  const int32_t e = 8, m = 4;
  const int64_t width = int64_t{m} * e + m;
  std::vector<float> x = Random(rows * width, 83, 3.0f);
  x[9 * width + 3] = std::numeric_limits<float>::quiet_NaN();  // one undefined row
  std::vector<int32_t> active(rows);
  for (int64_t r = 0; r < rows; ++r) active[r] = r % 4 != 0;
  std::vector<float> y(rows * e, -7.0f);
  DeviceBytes dx(x), dy(y), da(active);
  MixRouterParams p{.rows = rows, .experts = e, .routers = m};
  MixRouterParams dp = p;
  dp.x = dx.get<float>();
  dp.y = dy.get<float>();
  dp.active = da.get<int32_t>();
  ASSERT_EQ(cuda::MixRouter(dp, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  p.x = x.data();
  p.y = y.data();
  p.active = active.data();
  ASSERT_EQ(cpu::MixRouter(p, nullptr), KernelStatus::kOk);
  const std::vector<float> got = dy.Download<float>(rows * e);
  for (int64_t i = 0; i < rows * e; ++i) {
    if (std::isnan(y[i])) {
      ASSERT_TRUE(std::isnan(got[i])) << "at " << i;
    } else {
      ASSERT_NEAR(got[i], y[i], 1e-5f) << "at " << i;  // expf / logf may differ by an ulp
    }
  }
}

// The output gate's normalisation and mask over fp32 and bf16 expert outputs (one all-zero row:
// F.normalize's floor keeps its logits finite). fp32 block sums against the CPU's double ones:
// 1e-5 relative.
TEST(CudaRoutingTest, OutputGateScaleMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 70, width = 3 * 4096;
  const int32_t e = 3;
  std::vector<float> d = Random(rows * width, 85, 0.5f);
  std::fill(d.begin() + 5 * width, d.begin() + 6 * width, 0.0f);
  const std::vector<float> logits = Random(rows * e, 86, 2.0f);
  std::vector<float> mask(rows * e, 0.0f);
  for (int64_t r = 0; r < rows; r += 4) mask[r * e + 1] = -std::numeric_limits<float>::infinity();
  for (const ScalarType dtype : {ScalarType::kF32, ScalarType::kBF16}) {
    SCOPED_TRACE(dtype == ScalarType::kF32 ? "fp32" : "bf16");
    std::vector<uint16_t> d16(d.size());
    std::vector<float> rounded = d;
    for (size_t i = 0; i < d.size(); ++i) {
      d16[i] = F32ToBf16(d[i]);
      if (dtype == ScalarType::kBF16) rounded[i] = Bf16ToF32(d16[i]);
    }
    DeviceBytes d32(d), dbf(d16), dl(logits), dm(mask);
    OutputGateScaleParams p{.rows = rows, .width = width, .experts = e, .dtype = dtype};
    OutputGateScaleParams dp = p;
    dp.d = dtype == ScalarType::kF32 ? d32.get() : dbf.get();
    dp.logits = dl.get<float>();
    dp.mask = dm.get<float>();
    ASSERT_EQ(cuda::OutputGateScale(dp, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    std::vector<float> want = logits;
    p.d = rounded.data();
    p.logits = want.data();
    p.mask = mask.data();
    p.dtype = ScalarType::kF32;
    ASSERT_EQ(cpu::OutputGateScale(p, nullptr), KernelStatus::kOk);
    const std::vector<float> got = dl.Download<float>(rows * e);
    for (int64_t i = 0; i < rows * e; ++i) {
      if (std::isinf(want[i])) {
        ASSERT_EQ(got[i], want[i]) << "at " << i;
      } else {
        ASSERT_NEAR(got[i], want[i], 1e-5f * std::max(1.0f, std::abs(want[i]))) << "at " << i;
      }
    }
  }
}

TEST(CudaRoutingTest, SoftmaxGroupsMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 150, cols = 40;  // 8 groups of 5 (X-LoRA: modules x adapters)
  std::vector<float> x = Random(rows * cols, 81, 3.0f);
  x[7 * cols + 12] = std::numeric_limits<float>::quiet_NaN();  // one undefined group
  std::vector<int32_t> active(rows);
  for (int64_t r = 0; r < rows; ++r) active[r] = r % 3 != 0;
  for (bool softmax : {true, false}) {
    SCOPED_TRACE(softmax ? "softmax" : "copy");
    const int64_t stride = cols + 8;  // rows of a wider table
    std::vector<float> y(rows * stride, -7.0f);
    DeviceBytes dx(x), dy(y), da(active);
    SoftmaxGroupsParams p{.rows = rows,
                          .cols = cols,
                          .y_stride = stride,
                          .group = 5,
                          .temperature = 0.7f,
                          .softmax = softmax};
    SoftmaxGroupsParams dp = p;
    dp.x = dx.get<float>();
    dp.y = dy.get<float>();
    dp.active = da.get<int32_t>();
    ASSERT_EQ(cuda::SoftmaxGroups(dp, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    p.x = x.data();
    p.y = y.data();
    p.active = active.data();
    ASSERT_EQ(cpu::SoftmaxGroups(p, nullptr), KernelStatus::kOk);
    const std::vector<float> got = dy.Download<float>(rows * stride);
    for (int64_t i = 0; i < rows * stride; ++i) {
      if (std::isnan(y[i])) {
        ASSERT_TRUE(std::isnan(got[i])) << "at " << i;
      } else {
        ASSERT_NEAR(got[i], y[i], 1e-6f) << "at " << i;  // expf may differ by an ulp
      }
    }
  }
}

TEST(CudaRoutingTest, BuildSegmentsMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  for (int32_t e : {1, 8, 64, 128}) {
    for (bool slot_rows : {false, true}) {  // MixLoRA's down projection reads decision slots
      const int32_t t = 200, rank = 16;
      // Decisions of a top-min(3, e) route with one undefined token.
      std::vector<float> logits = Random(int64_t{t} * e, 91 + e, 2.0f);
      logits[5 * e] = std::numeric_limits<float>::quiet_NaN();
      RouteParams route{
          .num_tokens = t, .num_experts = e, .rule = RouteRule::kTopK, .k = std::min(3, e)};
      std::vector<int32_t> experts(t * e), count(t), rows(t);
      std::vector<float> weights(t * e), scale(e);
      for (int32_t i = 0; i < t; ++i) rows[i] = 2 * i + 1;
      for (int32_t i = 0; i < e; ++i) scale[i] = 0.25f * (i + 1);
      route.logits = logits.data();
      route.experts = experts.data();
      route.weights = weights.data();
      route.count = count.data();
      ASSERT_EQ(cpu::Route(route, nullptr), KernelStatus::kOk);
      DeviceBytes de(experts), dw(weights), dc(count), dr(rows), ds(scale);
      DeviceBytes dpr(t * e * 4), dpw(t * e * 4), dstart((e + 1) * 4), drank(e * 4), doff(e * 8);
      DeviceBytes dslots(t * e * 4);
      std::vector<int32_t> zero = {0};
      DeviceBytes dund(zero);
      SegmentBuildParams p{.slot_rows = slot_rows, .num_tokens = t, .num_experts = e, .rank = rank};
      SegmentBuildParams dp = p;
      dp.experts = de.get<int32_t>();
      dp.weights = dw.get<float>();
      dp.count = dc.get<int32_t>();
      dp.rows = dr.get<int32_t>();
      dp.scale = ds.get<float>();
      dp.pair_row = dpr.get<int32_t>();
      dp.pair_weight = dpw.get<float>();
      dp.seg_start = dstart.get<int32_t>();
      dp.seg_rank = drank.get<int32_t>();
      dp.seg_row_offset = doff.get<int64_t>();
      dp.undefined = dund.get<int32_t>();
      dp.slot_count = dslots.get<int32_t>();
      ASSERT_EQ(cuda::BuildSegments(dp, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<int32_t> pair_row(t * e), seg_start(e + 1), seg_rank(e);
      std::vector<float> pair_weight(t * e);
      std::vector<int64_t> seg_off(e);
      int32_t undefined = 0;
      p.experts = experts.data();
      p.weights = weights.data();
      p.count = count.data();
      p.rows = rows.data();
      p.scale = scale.data();
      p.pair_row = pair_row.data();
      p.pair_weight = pair_weight.data();
      p.seg_start = seg_start.data();
      p.seg_rank = seg_rank.data();
      p.seg_row_offset = seg_off.data();
      p.undefined = &undefined;
      std::vector<int32_t> slot_count(t * e, -1);
      p.slot_count = slot_count.data();
      ASSERT_EQ(cpu::BuildSegments(p, nullptr), KernelStatus::kOk);
      EXPECT_EQ(dslots.Download<int32_t>(t * e), slot_count);
      const int32_t pairs = seg_start[e];
      EXPECT_EQ(dstart.Download<int32_t>(e + 1), seg_start);
      EXPECT_EQ(drank.Download<int32_t>(e), seg_rank);
      EXPECT_EQ(doff.Download<int64_t>(e), seg_off);
      EXPECT_EQ(dund.Download<int32_t>(1)[0], undefined);
      const auto got_rows = dpr.Download<int32_t>(pairs);
      const auto got_w = dpw.Download<float>(pairs);
      EXPECT_EQ(got_rows, std::vector<int32_t>(pair_row.begin(), pair_row.begin() + pairs));
      EXPECT_EQ(got_w, std::vector<float>(pair_weight.begin(), pair_weight.begin() + pairs));
    }
  }
}

TEST(CudaRoutingTest, RankRoutingMatchesTheCpuTwin) {
  SKIP_WITHOUT_GPU();
  const int64_t t = 100;
  for (int32_t r : {8, 64, 128}) {
    for (bool smora : {false, true}) {
      const int32_t stride = r + 4, k = r / 4;
      std::vector<float> z = Random(t * stride, 81), logits = Random(t * r, 82);
      std::vector<float> bias = Random(r, 83, 0.1f);
      // Every 7th token masked out (not routed, not undefined), as in a planned step.
      std::vector<int32_t> active(t, 1);
      for (int64_t i = 3; i < t; i += 7) active[i] = 0;
      DeviceBytes dz(z), dl(logits), db(bias), du(t * stride * 4), dk(t * k * 4), dok(t * 4),
          da(active);
      RankRouteParams p{.num_tokens = t,
                        .rank = r,
                        .z_stride = stride,
                        .k = k,
                        .select_on_abs = true,
                        .temperature = 0.9f};
      RankRouteParams dp = p;
      dp.z = dz.get<float>();
      dp.router_logits = smora ? dl.get<float>() : nullptr;
      dp.select_bias = db.get<float>();
      dp.u = du.get<float>();
      dp.kept = dk.get<int32_t>();
      dp.ok = dok.get<int32_t>();
      dp.active = da.get<int32_t>();
      ASSERT_EQ(cuda::RankRoute(dp, nullptr), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      std::vector<float> u(t * stride, 0.0f);
      std::vector<int32_t> kept(t * k), ok(t);
      p.z = z.data();
      p.router_logits = smora ? logits.data() : nullptr;
      p.select_bias = bias.data();
      p.u = u.data();
      p.kept = kept.data();
      p.ok = ok.data();
      p.active = active.data();
      ASSERT_EQ(cpu::RankRoute(p, nullptr), KernelStatus::kOk);
      EXPECT_EQ(dok.Download<int32_t>(t), ok);
      const auto got_kept = dk.Download<int32_t>(t * k);
      const auto got_u = du.Download<float>(t * stride);
      for (int64_t i = 0; i < t; ++i) {
        if (!active[i]) continue;  // kept and u untouched there (uninitialised on the device)
        for (int32_t j = 0; j < k; ++j) ASSERT_EQ(got_kept[i * k + j], kept[i * k + j]) << i;
        for (int32_t j = 0; j < r; ++j) {
          ASSERT_NEAR(got_u[i * stride + j], u[i * stride + j], 1e-6f);
        }
      }
    }
  }
}

// The row-owned expand (no atomics) against its CPU twin: fp32 within 1e-5 x max(1, |ref|)
// (fused multiply-adds on the device), two device runs bit-identical; rows of masked tokens
// untouched.
TEST(CudaSgmvExpandRowsTest, MatchesCpuAndRepeatsBitForBit) {
  SKIP_WITHOUT_GPU();
  constexpr int32_t kTokens = 64, kExperts = 8, kRank = 16, kOut = 1000, kK = 2;
  // Each token's k pairs: token t takes experts (t % E, (t + 3) % E); pairs grouped by expert.
  std::vector<int32_t> count(kTokens, kK), active(kTokens, 1), token_pair(kTokens * kExperts, 0);
  active[5] = 0;
  std::vector<std::vector<int32_t>> by_expert(kExperts);
  for (int32_t t = 0; t < kTokens; ++t) {
    by_expert[t % kExperts].push_back(t * kExperts + 0);
    by_expert[(t + 3) % kExperts].push_back(t * kExperts + 1);
  }
  std::vector<int32_t> seg_start(kExperts + 1, 0), seg_rank(kExperts, kRank);
  std::vector<int64_t> seg_off(kExperts);
  int32_t at = 0;
  for (int32_t e = 0; e < kExperts; ++e) {
    seg_start[e] = at;
    seg_off[e] = int64_t{e} * kRank;
    for (int32_t slot : by_expert[e]) token_pair[slot] = at++;
  }
  seg_start[kExperts] = at;
  const std::vector<float> v = Random(int64_t{at} * kRank, 7, 1.0f);
  const std::vector<float> w = Random(at, 8, 1.0f);
  const std::vector<float> b = Random(int64_t{kExperts} * kRank * kOut, 9, 0.2f);
  const std::vector<float> y0 = Random(int64_t{kTokens} * kOut, 10, 1.0f);
  std::vector<const void*> rows(kExperts * kRank);
  for (int32_t i = 0; i < kExperts * kRank; ++i) rows[i] = b.data() + int64_t{i} * kOut;
  std::vector<float> want = y0;
  SgmvExpandRowsParams p{.v = v.data(),
                         .y = want.data(),
                         .token_pair = token_pair.data(),
                         .count = count.data(),
                         .active = active.data(),
                         .weight = w.data(),
                         .seg_start = seg_start.data(),
                         .seg_rank = seg_rank.data(),
                         .seg_row_offset = seg_off.data(),
                         .b_rows = rows.data(),
                         .num_tokens = kTokens,
                         .pair_stride = kExperts,
                         .num_segments = kExperts,
                         .out = kOut,
                         .v_stride = kRank};
  ASSERT_EQ(cpu::SgmvExpandRows(p, nullptr), KernelStatus::kOk);
  DeviceBytes d_v(v), d_w(w), d_b(b), d_tp(token_pair), d_count(count), d_active(active),
      d_start(seg_start), d_rank(seg_rank), d_off(seg_off);
  std::vector<const void*> d_rows_host(kExperts * kRank);
  for (int32_t i = 0; i < kExperts * kRank; ++i) {
    d_rows_host[i] = d_b.get<float>() + int64_t{i} * kOut;
  }
  DeviceBytes d_rows(d_rows_host);
  std::vector<float> got[2];
  for (int run = 0; run < 2; ++run) {
    DeviceBytes d_y(y0);
    SgmvExpandRowsParams q = p;
    q.v = d_v.get<float>();
    q.y = d_y.get();
    q.token_pair = d_tp.get<int32_t>();
    q.count = d_count.get<int32_t>();
    q.active = d_active.get<int32_t>();
    q.weight = d_w.get<float>();
    q.seg_start = d_start.get<int32_t>();
    q.seg_rank = d_rank.get<int32_t>();
    q.seg_row_offset = d_off.get<int64_t>();
    q.b_rows = d_rows.get<const void*>();
    ASSERT_EQ(cuda::SgmvExpandRows(q, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    got[run] = d_y.Download<float>(y0.size());
  }
  EXPECT_EQ(got[0], got[1]);
  double max_ref = 1.0;
  for (float x : want) max_ref = std::max<double>(max_ref, std::fabs(x));
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[0][i], want[i], 1e-5 * max_ref) << i;
    if (i / kOut == 5) {
      ASSERT_EQ(got[0][i], y0[i]);  // masked
    }
  }
  // Into columns [3, 3 + kOut) of rows kOut + 5 wide (a module of a fused projection): the same
  // bits there, the other columns untouched.
  constexpr int64_t kWide = kOut + 5, kFirst = 3;
  std::vector<float> wide = Random(int64_t{kTokens} * kWide, 11, 1.0f);
  for (int32_t t = 0; t < kTokens; ++t) {
    std::copy_n(y0.begin() + int64_t{t} * kOut, kOut, wide.begin() + t * kWide + kFirst);
  }
  DeviceBytes d_wide(wide);
  SgmvExpandRowsParams q = p;
  q.v = d_v.get<float>();
  q.y = d_wide.get<float>() + kFirst;
  q.y_stride = kWide;
  q.token_pair = d_tp.get<int32_t>();
  q.count = d_count.get<int32_t>();
  q.active = d_active.get<int32_t>();
  q.weight = d_w.get<float>();
  q.seg_start = d_start.get<int32_t>();
  q.seg_rank = d_rank.get<int32_t>();
  q.seg_row_offset = d_off.get<int64_t>();
  q.b_rows = d_rows.get<const void*>();
  ASSERT_EQ(cuda::SgmvExpandRows(q, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> wide_got = d_wide.Download<float>(wide.size());
  for (int32_t t = 0; t < kTokens; ++t) {
    for (int64_t c = 0; c < kWide; ++c) {
      const bool mine = c >= kFirst && c < kFirst + kOut;
      ASSERT_EQ(wide_got[t * kWide + c],
                mine ? got[0][int64_t{t} * kOut + c - kFirst] : wide[t * kWide + c])
          << "token " << t << " column " << c;
    }
  }
}

}  // namespace
}  // namespace moleserve::kernels
