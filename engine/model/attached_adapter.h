#pragma once

// AttachedAdapter: an adapter attached to a model (AdapterExecutor::Attach) with what it keeps on
// the device besides its LoRA experts, which live in the expert cache: each router's weight (in
// the compute dtype) and bias (fp32), and the X-LoRA classifier's layers.

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"

namespace moleserve::engine {

struct AttachedAdapter {
  std::shared_ptr<const Adapter> adapter;
  // Router weight and bias per host router.
  std::map<const RouterWeights*, std::pair<DeviceBuffer, DeviceBuffer>> routers;
  std::vector<std::pair<DeviceBuffer, DeviceBuffer>> classifier;  // X-LoRA: weight, bias

  // logits [n, router.rows] (fp32) = x [n, in] (compute dtype) W^T + bias, on `backend`. A
  // Mixture of Routers' GEMM goes to mix_scratch first, then Backend::MixRouter gives its logits
  // (the log of the mixed probabilities).
  absl::Status RouterLogits(Backend* backend, const RouterWeights& router, const void* x, int64_t n,
                            int64_t in, float* logits) const;
  // The stacked sub-router and main-router logits of a mixture router: allocated at Attach for
  // the largest pass and never reallocated (a recorded decode graph may hold its address).
  DeviceBuffer mix_scratch;
};

}  // namespace moleserve::engine
