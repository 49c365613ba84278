// CPU kernels against naive double-precision references written independently here.
// Tolerances: max abs error <= 1e-4 relative to the output scale (fp32 accumulation over at most
// a few thousand terms); copies (embedding, KV write) bit-exact.

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <complex>
#include <random>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/cpu/ops.h"
#include "tests/kernels/random_inputs.h"

namespace moleserve::kernels::cpu {
namespace {

using test_util::Random;

float MaxAbsDiff(const std::vector<float>& a, const std::vector<double>& b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, static_cast<float>(std::fabs(a[i] - b[i])));
  return m;
}

struct GemmShape {
  int64_t m, n, k;
};
void PrintTo(const GemmShape& s, std::ostream* os) { *os << s.m << "x" << s.n << "x" << s.k; }
class GemmTest : public ::testing::TestWithParam<GemmShape> {};

TEST_P(GemmTest, MatchesNaive) {
  const auto [m, n, k] = GetParam();
  auto x = Random(m * k, 1), w = Random(n * k, 2), y = Random(m * n, 3);
  std::vector<double> ref(m * n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t l = 0; l < k; ++l) acc += double{x[i * k + l]} * w[j * k + l];
      ref[i * n + j] = 0.5 * acc + 2.0 * y[i * n + j];
    }
  }
  ASSERT_EQ(Gemm({.x = x.data(),
                  .w = w.data(),
                  .y = y.data(),
                  .m = m,
                  .n = n,
                  .k = k,
                  .alpha = 0.5f,
                  .beta = 2.0f}),
            KernelStatus::kOk);
  EXPECT_LT(MaxAbsDiff(y, ref), 1e-4f * std::sqrt(static_cast<float>(k)));
}

INSTANTIATE_TEST_SUITE_P(Shapes, GemmTest,
                         ::testing::Values(GemmShape{1, 1, 1}, GemmShape{1, 260, 256},
                                           GemmShape{7, 33, 65}, GemmShape{64, 688, 256},
                                           GemmShape{3, 256, 688}),
                         [](const ::testing::TestParamInfo<GemmShape>& info) {
                           return std::to_string(info.param.m) + "x" +
                                  std::to_string(info.param.n) + "x" + std::to_string(info.param.k);
                         });

class RowOpsTest : public ::testing::TestWithParam<std::pair<int64_t, int64_t>> {};

TEST_P(RowOpsTest, RmsNormMatchesNaive) {
  const auto [rows, cols] = GetParam();
  auto x = Random(rows * cols, 4, 3.0f), w = Random(cols, 5);
  std::vector<float> y(rows * cols);
  std::vector<double> ref(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < cols; ++c) ss += double{x[r * cols + c]} * x[r * cols + c];
    const double inv = 1.0 / std::sqrt(ss / cols + 1e-5);
    for (int64_t c = 0; c < cols; ++c) ref[r * cols + c] = x[r * cols + c] * inv * w[c];
  }
  ThreadPool pool(2);
  ASSERT_EQ(RmsNorm({.x = x.data(),
                     .weight = w.data(),
                     .y = y.data(),
                     .rows = rows,
                     .cols = cols,
                     .eps = 1e-5f},
                    &pool),
            KernelStatus::kOk);
  EXPECT_LT(MaxAbsDiff(y, ref), 1e-5f);
  // In place gives the same result.
  ASSERT_EQ(RmsNorm({.x = x.data(),
                     .weight = w.data(),
                     .y = x.data(),
                     .rows = rows,
                     .cols = cols,
                     .eps = 1e-5f},
                    nullptr),
            KernelStatus::kOk);
  EXPECT_EQ(x, y);
}

