#include "engine/model/xlora_classifier.h"

#include <algorithm>

#include "engine/core/status_macros.h"

namespace moleserve::engine {

XloraClassifier::XloraClassifier(Backend* backend, const ModelConfig& config)
    : backend_(backend), config_(config), dt_(backend->compute_dtype()) {}

absl::Status XloraClassifier::Reserve(const AttachedAdapter& att, int64_t rows) {
  const XloraSpec& xs = *att.adapter->xlora;
  int64_t widest = config_.hidden_size;
  for (const XloraSpec::Linear& lin : xs.classifier) widest = std::max(widest, lin.out);
  const size_t act_bytes = std::max<int64_t>(rows, 1) * widest * ScalarTypeSize(dt_);
  const size_t logit_bytes = std::max<int64_t>(rows, 1) * xs.classifier.back().out * 4;
  for (auto [buf, bytes] : {std::pair{&in_, act_bytes}, std::pair{&out_, act_bytes},
                            std::pair{&logits_, logit_bytes}}) {
    if (buf->bytes() >= bytes) continue;
    ASSIGN_OR_RETURN(*buf, backend_->Allocate(std::max(bytes, buf->bytes() * 2)));
    ++epoch_;
  }
  return absl::OkStatus();
}

absl::Status XloraClassifier::Run(const AttachedAdapter& att, const void* hidden,
                                  const int32_t* ids, int64_t rows, const int32_t* active,
                                  float* out, int64_t out_stride) {
  const XloraSpec& xs = *att.adapter->xlora;
  if (rows == 0) return absl::OkStatus();
  void* src = in_.data();
  void* dst = out_.data();
  RETURN_IF_ERROR(backend_->Embedding({.ids = ids,
                                       .table = hidden,
                                       .out = src,
                                       .num_tokens = rows,
                                       .hidden = config_.hidden_size,
                                       .dtype = dt_}));
  for (size_t li = 0; li < xs.classifier.size(); ++li) {
    const XloraSpec::Linear& lin = xs.classifier[li];
    const auto& [weight, bias] = att.classifier[li];
    const bool last = li + 1 == xs.classifier.size();
    // Inner layers: Linear + ReLU (when configured) in the compute dtype; the last to fp32.
    RETURN_IF_ERROR(backend_->Gemm({.x = src,
                                    .w = weight.data(),
                                    .y = last ? logits_.data() : dst,
                                    .m = rows,
                                    .n = lin.out,
                                    .k = lin.in,
                                    .dtype = dt_,
                                    .y_f32 = last}));
    const bool relu = !last && xs.relu;
    if (!lin.bias.empty() || relu) {
      RETURN_IF_ERROR(backend_->BiasAdd({.x = last ? logits_.data() : dst,
                                         .bias = lin.bias.empty() ? nullptr : bias.data(),
                                         .rows = rows,
                                         .cols = lin.out,
                                         .dtype = last ? ScalarType::kF32 : dt_,
                                         .relu = relu}));
    }
    std::swap(src, dst);
  }
  return backend_->SoftmaxGroups({.x = logits_.as<float>(),
                                  .y = out,
                                  .active = active,
                                  .rows = rows,
                                  .cols = xs.classifier.back().out,
                                  .y_stride = out_stride,
                                  .group = xs.num_adapters,
                                  .temperature = xs.softmax_temperature,
                                  .softmax = xs.enable_softmax});
}

}  // namespace moleserve::engine
