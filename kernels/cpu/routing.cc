// CPU twins of the routing kernels (the per-token code is routing_math.h, shared with CUDA) and
// of the dtype conversion.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/common/routing_math.h"
#include "kernels/cpu/ops.h"

namespace moleserve::kernels::cpu {

KernelStatus Route(const RouteParams& p, ThreadPool* pool) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.num_experts > kMaxRouteWidth ||
      (p.logits_stride != 0 && p.logits_stride < p.num_experts)) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (p.logits == nullptr || p.experts == nullptr || p.weights == nullptr || p.count == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  const int32_t e = p.num_experts;
  const int64_t stride = p.logits_stride == 0 ? e : p.logits_stride;
  ParallelFor(pool, p.num_tokens, [&](int64_t begin, int64_t end) {
    float prob[kMaxRouteWidth];
    int32_t order[kMaxRouteWidth];
    for (int64_t t = begin; t < end; ++t) {
      p.count[t] = p.active != nullptr && p.active[t] == 0
                       ? 0
                       : routing_math::RouteOne(p, p.logits + t * stride, p.experts + t * e,
                                                p.weights + t * e, prob, order);
    }
  });
  return KernelStatus::kOk;
}

KernelStatus MixRouter(const MixRouterParams& p, ThreadPool* pool) {
  if (p.rows < 0 || p.experts < 1 || p.experts > kMaxRouteWidth || p.routers < 1 ||
      p.routers > kMaxMixRouters) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.x == nullptr || p.y == nullptr || p.x == p.y) return KernelStatus::kInvalidArgument;
  const int64_t width = int64_t{p.routers} * p.experts + p.routers;
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    float s[kMaxRouteWidth];
    for (int64_t r = begin; r < end; ++r) {
      if (p.active != nullptr && p.active[r] == 0) continue;
      routing_math::MixRouterRow(p, p.x + r * width, p.y + r * p.experts, s);
    }
  });
  return KernelStatus::kOk;
}

KernelStatus OutputGateScale(const OutputGateScaleParams& p, ThreadPool* pool) {
  if (p.rows < 0 || p.width < 1 || p.experts < 1) return KernelStatus::kInvalidShape;
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.d == nullptr || p.logits == nullptr) return KernelStatus::kInvalidArgument;
  const auto* d = static_cast<const float*>(p.d);
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* v = d + r * p.width;
      double sum = 0;
      for (int64_t k = 0; k < p.width; ++k) sum += double{v[k]} * v[k];
      const double inv = 1.0 / std::max(std::sqrt(sum), 1e-12);
      float* row = p.logits + r * p.experts;
      for (int32_t e = 0; e < p.experts; ++e) {
        row[e] = static_cast<float>(row[e] * inv) +
                 (p.mask == nullptr ? 0.0f : p.mask[r * p.experts + e]);
      }
    }
  });
  return KernelStatus::kOk;
}

KernelStatus SoftmaxGroups(const SoftmaxGroupsParams& p, ThreadPool* pool) {
  const int64_t stride = p.y_stride == 0 ? p.cols : p.y_stride;
  if (p.rows < 0 || p.group < 1 || p.cols < 0 || p.cols % p.group != 0 || stride < p.cols) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0 || p.cols == 0) return KernelStatus::kOk;
  if (p.x == nullptr || p.y == nullptr) return KernelStatus::kInvalidArgument;
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (p.active != nullptr && p.active[r] == 0) continue;
      routing_math::SoftmaxGroupsRow(p, p.x + r * p.cols, p.y + r * stride);
    }
  });
  return KernelStatus::kOk;
}