// The fused residual add (RmsNormParams::residual) is exactly Add then RmsNorm: the same
// residual stream and the same normalised rows, bit for bit.
TEST_P(RowOpsTest, RmsNormWithResidualIsAddThenRmsNorm) {
  const auto [rows, cols] = GetParam();
  const auto x = Random(rows * cols, 8, 2.0f), w = Random(cols, 9);
  const auto residual = Random(rows * cols, 10, 5.0f);
  std::vector<float> fused_residual = residual, fused_y(rows * cols);
  ThreadPool pool(2);
  ASSERT_EQ(RmsNorm({.x = x.data(),
                     .weight = w.data(),
                     .y = fused_y.data(),
                     .rows = rows,
                     .cols = cols,
                     .eps = 1e-5f,
                     .residual = fused_residual.data()},
                    &pool),
            KernelStatus::kOk);
  std::vector<float> sum(rows * cols), y(rows * cols);
  ASSERT_EQ(Add({.a = residual.data(), .b = x.data(), .out = sum.data(), .n = rows * cols}, &pool),
            KernelStatus::kOk);
  ASSERT_EQ(RmsNorm({.x = sum.data(),
                     .weight = w.data(),
                     .y = y.data(),
                     .rows = rows,
                     .cols = cols,
                     .eps = 1e-5f},
                    &pool),
            KernelStatus::kOk);
  EXPECT_EQ(fused_residual, sum);
  EXPECT_EQ(fused_y, y);
  // y may not alias the residual stream or x.
  EXPECT_EQ(RmsNorm({.x = x.data(),
                     .weight = w.data(),
                     .y = fused_residual.data(),
                     .rows = rows,
                     .cols = cols,
                     .residual = fused_residual.data()},
                    nullptr),
            KernelStatus::kInvalidArgument);
}

TEST_P(RowOpsTest, SiluMulMatchesNaive) {
  const auto [rows, cols] = GetParam();
  auto g = Random(rows * cols, 6, 4.0f), u = Random(rows * cols, 7);
  std::vector<float> out(rows * cols);
  std::vector<double> ref(rows * cols);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] = g[i] / (1.0 + std::exp(-double{g[i]})) * u[i];
  ThreadPool pool(3);
  ASSERT_EQ(
      SiluMul({.gate = g.data(), .up = u.data(), .out = out.data(), .rows = rows, .cols = cols},
              &pool),
      KernelStatus::kOk);
  EXPECT_LT(MaxAbsDiff(out, ref), 1e-5f);
}

TEST_P(RowOpsTest, EmbeddingAndAddAreExact) {
  const auto [rows, cols] = GetParam();
  const int64_t vocab = 50;
  auto table = Random(vocab * cols, 8);
  std::vector<int32_t> ids(rows);
  for (int64_t i = 0; i < rows; ++i) ids[i] = static_cast<int32_t>((i * 7 + 3) % vocab);
  std::vector<float> out(rows * cols);
  ThreadPool pool(2);
  ASSERT_EQ(Embedding({.ids = ids.data(),
                       .table = table.data(),
                       .out = out.data(),
                       .num_tokens = rows,
                       .hidden = cols},
                      &pool),
            KernelStatus::kOk);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(out[i * cols + c], table[ids[i] * cols + c]);
  }
  auto other = Random(rows * cols, 9);
  std::vector<float> sum(rows * cols);
  ASSERT_EQ(Add({.a = out.data(), .b = other.data(), .out = sum.data(), .n = rows * cols}, &pool),
            KernelStatus::kOk);
  for (size_t i = 0; i < sum.size(); ++i) ASSERT_EQ(sum[i], out[i] + other[i]);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RowOpsTest,
    ::testing::Values(std::pair<int64_t, int64_t>{1, 1}, std::pair<int64_t, int64_t>{1, 256},
                      std::pair<int64_t, int64_t>{17, 688}, std::pair<int64_t, int64_t>{64, 4096}),
    [](const auto& info) {
      return std::to_string(info.param.first) + "x" + std::to_string(info.param.second);
    });

TEST(RopeTest, MatchesComplexRotation) {
  const int nq = 4, nkv = 2, d = 16, t = 5;
  auto q = Random(t * nq * d, 10), k = Random(t * nkv * d, 11);
  auto q0 = q, k0 = k;
  std::vector<int32_t> pos = {0, 1, 7, 100, 4095};
  std::vector<float> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / d);
  ASSERT_EQ(Rope({.q = q.data(),
                  .k = k.data(),
                  .positions = pos.data(),
                  .inv_freq = inv_freq.data(),
                  .num_tokens = t,
                  .num_q_heads = nq,
                  .num_kv_heads = nkv,
                  .head_dim = d},
                 nullptr),
            KernelStatus::kOk);
  // Reference: pair (x[i], x[i + d/2]) as a complex number times e^{i * theta}, theta = pos * f_i
  // multiplied in fp32 as Hugging Face's rotary embedding does (inv_freq @ positions, float32).
  auto check = [&](const std::vector<float>& before, const std::vector<float>& after, int heads) {
    for (int tok = 0; tok < t; ++tok) {
      for (int h = 0; h < heads; ++h) {
        const float* x = &before[(tok * heads + h) * d];
        const float* y = &after[(tok * heads + h) * d];
        for (int i = 0; i < d / 2; ++i) {
          std::complex<double> z(x[i], x[i + d / 2]);
          const float theta = static_cast<float>(pos[tok]) * inv_freq[i];
          z *= std::polar(1.0, static_cast<double>(theta));
          ASSERT_NEAR(y[i], z.real(), 1e-4);
          ASSERT_NEAR(y[i + d / 2], z.imag(), 1e-4);
        }
      }
    }
  };
  check(q0, q, nq);
  check(k0, k, nkv);
}

