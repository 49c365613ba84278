#pragma once

// What a request asks of sampling and stopping, already defaulted (API-level "unset" resolved by
// the server boundary). Validate() is the single definition of the accepted ranges.

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace moleserve::engine {

// Temperatures below this are treated as greedy (as vLLM does): dividing logits by a tinier
// temperature only overflows.
inline constexpr float kGreedyTemperature = 1e-5f;

struct SamplingParams {
  float temperature = 1.0f;         // >= 0; below kGreedyTemperature = greedy
  float top_p = 1.0f;               // (0, 1]
  int32_t top_k = 0;                // >= 0; 0 = off
  float min_p = 0.0f;               // [0, 1]
  float repetition_penalty = 1.0f;  // [0.01, 100]
  float frequency_penalty = 0.0f;   // [-2, 2]
  float presence_penalty = 0.0f;    // [-2, 2]
  std::optional<uint64_t> seed;     // unset: random
  // OpenAI logit_bias: (token id, value in [-100, 100]) added to the logit before sampling
  // (after the penalties; logprobs stay those of the raw logits). Distinct ids.
  std::vector<std::pair<int32_t, float>> logit_bias;
};

inline constexpr float kMaxLogitBias = 100.0f;
// Entries a request's logit_bias may hold: each is copied into every step's sampler rows.
inline constexpr int kMaxLogitBiasEntries = 1024;

struct StoppingParams {
  int32_t max_new_tokens = 0;  // 0 = default (see EngineOptions::default_max_new_tokens)
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
};

inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopStringBytes = 256;
inline constexpr int kMaxTopLogprobs = 20;

// kInvalidArgument naming the field and its allowed range (logit_bias ids within the
// vocabulary when vocab_size > 0).
absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size = 0);
absl::Status ValidateStoppingParams(const StoppingParams& p, int32_t vocab_size);

}  // namespace moleserve::engine
