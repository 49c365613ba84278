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

}  // namespace moleserve::kernels::cuda
