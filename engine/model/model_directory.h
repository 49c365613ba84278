#pragma once

// Opens a Hugging Face-style model directory: config.json (+ generation_config.json for EOS ids),
// model.safetensors or a sharded model.safetensors.index.json, and tokenizer.json.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"

namespace moleserve::engine {

struct ModelDirectory {
  ModelConfig config;
  std::unique_ptr<WeightSource> weights;  // mmapped safetensors
  std::string tokenizer_path;             // <dir>/tokenizer.json
};

// kNotFound when a required file is missing (the message names it), kInvalidArgument when a file
// is malformed or describes an unsupported model.
absl::StatusOr<ModelDirectory> OpenModelDirectory(const std::string& dir);

}  // namespace moleserve::engine
