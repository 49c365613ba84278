#include "kernels/cuda/attention/paged_attention.cuh"
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

cudaError_t PagedAttention(const PagedAttentionParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  const LaunchPlan plan = PlanPagedAttention(p.num_tokens, p.num_q_heads, p.kv.num_kv_heads,
                                             p.kv.head_dim, p.kv.block_size);
  if (!plan.ok) return cudaErrorInvalidValue;  // sliding_window <= 0: full attention, as on CPU
  const int64_t q_width = int64_t{p.num_q_heads} * p.kv.head_dim;
  if (p.q_stride != 0 && p.q_stride < q_width) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    PagedAttentionKernel<T><<<dim3(plan.grid.x, plan.grid.y), plan.block, 0, stream>>>(
        p.kv, static_cast<const T*>(p.q), static_cast<T*>(p.out), p.token_seq, p.positions,
        p.num_q_heads, p.scale, p.sliding_window, p.q_stride > 0 ? p.q_stride : q_width);
    return cudaGetLastError();
  });
}

}  // namespace moleserve::kernels::cuda
