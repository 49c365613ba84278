// Routing on the device: one thread per token runs the shared per-token code of
// kernels/common/routing_math.h (the CPU twin runs the same code; both are checked against
// engine/routing).

#include "kernels/common/launch_plan.h"
#include "kernels/common/routing_math.h"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {
namespace {

__global__ void RouteKernel(RouteParams p) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= p.num_tokens) return;
  float prob[kMaxRouteWidth];
  int32_t order[kMaxRouteWidth];
  const int32_t e = p.num_experts;
  if (p.active != nullptr && p.active[t] == 0) {
    p.count[t] = 0;
    return;
  }
  const int64_t stride = p.logits_stride == 0 ? e : p.logits_stride;
  p.count[t] = routing_math::RouteOne(p, p.logits + t * stride, p.experts + t * e,
                                      p.weights + t * e, prob, order);
}

__global__ void SoftmaxGroupsKernel(SoftmaxGroupsParams p, int64_t stride) {
  const int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (r >= p.rows || (p.active != nullptr && p.active[r] == 0)) return;
  routing_math::SoftmaxGroupsRow(p, p.x + r * p.cols, p.y + r * stride);
}

__global__ void MixRouterKernel(MixRouterParams p) {
  const int64_t r = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (r >= p.rows || (p.active != nullptr && p.active[r] == 0)) return;
  float s[kMaxRouteWidth];
  const int64_t width = int64_t{p.routers} * p.experts + p.routers;
  routing_math::MixRouterRow(p, p.x + r * width, p.y + r * p.experts, s);
}

__global__ void RankRouteKernel(RankRouteParams p) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= p.num_tokens) return;
  if (p.active != nullptr && p.active[t] == 0) {
    p.ok[t] = 1;
    return;
  }
  float key[kMaxRouteWidth], g[kMaxRouteWidth];
  int32_t order[kMaxRouteWidth];
  const float* logits = p.router_logits == nullptr ? nullptr : p.router_logits + t * p.rank;
  p.ok[t] = routing_math::RouteRanksOne(p, p.z + t * p.z_stride, logits, p.kept + t * p.k,
                                        p.u + t * p.z_stride, key, g, order)
                ? 1
                : 0;
  if (p.ok[t] == 0 && p.undefined != nullptr) atomicAdd(p.undefined, 1);
}

// One block, thread e owns expert e: counts its pairs, thread 0 scans the counts into
// seg_start, then each thread writes its segment in token order (the CPU twin's order).
__global__ void BuildSegmentsKernel(SegmentBuildParams p) {
  const int32_t e = threadIdx.x;
  __shared__ int32_t counts[kMaxRouteWidth];
  if (e < p.num_experts) counts[e] = routing_math::ExpertPairCount(p, e);
  __syncthreads();
  if (e == 0) {
    int32_t total = 0;
    p.seg_start[0] = 0;
    for (int32_t i = 0; i < p.num_experts; ++i) {
      total += counts[i];
      p.seg_start[i + 1] = total;
    }
    int32_t undefined = 0;
    for (int32_t t = 0; t < p.num_tokens; ++t) {
      const bool active = p.active == nullptr || p.active[t] != 0;
      undefined += active && p.count[t] == 0 ? 1 : 0;
    }
    if (undefined > 0) atomicAdd(p.undefined, undefined);
  }
  __syncthreads();
  if (e < p.num_experts) routing_math::WriteExpertSegment(p, e);
}

// One block per row: each thread sums the squares of a strided slice, a fixed-order tree adds
// the partial sums (the same inputs give the same logits run to run).
template <typename T>
__global__ void OutputGateScaleKernel(OutputGateScaleParams p) {
  constexpr int kThreads = 256;
  __shared__ float partial[kThreads];
  const int64_t r = blockIdx.x;
  const T* v = static_cast<const T*>(p.d) + r * p.width;
  float sum = 0.0f;
  for (int64_t k = threadIdx.x; k < p.width; k += kThreads) {
    const float x = ToFloat(v[k]);
    sum += x * x;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int step = kThreads / 2; step > 0; step /= 2) {
    if (threadIdx.x < step) partial[threadIdx.x] += partial[threadIdx.x + step];
    __syncthreads();
  }
  const float inv = 1.0f / fmaxf(sqrtf(partial[0]), 1e-12f);
  for (int32_t e = threadIdx.x; e < p.experts; e += kThreads) {
    const int64_t i = r * p.experts + e;
    p.logits[i] = p.logits[i] * inv + (p.mask == nullptr ? 0.0f : p.mask[i]);
  }
}

}  // namespace

cudaError_t BuildSegments(const SegmentBuildParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.num_experts > kMaxRouteWidth || p.rank < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.seg_start == nullptr || p.seg_rank == nullptr || p.seg_row_offset == nullptr ||
      p.undefined == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens > 0 && (p.experts == nullptr || p.weights == nullptr || p.count == nullptr ||
                           (p.rows == nullptr && !p.slot_rows) || p.scale == nullptr ||
                           p.pair_row == nullptr || p.pair_weight == nullptr)) {
    return cudaErrorInvalidValue;
  }
  BuildSegmentsKernel<<<1, kMaxRouteWidth, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t Route(const RouteParams& p, cudaStream_t stream) {
  // k is clamped to 1..E by the per-token code, as on the CPU.
  const LaunchPlan plan = PlanRoute(p.num_tokens, p.num_experts, 1);
  if (!plan.ok || (p.logits_stride != 0 && p.logits_stride < p.num_experts)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.logits == nullptr || p.experts == nullptr || p.weights == nullptr || p.count == nullptr) {
    return cudaErrorInvalidValue;
  }
  RouteKernel<<<plan.grid.x, plan.block, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t SoftmaxGroups(const SoftmaxGroupsParams& p, cudaStream_t stream) {
  // One thread per row: the rows are few (a step's tokens) and their groups small.
  const int64_t stride = p.y_stride == 0 ? p.cols : p.y_stride;
  if (p.rows < 0 || p.rows > 0x7fffffff || p.group < 1 || p.cols < 0 || p.cols % p.group != 0 ||
      stride < p.cols) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned int>((p.rows + kThreads - 1) / kThreads);
  SoftmaxGroupsKernel<<<blocks, kThreads, 0, stream>>>(p, stride);
  return cudaGetLastError();
}

cudaError_t MixRouter(const MixRouterParams& p, cudaStream_t stream) {
  // One thread per row, as SoftmaxGroups: a step's tokens, a few small softmaxes each.
  if (p.rows < 0 || p.rows > 0x7fffffff || p.experts < 1 || p.experts > kMaxRouteWidth ||
      p.routers < 1 || p.routers > kMaxMixRouters) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr || p.x == p.y) return cudaErrorInvalidValue;
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned int>((p.rows + kThreads - 1) / kThreads);
  MixRouterKernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t OutputGateScale(const OutputGateScaleParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.rows > 0x7fffffff || p.width < 1 || p.experts < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  if (p.d == nullptr || p.logits == nullptr) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    OutputGateScaleKernel<T><<<static_cast<unsigned int>(p.rows), 256, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t RankRoute(const RankRouteParams& p, cudaStream_t stream) {
  const LaunchPlan plan = PlanRoute(p.num_tokens, p.rank, p.k);
  if (!plan.ok || p.z_stride < p.rank) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.z == nullptr || p.u == nullptr || p.kept == nullptr || p.ok == nullptr || p.z == p.u) {
    return cudaErrorInvalidValue;
  }
  RankRouteKernel<<<plan.grid.x, plan.block, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moleserve::kernels::cuda
