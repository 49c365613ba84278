#pragma once

// Router math of every MoLE family (MOLE_FORMAT.md section (c)): per-token, fp32, with ties
// broken towards the lower expert index on every backend.
//
//   RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopK, .k = 2};
//   RETURN_IF_ERROR(ValidateRoutingSpec(spec, num_experts));
//   ASSIGN_OR_RETURN(int32_t n, RouteToken(spec, logits, experts, weights));
//
// Family mapping: MixLoRA / MoLA / LLaVA-MoLE -> kTopK (renormalize); MixLoRA-dynamic and
// "Harder Tasks" -> kTopP with kExceed (raw p, optional prob_temperature quirk); DynMoLE ->
// kDynMole (Tsallis-entropy gate, then kWithin top-p with min_k); MixLoRA-switch -> kSwitch;
// LoRAMoE -> kSoft; FlyLoRA / SMoRA -> rank routing (RankTopK); X-LoRA -> XloraModuleWeights.
//
// Thread safety: pure functions.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/common/params.h"

namespace moleserve::engine {

enum class RoutingAlgorithm {
  kTopK,      // softmax(l / T) -> top-k -> optional renormalisation
  kTopP,      // softmax(l / T) [/ prob_temperature] -> top-p (p_mode) [+ min_k], raw weights
  kDynMole,   // entropy gate: soft over all when H_norm > threshold, else top-p "within" + min_k
              // (always kWithin: p_mode is ignored)
  kSoft,      // softmax over all experts (LoRAMoE)
  kSwitch,    // argmax, weight = p_max (no capacity at serving time)
  kRankTopK,  // rank-granular: keep the k ranks with the largest selection key (FlyLoRA, SMoRA)
};

// The routing decision of one routed site for one token (what return_routing reports).
struct RoutingRecord {
  int32_t layer = 0;
  std::string module;            // "q_proj" ... or "ffn" for a block-routed FFN (MixLoRA)
  std::vector<int32_t> experts;  // descending weight, ties to the lower index (rank groups: the
                                 // kept ranks, weight 1; X-LoRA: adapters with non-zero weight)
  std::vector<float> weights;
};

// "topk", "top_p", "dynmole", "soft", "switch", "rank_topk" (the mole/1 names).
const char* RoutingAlgorithmName(RoutingAlgorithm a);
absl::StatusOr<RoutingAlgorithm> ParseRoutingAlgorithm(std::string_view name);

enum class TopPMode {
  kExceed,  // smallest prefix whose mass exceeds p: keeps c_j <= p plus the first crossing
  kWithin,  // keeps only sorted positions with cumulative mass c_j <= p (DynMoLE)
};

// DynMoLE's normalised Tsallis entropy gate: q == 1 is Shannon entropy.
struct EntropyGate {
  bool enabled = false;
  double q = 1.1;
  double threshold = 0.9;
  double eps = 1e-5;
};

struct RoutingSpec {
  RoutingAlgorithm algorithm = RoutingAlgorithm::kTopK;
  int32_t k = 2;   // kTopK, kRankTopK
  float p = 0.0f;  // kTopP, kDynMole: in (0, 1]
  TopPMode p_mode = TopPMode::kExceed;
  int32_t min_k = 0;              // kTopP / kDynMole: force the first min_k sorted experts on
  float temperature = 1.0f;       // divides the logits before softmax (> 0), every algorithm
  float prob_temperature = 0.0f;  // kTopP only, > 0: divide probabilities before the cut
                                  // (MixLoRA-dynamic); the divided values are the weights
  bool renormalize = true;        // kTopK: weights / sum(weights); kRankTopK (SMoRA) likewise
  EntropyGate entropy;            // kDynMole
};

// kInvalidArgument naming the field when the spec cannot route `num_experts` experts (k outside
// 1..E, p outside (0, 1], non-positive temperature, ...). For kRankTopK pass the rank r as
// num_experts. Only the fields the algorithm uses are checked (k for kTopK / kRankTopK, p and
// min_k for kTopP / kDynMole, entropy for kDynMole), plus the temperatures.
absl::Status ValidateRoutingSpec(const RoutingSpec& spec, int32_t num_experts);

// A per-request override of an adapter's routing (fields left empty keep the adapter's value).
struct RoutingOverride {
  std::optional<RoutingAlgorithm> algorithm;
  std::optional<int32_t> k;
  std::optional<float> p;
  // Output-gated groups (Microsoft's MoLE): experts turned off for this request; the remaining
  // gates are renormalised (the paper's inference-time masking). Checked by
  // ValidateRoutingOverride; ApplyRoutingOverride leaves it to the executor.
  std::vector<int32_t> disabled_experts;
  bool empty() const { return !algorithm && !k && !p && disabled_experts.empty(); }
};
// The spec with the override applied; kInvalidArgument when the result is not valid for
// `num_experts` (e.g. k > E) or the override cannot apply (rank-granular groups only take k; a
// lora-granular group cannot become rank_topk; k applies only to topk / rank_topk and p only to
// top_p / dynmole, after the override's algorithm is applied). A changed algorithm starts from
// its own defaults (renormalize only for topk; top_p "exceed"; dynmole with its entropy gate and
// min_k 2), keeping the group's k, p and logit temperature unless the override sets them.
absl::StatusOr<RoutingSpec> ApplyRoutingOverride(const RoutingSpec& spec,
                                                 const RoutingOverride& override_spec,
                                                 int32_t num_experts);

// out[i] = softmax(in / temperature)[i], max-subtracted, in fp32. in.size() == out.size().
// All NaN when undefined (a NaN or +inf scaled input, or every input -inf).
void SoftmaxF32(absl::Span<const float> in, float temperature, absl::Span<float> out);

// Indices of the `k` largest values, in descending value order, ties to the lower index
// (a stable sort by (-value, index); NaN sorts last). Writes k indices into `out`;
// k <= values.size().
void TopKIndices(absl::Span<const float> values, int32_t k, int32_t* out);

// Routes one token of a lora-granular group from its router logits [E]. Writes the chosen experts
// into experts[0..n) and their gate weights into weights[0..n) (both with room for E entries),
// ordered by descending probability (ties: lower index first), and returns n >= 1.
// kInvalidArgument when a logit is NaN, when a logit / temperature is +inf or all are -inf, or for
// kRankTopK. Expects a spec that passed ValidateRoutingSpec. Allocates nothing for E <= 64.
absl::StatusOr<int32_t> RouteToken(const RoutingSpec& spec, absl::Span<const float> logits,
                                   int32_t* experts, float* weights);

// Normalised Tsallis entropy H(p + eps) / H_max of a probability vector (Shannon when q == 1),
// DynMoLE's uncertainty measure.
double NormalizedTsallisEntropy(absl::Span<const float> probs, double q, double eps);

// X-LoRA: the adapters one LoRA module applies, from the token's scalings for that module (N
// values, already softmaxed by the classifier when enable_softmax): the top_k largest (all N when
// top_k is 0), in descending order with ties to the lower index, into experts[0..n) and their
// weights into weights[0..n); softmax_topk replaces the kept weights by their softmax. Returns n.
// kInvalidArgument when a scaling is NaN or infinite. The device's code (routing_math::XloraOne,
// RouteRule::kXlora), so host and device pick the same adapters with the same bits.
absl::StatusOr<int32_t> RouteXlora(absl::Span<const float> scalings, int32_t top_k,
                                   bool softmax_topk, int32_t* experts, float* weights);
// The device routing parameters of the same rule (logits = the scalings).
kernels::RouteParams XloraRouteParams(int32_t num_adapters, int32_t top_k, bool softmax_topk);

// Rank routing of one token over r ranks. z = A x (the shrink output, r values).
//  FlyLoRA (router_logits empty, implicit A): key = z + select_bias (|z + select_bias| when
//    select_on_abs); u[i] = z[i] for the k ranks with the largest key, 0 elsewhere.
//  SMoRA (router_logits = W_g x, r values): key = logits + select_bias (select_on_abs ignored);
//    g = softmax(logits / spec.temperature) over all r, restricted to the kept ranks,
//    renormalised over them when spec.renormalize; u[i] = g[i] * z[i] on the kept ranks, 0
//    elsewhere.
// select_bias may be empty (zero). Writes the kept rank indices (descending key, ties to the lower
// index) into kept[0..k) and u[0..r). kInvalidArgument on NaN, on mismatched sizes (u, non-empty
// router_logits and select_bias must have r entries), or when spec is not kRankTopK with k in
// 1..r. Allocates nothing for r <= 64.
absl::Status RouteRanks(const RoutingSpec& spec, absl::Span<const float> z,
                        absl::Span<const float> router_logits, absl::Span<const float> select_bias,
                        bool select_on_abs, int32_t* kept, absl::Span<float> u);

// The kernel-side description of a validated lora-granular spec over `num_experts` experts (the
// device routing kernel and its CPU twin, kernels/common/routing_math.h); pointers and
// num_tokens are left for the caller. kInvalidArgument for kRankTopK or more than
// kernels::kMaxRouteWidth experts.
absl::StatusOr<kernels::RouteParams> ToRouteParams(const RoutingSpec& spec, int32_t num_experts);
// Likewise for a rank-granular (kRankTopK) spec over r ranks.
absl::StatusOr<kernels::RankRouteParams> ToRankRouteParams(const RoutingSpec& spec, int32_t rank,
                                                           bool select_on_abs);

}  // namespace moleserve::engine
