// Built instead of cuda_backend.cc when MOLESERVE_ENABLE_CUDA is OFF.
#include "engine/backend/backend.h"

namespace moleserve::engine {

bool CudaBackendCompiled() { return false; }
int CudaDeviceCount() { return 0; }

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions&) {
  return absl::FailedPreconditionError(
      "cuda backend: this build has no CUDA support (configure with MOLESERVE_ENABLE_CUDA=ON)");
}

}  // namespace moleserve::engine
