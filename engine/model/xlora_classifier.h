#pragma once

// XloraClassifier: X-LoRA's classifier on the device (MOLE_FORMAT 2): from the final-norm hidden
// states of the scaling pass to each token's scalings, with no host work, so the classifier can
// sit between the scaling pass and the real pass inside one decode graph.
//
// Per X-LoRA adapter: gather the token rows, then the classifier's Linear layers (GEMMs in the
// compute dtype, each inner layer's bias and ReLU in one BiasAdd), the last layer to fp32 with its
// fp32 bias, then a softmax over each module's N adapters (Backend::SoftmaxGroups, with the
// softmax temperature) into the caller's scalings rows. The same ops run for eager steps (whose
// scalings then come to the host) and graphed ones (which write the planned pass's table).
//
// Thread safety: none; the engine loop drives it. Memory: owns its scratch, grown by Reserve()
// (never while a graph is being captured); each growth bumps epoch().

#include <cstdint>

#include "absl/status/status.h"
#include "engine/backend/backend.h"
#include "engine/model/attached_adapter.h"
#include "engine/model_io/model_config.h"

namespace moleserve::engine {

class XloraClassifier {
 public:
  XloraClassifier(Backend* backend, const ModelConfig& config);

  // Scratch for `rows` rows of `att`'s classifier.
  absl::Status Reserve(const AttachedAdapter& att, int64_t rows);
  // out[i * out_stride + c] (fp32, C = the classifier's width) = the scalings of hidden row
  // ids[i], for i < rows with active[i] != 0 (active may be null: all). `hidden` [*, H] and ids
  // (device) are the caller's. Needs Reserve(att, rows) first; issues ops only.
  absl::Status Run(const AttachedAdapter& att, const void* hidden, const int32_t* ids, int64_t rows,
                   const int32_t* active, float* out, int64_t out_stride);
  int64_t epoch() const { return epoch_; }

 private:
  Backend* backend_;
  ModelConfig config_;
  ScalarType dt_;
  DeviceBuffer in_, out_, logits_;  // gathered rows / layer outputs (compute dtype), fp32 logits
  int64_t epoch_ = 0;
};

}  // namespace moleserve::engine
