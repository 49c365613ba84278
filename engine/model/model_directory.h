#pragma once

// Opens a Hugging Face-style model directory: config.json (+ generation_config.json for EOS ids),
// model.safetensors or a sharded model.safetensors.index.json, and tokenizer.json.

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model_io/model_config.h"
#include "engine/model_io/weights.h"

namespace moleserve::engine {

// Sampling defaults from generation_config.json: only the keys the file has (vLLM's reading;
// `do_sample` is ignored, a server samples unless asked for temperature 0).
struct GenerationDefaults {
  std::optional<float> temperature;
  std::optional<float> top_p;
  std::optional<int32_t> top_k;
  std::optional<float> min_p;
  std::optional<float> repetition_penalty;
};

struct ModelDirectory {
  ModelConfig config;
  GenerationDefaults generation_defaults;
  std::unique_ptr<WeightSource> weights;  // mmapped safetensors
  std::string tokenizer_path;             // <dir>/tokenizer.json
};

// kNotFound when a required file is missing (the message names it), kInvalidArgument when a file
// is malformed or describes an unsupported model.
absl::StatusOr<ModelDirectory> OpenModelDirectory(const std::string& dir);

}  // namespace moleserve::engine
