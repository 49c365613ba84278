// CreateCudaBackend and CudaDeviceCount through the CUDA plugin (cuda_plugin.h), opened once.
// Where it is looked for, in order: $MOLESERVE_CUDA_PLUGIN (a file), next to the executable and
// in ../lib from it, the build tree's lib/ (MOLESERVE_CUDA_PLUGIN_DIR), then the loader's search
// path (LD_LIBRARY_PATH).

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda_plugin.h"

namespace moleserve::engine {
namespace {

struct Plugin {
  const CudaPluginApi* api = nullptr;
  std::string error;
};

const Plugin& LoadPlugin() {
  static const Plugin plugin = [] {
    Plugin p;
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("MOLESERVE_CUDA_PLUGIN"); env != nullptr && *env != 0) {
      candidates.push_back(env);
    }
    std::error_code ec;
    const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      candidates.push_back((exe.parent_path() / kCudaPluginFile).string());
      candidates.push_back((exe.parent_path().parent_path() / "lib" / kCudaPluginFile).string());
    }
    candidates.push_back(absl::StrCat(MOLESERVE_CUDA_PLUGIN_DIR, "/", kCudaPluginFile));
    candidates.push_back(kCudaPluginFile);
    std::vector<std::string> errors;
    for (const std::string& path : candidates) {
      if (path.find('/') != std::string::npos && !std::filesystem::exists(path, ec)) continue;
      void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (handle == nullptr) {
        errors.push_back(dlerror());
        continue;
      }
      auto entry = reinterpret_cast<const CudaPluginApi* (*)()>(dlsym(handle, kCudaPluginSymbol));
      if (entry == nullptr || entry()->version != kCudaPluginApiVersion) {
        errors.push_back(absl::StrCat(path, ": not a moleserve CUDA plugin of API version ",
                                      kCudaPluginApiVersion));
        continue;
      }
      p.api = entry();
      return p;
    }
    p.error = absl::StrCat("cannot load the CUDA backend plugin ", kCudaPluginFile,
                           " (set MOLESERVE_CUDA_PLUGIN to its path)", errors.empty() ? "" : ": ",
                           absl::StrJoin(errors, "; "));
    return p;
  }();
  return plugin;
}

}  // namespace

bool CudaBackendCompiled() { return true; }

int CudaDeviceCount() {
  const Plugin& p = LoadPlugin();
  return p.api == nullptr ? 0 : p.api->device_count();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  const Plugin& p = LoadPlugin();
  if (p.api == nullptr) return absl::FailedPreconditionError("cuda backend: " + p.error);
  return p.api->create(options);
}

}  // namespace moleserve::engine
