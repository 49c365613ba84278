#pragma once

// CPU implementations of every op in kernels/common/params.h: fp32, OpenBLAS for GEMM, data
// parallelism over a ThreadPool (may be null: run inline). They are both the CPU backend's compute
// and the oracle the CUDA kernels are tested against. Each function is thread-compatible: distinct
// calls on disjoint outputs may run concurrently.

#include "kernels/common/kernel_status.h"
#include "kernels/common/params.h"
#include "kernels/cpu/thread_pool.h"

namespace moleserve::kernels::cpu {

KernelStatus RmsNorm(const RmsNormParams& p, ThreadPool* pool);
KernelStatus SiluMul(const SiluMulParams& p, ThreadPool* pool);
KernelStatus Embedding(const EmbeddingParams& p, ThreadPool* pool);
KernelStatus Add(const AddParams& p, ThreadPool* pool);
KernelStatus BiasAdd(const BiasAddParams& p, ThreadPool* pool);
// OpenBLAS sgemm; its own threads (see SetBlasThreads).
KernelStatus Gemm(const GemmParams& p);
KernelStatus Rope(const RopeParams& p, ThreadPool* pool);
KernelStatus KvWrite(const KvWriteParams& p, ThreadPool* pool);
KernelStatus PagedAttention(const PagedAttentionParams& p, ThreadPool* pool);

// Segmented LoRA GEMMs and the row-owned weighted gather-add (params.h). fp32 only (other
// dtypes: kUnsupportedDtype). Arguments are checked before anything is written: negative sizes or
// a rank above v_stride -> kInvalidShape; null pointers, negative row indices or offsets, a
// seg_start that does not start at 0 and never decrease, a pair or source index outside the call,
// or an output row named twice -> kInvalidArgument. Row indices are not checked against the
// (unknown) row counts of x and y. The shrink's segments with many pairs go through OpenBLAS
// sgemm on the calling thread (OpenBLAS's own threads), the rest run on the pool; the calling
// thread keeps scratch buffers for the gathered rows between calls. The expand works segment by
// segment like the shrink (a row's pairs add in segment order; a pair named by two rows ->
// kInvalidArgument); the gather-add runs on the pool by column blocks, a row's sources in order.
KernelStatus SgmvShrink(const SgmvShrinkParams& p, ThreadPool* pool);
KernelStatus GatherAdd(const GatherAddParams& p, ThreadPool* pool);
KernelStatus SgmvExpandRows(const SgmvExpandRowsParams& p, ThreadPool* pool);

// Routing (routing_math.h, the same per-token code the CUDA kernel runs) and dtype conversion.
// Route / RankRoute: widths outside 1..kMaxRouteWidth or k outside 1..width -> kInvalidShape.
KernelStatus Route(const RouteParams& p, ThreadPool* pool);
KernelStatus RankRoute(const RankRouteParams& p, ThreadPool* pool);
// MixRouter: experts outside 1..kMaxRouteWidth or routers outside 1..kMaxMixRouters ->
// kInvalidShape; x aliasing y -> kInvalidArgument.
KernelStatus MixRouter(const MixRouterParams& p, ThreadPool* pool);
// OutputGateScale: experts < 1 or width < 1 -> kInvalidShape; fp32 only.
KernelStatus OutputGateScale(const OutputGateScaleParams& p, ThreadPool* pool);
// SoftmaxGroups: cols not a multiple of group, or y_stride < cols -> kInvalidShape.
KernelStatus SoftmaxGroups(const SoftmaxGroupsParams& p, ThreadPool* pool);
// Segments from routing decisions (params.h SegmentBuildParams); runs on the calling thread.
KernelStatus BuildSegments(const SegmentBuildParams& p, ThreadPool* pool);
// The next token of each row (params.h SampleParams, sampling_math.h): rows on the pool. Negative
// rows or vocab < 1 -> kInvalidShape; a null pointer the rows need, num_top_logprobs outside
// 0..kMaxSampleTopLogprobs or a reversed penalty range -> kInvalidArgument.
KernelStatus Sample(const SampleParams& p, ThreadPool* pool);
// fp32 <-> bf16 (round to nearest even; NaN stays NaN) or a same-dtype copy.
KernelStatus Convert(const ConvertParams& p, ThreadPool* pool);

// Sets OpenBLAS's thread count (process-wide, OpenBLAS's own state).
void SetBlasThreads(int n);

}  // namespace moleserve::kernels::cpu
