#pragma once

// The one place that turns CUDA runtime errors into absl::Status (STYLE.md section 3).

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace moleserve::engine {

// OK for cudaSuccess; otherwise kResourceExhausted for out-of-memory, kInvalidArgument for
// cudaErrorInvalidValue (a kernel refused its Params), kInternal for the rest. The message names
// `context` and CUDA's own error name and string.
absl::Status CudaStatus(cudaError_t err, absl::string_view context);

}  // namespace moleserve::engine
