// Routing on the device: one thread per token runs the shared per-token code of
// kernels/common/routing_math.h (the CPU twin runs the same code; both are checked against
// engine/routing).

#include "kernels/common/launch_plan.h"
#include "kernels/common/routing_math.h"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {
namespace {

__global__ void RouteKernel(RouteParams p) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= p.num_tokens) return;
  float prob[kMaxRouteWidth];
  int32_t order[kMaxRouteWidth];
  const int32_t e = p.num_experts;
  p.count[t] = routing_math::RouteOne(p, p.logits + t * e, p.experts + t * e, p.weights + t * e,
                                      prob, order);
}

__global__ void RankRouteKernel(RankRouteParams p) {
  const int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (t >= p.num_tokens) return;
  float key[kMaxRouteWidth], g[kMaxRouteWidth];
  int32_t order[kMaxRouteWidth];
  const float* logits = p.router_logits == nullptr ? nullptr : p.router_logits + t * p.rank;
  p.ok[t] = routing_math::RouteRanksOne(p, p.z + t * p.z_stride, logits, p.kept + t * p.k,
                                        p.u + t * p.z_stride, key, g, order)
                ? 1
                : 0;
}

}  // namespace

cudaError_t Route(const RouteParams& p, cudaStream_t stream) {
  // k is clamped to 1..E by the per-token code, as on the CPU.
  const LaunchPlan plan = PlanRoute(p.num_tokens, p.num_experts, 1);
  if (!plan.ok) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.logits == nullptr || p.experts == nullptr || p.weights == nullptr || p.count == nullptr) {
    return cudaErrorInvalidValue;
  }
  RouteKernel<<<plan.grid.x, plan.block, 0, stream>>>(p);
  return cudaGetLastError();
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
