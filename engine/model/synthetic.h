#pragma once

// Synthetic models: real model shapes with deterministic random weights and no files, so
// throughput can be measured at real sizes where no weights can be downloaded.
//
//   moleserve --model synthetic:llama3.2-1b
//
// A synthetic model uses the byte-level tokenizer (BOS 256, EOS 257); its text is noise.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model_io/model_config.h"
#include "engine/model_io/weights.h"

namespace moleserve::engine {

inline constexpr absl::string_view kSyntheticPrefix = "synthetic:";

// The presets, e.g. "llama3.2-1b", "llama-7b", "llama3-8b", "mistral-7b", "qwen2-7b".
std::vector<std::string> SyntheticPresetNames();

// The shape of `preset` (without the "synthetic:" prefix). kNotFound listing the presets when it
// is unknown.
absl::StatusOr<ModelConfig> SyntheticModelConfig(absl::string_view preset);

// Weights generated on demand, one tensor at a time (nothing is held in memory), uniformly
// distributed with the variances of RandomLlamaWeights: projections 1/in_features, embeddings 1,
// norms 1 + U with variance 0.01, biases variance 0.01. Deterministic for a given (config, seed).
// Thread-compatible (const methods only).
class RandomWeightSource final : public WeightSource {
 public:
  RandomWeightSource(const ModelConfig& config, uint64_t seed);
  absl::Status ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                       float* out) const override;
  absl::StatusOr<std::vector<int64_t>> Shape(const std::string& name) const override;

 private:
  std::vector<TensorSpec> specs_;
  uint64_t seed_;
};

}  // namespace moleserve::engine
