#include "engine/model/attached_adapter.h"

#include "engine/core/status_macros.h"

namespace moleserve::engine {

absl::Status AttachedAdapter::RouterLogits(Backend* backend, const RouterWeights& router,
                                           const void* x, int64_t n, int64_t in,
                                           float* logits) const {
  const auto& [weight, bias] = routers.at(&router);
  RETURN_IF_ERROR(backend->Gemm({.x = x,
                                 .w = weight.data(),
                                 .y = logits,
                                 .m = n,
                                 .n = router.rows,
                                 .k = in,
                                 .dtype = backend->compute_dtype(),
                                 .y_f32 = true}));
  if (router.bias.empty()) return absl::OkStatus();
  return backend->BiasAdd({.x = logits,
                           .bias = bias.data(),
                           .rows = n,
                           .cols = router.rows,
                           .dtype = ScalarType::kF32});
}

}  // namespace moleserve::engine
