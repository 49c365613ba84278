#include "engine/routing/routing.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/core/quote.h"
#include "kernels/common/routing_math.h"

namespace moleserve::engine {
namespace {

// Scratch for RouteToken / RouteRanks: on the stack up to kInline entries (E <= 64 covers every
// public MoLE family, and routing runs per token per module), on the heap beyond.
constexpr size_t kInline = 64;

template <typename T>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    if (n > kInline) {
      heap_.resize(n);
      data_ = heap_.data();
    } else {
      data_ = inline_.data();
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return data_; }
  T& operator[](size_t i) { return data_[i]; }

 private:
  std::array<T, kInline> inline_;
  std::vector<T> heap_;
  T* data_;
};

// Strict total order "a comes before b": larger value first, ties to the lower index, NaN last
// (callers reject NaN first; the NaN rule only keeps the order well defined for std::sort).
struct DescendingStable {
  const float* v;
  bool operator()(int32_t a, int32_t b) const {
    const float va = v[a], vb = v[b];
    const bool na = std::isnan(va), nb = std::isnan(vb);
    if (na != nb) return nb;
    if (!na && va != vb) return va > vb;
    return a < b;
  }
};

// order[0..n) = the first n entries of order_desc(values) (MOLE_FORMAT (c)).
void OrderDesc(const float* values, int32_t size, int32_t n, int32_t* order) {
  for (int32_t i = 0; i < size; ++i) order[i] = i;
  if (n >= size) {
    std::sort(order, order + size, DescendingStable{values});
  } else {
    std::partial_sort(order, order + n, order + size, DescendingStable{values});
  }
}

bool AnyNan(absl::Span<const float> v) {
  for (float x : v) {
    if (std::isnan(x)) return true;
  }
  return false;
}

absl::Status NanError(const char* what) {
  return absl::InvalidArgumentError(absl::StrCat("routing: ", what, " contain NaN"));
}

// Softmax of l / temperature; false when it is undefined (a NaN or +inf scaled logit, or all of
// them -inf). fp32 throughout, as every public implementation runs its router in fp32.
bool Softmax(const float* in, int32_t n, float temperature, float* out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int32_t i = 0; i < n; ++i) {
    const float x = in[i] / temperature;
    if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) return false;
    out[i] = x;
    m = std::max(m, x);
  }
  if (m == -std::numeric_limits<float>::infinity()) return false;
  float sum = 0.0f;
  for (int32_t i = 0; i < n; ++i) {
    out[i] = std::exp(out[i] - m);
    sum += out[i];
  }
  for (int32_t i = 0; i < n; ++i) out[i] /= sum;  // sum >= 1: the max term is exp(0)
  return true;
}

// The length of the kept prefix of the descending order under the top-p rule, with min_k forced
// and at least one expert. The cumulative mass is accumulated in fp32 in sorted order
// (MOLE_FORMAT (c)); since it never decreases, both rules keep a prefix.
int32_t TopPPrefix(const float* p, const int32_t* order, int32_t n, float top_p, TopPMode mode,
                   int32_t min_k) {
  int32_t keep = 0;
  float c = 0.0f;
  for (int32_t j = 0; j < n; ++j) {
    const float c_prev = c;
    c += p[order[j]];
    // kExceed: c_prev <= P keeps every position up to and including the first with c > P.
    const bool kept = mode == TopPMode::kExceed ? c_prev <= top_p : c <= top_p;
    if (!kept) break;
    keep = j + 1;
  }
  return std::max({keep, min_k, int32_t{1}});
}

absl::Status Invalid(absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("routing: ", field, " ", message));
}

bool UsesK(RoutingAlgorithm a) {
  return a == RoutingAlgorithm::kTopK || a == RoutingAlgorithm::kRankTopK;
}
bool UsesP(RoutingAlgorithm a) {
  return a == RoutingAlgorithm::kTopP || a == RoutingAlgorithm::kDynMole;
}

}  // namespace

const char* RoutingAlgorithmName(RoutingAlgorithm a) {
  switch (a) {
    case RoutingAlgorithm::kTopK:
      return "topk";
    case RoutingAlgorithm::kTopP:
      return "top_p";
    case RoutingAlgorithm::kDynMole:
      return "dynmole";
    case RoutingAlgorithm::kSoft:
      return "soft";
    case RoutingAlgorithm::kSwitch:
      return "switch";
    case RoutingAlgorithm::kRankTopK:
      return "rank_topk";
  }
  return "unknown";
}

