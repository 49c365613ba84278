#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/common/rope_math.h"
#include "kernels/cpu/ops.h"

namespace moleserve::kernels::cpu {

KernelStatus RmsNorm(const RmsNormParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.residual != nullptr && (p.y == p.residual || p.y == p.x)) {
    return KernelStatus::kInvalidArgument;
  }
  const auto* x = static_cast<const float*>(p.x);
  const auto* w = static_cast<const float*>(p.weight);
  auto* y = static_cast<float*>(p.y);
  auto* residual = static_cast<float*>(p.residual);
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * p.cols;
      if (residual != nullptr) {  // the fused residual add, as Add computes it
        float* rr = residual + r * p.cols;
        for (int64_t c = 0; c < p.cols; ++c) rr[c] = rr[c] + xr[c];
        xr = rr;
      }
      float* yr = y + r * p.cols;
      double sum_sq = 0.0;  // double: the oracle should not lose bits on wide rows
      for (int64_t c = 0; c < p.cols; ++c) sum_sq += static_cast<double>(xr[c]) * xr[c];
      const float inv = static_cast<float>(1.0 / std::sqrt(sum_sq / p.cols + p.eps));
      for (int64_t c = 0; c < p.cols; ++c) yr[c] = xr[c] * inv * w[c];
    }
  });
  return KernelStatus::kOk;
}

KernelStatus SiluMul(const SiluMulParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  const auto* g = static_cast<const float*>(p.gate);
  const auto* u = static_cast<const float*>(p.up);
  auto* o = static_cast<float*>(p.out);
  if (p.in_stride != 0 && p.in_stride < p.cols) return KernelStatus::kInvalidShape;
  const int64_t in_stride = p.in_stride > 0 ? p.in_stride : p.cols;
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gr = g + r * in_stride;
      const float* ur = u + r * in_stride;
      float* orow = o + r * p.cols;
      for (int64_t i = 0; i < p.cols; ++i) {
        const float gv = gr[i];
        orow[i] = gv / (1.0f + std::exp(-gv)) * ur[i];
      }
    }
  });
  return KernelStatus::kOk;
}

KernelStatus Embedding(const EmbeddingParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  const auto* table = static_cast<const float*>(p.table);
  auto* out = static_cast<float*>(p.out);
  if (p.table_stride != 0 && p.table_stride < p.hidden) return KernelStatus::kInvalidShape;
  const int64_t stride = p.table_stride > 0 ? p.table_stride : p.hidden;
  ParallelFor(pool, p.num_tokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(out + t * p.hidden, table + static_cast<int64_t>(p.ids[t]) * stride,
                  sizeof(float) * p.hidden);
    }
  });
  return KernelStatus::kOk;
}

KernelStatus Add(const AddParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  const auto* a = static_cast<const float*>(p.a);
  const auto* b = static_cast<const float*>(p.b);
  auto* o = static_cast<float*>(p.out);
  constexpr int64_t kChunk = 4096;
  ParallelFor(pool, (p.n + kChunk - 1) / kChunk, [&](int64_t begin, int64_t end) {
    const int64_t hi = std::min(end * kChunk, p.n);
    for (int64_t i = begin * kChunk; i < hi; ++i) o[i] = a[i] + b[i];
  });
  return KernelStatus::kOk;
}

KernelStatus BiasAdd(const BiasAddParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.bias == nullptr && !p.relu) return KernelStatus::kInvalidArgument;
  auto* x = static_cast<float*>(p.x);
  const auto* b = static_cast<const float*>(p.bias);
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * p.cols;
      if (b != nullptr) {
        for (int64_t c = 0; c < p.cols; ++c) row[c] += b[c];
      }
      if (p.relu) {
        for (int64_t c = 0; c < p.cols; ++c) row[c] = std::max(row[c], 0.0f);
      }
    }
  });
  return KernelStatus::kOk;
}

KernelStatus Rope(const RopeParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.head_dim % 2 != 0) return KernelStatus::kInvalidShape;
  const int64_t q_width = int64_t{p.num_q_heads} * p.head_dim;
  const int64_t k_width = int64_t{p.num_kv_heads} * p.head_dim;
  if ((p.q_stride != 0 && p.q_stride < q_width) || (p.k_stride != 0 && p.k_stride < k_width)) {
    return KernelStatus::kInvalidShape;
  }
  const int64_t q_stride = p.q_stride > 0 ? p.q_stride : q_width;
  const int64_t k_stride = p.k_stride > 0 ? p.k_stride : k_width;
  const int half = p.head_dim / 2;
  auto rotate = [&](float* head, const float* cos_v, const float* sin_v) {
    for (int i = 0; i < half; ++i) {
      const float x0 = head[i];
      const float x1 = head[i + half];
      head[i] = x0 * cos_v[i] - x1 * sin_v[i];
      head[i + half] = x1 * cos_v[i] + x0 * sin_v[i];
    }
  };
  ParallelFor(pool, p.num_tokens, [&](int64_t begin, int64_t end) {
    std::vector<float> cos_v(half), sin_v(half);
    for (int64_t t = begin; t < end; ++t) {
      for (int i = 0; i < half; ++i) {
        rope_math::CosSin(p.positions[t], p.inv_freq[i], &cos_v[i], &sin_v[i]);
      }
      auto* q = static_cast<float*>(p.q) + t * q_stride;
      for (int h = 0; h < p.num_q_heads; ++h)
        rotate(q + h * p.head_dim, cos_v.data(), sin_v.data());
      auto* k = static_cast<float*>(p.k) + t * k_stride;
      for (int h = 0; h < p.num_kv_heads; ++h)
        rotate(k + h * p.head_dim, cos_v.data(), sin_v.data());
    }
  });
  return KernelStatus::kOk;
}

}  // namespace moleserve::kernels::cpu
