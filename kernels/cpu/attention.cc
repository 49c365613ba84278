#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/ops.h"

namespace moleserve::kernels::cpu {
namespace {

// Pointer to row `pos` of sequence `seq` in a [num_blocks, block_size, kv_heads, head_dim] cache.
inline int64_t CacheRowOffset(const PagedKvLayout& kv, int32_t seq, int32_t pos) {
  const int32_t block = kv.block_tables[kv.block_table_offsets[seq] + pos / kv.block_size];
  const int64_t row = static_cast<int64_t>(block) * kv.block_size + pos % kv.block_size;
  return row * kv.num_kv_heads * kv.head_dim;
}

}  // namespace

KernelStatus KvWrite(const KvWriteParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  const int64_t width = static_cast<int64_t>(p.kv.num_kv_heads) * p.kv.head_dim;
  if (p.kv_stride != 0 && p.kv_stride < width) return KernelStatus::kInvalidShape;
  const int64_t stride = p.kv_stride > 0 ? p.kv_stride : width;
  if (p.rope_inv_freq != nullptr) {  // the fused RoPE: exactly Rope, then the write
    if (p.q == nullptr) return KernelStatus::kInvalidArgument;
    const KernelStatus s = Rope(FusedRopeOf(p), pool);
    if (s != KernelStatus::kOk) return s;
  }
  ParallelFor(pool, p.num_tokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t off = CacheRowOffset(p.kv, p.token_seq[t], p.positions[t]);
      std::memcpy(static_cast<float*>(p.kv.k_cache) + off,
                  static_cast<const float*>(p.k) + t * stride, sizeof(float) * width);
      std::memcpy(static_cast<float*>(p.kv.v_cache) + off,
                  static_cast<const float*>(p.v) + t * stride, sizeof(float) * width);
    }
  });
  return KernelStatus::kOk;
}

KernelStatus PagedAttention(const PagedAttentionParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.kv.num_kv_heads <= 0 || p.num_q_heads % p.kv.num_kv_heads != 0) {
    return KernelStatus::kInvalidShape;
  }
  const int d = p.kv.head_dim;
  const int64_t q_width = int64_t{p.num_q_heads} * d;
  if (p.q_stride != 0 && p.q_stride < q_width) return KernelStatus::kInvalidShape;
  const int64_t q_stride = p.q_stride > 0 ? p.q_stride : q_width;
  const int group = p.num_q_heads / p.kv.num_kv_heads;
  const auto* k_cache = static_cast<const float*>(p.kv.k_cache);
  const auto* v_cache = static_cast<const float*>(p.kv.v_cache);
  // One work item per (token, query head).
  ParallelFor(pool, p.num_tokens * p.num_q_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / p.num_q_heads;
      const int h = static_cast<int>(item % p.num_q_heads);
      const int kvh = h / group;
      const int32_t seq = p.token_seq[t];
      const int32_t ctx = p.positions[t] + 1;
      const int32_t first = p.sliding_window > 0 ? std::max(0, ctx - p.sliding_window) : 0;
      const float* q = static_cast<const float*>(p.q) + t * q_stride + h * d;
      scores.resize(ctx);
      float max_score = -std::numeric_limits<float>::infinity();
      for (int32_t j = first; j < ctx; ++j) {
        const float* k = k_cache + CacheRowOffset(p.kv, seq, j) + kvh * d;
        float dot = 0.0f;
        for (int i = 0; i < d; ++i) dot += q[i] * k[i];
        scores[j] = dot * p.scale;
        max_score = std::max(max_score, scores[j]);
      }
      float denom = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int32_t j = first; j < ctx; ++j) {
        const float w = std::exp(scores[j] - max_score);
        denom += w;
        const float* v = v_cache + CacheRowOffset(p.kv, seq, j) + kvh * d;
        for (int i = 0; i < d; ++i) acc[i] += w * v[i];
      }
      float* out = static_cast<float*>(p.out) + (t * p.num_q_heads + h) * d;
      const float inv = 1.0f / denom;
      for (int i = 0; i < d; ++i) out[i] = acc[i] * inv;
    }
  });
  return KernelStatus::kOk;
}

}  // namespace moleserve::kernels::cpu
