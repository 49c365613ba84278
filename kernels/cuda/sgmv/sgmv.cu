#include "kernels/cuda/ops.h"
#include "kernels/cuda/sgmv/sgmv.cuh"

namespace moleserve::kernels::cuda {

cudaError_t SgmvShrink(const SgmvShrinkParams& p, cudaStream_t stream) {
  if (p.num_segments == 0) return cudaSuccess;
  if (p.x == nullptr || p.v == nullptr || p.x_row == nullptr || p.seg_start == nullptr ||
      p.seg_rank == nullptr || p.seg_row_offset == nullptr || p.a_rows == nullptr) {
    return cudaErrorInvalidValue;
  }
  return DispatchFloat(p.dtype, [&]<typename T>() {
    const LaunchPlan plan = PlanSgmvShrink(p.num_segments, p.v_stride, p.in, sizeof(T), p.x);
    if (!plan.ok || p.in == 0) return cudaErrorInvalidValue;
    if (plan.grid.y == 0) return cudaSuccess;
    const dim3 grid(plan.grid.x, plan.grid.y);
    auto launch = [&]<int kVec>() {
      SgmvShrinkKernel<T, kVec><<<grid, plan.block, 0, stream>>>(
          static_cast<const T*>(p.x), p.v, p.x_row, p.seg_start, p.seg_rank, p.seg_row_offset,
          p.a_rows, p.in, p.v_stride);
      return cudaGetLastError();
    };
    return plan.vec > 1 ? launch.template operator()<16 / sizeof(T)>()
                        : launch.template operator()<1>();
  });
}

cudaError_t SgmvExpandRows(const SgmvExpandRowsParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.out < 0 || p.pair_stride < 0 || p.num_segments < 0 ||
      (p.y_stride != 0 && p.y_stride < p.out)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0 || p.out == 0 || p.num_segments == 0) return cudaSuccess;
  if (p.v == nullptr || p.y == nullptr || p.token_pair == nullptr || p.count == nullptr ||
      p.weight == nullptr || p.seg_start == nullptr || p.seg_rank == nullptr ||
      p.seg_row_offset == nullptr || p.b_rows == nullptr) {
    return cudaErrorInvalidValue;
  }
  const LaunchPlan plan = PlanSgmvExpandRows(p.num_tokens, p.v_stride, p.out);
  if (!plan.ok) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    SgmvExpandRowsKernel<T><<<dim3(plan.grid.x, plan.grid.y), plan.block, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t GatherAdd(const GatherAddParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.src_stride < 0 || p.x_rows < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  if (p.x == nullptr || p.y == nullptr || p.y_row == nullptr || p.src == nullptr ||
      p.count == nullptr) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  const int64_t col_blocks = (p.cols + kThreads - 1) / kThreads;
  if (p.rows > kMaxGridX || col_blocks > kMaxGridY) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    GatherAddKernel<T><<<dim3(static_cast<unsigned>(p.rows), static_cast<unsigned>(col_blocks)),
                         kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace moleserve::kernels::cuda