// RoPE fused into the cache write (KvWriteParams::rope_inv_freq) is Rope then KvWrite, bit for
// bit: q rotated in place, the rotated k and the v in the cache, on strided q|k|v rows.
TEST(RopeTest, FusedIntoTheCacheWriteIsRopeThenKvWrite) {
  const int nq = 4, nkv = 2, d = 16, t = 6, bs = 4;
  const int64_t width = int64_t{nq + 2 * nkv} * d;  // one q|k|v row
  const std::vector<float> qkv0 = Random(t * width, 12);
  std::vector<int32_t> pos = {0, 1, 2, 3, 4, 5}, seq(t, 0), tables = {1, 0}, offsets = {0, 2};
  std::vector<float> inv_freq(d / 2);
  for (int i = 0; i < d / 2; ++i) inv_freq[i] = std::pow(10000.0f, -2.0f * i / d);
  struct Out {
    std::vector<float> qkv, k_cache, v_cache;
  };
  auto run = [&](bool fused) {
    Out o{qkv0, std::vector<float>(2 * bs * nkv * d), std::vector<float>(2 * bs * nkv * d)};
    float* q = o.qkv.data();
    float* k = q + nq * d;
    float* v = k + nkv * d;
    if (!fused) {
      EXPECT_EQ(Rope({.q = q,
                      .k = k,
                      .positions = pos.data(),
                      .inv_freq = inv_freq.data(),
                      .num_tokens = t,
                      .num_q_heads = nq,
                      .num_kv_heads = nkv,
                      .head_dim = d,
                      .q_stride = width,
                      .k_stride = width},
                     nullptr),
                KernelStatus::kOk);
    }
    const PagedKvLayout kv{.k_cache = o.k_cache.data(),
                           .v_cache = o.v_cache.data(),
                           .block_tables = tables.data(),
                           .block_table_offsets = offsets.data(),
                           .num_seqs = 1,
                           .block_size = bs,
                           .num_kv_heads = nkv,
                           .head_dim = d};
    ThreadPool pool(2);
    EXPECT_EQ(KvWrite({.kv = kv,
                       .k = k,
                       .v = v,
                       .token_seq = seq.data(),
                       .positions = pos.data(),
                       .num_tokens = t,
                       .kv_stride = width,
                       .rope_inv_freq = fused ? inv_freq.data() : nullptr,
                       .q = fused ? q : nullptr,
                       .num_q_heads = fused ? nq : 0,
                       .q_stride = width},
                      &pool),
              KernelStatus::kOk);
    return o;
  };
  const Out separate = run(false), fused = run(true);
  EXPECT_EQ(fused.qkv, separate.qkv);
  EXPECT_EQ(fused.k_cache, separate.k_cache);
  EXPECT_EQ(fused.v_cache, separate.v_cache);
  EXPECT_NE(fused.qkv, qkv0);  // something was rotated
}

TEST(RopeTest, RejectsOddHeadDim) {
  float x = 0;
  int32_t p = 0;
  EXPECT_EQ(Rope({.q = &x,
                  .k = &x,
                  .positions = &p,
                  .inv_freq = &x,
                  .num_tokens = 1,
                  .num_q_heads = 1,
                  .num_kv_heads = 1,
                  .head_dim = 3},
                 nullptr),
            KernelStatus::kInvalidShape);
}

