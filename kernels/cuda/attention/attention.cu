#include <algorithm>

#include "kernels/cuda/attention/grouped_attention.cuh"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {

cudaError_t KvWrite(const KvWriteParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_tokens > kMaxGridX || p.kv.num_kv_heads < 1 || p.kv.head_dim < 1 ||
      p.kv.block_size < 1) {
    return cudaErrorInvalidValue;
  }
  const int64_t width = int64_t{p.kv.num_kv_heads} * p.kv.head_dim;
  if (p.kv_stride != 0 && p.kv_stride < width) return cudaErrorInvalidValue;
  const int64_t q_width = int64_t{p.num_q_heads} * p.kv.head_dim;
  if (p.rope_inv_freq != nullptr &&
      (p.q == nullptr || p.num_q_heads < 0 || p.kv.head_dim % 2 != 0 ||
       (p.q_stride != 0 && p.q_stride < q_width))) {
    return cudaErrorInvalidValue;
  }
  return DispatchFloat(p.dtype, [&]<typename T>() {
    KvWriteKernel<T><<<static_cast<unsigned>(p.num_tokens), 128, 0, stream>>>(
        p.kv, static_cast<T*>(const_cast<void*>(p.k)), static_cast<const T*>(p.v), p.token_seq,
        p.positions, p.kv_stride > 0 ? p.kv_stride : width, p.rope_inv_freq, static_cast<T*>(p.q),
        p.num_q_heads, p.q_stride > 0 ? p.q_stride : q_width);
    return cudaGetLastError();
  });
}

namespace {

// The grouped kernel for a group size rounded up to 1, 2, 4 or 8 heads.
template <typename T, int kVec>
cudaError_t LaunchGrouped(const PagedAttentionParams& p, const LaunchPlan& plan, int64_t q_stride,
                          cudaStream_t stream) {
  const int32_t group = p.num_q_heads / p.kv.num_kv_heads;
  const dim3 grid(plan.grid.x, plan.grid.y, plan.grid.z);
  auto launch = [&]<int kGroup>() {
    GroupedAttentionKernel<T, kVec, kGroup><<<grid, plan.block, 0, stream>>>(
        p.kv, static_cast<const T*>(p.q), static_cast<T*>(p.out), p.token_seq, p.positions,
        p.num_q_heads, p.scale, p.sliding_window, q_stride, p.split_workspace);
    return cudaGetLastError();
  };
  cudaError_t err = group <= 1   ? launch.template operator()<1>()
                    : group <= 2 ? launch.template operator()<2>()
                    : group <= 4 ? launch.template operator()<4>()
                                 : launch.template operator()<8>();
  if (err != cudaSuccess || plan.grid.z == 1) return err;
  const unsigned threads = static_cast<unsigned>(std::min(p.kv.head_dim, 256));
  MergeAttentionSplitsKernel<T><<<dim3(plan.grid.x, p.num_q_heads), threads, 0, stream>>>(
      p.split_workspace, static_cast<T*>(p.out), p.num_q_heads, p.kv.head_dim,
      static_cast<int32_t>(plan.grid.z));
  return cudaGetLastError();
}

}  // namespace

cudaError_t PagedAttention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const LaunchPlan plan = PlanPagedAttention(p.num_tokens, p.num_q_heads, p.kv.num_kv_heads,
                                             p.kv.head_dim, p.kv.block_size);
  if (!plan.ok) return cudaErrorInvalidValue;  // sliding_window <= 0: full attention, as on CPU
  const int64_t q_width = int64_t{p.num_q_heads} * p.kv.head_dim;
  if (p.q_stride != 0 && p.q_stride < q_width) return cudaErrorInvalidValue;
  const int64_t q_stride = p.q_stride > 0 ? p.q_stride : q_width;
  if (p.split_workspace_floats < 0 ||
      (p.split_workspace == nullptr && p.split_workspace_floats != 0)) {
    return cudaErrorInvalidValue;
  }
  return DispatchFloat(p.dtype, [&]<typename T>() {
    const LaunchPlan grouped = PlanGroupedAttention(
        p.num_tokens, p.num_q_heads, p.kv.num_kv_heads, p.kv.head_dim, sizeof(T), p.num_sms,
        p.split_workspace != nullptr ? p.split_workspace_floats : 0);
    if (grouped.ok) return LaunchGrouped<T, 16 / sizeof(T)>(p, grouped, q_stride, stream);
    // A head size or group the grouped kernel does not take: one block per query head.
    PagedAttentionKernel<T><<<dim3(plan.grid.x, plan.grid.y), plan.block, 0, stream>>>(
        p.kv, static_cast<const T*>(p.q), static_cast<T*>(p.out), p.token_seq, p.positions,
        p.num_q_heads, p.scale, p.sliding_window, q_stride);
    return cudaGetLastError();
  });
}

}  // namespace moleserve::kernels::cuda