KernelStatus RankRoute(const RankRouteParams& p, ThreadPool* pool) {
  if (p.num_tokens < 0 || p.rank < 1 || p.rank > kMaxRouteWidth || p.z_stride < p.rank || p.k < 1 ||
      p.k > p.rank) {
    return KernelStatus::kInvalidShape;
  }
  if (p.num_tokens == 0) return KernelStatus::kOk;
  if (p.z == nullptr || p.u == nullptr || p.kept == nullptr || p.ok == nullptr || p.z == p.u) {
    return KernelStatus::kInvalidArgument;
  }
  ParallelFor(pool, p.num_tokens, [&](int64_t begin, int64_t end) {
    float key[kMaxRouteWidth], g[kMaxRouteWidth];
    int32_t order[kMaxRouteWidth];
    for (int64_t t = begin; t < end; ++t) {
      if (p.active != nullptr && p.active[t] == 0) {
        p.ok[t] = 1;
        continue;
      }
      const float* logits = p.router_logits == nullptr ? nullptr : p.router_logits + t * p.rank;
      p.ok[t] = routing_math::RouteRanksOne(p, p.z + t * p.z_stride, logits, p.kept + t * p.k,
                                            p.u + t * p.z_stride, key, g, order)
                    ? 1
                    : 0;
    }
  });
  if (p.undefined != nullptr) {
    for (int64_t t = 0; t < p.num_tokens; ++t) *p.undefined += p.ok[t] == 0 ? 1 : 0;
  }
  return KernelStatus::kOk;
}

KernelStatus BuildSegments(const SegmentBuildParams& p, ThreadPool*) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.num_experts > kMaxRouteWidth || p.rank < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (p.seg_start == nullptr || p.seg_rank == nullptr || p.seg_row_offset == nullptr ||
      p.undefined == nullptr ||
      (p.num_tokens > 0 && (p.experts == nullptr || p.weights == nullptr || p.count == nullptr ||
                            (p.rows == nullptr && !p.slot_rows) || p.scale == nullptr ||
                            p.pair_row == nullptr || p.pair_weight == nullptr))) {
    return KernelStatus::kInvalidArgument;
  }
  p.seg_start[0] = 0;
  for (int32_t e = 0; e < p.num_experts; ++e) {
    p.seg_start[e + 1] = p.seg_start[e] + routing_math::ExpertPairCount(p, e);
  }
  for (int32_t e = 0; e < p.num_experts; ++e) routing_math::WriteExpertSegment(p, e);
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const bool active = p.active == nullptr || p.active[t] != 0;
    *p.undefined += active && p.count[t] == 0 ? 1 : 0;
  }
  return KernelStatus::kOk;
}

KernelStatus Convert(const ConvertParams& p, ThreadPool* pool) {
  if (p.n < 0) return KernelStatus::kInvalidShape;
  if (p.n == 0) return KernelStatus::kOk;
  if (p.src == nullptr || p.dst == nullptr) return KernelStatus::kInvalidArgument;
  const bool f32_in = p.src_dtype == ScalarType::kF32, bf16_in = p.src_dtype == ScalarType::kBF16;
  const bool f32_out = p.dst_dtype == ScalarType::kF32, bf16_out = p.dst_dtype == ScalarType::kBF16;
  if (!(f32_in || bf16_in) || !(f32_out || bf16_out)) return KernelStatus::kUnsupportedDtype;
  const size_t src_bytes = static_cast<size_t>(p.n) * (f32_in ? 4 : 2);
  const size_t dst_bytes = static_cast<size_t>(p.n) * (f32_out ? 4 : 2);
  if (p.src_dtype == p.dst_dtype && p.src == p.dst) return KernelStatus::kOk;
  const auto* s0 = static_cast<const char*>(p.src);
  const auto* d0 = static_cast<const char*>(p.dst);
  if (s0 < d0 + dst_bytes && d0 < s0 + src_bytes) return KernelStatus::kInvalidArgument;
  if (p.src_dtype == p.dst_dtype) {
    std::memcpy(p.dst, p.src, src_bytes);
    return KernelStatus::kOk;
  }
  ParallelFor(pool, p.n, [&](int64_t begin, int64_t end) {
    if (f32_in) {
      const auto* s = static_cast<const float*>(p.src);
      auto* d = static_cast<uint16_t*>(p.dst);
      for (int64_t i = begin; i < end; ++i) d[i] = F32ToBf16(s[i]);
    } else {
      const auto* s = static_cast<const uint16_t*>(p.src);
      auto* d = static_cast<float*>(p.dst);
      for (int64_t i = begin; i < end; ++i) d[i] = Bf16ToF32(s[i]);
    }
  });
  return KernelStatus::kOk;
}

}  // namespace moleserve::kernels::cpu