// Paged attention over a mixed batch (one prefill chunk continuing a cached prefix, one decode
// token, one fresh prefill) against dense causal attention over contiguous K/V.
void CheckMixedBatchAgainstDenseAttention(int window) {
  const int nq = 8, nkv = 2, d = 32, bs = 4, num_blocks = 40;
  const int group = nq / nkv;
  // Sequence lengths (total) and how many tokens are new in this step.
  const std::vector<int> total = {11, 6, 9};
  const std::vector<int> fresh = {5, 1, 9};
  // Scattered, non-monotonic block tables.
  std::vector<std::vector<int32_t>> tables = {{7, 2, 30}, {5, 19}, {33, 0, 12}};
  std::vector<int32_t> flat, offsets = {0};
  for (const auto& t : tables) {
    flat.insert(flat.end(), t.begin(), t.end());
    offsets.push_back(static_cast<int32_t>(flat.size()));
  }
  const int kv_width = nkv * d;
  std::vector<float> k_cache(num_blocks * bs * kv_width, NAN), v_cache(k_cache.size(), NAN);
  // Full K/V/Q of every position of every sequence (dense reference inputs).
  std::vector<std::vector<float>> K, V, Q;
  for (int s = 0; s < 3; ++s) {
    K.push_back(Random(total[s] * kv_width, 100 + s));
    V.push_back(Random(total[s] * kv_width, 200 + s));
    Q.push_back(Random(total[s] * nq * d, 300 + s));
  }
  PagedKvLayout kv{.k_cache = k_cache.data(),
                   .v_cache = v_cache.data(),
                   .block_tables = flat.data(),
                   .block_table_offsets = offsets.data(),
                   .num_seqs = 3,
                   .block_size = bs,
                   .num_kv_heads = nkv,
                   .head_dim = d};
  ThreadPool pool(2);
  // Step 1: the cached prefixes (positions before the new tokens).
  std::vector<int32_t> seq_ids, positions;
  std::vector<float> k_in, v_in;
  auto add_tokens = [&](int s, int from, int to) {
    for (int p = from; p < to; ++p) {
      seq_ids.push_back(s);
      positions.push_back(p);
      k_in.insert(k_in.end(), K[s].begin() + p * kv_width, K[s].begin() + (p + 1) * kv_width);
      v_in.insert(v_in.end(), V[s].begin() + p * kv_width, V[s].begin() + (p + 1) * kv_width);
    }
  };
  for (int s = 0; s < 3; ++s) add_tokens(s, 0, total[s] - fresh[s]);
  ASSERT_EQ(KvWrite({.kv = kv,
                     .k = k_in.data(),
                     .v = v_in.data(),
                     .token_seq = seq_ids.data(),
                     .positions = positions.data(),
                     .num_tokens = static_cast<int64_t>(seq_ids.size())},
                    &pool),
            KernelStatus::kOk);
  // Step 2: the new tokens of every sequence in one flat batch.
  seq_ids.clear();
  positions.clear();
  k_in.clear();
  v_in.clear();
  std::vector<float> q_in;
  for (int s = 0; s < 3; ++s) {
    add_tokens(s, total[s] - fresh[s], total[s]);
    for (int p = total[s] - fresh[s]; p < total[s]; ++p) {
      q_in.insert(q_in.end(), Q[s].begin() + p * nq * d, Q[s].begin() + (p + 1) * nq * d);
    }
  }
  const int64_t n = static_cast<int64_t>(seq_ids.size());
  ASSERT_EQ(KvWrite({.kv = kv,
                     .k = k_in.data(),
                     .v = v_in.data(),
                     .token_seq = seq_ids.data(),
                     .positions = positions.data(),
                     .num_tokens = n},
                    &pool),
            KernelStatus::kOk);
  std::vector<float> out(n * nq * d);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_EQ(PagedAttention({.kv = kv,
                            .q = q_in.data(),
                            .out = out.data(),
                            .token_seq = seq_ids.data(),
                            .positions = positions.data(),
                            .num_tokens = n,
                            .num_q_heads = nq,
                            .scale = scale,
                            .sliding_window = window},
                           &pool),
            KernelStatus::kOk);
  for (int64_t t = 0; t < n; ++t) {
    const int s = seq_ids[t], p = positions[t];
    for (int h = 0; h < nq; ++h) {
      const int kh = h / group;
      const int first = window > 0 ? std::max(0, p - window + 1) : 0;
      std::vector<double> w(p + 1, 0.0);
      double mx = -INFINITY, den = 0;
      for (int j = first; j <= p; ++j) {
        double dot = 0;
        for (int i = 0; i < d; ++i) {
          dot += double{Q[s][(p * nq + h) * d + i]} * K[s][j * kv_width + kh * d + i];
        }
        w[j] = dot * scale;
        mx = std::max(mx, w[j]);
      }
      for (int j = first; j <= p; ++j) den += (w[j] = std::exp(w[j] - mx));
      for (int i = 0; i < d; ++i) {
        double acc = 0;
        for (int j = first; j <= p; ++j) acc += w[j] * V[s][j * kv_width + kh * d + i];
        ASSERT_NEAR(out[(t * nq + h) * d + i], acc / den, 1e-5) << "token " << t << " head " << h;
      }
    }
  }
}

