#pragma once

// Result of a CPU kernel call. CUDA launchers return cudaError_t instead; engine/backend turns
// both into absl::Status. Kernels never throw and never log.

namespace moleserve::kernels {

enum class KernelStatus : int {
  kOk = 0,
  kUnsupportedDtype,  // the op has no implementation for Params::dtype on this device
  kInvalidShape,      // a size or head count that the op cannot handle (e.g. odd head_dim)
  kInvalidArgument,   // a null pointer, a negative row index or an out-of-order segment table
};

inline const char* KernelStatusName(KernelStatus s) {
  switch (s) {
    case KernelStatus::kOk:
      return "ok";
    case KernelStatus::kUnsupportedDtype:
      return "unsupported dtype";
    case KernelStatus::kInvalidShape:
      return "invalid shape";
    case KernelStatus::kInvalidArgument:
      return "invalid argument";
  }
  return "unknown";
}

}  // namespace moleserve::kernels
