#pragma once

// ModelConfig: the shape of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), read from a
// Hugging Face config.json or built in code (the demo model, synthetic presets). Plain value type.

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moleserve::engine {

// RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`).
enum class RopeScalingType { kNone, kLinear, kLlama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  double factor = 1.0;
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int32_t original_max_position_embeddings = 8192;
};

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
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  // Biases on the q/k/v projections (Qwen2; Llama's attention_bias) and on o_proj (Llama's
  // attention_bias only).
  bool qkv_bias = false;
  bool o_bias = false;
  // Mistral's sliding-window attention: a token sees the previous `sliding_window` positions
  // (itself included). 0 = full causal attention.
  int32_t sliding_window = 0;
  int32_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;

  int64_t ParameterCount() const;
  // Checks the shape is one the engine can run; kInvalidArgument naming the first bad field.
  absl::Status Validate() const;
};

// Parses a Hugging Face config.json. Supported: LlamaForCausalLM, MistralForCausalLM,
// Qwen2ForCausalLM; rope scaling "default", "linear" and "llama3" in either the transformers 4
// layout (rope_theta + rope_scaling) or the transformers 5 one (rope_parameters). An unsupported
// architecture or option (dynamic/yarn rope scaling, mlp_bias, Qwen2's use_sliding_window, ...)
// is kInvalidArgument naming it, never ignored.
absl::StatusOr<ModelConfig> ParseHfConfig(absl::string_view json_text);

// The config.json that ParseHfConfig reads back to `config`.
std::string ToHfConfigJson(const ModelConfig& config);

// Reads a token id or a list of them (e.g. eos_token_id), each in [0, INT32_MAX];
// kInvalidArgument naming `what` otherwise.
absl::StatusOr<std::vector<int32_t>> ReadTokenIds(const nlohmann::json& value,
                                                  absl::string_view what);

// RoPE inverse frequencies (head_dim / 2 of them) with the config's scaling applied, computed in
// double as HF's rope initialisers define them.
std::vector<double> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace moleserve::engine
