#pragma once

// The CUDA backend ships as a plugin, libmoleserve_cuda.so, opened with dlopen by the first call
// that needs it (CreateCudaBackend, CudaDeviceCount). A binary that runs on the CPU never maps
// the CUDA runtime: libcudart's thread-local storage, loaded at startup, would sit in every
// thread's static TLS block and overflow the small stacks of civetweb's threads (the /metrics
// server); a dlopen-ed library's TLS is allocated on demand instead.
//
// The plugin exports one C symbol returning this table. Both sides are built from this tree with
// the same compiler and the same (shared) Abseil, so C++ types cross the boundary.

#include <memory>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"

namespace moleserve::engine {

inline constexpr int kCudaPluginApiVersion = 2;  // 2: CudaBackendOptions::split_workspace_bytes
inline constexpr const char* kCudaPluginFile = "libmoleserve_cuda.so";
inline constexpr const char* kCudaPluginSymbol = "moleserve_cuda_plugin";

struct CudaPluginApi {
  int version;
  int (*device_count)();
  absl::StatusOr<std::unique_ptr<Backend>> (*create)(const CudaBackendOptions& options);
};

}  // namespace moleserve::engine