TEST(PagedAttentionTest, MixedBatchMatchesDenseAttention) {
  CheckMixedBatchAgainstDenseAttention(0);
}

// Mistral: each token sees only its last `window` positions (the window is shorter than the
// cached prefixes, and longer than some sequences).
TEST(PagedAttentionTest, SlidingWindowMatchesDenseWindowedAttention) {
  CheckMixedBatchAgainstDenseAttention(3);
  CheckMixedBatchAgainstDenseAttention(7);
}

// The fused projections (q|k|v and gate|up in one GEMM) leave each module's output as columns
// of a wider row; the ops that read or write them take row strides. Each strided op must give
// the bits its dense form gives on copies of the columns, and leave the other columns alone.
TEST(FusedProjectionTest, StridedOperandsGiveTheDenseResultsBitForBit) {
  const int nq = 4, nkv = 2, d = 8, bs = 4, t = 5, inter = 12;
  const int64_t qw = nq * d, kvw = nkv * d, w = qw + 2 * kvw;
  ThreadPool pool(2);
  const std::vector<float> fused0 = Random(t * w, 11);
  auto columns = [&](const std::vector<float>& f, int64_t first, int64_t width) {
    std::vector<float> out(t * width);
    for (int64_t r = 0; r < t; ++r) {
      std::copy(f.begin() + r * w + first, f.begin() + r * w + first + width,
                out.begin() + r * width);
    }
    return out;
  };
  // RoPE over q and k in place, through the strides.
  std::vector<float> fused = fused0;
  std::vector<float> q = columns(fused0, 0, qw), k = columns(fused0, qw, kvw);
  const std::vector<int32_t> pos = {0, 3, 17, 1000, 5};
  const std::vector<float> inv_freq = {1.0f, 0.1f, 0.01f, 0.001f};
  RopeParams rope{.positions = pos.data(),
                  .inv_freq = inv_freq.data(),
                  .num_tokens = t,
                  .num_q_heads = nq,
                  .num_kv_heads = nkv,
                  .head_dim = d};
  RopeParams dense = rope, strided = rope;
  dense.q = q.data(), dense.k = k.data();
  strided.q = fused.data(), strided.k = fused.data() + qw, strided.q_stride = w,
  strided.k_stride = w;
  ASSERT_EQ(Rope(dense, &pool), KernelStatus::kOk);
  ASSERT_EQ(Rope(strided, &pool), KernelStatus::kOk);
  EXPECT_EQ(columns(fused, 0, qw), q);
  EXPECT_EQ(columns(fused, qw, kvw), k);
  EXPECT_EQ(columns(fused, qw + kvw, kvw), columns(fused0, qw + kvw, kvw));  // v untouched
  EXPECT_NE(q, columns(fused0, 0, qw));                                      // it did rotate
  // KV write and attention: one sequence of t tokens over two blocks.
  const std::vector<int32_t> table = {1, 0}, offsets = {0, 2}, seq(t, 0);
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4};
  std::vector<float> kc_dense(2 * bs * kvw, NAN), vc_dense(kc_dense), kc(kc_dense), vc(kc_dense);
  PagedKvLayout kv{.block_tables = table.data(),
                   .block_table_offsets = offsets.data(),
                   .num_seqs = 1,
                   .block_size = bs,
                   .num_kv_heads = nkv,
                   .head_dim = d};
  const std::vector<float> v = columns(fused, qw + kvw, kvw);
  PagedKvLayout kv_dense = kv;
  kv_dense.k_cache = kc_dense.data(), kv_dense.v_cache = vc_dense.data();
  kv.k_cache = kc.data(), kv.v_cache = vc.data();
  ASSERT_EQ(KvWrite({.kv = kv_dense,
                     .k = k.data(),
                     .v = v.data(),
                     .token_seq = seq.data(),
                     .positions = positions.data(),
                     .num_tokens = t},
                    &pool),
            KernelStatus::kOk);
  ASSERT_EQ(KvWrite({.kv = kv,
                     .k = fused.data() + qw,
                     .v = fused.data() + qw + kvw,
                     .token_seq = seq.data(),
                     .positions = positions.data(),
                     .num_tokens = t,
                     .kv_stride = w},
                    &pool),
            KernelStatus::kOk);
  for (size_t i = 0; i < kc.size(); ++i) {  // NaN where nothing was written, on both sides
    ASSERT_TRUE(kc[i] == kc_dense[i] || (std::isnan(kc[i]) && std::isnan(kc_dense[i]))) << i;
    ASSERT_TRUE(vc[i] == vc_dense[i] || (std::isnan(vc[i]) && std::isnan(vc_dense[i]))) << i;
  }
  std::vector<float> out_dense(t * qw), out(t * qw);
  PagedAttentionParams attn{.kv = kv,
                            .token_seq = seq.data(),
                            .positions = positions.data(),
                            .num_tokens = t,
                            .num_q_heads = nq,
                            .scale = 0.25f};
  PagedAttentionParams attn_dense = attn;
  attn_dense.q = q.data(), attn_dense.out = out_dense.data();
  attn.q = fused.data(), attn.out = out.data(), attn.q_stride = w;
  ASSERT_EQ(PagedAttention(attn_dense, &pool), KernelStatus::kOk);
  ASSERT_EQ(PagedAttention(attn, &pool), KernelStatus::kOk);
  EXPECT_EQ(out, out_dense);
  // SwiGLU over the gate|up halves, and the embedding gather from a strided table.
  const std::vector<float> gate_up = Random(t * 2 * inter, 12);
  std::vector<float> gate(t * inter), up(t * inter);
  for (int64_t r = 0; r < t; ++r) {
    std::copy_n(gate_up.begin() + r * 2 * inter, inter, gate.begin() + r * inter);
    std::copy_n(gate_up.begin() + r * 2 * inter + inter, inter, up.begin() + r * inter);
  }
  std::vector<float> act_dense(t * inter), act(t * inter);
  ASSERT_EQ(
      SiluMul(
          {.gate = gate.data(), .up = up.data(), .out = act_dense.data(), .rows = t, .cols = inter},
          &pool),
      KernelStatus::kOk);
  ASSERT_EQ(SiluMul({.gate = gate_up.data(),
                     .up = gate_up.data() + inter,
                     .out = act.data(),
                     .rows = t,
                     .cols = inter,
                     .in_stride = 2 * inter},
                    &pool),
            KernelStatus::kOk);
  EXPECT_EQ(act, act_dense);
  const std::vector<int32_t> ids = {4, 0, 4, 2};
  std::vector<float> rows(4 * inter);
  ASSERT_EQ(Embedding({.ids = ids.data(),
                       .table = gate_up.data() + inter,
                       .out = rows.data(),
                       .num_tokens = 4,
                       .hidden = inter,
                       .table_stride = 2 * inter},
                      &pool),
            KernelStatus::kOk);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(std::equal(rows.begin() + i * inter, rows.begin() + (i + 1) * inter,
                           up.begin() + ids[i] * inter));
  }
  // Strides narrower than the row are refused.
  strided.q_stride = qw - 1;
  EXPECT_EQ(Rope(strided, &pool), KernelStatus::kInvalidShape);
  EXPECT_EQ(SiluMul({.gate = gate_up.data(),
                     .up = gate_up.data(),
                     .out = act.data(),
                     .rows = t,
                     .cols = inter,
                     .in_stride = inter - 1},
                    &pool),
            KernelStatus::kInvalidShape);
}

