#pragma once

// Host-side launchers of the CUDA kernels. Host .cc files include this header, never a .cuh
// (STYLE.md section 1). Each launcher takes the same Params struct as its CPU twin in
// kernels/cpu/ops.h, enqueues on `stream`, and returns the launch's cudaError_t
// (cudaErrorInvalidValue for a dtype or shape it does not support; never a silent fallback).
// Supported dtypes: kF32 and kBF16 (fp32 math inside).

#include <cuda_runtime_api.h>

#include "kernels/common/params.h"

namespace moleserve::kernels::cuda {

cudaError_t RmsNorm(const RmsNormParams& p, cudaStream_t stream);
cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream);
cudaError_t Embedding(const EmbeddingParams& p, cudaStream_t stream);
cudaError_t Add(const AddParams& p, cudaStream_t stream);
cudaError_t BiasAdd(const BiasAddParams& p, cudaStream_t stream);
cudaError_t Rope(const RopeParams& p, cudaStream_t stream);
cudaError_t Convert(const ConvertParams& p, cudaStream_t stream);
cudaError_t KvWrite(const KvWriteParams& p, cudaStream_t stream);
cudaError_t PagedAttention(const PagedAttentionParams& p, cudaStream_t stream);
// Segmented GEMMs: the segment tables live on the device, so ranks above v_stride cannot be
// refused here; such rows are skipped (the backend's callers build the tables).
cudaError_t SgmvShrink(const SgmvShrinkParams& p, cudaStream_t stream);
// One block per (row, 256 columns): no atomics, the pairs of a row in token_pair order.
cudaError_t SgmvExpandRows(const SgmvExpandRowsParams& p, cudaStream_t stream);
// One block per (row, 256 columns): no atomics, the sources of a row in order.
cudaError_t GatherAdd(const GatherAddParams& p, cudaStream_t stream);
// Routing: count[t] == 0 / ok[t] == 0 marks a token with NaN or undefined logits.
cudaError_t Route(const RouteParams& p, cudaStream_t stream);
cudaError_t RankRoute(const RankRouteParams& p, cudaStream_t stream);
cudaError_t SoftmaxGroups(const SoftmaxGroupsParams& p, cudaStream_t stream);
cudaError_t MixRouter(const MixRouterParams& p, cudaStream_t stream);
// One block per row: the norm by a fixed-order block reduction.
cudaError_t OutputGateScale(const OutputGateScaleParams& p, cudaStream_t stream);
cudaError_t BuildSegments(const SegmentBuildParams& p, cudaStream_t stream);
// The next token of each row (params.h SampleParams): one block per row, thresholds by bisection
// over sampling_math.h's order keys (no sort), fixed-order block sums (the same inputs give the
// same tokens run to run).
cudaError_t Sample(const SampleParams& p, cudaStream_t stream);

}  // namespace moleserve::kernels::cuda
