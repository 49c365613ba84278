#pragma once

// The one place that turns CUDA runtime and cuBLAS errors into absl::Status (STYLE.md section 3).

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace moleserve::engine {

// OK for cudaSuccess; otherwise kResourceExhausted for out-of-memory, kInvalidArgument for
// cudaErrorInvalidValue (a kernel refused its Params), kInternal for the rest. The message names
// `context` and CUDA's own error name and string.
absl::Status CudaStatus(cudaError_t err, absl::string_view context);
// Likewise for cuBLAS: kResourceExhausted for CUBLAS_STATUS_ALLOC_FAILED, kInvalidArgument for
// CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED, kInternal otherwise.
absl::Status CublasStatus(cublasStatus_t status, absl::string_view context);

}  // namespace moleserve::engine