TEST(BiasAddTest, AddsTheBiasToEveryRow) {
  auto x = Random(13 * 37, 20);
  const auto x0 = x;
  auto b = Random(37, 21);
  ThreadPool pool(2);
  ASSERT_EQ(BiasAdd({.x = x.data(), .bias = b.data(), .rows = 13, .cols = 37}, &pool),
            KernelStatus::kOk);
  for (int r = 0; r < 13; ++r) {
    for (int c = 0; c < 37; ++c) ASSERT_EQ(x[r * 37 + c], x0[r * 37 + c] + b[c]);
  }
}

TEST(BiasAddTest, ReluAfterTheBiasOrAlone) {
  auto x = Random(13 * 37, 22);
  const auto x0 = x;
  auto b = Random(37, 23);
  ThreadPool pool(2);
  ASSERT_EQ(BiasAdd({.x = x.data(), .bias = b.data(), .rows = 13, .cols = 37, .relu = true}, &pool),
            KernelStatus::kOk);
  int zeros = 0;
  for (int i = 0; i < 13 * 37; ++i) {
    ASSERT_EQ(x[i], std::max(x0[i] + b[i % 37], 0.0f));
    zeros += x[i] == 0.0f;
  }
  EXPECT_GT(zeros, 13 * 37 / 4);  // the inputs straddle 0
  auto y = Random(5 * 8, 24);
  const auto y0 = y;
  ASSERT_EQ(BiasAdd({.x = y.data(), .rows = 5, .cols = 8, .relu = true}, &pool), KernelStatus::kOk);
  for (int i = 0; i < 5 * 8; ++i) ASSERT_EQ(y[i], std::max(y0[i], 0.0f));
  EXPECT_EQ(BiasAdd({.x = y.data(), .rows = 5, .cols = 8}, &pool),
            KernelStatus::kInvalidArgument);  // neither bias nor ReLU
}