absl::StatusOr<RoutingAlgorithm> ParseRoutingAlgorithm(std::string_view name) {
  for (RoutingAlgorithm a :
       {RoutingAlgorithm::kTopK, RoutingAlgorithm::kTopP, RoutingAlgorithm::kDynMole,
        RoutingAlgorithm::kSoft, RoutingAlgorithm::kSwitch, RoutingAlgorithm::kRankTopK}) {
    if (name == RoutingAlgorithmName(a)) return a;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("routing: unknown algorithm ", Quote(name),
                   " (expected topk, top_p, dynmole, soft, switch or rank_topk)"));
}

absl::Status ValidateRoutingSpec(const RoutingSpec& spec, int32_t num_experts) {
  const bool rank = spec.algorithm == RoutingAlgorithm::kRankTopK;
  const char* unit = rank ? "ranks" : "experts";
  if (num_experts < 1) {
    return Invalid(rank ? "rank" : "num_experts", absl::StrCat("= ", num_experts, " must be >= 1"));
  }
  if (!std::isfinite(spec.temperature) || spec.temperature <= 0.0f) {
    return Invalid("temperature", absl::StrCat("= ", spec.temperature, " must be > 0"));
  }
  if (!std::isfinite(spec.prob_temperature) || spec.prob_temperature < 0.0f) {
    return Invalid("prob_temperature",
                   absl::StrCat("= ", spec.prob_temperature, " must be >= 0 (0 = off)"));
  }
  if (UsesK(spec.algorithm)) {
    if (spec.k < 1) return Invalid("k", absl::StrCat("= ", spec.k, " must be >= 1"));
    if (spec.k > num_experts) {
      return Invalid("k", absl::StrCat("= ", spec.k, " exceeds the ", num_experts, " ", unit));
    }
  }
  if (UsesP(spec.algorithm)) {
    if (!(spec.p > 0.0f && spec.p <= 1.0f)) {  // also rejects NaN
      return Invalid("p", absl::StrCat("= ", spec.p, " is outside (0, 1]"));
    }
    if (spec.min_k < 0) return Invalid("min_k", absl::StrCat("= ", spec.min_k, " must be >= 0"));
    if (spec.min_k > num_experts) {
      return Invalid("min_k",
                     absl::StrCat("= ", spec.min_k, " exceeds the ", num_experts, " experts"));
    }
  }
  if (spec.algorithm == RoutingAlgorithm::kDynMole && spec.entropy.enabled) {
    const EntropyGate& e = spec.entropy;
    if (!std::isfinite(e.q) || e.q <= 0.0) {
      return Invalid("entropy.q", absl::StrCat("= ", e.q, " must be > 0"));
    }
    if (!std::isfinite(e.threshold)) {
      return Invalid("entropy.threshold", absl::StrCat("= ", e.threshold, " must be finite"));
    }
    if (!std::isfinite(e.eps) || e.eps < 0.0) {
      return Invalid("entropy.eps", absl::StrCat("= ", e.eps, " must be >= 0"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RoutingSpec> ApplyRoutingOverride(const RoutingSpec& spec,
                                                 const RoutingOverride& override_spec,
                                                 int32_t num_experts) {
  RoutingSpec out = spec;
  if (override_spec.algorithm && *override_spec.algorithm != spec.algorithm) {
    if (spec.algorithm == RoutingAlgorithm::kRankTopK) {
      return absl::InvalidArgumentError(
          absl::StrCat("routing override: algorithm cannot change a rank-granular group "
                       "(rank_topk) to ",
                       RoutingAlgorithmName(*override_spec.algorithm), "; only k applies"));
    }
    if (*override_spec.algorithm == RoutingAlgorithm::kRankTopK) {
      return absl::InvalidArgumentError(
          absl::StrCat("routing override: algorithm rank_topk applies only to rank-granular "
                       "groups; this group routes with ",
                       RoutingAlgorithmName(spec.algorithm)));
    }
    // A new algorithm starts from its own defaults (the mole/1 ones): the group's
    // algorithm-specific settings (renormalisation of top-p, DynMoLE's min_k and entropy gate,
    // MixLoRA-dynamic's probability temperature) describe the old rule, not the new one.
    out.algorithm = *override_spec.algorithm;
    out.renormalize = out.algorithm == RoutingAlgorithm::kTopK;
    out.p_mode =
        out.algorithm == RoutingAlgorithm::kDynMole ? TopPMode::kWithin : TopPMode::kExceed;
    out.min_k = 0;
    out.prob_temperature = 0.0f;
    out.entropy = EntropyGate();
    if (out.algorithm == RoutingAlgorithm::kDynMole) {
      out.entropy.enabled = true;  // DynMoLE's defaults: q 1.1, threshold 0.9, keep_top_k 2
      out.min_k = std::min(2, num_experts);
    }
  }
  if (override_spec.k) {
    if (!UsesK(out.algorithm)) {
      return absl::InvalidArgumentError(absl::StrCat("routing override: k does not apply to ",
                                                     RoutingAlgorithmName(out.algorithm),
                                                     " routing (only topk and rank_topk)"));
    }
    out.k = *override_spec.k;
  }
  if (override_spec.p) {
    if (!UsesP(out.algorithm)) {
      return absl::InvalidArgumentError(absl::StrCat("routing override: p does not apply to ",
                                                     RoutingAlgorithmName(out.algorithm),
                                                     " routing (only top_p and dynmole)"));
    }
    out.p = *override_spec.p;
  }
  if (absl::Status s = ValidateRoutingSpec(out, num_experts); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("routing override: ", s.message()));
  }
  return out;
}

void SoftmaxF32(absl::Span<const float> in, float temperature, absl::Span<float> out) {
  const int32_t n = static_cast<int32_t>(std::min(in.size(), out.size()));
  if (n == 0) return;
  if (!Softmax(in.data(), n, temperature, out.data())) {
    std::fill(out.begin(), out.begin() + n, std::numeric_limits<float>::quiet_NaN());
  }
}

void TopKIndices(absl::Span<const float> values, int32_t k, int32_t* out) {
  const int32_t n = static_cast<int32_t>(values.size());
  k = std::clamp(k, int32_t{0}, n);
  if (k == 0) return;
  Scratch<int32_t> order(n);
  OrderDesc(values.data(), n, k, order.data());
  std::copy(order.data(), order.data() + k, out);
}

double NormalizedTsallisEntropy(absl::Span<const float> probs, double q, double eps) {
  const size_t n = probs.size();
  if (n <= 1) return 0.0;  // H_max = 0: one expert carries no uncertainty
  double h = 0.0, h_max = 0.0;
  if (q == 1.0) {
    for (float p : probs) {
      const double pe = static_cast<double>(p) + eps;
      h -= pe * std::log(pe);
    }
    h_max = std::log(static_cast<double>(n));
  } else {
    double s = 0.0;
    for (float p : probs) s += std::pow(static_cast<double>(p) + eps, q);
    h = (1.0 - s) / (q - 1.0);
    h_max = (1.0 - std::pow(static_cast<double>(n), 1.0 - q)) / (q - 1.0);
  }
  return h / h_max;
}

absl::StatusOr<int32_t> RouteToken(const RoutingSpec& spec, absl::Span<const float> logits,
                                   int32_t* experts, float* weights) {
  const int32_t n = static_cast<int32_t>(logits.size());
  if (n == 0) return absl::InvalidArgumentError("routing: no router logits");
  if (spec.algorithm == RoutingAlgorithm::kRankTopK) {
    return absl::InvalidArgumentError("routing: rank_topk routes ranks; use RouteRanks");
  }
  Scratch<float> p(n);
  if (!Softmax(logits.data(), n, spec.temperature, p.data())) {
    if (AnyNan(logits)) return NanError("router logits");
    return absl::InvalidArgumentError(
        "routing: router logits are +inf or all -inf (after dividing by the temperature)");
  }
  Scratch<int32_t> order(n);
  int32_t count = 0;
  switch (spec.algorithm) {
    case RoutingAlgorithm::kTopK: {
      count = std::clamp(spec.k, int32_t{1}, n);
      OrderDesc(p.data(), n, count, order.data());
      break;
    }
    case RoutingAlgorithm::kSwitch:
      count = 1;
      OrderDesc(p.data(), n, 1, order.data());
      break;
    case RoutingAlgorithm::kSoft:
      count = n;
      OrderDesc(p.data(), n, n, order.data());
      break;
    case RoutingAlgorithm::kTopP: {
      if (spec.prob_temperature > 0.0f) {
        // MixLoRA-dynamic's quirk: probabilities (not logits) divided by its temperature, and
        // these divided values are both the cut's mass and the weights.
        for (int32_t i = 0; i < n; ++i) p[i] /= spec.prob_temperature;
      }
      OrderDesc(p.data(), n, n, order.data());
      count = std::min(n, TopPPrefix(p.data(), order.data(), n, spec.p, spec.p_mode, spec.min_k));
      break;
    }
    case RoutingAlgorithm::kDynMole: {
      OrderDesc(p.data(), n, n, order.data());
      const EntropyGate& e = spec.entropy;
      if (e.enabled && e.q > 0.0 && e.threshold < 1.0 &&
          NormalizedTsallisEntropy(absl::MakeConstSpan(p.data(), n), e.q, e.eps) > e.threshold) {
        count = n;  // uncertain token: soft routing over every expert
      } else {
        count = std::min(
            n, TopPPrefix(p.data(), order.data(), n, spec.p, TopPMode::kWithin, spec.min_k));
      }
      break;
    }
    case RoutingAlgorithm::kRankTopK:
      break;  // rejected above
  }
  float sum = 0.0f;
  for (int32_t j = 0; j < count; ++j) {
    experts[j] = order[j];
    weights[j] = p[order[j]];
    sum += weights[j];
  }
  if (spec.algorithm == RoutingAlgorithm::kTopK && spec.renormalize) {
    for (int32_t j = 0; j < count; ++j) weights[j] /= sum;  // sum > 0: includes the max, > 0
  }
  return count;
}

kernels::RouteParams XloraRouteParams(int32_t num_adapters, int32_t top_k, bool softmax_topk) {
  kernels::RouteParams p;
  p.rule = kernels::RouteRule::kXlora;
  p.num_experts = num_adapters;
  p.k = top_k;
  p.renormalize = softmax_topk;
  return p;
}

absl::StatusOr<int32_t> RouteXlora(absl::Span<const float> scalings, int32_t top_k,
                                   bool softmax_topk, int32_t* experts, float* weights) {
  const int32_t n = static_cast<int32_t>(scalings.size());
  if (n < 1) return absl::InvalidArgumentError("routing: X-LoRA over no adapter");
  Scratch<float> p(n);
  Scratch<int32_t> order(n);
  const int32_t count =
      kernels::routing_math::XloraOne(XloraRouteParams(n, top_k, softmax_topk), scalings.data(),
                                      experts, weights, p.data(), order.data());
  if (count == 0) {
    if (AnyNan(scalings)) return NanError("X-LoRA scalings");
    return absl::InvalidArgumentError("routing: X-LoRA scalings are infinite");
  }
  return count;
}

absl::Status RouteRanks(const RoutingSpec& spec, absl::Span<const float> z,
                        absl::Span<const float> router_logits, absl::Span<const float> select_bias,
                        bool select_on_abs, int32_t* kept, absl::Span<float> u) {
  const int32_t r = static_cast<int32_t>(z.size());
  if (spec.algorithm != RoutingAlgorithm::kRankTopK) {
    return absl::InvalidArgumentError(absl::StrCat("routing: RouteRanks needs rank_topk, got ",
                                                   RoutingAlgorithmName(spec.algorithm)));
  }
  if (r == 0 || u.size() != z.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("routing: rank routing needs z and u of the same size r >= 1; got z[",
                     z.size(), "], u[", u.size(), "]"));
  }
  if (spec.k < 1 || spec.k > r) {
    return Invalid("k", absl::StrCat("= ", spec.k, " exceeds the ", r, " ranks"));
  }
  const bool smora = !router_logits.empty();
  if (smora && router_logits.size() != z.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routing: router_logits has ", router_logits.size(), " values for ", r, " ranks"));
  }
  if (!select_bias.empty() && select_bias.size() != z.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("routing: select_bias has ", select_bias.size(), " values for ", r, " ranks"));
  }
  if (AnyNan(z)) return NanError("rank activations (A x)");
  if (AnyNan(router_logits)) return NanError("router logits");
  if (AnyNan(select_bias)) return NanError("selection biases");

  Scratch<float> key(r);
  const float* base = smora ? router_logits.data() : z.data();
  for (int32_t i = 0; i < r; ++i) {
    const float k = base[i] + (select_bias.empty() ? 0.0f : select_bias[i]);
    // Selection bias + abs only for FlyLoRA's reference variant; SMoRA always selects signed.
    key[i] = (select_on_abs && !smora) ? std::fabs(k) : k;
  }
  const int32_t k = spec.k;
  Scratch<int32_t> order(r);
  OrderDesc(key.data(), r, k, order.data());
  std::copy(order.data(), order.data() + k, kept);
  std::fill(u.begin(), u.end(), 0.0f);
  if (!smora) {
    for (int32_t j = 0; j < k; ++j) u[order[j]] = z[order[j]];
    return absl::OkStatus();
  }
  Scratch<float> g(r);
  if (!Softmax(router_logits.data(), r, spec.temperature, g.data())) {
    return absl::InvalidArgumentError(
        "routing: router logits are +inf or all -inf (after dividing by the temperature)");
  }
  float sum = 0.0f;
  for (int32_t j = 0; j < k; ++j) sum += g[order[j]];
  const float norm = spec.renormalize && sum > 0.0f ? sum : 1.0f;
  for (int32_t j = 0; j < k; ++j) u[order[j]] = g[order[j]] / norm * z[order[j]];
  return absl::OkStatus();
}

absl::StatusOr<kernels::RouteParams> ToRouteParams(const RoutingSpec& spec, int32_t num_experts) {
  if (num_experts < 1 || num_experts > kernels::kMaxRouteWidth) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routing: ", num_experts, " experts; device routing handles 1..", kernels::kMaxRouteWidth));
  }
  kernels::RouteParams p;
  switch (spec.algorithm) {
    case RoutingAlgorithm::kTopK:
      p.rule = kernels::RouteRule::kTopK;
      break;
    case RoutingAlgorithm::kTopP:
      p.rule = kernels::RouteRule::kTopP;
      break;
    case RoutingAlgorithm::kDynMole:
      p.rule = kernels::RouteRule::kDynMole;
      break;
    case RoutingAlgorithm::kSoft:
      p.rule = kernels::RouteRule::kSoft;
      break;
    case RoutingAlgorithm::kSwitch:
      p.rule = kernels::RouteRule::kSwitch;
      break;
    case RoutingAlgorithm::kRankTopK:
      return absl::InvalidArgumentError("routing: rank_topk routes ranks; use ToRankRouteParams");
  }
  p.num_experts = num_experts;
  p.k = spec.k;
  p.p = spec.p;
  p.p_within = spec.p_mode == TopPMode::kWithin;
  p.min_k = spec.min_k;
  p.temperature = spec.temperature;
  p.prob_temperature = spec.prob_temperature;
  p.renormalize = spec.renormalize;
  p.entropy_gate = spec.entropy.enabled;
  p.entropy_q = spec.entropy.q;
  p.entropy_threshold = spec.entropy.threshold;
  p.entropy_eps = spec.entropy.eps;
  return p;
}

absl::StatusOr<kernels::RankRouteParams> ToRankRouteParams(const RoutingSpec& spec, int32_t rank,
                                                           bool select_on_abs) {
  if (spec.algorithm != RoutingAlgorithm::kRankTopK) {
    return absl::InvalidArgumentError("routing: rank routing needs a rank_topk spec");
  }
  if (rank < 1 || rank > kernels::kMaxRouteWidth || spec.k < 1 || spec.k > rank) {
    return absl::InvalidArgumentError(absl::StrCat("routing: rank ", rank, " with k ", spec.k,
                                                   "; device rank routing handles ranks 1..",
                                                   kernels::kMaxRouteWidth, " and k in 1..rank"));
  }
  kernels::RankRouteParams p;
  p.rank = rank;
  p.z_stride = rank;
  p.k = spec.k;
  p.select_on_abs = select_on_abs;
  p.temperature = spec.temperature;
  p.renormalize = spec.renormalize;
  return p;
}

}  // namespace moleserve::engine
