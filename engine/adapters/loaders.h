#pragma once

// The two adapter loaders behind LoadAdapter, and the pieces they share. Internal to
// engine/adapters.

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/adapters/adapter.h"
#include "engine/adapters/tensor_set.h"

namespace moleserve::engine {

absl::StatusOr<std::unique_ptr<Adapter>> LoadMoleDirectory(const std::string& dir,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits);
absl::StatusOr<std::unique_ptr<Adapter>> LoadPeftDirectory(const std::string& dir,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits);

// Reads a stack of LoRA experts stored as A [E, r, in] and B [E, out, r] (or [r, in] / [out, r]
// when `stacked` is false, E = 1) and checks the shapes against the module and the limits.
absl::StatusOr<LoraStack> ReadLoraStack(TensorSet& tensors, const std::string& a_name,
                                        const std::string& b_name, bool stacked, int64_t in,
                                        int64_t out, const AdapterLimits& limits);

// kInvalidArgument when the tensors, as fp32, exceed limits.max_bytes (checked from the headers,
// before anything is read).
absl::Status CheckAdapterSize(const TensorSet& tensors, const AdapterLimits& limits);
// kInvalidArgument naming (up to 5) tensors that no loader step read.
absl::Status CheckAllTensorsUsed(const TensorSet& tensors);

// Fills Adapter::bytes from the weights it holds.
void ComputeAdapterBytes(Adapter* adapter);

}  // namespace moleserve::engine
