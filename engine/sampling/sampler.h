#pragma once

// TokenSampler: picks the next token of one sequence from its logits.
//
// Pipeline, in order (vLLM's order): log-probabilities for the response are taken from the raw
// logits; then repetition penalty (HF: over prompt and output tokens), frequency and presence
// penalties (OpenAI: over output tokens), the logit bias (OpenAI); temperature == 0 -> argmax (ties
// to the lower id); otherwise logits / temperature, top-k, top-p (smallest set whose mass reaches
// p), min-p, and a draw from the renormalised distribution with the sequence's own RNG.
// Determinism: the same seed, prompt and logits give the same tokens on every run and platform.
// Thread safety: one sampler per sequence; not thread-safe.

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/types/span.h"
#include "engine/sampling/sampling_params.h"
#include "kernels/common/params.h"

namespace moleserve::engine {

struct SampledToken {
  int32_t id = -1;
  float logprob = 0.0f;                        // log p(id) under the raw logits
  std::vector<std::pair<int32_t, float>> top;  // top_logprobs alternatives, most likely first
};

class TokenSampler {
 public:
  TokenSampler(const SamplingParams& params, uint64_t seed, absl::Span<const int32_t> prompt,
               int32_t top_logprobs);

  // Samples from logits[0..vocab) and records the token as part of the output. The host
  // reference of the device sampler (Backend::Sample), which serving uses.
  SampledToken Sample(absl::Span<const float> logits);

  // For the device sampler: this step's row (draws the step's uniform from the sequence's
  // stream unless greedy, as Sample does) with its penalty entries appended to `penalty_ids` /
  // `penalty_counts` (every id of the prompt and output when repetition_penalty != 1, the
  // output's when frequency or presence penalties are set; none otherwise). The caller then
  // Observe()s the token the device picked.
  // The logit bias entries go to `bias_ids` / `bias_values`.
  kernels::SampleRowParams NextRow(std::vector<int32_t>* penalty_ids,
                                   std::vector<int32_t>* penalty_counts,
                                   std::vector<int32_t>* bias_ids, std::vector<float>* bias_values);

  // Records a token as output without sampling (used when resuming from known tokens).
  void Observe(int32_t id);

 private:
  double NextUniform();  // [0, 1)

  SamplingParams params_;
  uint64_t rng_state_;
  int32_t top_logprobs_;
  std::unordered_map<int32_t, int32_t> output_counts_;
  std::unordered_map<int32_t, bool> seen_;  // prompt or output, for repetition_penalty
  std::vector<float> work_;                 // penalised logits
  std::vector<int32_t> order_;              // candidate ids
};

// Log-softmax of logits at `id`, and the top `n` (id, logprob) pairs (ties to the lower id).
float LogSoftmaxAt(absl::Span<const float> logits, int32_t id);
std::vector<std::pair<int32_t, float>> TopLogprobs(absl::Span<const float> logits, int32_t n);

}  // namespace moleserve::engine