TEST(PagedAttentionTest, RejectsHeadsNotDivisibleByKvHeads) {
  PagedAttentionParams p;
  p.kv.num_kv_heads = 3;
  p.num_q_heads = 8;
  EXPECT_EQ(PagedAttention(p, nullptr), KernelStatus::kInvalidShape);
}

TEST(ThreadPoolTest, CoversRangeExactlyOnce) {
  ThreadPool pool(4);
  for (int64_t n : {0, 1, 3, 4, 5, 1000}) {
    std::vector<std::atomic<int>> hits(n);
    pool.ParallelFor(n, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

// fp32 -> bf16 rounds to nearest even (values chosen at and around ties), bf16 -> fp32 is exact,
// overlapping buffers are refused and an in-place same-dtype conversion is a no-op.
TEST(ConvertTest, RoundsToNearestEvenAndRefusesOverlap) {
  const std::vector<float> in = {
      1.0f,  1.00390625f /* tie: even 0x3f80 */, 1.01171875f /* tie: up to 0x3f82 */,
      -2.5f, 3.4e38f /* past bf16 max: inf */,   1e-40f /* subnormal */};
  const std::vector<uint16_t> want = {0x3f80, 0x3f80, 0x3f82, 0xc020, 0x7f80, 0x0001};
  std::vector<uint16_t> bits(in.size());
  ASSERT_EQ(Convert({.src = in.data(),
                     .dst = bits.data(),
                     .n = 6,
                     .src_dtype = ScalarType::kF32,
                     .dst_dtype = ScalarType::kBF16},
                    nullptr),
            KernelStatus::kOk);
  EXPECT_EQ(bits, want);
  std::vector<float> back(in.size());
  ASSERT_EQ(Convert({.src = bits.data(),
                     .dst = back.data(),
                     .n = 6,
                     .src_dtype = ScalarType::kBF16,
                     .dst_dtype = ScalarType::kF32},
                    nullptr),
            KernelStatus::kOk);
  for (size_t i = 0; i < in.size(); ++i) EXPECT_EQ(F32ToBf16(back[i]), want[i]) << i;
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_EQ(back[3], -2.5f);
  std::vector<float> buf = {1, 2, 3, 4};
  EXPECT_EQ(Convert({.src = buf.data(), .dst = buf.data(), .n = 4}, nullptr), KernelStatus::kOk);
  EXPECT_EQ(buf, (std::vector<float>{1, 2, 3, 4}));
  EXPECT_EQ(Convert({.src = buf.data(), .dst = buf.data() + 1, .n = 3}, nullptr),
            KernelStatus::kInvalidArgument);
  EXPECT_EQ(Convert({.src = buf.data(),
                     .dst = buf.data(),
                     .n = 4,
                     .src_dtype = ScalarType::kF32,
                     .dst_dtype = ScalarType::kBF16},
                    nullptr),
            KernelStatus::kInvalidArgument);
  EXPECT_EQ(Convert({.src = buf.data(),
                     .dst = bits.data(),
                     .n = 2,
                     .src_dtype = ScalarType::kF16,
                     .dst_dtype = ScalarType::kF32},
                    nullptr),
            KernelStatus::kUnsupportedDtype);
}

}  // namespace
}  // namespace moleserve::kernels::cpu
