#include "engine/model/attached_adapter.h"

#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {

absl::Status AttachedAdapter::RouterLogits(Backend* backend, const RouterWeights& router,
                                           const void* x, int64_t n, int64_t in,
                                           float* logits) const {
  const auto& [weight, bias] = routers.at(&router);
  float* gemm_out = logits;
  if (router.mixture > 0) {
    if (mix_scratch.bytes() < static_cast<size_t>(n * router.gemm_rows()) * sizeof(float)) {
      return absl::InternalError(absl::StrCat("mixture router scratch holds ", mix_scratch.bytes(),
                                              " bytes; ", n,
                                              " tokens need more (more than a pass's tokens?)"));
    }
    gemm_out = mix_scratch.as<float>();
  }
  RETURN_IF_ERROR(backend->Gemm({.x = x,
                                 .w = weight.data(),
                                 .y = gemm_out,
                                 .m = n,
                                 .n = router.gemm_rows(),
                                 .k = in,
                                 .dtype = backend->compute_dtype(),
                                 .y_f32 = true}));
  if (router.mixture > 0) {
    return backend->MixRouter(
        {.x = gemm_out, .y = logits, .rows = n, .experts = router.rows, .routers = router.mixture});
  }
  if (router.bias.empty()) return absl::OkStatus();
  return backend->BiasAdd({.x = logits,
                           .bias = bias.data(),
                           .rows = n,
                           .cols = router.rows,
                           .dtype = ScalarType::kF32});
}

}  // namespace moleserve::engine
