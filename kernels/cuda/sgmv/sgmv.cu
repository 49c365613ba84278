#include "kernels/cuda/ops.h"
#include "kernels/cuda/sgmv/sgmv.cuh"
#include "kernels/cuda/sgmv/sgmv_tensor_core.cuh"

namespace moleserve::kernels::cuda {

namespace {

cudaError_t ShrinkOnTensorCores(const SgmvShrinkParams& p, const LaunchPlan& plan,
                                cudaStream_t stream) {
  if (plan.grid.x == 0 || plan.grid.y == 0) return cudaSuccess;
  const int32_t splits = static_cast<int32_t>(plan.grid.z);
  const int64_t split_stride = splits > 1 ? int64_t{p.max_pairs} * p.v_stride : 0;
  const SgmvShrinkTileArgs args{.x = static_cast<const __nv_bfloat16*>(p.x),
                                .out = splits > 1 ? p.split_workspace : p.v,
                                .x_row = p.x_row,
                                .seg_start = p.seg_start,
                                .seg_rank = p.seg_rank,
                                .seg_row_offset = p.seg_row_offset,
                                .a_rows = p.a_rows,
                                .in = p.in,
                                .v_stride = p.v_stride,
                                .split_stride = split_stride,
                                .max_pairs = p.max_pairs};
  const dim3 grid(plan.grid.x, plan.grid.y, plan.grid.z);
  SgmvShrinkTileKernel<<<grid, plan.block, 0, stream>>>(args);
  if (splits == 1) return cudaGetLastError();
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  SgmvShrinkReduceKernel<<<dim3(plan.grid.x, plan.grid.y), 256, 0, stream>>>(
      p.split_workspace, p.v, p.seg_start, p.seg_rank, p.v_stride, splits, split_stride,
      p.max_pairs);
  return cudaGetLastError();
}

}  // namespace

cudaError_t SgmvShrink(const SgmvShrinkParams& p, cudaStream_t stream) {
  if (p.num_segments == 0) return cudaSuccess;
  if (p.x == nullptr || p.v == nullptr || p.x_row == nullptr || p.seg_start == nullptr ||
      p.seg_rank == nullptr || p.seg_row_offset == nullptr || p.a_rows == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.split_workspace_floats < 0 || p.max_pairs < 0 ||
      (p.split_workspace == nullptr && p.split_workspace_floats != 0)) {
    return cudaErrorInvalidValue;
  }
  if (p.dtype == ScalarType::kBF16) {
    const LaunchPlan tiles =
        PlanSgmvShrinkTiles(p.num_segments, p.v_stride, p.in, 2, p.x, p.num_sms, p.max_pairs,
                            p.split_workspace != nullptr ? p.split_workspace_floats : 0);
    if (tiles.ok) return ShrinkOnTensorCores(p, tiles, stream);
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
  return DispatchFloat(p.dtype, [&]<typename T>() {
    const LaunchPlan plan =
        PlanSgmvExpandRows(p.num_tokens, p.v_stride, p.out, sizeof(T), p.y, p.y_stride);
    if (!plan.ok) return cudaErrorInvalidValue;
    const dim3 grid(plan.grid.x, plan.grid.y);
    if (plan.vec > 1) {
      SgmvExpandRowsKernel<T, 16 / sizeof(T)><<<grid, plan.block, 0, stream>>>(p);
    } else {
      SgmvExpandRowsKernel<T, 1><<<grid, plan.block, 0, stream>>>(p);
    }
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
