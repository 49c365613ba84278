#pragma once

// ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face config.json or built
// in code (the demo model). Plain value type.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moleserve::engine {

struct ModelConfig {
  std::string name = "model";
  std::string architecture = "LlamaForCausalLM";
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // hidden_size / num_heads unless config.json says otherwise
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  int32_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;

  int64_t ParameterCount() const;
  // Checks the shape is one the engine can run; kInvalidArgument naming the first bad field.
  absl::Status Validate() const;
};

// Parses a Hugging Face config.json. Supported: LlamaForCausalLM. An unsupported architecture or
// option (e.g. rope_scaling, attention bias) is kInvalidArgument naming it, never ignored.
absl::StatusOr<ModelConfig> ParseHfConfig(absl::string_view json_text);

// The config.json that ParseHfConfig reads back to `config`.
std::string ToHfConfigJson(const ModelConfig& config);

}  // namespace moleserve::engine
