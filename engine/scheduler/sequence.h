#pragma once

// Sequence: the engine-local, mutable state of one admitted request (engine/README.md).
// Owned by the Scheduler from Enqueue to Remove; touched only by the engine loop thread.
//
// tokens = prompt followed by generated tokens. The KV cache holds positions [0, num_computed).
// A sequence is prefilling while more than one token is uncomputed, and decoding when exactly one
// (the last sampled token) is.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "engine/adapters/adapter_version.h"
#include "engine/request.h"
#include "engine/sampling/output_text.h"
#include "engine/sampling/sampler.h"

namespace moleserve::engine {

struct Sequence {
  Sequence(uint64_t handle, GenerateRequest request, std::vector<int32_t> prompt, uint64_t seed,
           std::shared_ptr<GenerationSink> sink)
      : handle(handle),
        request(std::move(request)),
        tokens(std::move(prompt)),
        prompt_len(static_cast<int32_t>(tokens.size())),
        sampler(this->request.sampling, seed, tokens, this->request.top_logprobs),
        text(this->request.stopping.stop),
        sink(std::move(sink)) {}

  int32_t generated() const { return static_cast<int32_t>(tokens.size()) - prompt_len; }
  int32_t uncomputed() const { return static_cast<int32_t>(tokens.size()) - num_computed; }
  // Prompt logprobs: the positions p of [begin, begin + n) still to be scored (the logits at p
  // give the logprob of prompt token p + 1), each one more logits row of its step.
  int32_t FirstScored(int32_t begin) const { return std::max(begin, scored); }
  int32_t ScoringRows(int32_t begin, int32_t n) const {
    if (!request.prompt_logprobs) return 0;
    return std::max(0, std::min(begin + n, prompt_len - 1) - FirstScored(begin));
  }

  const uint64_t handle;
  const GenerateRequest request;  // max_new_tokens already resolved
  std::vector<int32_t> tokens;
  const int32_t prompt_len;
  int32_t num_computed = 0;
  std::vector<int32_t> blocks;  // KV block table, logical order
  // MoLE: the adapter version the request resolved at Submit (kept alive while it runs) and its
  // model slot; -1 = base model. X-LoRA sequences keep a second KV table for the scaling pass
  // and, once frozen, the scalings they reuse.
  std::shared_ptr<const AdapterVersion> adapter;
  int32_t adapter_slot = -1;
  bool xlora = false;
  std::vector<int32_t> aux_blocks;
  std::optional<std::vector<float>> frozen_scalings;
  int32_t reserved_blocks = 0;  // promised by the BlockManager, not yet taken
  // Prefix cache (Scheduler): what else its KV depends on (adapter and version, routing
  // override), nonzero; 0 = its blocks are neither matched nor registered (X-LoRA, prompt
  // logprobs, caching off). block_hashes[i]: the chain hash of full block i (as far as hashed);
  // blocks [0, registered_blocks) of its table are registered or were matched.
  uint64_t prefix_key = 0;
  std::vector<uint64_t> block_hashes;
  int32_t registered_blocks = 0;
  TokenSampler sampler;
  // Prompt logprobs reported so far: positions [0, scored) (kept across preemption, so a
  // recomputed prompt is not scored twice), for the first chunk.
  int32_t scored = 0;
  std::vector<GeneratedToken> prompt_scores;
  OutputText text;
  std::shared_ptr<GenerationSink> sink;

  absl::Time arrival;
  std::optional<absl::Time> admitted;
  std::optional<absl::Time> first_token;
  absl::Time last_token;
  // Time the steps it ran in spent copying LoRA experts in (metrics).
  double expert_wait_seconds = 0;
  // Times it was preempted (its KV freed, to be recomputed when it is admitted again).
  int32_t preemptions = 0;
  // The experts its prefill's last token was routed to, as sorted keys (RoutedExpertKey), for the
  // expert-aware scheduling policy; empty until observed or for the base model.
  std::vector<uint32_t> routed_experts;
  bool routing_observed = false;  // routed_experts was taken (it may be empty)
  // Expert-aware policy: later arrivals admitted ahead of it by grouping while it waited.
  int32_t overtaken = 0;
  // Expert-aware policy: steps it waited, late (relative aging), for room in the expert pool.
  int32_t held_steps = 0;
};

}  // namespace moleserve::engine
