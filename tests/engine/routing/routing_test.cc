// Router math: MOLE_FORMAT.md's test vectors and edge cases computed by hand, validation and
// override errors, NaN handling, no allocation per token for E <= 64, and a cross-check against
// an independent torch implementation of each public rule (routing_reference.py, Debian's
// python3-torch) on 400 seeded random inputs.
//
// Tolerance of the cross-check: selections (experts / kept ranks, in order) must match exactly;
// weights within 1e-6 absolute. Both sides compute in fp32 (weights are in [0, 1], or O(1) rank
// activations): the residual is torch's vectorised exp against libm's expf and a different
// summation order, a few ulp. The reference redraws inputs whose selection would hinge on a near
// tie or on a cumulative mass / entropy within rounding of its threshold (see its docstring).

#include "engine/routing/routing.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/common/run_command.h"

// Counts heap allocations so the test can check that RouteToken does not allocate for E <= 64.
namespace {
std::atomic<int64_t> g_allocations{0};
}  // namespace

void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
// GCC sees free() on memory from `new` once these are inlined; our new is malloc, so it matches.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#pragma GCC diagnostic pop

namespace moleserve::engine {
namespace {

constexpr double kWeightTolerance = 1e-6;
const float kNan = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

struct Routed {
  std::vector<int32_t> experts;
  std::vector<float> weights;
};

Routed Route(const RoutingSpec& spec, const std::vector<float>& logits) {
  std::vector<int32_t> experts(logits.size(), -1);
  std::vector<float> weights(logits.size(), -1.0f);
  absl::StatusOr<int32_t> n = RouteToken(spec, logits, experts.data(), weights.data());
  EXPECT_TRUE(n.ok()) << n.status();
  if (!n.ok()) return {};
  experts.resize(*n);
  weights.resize(*n);
  return {experts, weights};
}

// Logits whose fp32 softmax is exactly [0.5, 0.25, 0.25] (checked in PowersOfTwoLogits).
const std::vector<float> kHalfQuarterQuarter = {std::log(2.0f), 0.0f, 0.0f};

TEST(RoutingTest, PowersOfTwoLogits) {
  std::vector<float> p(3);
  SoftmaxF32(kHalfQuarterQuarter, 1.0f, absl::MakeSpan(p));
  EXPECT_EQ(p, (std::vector<float>{0.5f, 0.25f, 0.25f}));
}

TEST(RoutingTest, AlgorithmNamesRoundTrip) {
  for (RoutingAlgorithm a :
       {RoutingAlgorithm::kTopK, RoutingAlgorithm::kTopP, RoutingAlgorithm::kDynMole,
        RoutingAlgorithm::kSoft, RoutingAlgorithm::kSwitch, RoutingAlgorithm::kRankTopK}) {
    absl::StatusOr<RoutingAlgorithm> parsed = ParseRoutingAlgorithm(RoutingAlgorithmName(a));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, a);
  }
  absl::StatusOr<RoutingAlgorithm> bad = ParseRoutingAlgorithm("top-k");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("'top-k'"), std::string::npos) << bad.status();
}

TEST(RoutingTest, TopKTiesGoToTheLowerIndex) {
  Routed r = Route({.algorithm = RoutingAlgorithm::kTopK, .k = 2}, {1, 1, 1, 1});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.5f}));

  int32_t idx[3];
  TopKIndices(std::vector<float>{3, 5, 3, 5, 1}, 3, idx);
  EXPECT_EQ(std::vector<int32_t>(idx, idx + 3), (std::vector<int32_t>{1, 3, 0}));
}

TEST(RoutingTest, TopKIndicesPutsNanLast) {
  int32_t idx[4];
  TopKIndices(std::vector<float>{kNan, 1, -kInf, 2}, 4, idx);
  EXPECT_EQ(std::vector<int32_t>(idx, idx + 4), (std::vector<int32_t>{3, 1, 2, 0}));
}

TEST(RoutingTest, TopKRenormalizeOnAndOff) {
  const std::vector<float> logits = {0.0f, 2.0f, 1.0f};
  std::vector<float> p(3);
  SoftmaxF32(logits, 1.0f, absl::MakeSpan(p));
  Routed on = Route({.algorithm = RoutingAlgorithm::kTopK, .k = 2, .renormalize = true}, logits);
  Routed off = Route({.algorithm = RoutingAlgorithm::kTopK, .k = 2, .renormalize = false}, logits);
  EXPECT_EQ(on.experts, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(off.experts, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(off.weights, (std::vector<float>{p[1], p[2]}));
  EXPECT_FLOAT_EQ(on.weights[0], p[1] / (p[1] + p[2]));
  EXPECT_FLOAT_EQ(on.weights[1], p[2] / (p[1] + p[2]));
  EXPECT_NEAR(on.weights[0] + on.weights[1], 1.0f, 1e-7f);
  // k = 1 with renormalisation is weight 1 (LLaVA-MoLE's flag), without it p_max.
  EXPECT_EQ(Route({.algorithm = RoutingAlgorithm::kTopK, .k = 1}, logits).weights[0], 1.0f);
  EXPECT_EQ(
      Route({.algorithm = RoutingAlgorithm::kTopK, .k = 1, .renormalize = false}, logits).weights,
      std::vector<float>{p[1]});
}

TEST(RoutingTest, TemperatureDividesTheLogits) {
  const RoutingSpec hot{.algorithm = RoutingAlgorithm::kSoft, .temperature = 2.0f};
  Routed scaled = Route(hot, {4.0f, 0.0f, 2.0f});
  Routed plain = Route({.algorithm = RoutingAlgorithm::kSoft}, {2.0f, 0.0f, 1.0f});
  EXPECT_EQ(scaled.experts, (std::vector<int32_t>{0, 2, 1}));
  EXPECT_EQ(scaled.experts, plain.experts);
  EXPECT_EQ(scaled.weights, plain.weights);  // 4/2 and 2/2 are exact
  // A low temperature sharpens.
  Routed cold = Route({.algorithm = RoutingAlgorithm::kSoft, .temperature = 0.5f}, {2, 0, 1});
  EXPECT_GT(cold.weights[0], plain.weights[0]);
}

TEST(RoutingTest, TopPExceedKeepsTheFirstCrossing) {
  // p = [0.5, 0.25, 0.25], cumsum [0.5, 0.75, 1.0].
  RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopP, .p = 0.75f, .renormalize = false};
  // P = 0.75: c_1 == P is kept, the first c > P (position 2) is the crossing: all three.
  Routed r = Route(spec, kHalfQuarterQuarter);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.25f, 0.25f}));  // raw p, no renormalisation
  spec.p = 0.7f;
  r = Route(spec, kHalfQuarterQuarter);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.25f}));
  // c_0 == P exactly: expert 0 is kept and so is the next one.
  spec.p = 0.5f;
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).experts, (std::vector<int32_t>{0, 1}));
  spec.p = 0.4f;
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).experts, (std::vector<int32_t>{0}));
  spec.p = 1.0f;
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).experts, (std::vector<int32_t>{0, 1, 2}));
  // renormalize has no effect on top-p.
  spec.p = 0.7f;
  spec.renormalize = true;
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).weights, (std::vector<float>{0.5f, 0.25f}));
}

TEST(RoutingTest, TopPWithinKeepsOnlyMassAtMostP) {
  RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopP, .p = 0.75f, .p_mode = TopPMode::kWithin};
  Routed r = Route(spec, kHalfQuarterQuarter);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));  // c_1 == P is kept, nothing after it
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.25f}));
  spec.p = 0.4f;  // nothing within: the top expert is kept anyway
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).experts, (std::vector<int32_t>{0}));
  spec.min_k = 2;  // ... or the first min_k
  EXPECT_EQ(Route(spec, kHalfQuarterQuarter).experts, (std::vector<int32_t>{0, 1}));
}

TEST(RoutingTest, TopPProbTemperatureQuirkDividesProbabilities) {
  // MixLoRA-dynamic divides the probabilities: p' = [0.25, 0.125, 0.125], cumsum [.25, .375, .5].
  RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopP, .p = 0.3f, .prob_temperature = 2.0f};
  Routed r = Route(spec, kHalfQuarterQuarter);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.25f, 0.125f}));  // the divided values are the weights
  spec.prob_temperature = 0.0f;  // off: the first expert alone crosses 0.3
  r = Route(spec, kHalfQuarterQuarter);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f}));
  // Other algorithms ignore it.
  EXPECT_EQ(
      Route({.algorithm = RoutingAlgorithm::kSwitch, .prob_temperature = 2.0f}, kHalfQuarterQuarter)
          .weights,
      (std::vector<float>{0.5f}));
}

RoutingSpec DynMoleDefaults() {
  return {.algorithm = RoutingAlgorithm::kDynMole,
          .p = 0.75f,
          .p_mode = TopPMode::kWithin,
          .min_k = 2,
          .renormalize = false,
          .entropy = {.enabled = true, .q = 1.1, .threshold = 0.9, .eps = 1e-5}};
}

TEST(RoutingTest, DynMoleUniformRoutesToAllExperts) {
  const std::vector<float> uniform(8, 0.0f);
  std::vector<float> p(8);
  SoftmaxF32(uniform, 1.0f, absl::MakeSpan(p));
  EXPECT_NEAR(NormalizedTsallisEntropy(p, 1.1, 1e-5), 1.0, 1e-3);
  Routed r = Route(DynMoleDefaults(), uniform);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(r.weights, std::vector<float>(8, 0.125f));
  // Gate disabled: top-p "within" 0.75 keeps 6 experts (c = 0.125 j).
  RoutingSpec off = DynMoleDefaults();
  off.entropy.enabled = false;
  EXPECT_EQ(Route(off, uniform).experts.size(), 6u);
  // threshold >= 1 never opens the gate.
  RoutingSpec high = DynMoleDefaults();
  high.entropy.threshold = 1.0;
  EXPECT_EQ(Route(high, uniform).experts.size(), 6u);
}

TEST(RoutingTest, DynMolePeakedKeepsMinK) {
  // p ~ [0.9, 0.05, 0.05]: within 0.75 keeps none, min_k = 2 forces {0, 1} (tie: lower index).
  const std::vector<float> logits = {std::log(0.9f), std::log(0.05f), std::log(0.05f)};
  std::vector<float> p(3);
  SoftmaxF32(logits, 1.0f, absl::MakeSpan(p));
  EXPECT_LT(NormalizedTsallisEntropy(p, 1.1, 1e-5), 0.9);
  Routed r = Route(DynMoleDefaults(), logits);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{p[0], p[1]}));  // raw, not renormalised
  EXPECT_NEAR(r.weights[0], 0.9f, 1e-6f);
  EXPECT_NEAR(r.weights[1], 0.05f, 1e-6f);
  // DynMoLE is always "within", whatever p_mode says.
  RoutingSpec exceed = DynMoleDefaults();
  exceed.p_mode = TopPMode::kExceed;
  EXPECT_EQ(Route(exceed, logits).experts, r.experts);
}

TEST(RoutingTest, TsallisEntropyClosedForms) {
  const std::vector<float> uniform4(4, 0.25f);
  EXPECT_NEAR(NormalizedTsallisEntropy(uniform4, 2.0, 0.0), 1.0, 1e-12);
  EXPECT_NEAR(NormalizedTsallisEntropy(uniform4, 1.0, 0.0), 1.0, 1e-12);  // Shannon
  const std::vector<float> one_hot = {1.0f, 0.0f, 0.0f, 0.0f};
  EXPECT_NEAR(NormalizedTsallisEntropy(one_hot, 2.0, 0.0), 0.0, 1e-12);
  // q = 2, N = 4, p = [0.5, 0.5, 0, 0]: H = 1 - sum p^2 = 0.5, H_max = 1 - 1/4 = 0.75.
  const std::vector<float> half = {0.5f, 0.5f, 0.0f, 0.0f};
  EXPECT_NEAR(NormalizedTsallisEntropy(half, 2.0, 0.0), 0.5 / 0.75, 1e-12);
  EXPECT_EQ(NormalizedTsallisEntropy(std::vector<float>{1.0f}, 1.1, 1e-5), 0.0);
}

TEST(RoutingTest, SwitchIsArgmaxWithRawWeight) {
  const std::vector<float> logits = {0.1f, 2.0f, 2.0f, -1.0f};
  std::vector<float> p(4);
  SoftmaxF32(logits, 1.0f, absl::MakeSpan(p));
  Routed r = Route({.algorithm = RoutingAlgorithm::kSwitch}, logits);
  EXPECT_EQ(r.experts, std::vector<int32_t>{1});
  EXPECT_EQ(r.weights, std::vector<float>{p[1]});
}

TEST(RoutingTest, SoftRoutesEveryExpertByDescendingProbability) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f, 0.5f};
  std::vector<float> p(5);
  SoftmaxF32(logits, 1.0f, absl::MakeSpan(p));
  Routed r = Route({.algorithm = RoutingAlgorithm::kSoft}, logits);
  EXPECT_EQ(r.experts, (std::vector<int32_t>{1, 3, 4, 0, 2}));
  EXPECT_EQ(r.weights, (std::vector<float>{p[1], p[3], p[4], p[0], p[2]}));
}

TEST(RoutingTest, InfiniteLogits) {
  // -inf is a masked expert (weight 0); +inf and all -inf leave the softmax undefined.
  Routed r = Route({.algorithm = RoutingAlgorithm::kSoft}, {0.0f, -kInf, 0.0f});
  EXPECT_EQ(r.experts, (std::vector<int32_t>{0, 2, 1}));
  EXPECT_EQ(r.weights, (std::vector<float>{0.5f, 0.5f, 0.0f}));
  int32_t e[3];
  float w[3];
  for (const std::vector<float>& bad :
       {std::vector<float>{0.0f, kInf, 1.0f}, std::vector<float>{-kInf, -kInf, -kInf}}) {
    EXPECT_EQ(RouteToken({.algorithm = RoutingAlgorithm::kTopK}, bad, e, w).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  // A finite logit that overflows once divided by the temperature.
  EXPECT_EQ(RouteToken({.algorithm = RoutingAlgorithm::kTopK, .temperature = 1e-3f},
                       std::vector<float>{3e38f, 0.0f}, e, w)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RoutingTest, NanIsAnError) {
  int32_t e[4];
  float w[4];
  for (RoutingAlgorithm a :
       {RoutingAlgorithm::kTopK, RoutingAlgorithm::kTopP, RoutingAlgorithm::kDynMole,
        RoutingAlgorithm::kSoft, RoutingAlgorithm::kSwitch}) {
    RoutingSpec spec{.algorithm = a, .p = 0.5f};
    absl::StatusOr<int32_t> n = RouteToken(spec, std::vector<float>{0.0f, kNan, 1.0f, 2.0f}, e, w);
    EXPECT_EQ(n.status().code(), absl::StatusCode::kInvalidArgument) << RoutingAlgorithmName(a);
    EXPECT_NE(n.status().message().find("NaN"), std::string::npos) << n.status();
  }
  int32_t kept[2];
  std::vector<float> u(4);
  const RoutingSpec rank{.algorithm = RoutingAlgorithm::kRankTopK, .k = 2};
  EXPECT_EQ(
      RouteRanks(rank, std::vector<float>{1, kNan, 2, 3}, {}, {}, false, kept, absl::MakeSpan(u))
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RouteRanks(rank, std::vector<float>{1, 0, 2, 3}, std::vector<float>{0, 0, kNan, 0}, {},
                       false, kept, absl::MakeSpan(u))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RouteRanks(rank, std::vector<float>{1, 0, 2, 3}, {}, std::vector<float>{0, 0, kNan, 0},
                       false, kept, absl::MakeSpan(u))
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(RoutingTest, RouteTokenRejectsRankRouting) {
  int32_t e[2];
  float w[2];
  EXPECT_EQ(
      RouteToken({.algorithm = RoutingAlgorithm::kRankTopK, .k = 1}, std::vector<float>{0, 1}, e, w)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

// X-LoRA's module weights by position (0 where an adapter is not kept), through RouteXlora.
std::vector<float> XloraWeights(const std::vector<float>& s, int32_t top_k, bool softmax_topk) {
  std::vector<int32_t> experts(s.size());
  std::vector<float> weights(s.size()), by_position(s.size(), 0.0f);
  absl::StatusOr<int32_t> n = RouteXlora(s, top_k, softmax_topk, experts.data(), weights.data());
  EXPECT_TRUE(n.ok()) << n.status();
  for (int32_t j = 0; n.ok() && j < *n; ++j) {
    if (j > 0) {  // descending order
      EXPECT_GE(s[experts[j - 1]], s[experts[j]]);
    }
    by_position[experts[j]] = weights[j];
  }
  return by_position;
}

TEST(RoutingTest, XloraTopKMasksWithoutRenormalising) {
  const std::vector<float> s = {0.1f, 0.4f, 0.2f, 0.3f};
  EXPECT_EQ(XloraWeights(s, 2, false), (std::vector<float>{0.0f, 0.4f, 0.0f, 0.3f}));
  EXPECT_EQ(XloraWeights(s, 0, false), s);
  EXPECT_EQ(XloraWeights(s, 9, false), s);  // top_k >= N keeps all

  std::vector<float> soft2(2);
  SoftmaxF32(std::vector<float>{0.4f, 0.3f}, 1.0f, absl::MakeSpan(soft2));
  EXPECT_EQ(XloraWeights(s, 2, true), (std::vector<float>{0.0f, soft2[0], 0.0f, soft2[1]}));

  std::vector<float> soft_all(4);
  SoftmaxF32(s, 1.0f, absl::MakeSpan(soft_all));
  EXPECT_EQ(XloraWeights(s, 0, true), soft_all);

  // Ties at the cut go to the lower index.
  EXPECT_EQ(XloraWeights({0.2f, 0.3f, 0.3f, 0.2f}, 1, false),
            (std::vector<float>{0.0f, 0.3f, 0.0f, 0.0f}));
}

TEST(RoutingTest, XloraRefusesUndefinedScalings) {
  int32_t e[3];
  float w[3];
  for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    const std::vector<float> s = {0.1f, bad, 0.2f};
    for (bool soft : {false, true}) {
      EXPECT_EQ(RouteXlora(s, 0, soft, e, w).status().code(), absl::StatusCode::kInvalidArgument)
          << bad << " softmax " << soft;
    }
  }
}

TEST(RoutingTest, FlyLoraSignedAndAbsSelection) {
  const RoutingSpec spec{.algorithm = RoutingAlgorithm::kRankTopK, .k = 2};
  const std::vector<float> z = {1.0f, -3.0f, 2.0f, 0.5f};
  int32_t kept[2];
  std::vector<float> u(4);
  ASSERT_TRUE(RouteRanks(spec, z, {}, {}, false, kept, absl::MakeSpan(u)).ok());
  EXPECT_EQ(std::vector<int32_t>(kept, kept + 2), (std::vector<int32_t>{2, 0}));
  EXPECT_EQ(u, (std::vector<float>{1.0f, 0.0f, 2.0f, 0.0f}));
  ASSERT_TRUE(RouteRanks(spec, z, {}, {}, true, kept, absl::MakeSpan(u)).ok());
  EXPECT_EQ(std::vector<int32_t>(kept, kept + 2), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(u, (std::vector<float>{0.0f, -3.0f, 2.0f, 0.0f}));
  // The bias steers selection only; the kept values stay z.
  const std::vector<float> d = {0.0f, 0.0f, 0.0f, 5.0f};
  ASSERT_TRUE(RouteRanks(spec, z, {}, d, false, kept, absl::MakeSpan(u)).ok());
  EXPECT_EQ(std::vector<int32_t>(kept, kept + 2), (std::vector<int32_t>{3, 2}));
  EXPECT_EQ(u, (std::vector<float>{0.0f, 0.0f, 2.0f, 0.5f}));
}

TEST(RoutingTest, SmoraGatesAndRenormalizes) {
  const std::vector<float> z = {1.0f, 2.0f, 3.0f, 4.0f};
  const std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f};
  const std::vector<float> bias = {0.0f, 3.0f, 0.0f, 0.0f};  // keys [1, 3, 2, -1]
  std::vector<float> g(4);
  SoftmaxF32(logits, 1.0f, absl::MakeSpan(g));
  int32_t kept[2];
  std::vector<float> u(4);
  RoutingSpec spec{.algorithm = RoutingAlgorithm::kRankTopK, .k = 2, .renormalize = false};
  ASSERT_TRUE(RouteRanks(spec, z, logits, bias, false, kept, absl::MakeSpan(u)).ok());
  EXPECT_EQ(std::vector<int32_t>(kept, kept + 2), (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(u, (std::vector<float>{0.0f, g[1] * 2.0f, g[2] * 3.0f, 0.0f}));
  spec.renormalize = true;
  ASSERT_TRUE(RouteRanks(spec, z, logits, bias, false, kept, absl::MakeSpan(u)).ok());
  const float s = g[1] + g[2];
  EXPECT_FLOAT_EQ(u[1], g[1] / s * 2.0f);
  EXPECT_FLOAT_EQ(u[2], g[2] / s * 3.0f);
  EXPECT_EQ(u[0], 0.0f);
  EXPECT_EQ(u[3], 0.0f);
}

TEST(RoutingTest, RouteRanksRejectsBadShapes) {
  const RoutingSpec spec{.algorithm = RoutingAlgorithm::kRankTopK, .k = 2};
  int32_t kept[8];
  std::vector<float> u(4), short_u(3);
  const std::vector<float> z = {1, 2, 3, 4};
  EXPECT_FALSE(RouteRanks(spec, z, {}, {}, false, kept, absl::MakeSpan(short_u)).ok());
  EXPECT_FALSE(
      RouteRanks(spec, z, std::vector<float>{1, 2}, {}, false, kept, absl::MakeSpan(u)).ok());
  EXPECT_FALSE(
      RouteRanks(spec, z, {}, std::vector<float>{1, 2}, false, kept, absl::MakeSpan(u)).ok());
  EXPECT_FALSE(RouteRanks({.algorithm = RoutingAlgorithm::kRankTopK, .k = 5}, z, {}, {}, false,
                          kept, absl::MakeSpan(u))
                   .ok());
  EXPECT_FALSE(RouteRanks({.algorithm = RoutingAlgorithm::kTopK, .k = 2}, z, {}, {}, false, kept,
                          absl::MakeSpan(u))
                   .ok());
}

void ExpectInvalid(const absl::Status& s, const std::string& message) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(message), std::string::npos) << s << "\nwanted: " << message;
}

TEST(RoutingTest, ValidationNamesTheField) {
  EXPECT_TRUE(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopK, .k = 8}, 8).ok());
  ExpectInvalid(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopK, .k = 9}, 8),
                "routing: k = 9 exceeds the 8 experts");
  ExpectInvalid(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopK, .k = 0}, 8),
                "routing: k = 0 must be >= 1");
  ExpectInvalid(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kRankTopK, .k = 17}, 16),
                "routing: k = 17 exceeds the 16 ranks");
  ExpectInvalid(ValidateRoutingSpec({}, 0), "routing: num_experts = 0 must be >= 1");
  for (float p : {0.0f, -0.1f, 1.5f, kNan}) {
    ExpectInvalid(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopP, .p = p}, 8),
                  "routing: p = ");
    ExpectInvalid(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kDynMole, .p = p}, 8),
                  "is outside (0, 1]");
  }
  EXPECT_TRUE(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopP, .p = 1.0f}, 8).ok());
  ExpectInvalid(
      ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopP, .p = 0.5f, .min_k = 9}, 8),
      "routing: min_k = 9 exceeds the 8 experts");
  ExpectInvalid(
      ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kTopP, .p = 0.5f, .min_k = -1}, 8),
      "routing: min_k = -1");
  for (float t : {0.0f, -1.0f, kInf, kNan}) {
    ExpectInvalid(ValidateRoutingSpec({.temperature = t}, 8), "routing: temperature = ");
  }
  ExpectInvalid(ValidateRoutingSpec({.prob_temperature = -1.0f}, 8),
                "routing: prob_temperature = -1");
  RoutingSpec dyn = DynMoleDefaults();
  dyn.entropy.q = 0.0;
  ExpectInvalid(ValidateRoutingSpec(dyn, 8), "routing: entropy.q = 0 must be > 0");
  dyn = DynMoleDefaults();
  dyn.entropy.eps = -1.0;
  ExpectInvalid(ValidateRoutingSpec(dyn, 8), "routing: entropy.eps");
  dyn = DynMoleDefaults();
  dyn.entropy.threshold = std::nan("");
  ExpectInvalid(ValidateRoutingSpec(dyn, 8), "routing: entropy.threshold");
  // Fields an algorithm does not use are not checked: k is irrelevant to soft routing.
  EXPECT_TRUE(ValidateRoutingSpec({.algorithm = RoutingAlgorithm::kSoft, .k = 0}, 8).ok());
  EXPECT_TRUE(ValidateRoutingSpec(DynMoleDefaults(), 8).ok());
}

TEST(RoutingTest, OverrideApplies) {
  const RoutingSpec topk{.algorithm = RoutingAlgorithm::kTopK, .k = 2};
  absl::StatusOr<RoutingSpec> s = ApplyRoutingOverride(topk, {}, 8);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->k, 2);
  s = ApplyRoutingOverride(topk, {.k = 4}, 8);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->k, 4);
  EXPECT_EQ(s->algorithm, RoutingAlgorithm::kTopK);
  s = ApplyRoutingOverride(topk, {.algorithm = RoutingAlgorithm::kTopP, .p = 0.6f}, 8);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->algorithm, RoutingAlgorithm::kTopP);
  EXPECT_EQ(s->p, 0.6f);
  s = ApplyRoutingOverride(topk, {.algorithm = RoutingAlgorithm::kSoft}, 8);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->algorithm, RoutingAlgorithm::kSoft);
  const RoutingSpec rank{.algorithm = RoutingAlgorithm::kRankTopK, .k = 8};
  s = ApplyRoutingOverride(rank, {.k = 4}, 16);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->k, 4);
  // The result is what routes: k = 4 now picks 4 experts.
  EXPECT_EQ(
      Route(*ApplyRoutingOverride(topk, {.k = 4}, 8), std::vector<float>(8, 0.0f)).experts.size(),
      4u);
}

TEST(RoutingTest, OverrideToAnotherAlgorithmTakesItsDefaults) {
  // A MixLoRA-dynamic group (raw top-p weights, probability temperature) overridden to top-k
  // renormalises, as MixLoRA's top-k does; back to top_p does not.
  RoutingSpec dyn{.algorithm = RoutingAlgorithm::kTopP,
                  .p = 0.6f,
                  .prob_temperature = 0.9f,
                  .renormalize = false};
  absl::StatusOr<RoutingSpec> topk =
      ApplyRoutingOverride(dyn, {.algorithm = RoutingAlgorithm::kTopK, .k = 2}, 4);
  ASSERT_TRUE(topk.ok()) << topk.status();
  EXPECT_TRUE(topk->renormalize);
  EXPECT_EQ(topk->prob_temperature, 0.0f);
  int32_t experts[4];
  float weights[4];
  const std::vector<float> logits = {0.3f, 1.2f, -0.4f, 0.9f};
  absl::StatusOr<int32_t> n = RouteToken(*topk, logits, experts, weights);
  ASSERT_TRUE(n.ok());
  ASSERT_EQ(*n, 2);
  EXPECT_NEAR(weights[0] + weights[1], 1.0f, 1e-6f);
  RoutingSpec mixlora{.algorithm = RoutingAlgorithm::kTopK, .k = 2, .renormalize = true};
  absl::StatusOr<RoutingSpec> top_p =
      ApplyRoutingOverride(mixlora, {.algorithm = RoutingAlgorithm::kTopP, .p = 0.5f}, 4);
  ASSERT_TRUE(top_p.ok()) << top_p.status();
  EXPECT_FALSE(top_p->renormalize);
  EXPECT_EQ(top_p->p_mode, TopPMode::kExceed);
  absl::StatusOr<RoutingSpec> dynmole =
      ApplyRoutingOverride(mixlora, {.algorithm = RoutingAlgorithm::kDynMole, .p = 0.75f}, 8);
  ASSERT_TRUE(dynmole.ok()) << dynmole.status();
  EXPECT_TRUE(dynmole->entropy.enabled);
  EXPECT_EQ(dynmole->min_k, 2);
  EXPECT_FALSE(dynmole->renormalize);
}

TEST(RoutingTest, OverrideErrors) {
  const RoutingSpec topk{.algorithm = RoutingAlgorithm::kTopK, .k = 2};
  ExpectInvalid(ApplyRoutingOverride(topk, {.k = 9}, 8).status(),
                "routing override: routing: k = 9 exceeds the 8 experts");
  ExpectInvalid(ApplyRoutingOverride(topk, {.p = 0.5f}, 8).status(),
                "routing override: p does not apply to topk routing");
  ExpectInvalid(ApplyRoutingOverride(topk, {.algorithm = RoutingAlgorithm::kTopP}, 8).status(),
                "routing: p = 0 is outside (0, 1]");
  ExpectInvalid(ApplyRoutingOverride(topk, {.algorithm = RoutingAlgorithm::kRankTopK}, 8).status(),
                "rank_topk applies only to rank-granular groups");
  const RoutingSpec top_p{.algorithm = RoutingAlgorithm::kTopP, .p = 0.8f};
  ExpectInvalid(ApplyRoutingOverride(top_p, {.k = 2}, 8).status(),
                "routing override: k does not apply to top_p routing");
  ExpectInvalid(ApplyRoutingOverride(top_p, {.p = 1.5f}, 8).status(), "routing: p = 1.5");
  const RoutingSpec rank{.algorithm = RoutingAlgorithm::kRankTopK, .k = 8};
  ExpectInvalid(ApplyRoutingOverride(rank, {.algorithm = RoutingAlgorithm::kTopK}, 16).status(),
                "cannot change a rank-granular group");
  ExpectInvalid(ApplyRoutingOverride(rank, {.p = 0.5f}, 16).status(),
                "p does not apply to rank_topk");
  ExpectInvalid(ApplyRoutingOverride(rank, {.k = 17}, 16).status(), "k = 17 exceeds the 16 ranks");
}

TEST(RoutingTest, RouteTokenDoesNotAllocateUpTo64Experts) {
  std::vector<float> logits(64);
  for (int i = 0; i < 64; ++i) logits[i] = std::sin(0.37f * i);
  std::vector<int32_t> experts(80);
  std::vector<float> weights(80);
  std::vector<RoutingSpec> specs = {
      {.algorithm = RoutingAlgorithm::kTopK, .k = 4},
      {.algorithm = RoutingAlgorithm::kTopP, .p = 0.8f},
      DynMoleDefaults(),
      {.algorithm = RoutingAlgorithm::kSoft},
      {.algorithm = RoutingAlgorithm::kSwitch},
  };
  int32_t kept[8];
  std::vector<float> u(64);
  const int64_t before = g_allocations.load();
  for (const RoutingSpec& spec : specs) {
    absl::StatusOr<int32_t> n = RouteToken(spec, logits, experts.data(), weights.data());
    if (!n.ok()) ADD_FAILURE() << n.status();
  }
  if (!RouteRanks({.algorithm = RoutingAlgorithm::kRankTopK, .k = 8}, logits, logits, {}, false,
                  kept, absl::MakeSpan(u))
           .ok()) {
    ADD_FAILURE();
  }
  EXPECT_EQ(g_allocations.load() - before, 0);
  // Beyond 64 the scratch moves to the heap and the result is the same kind of answer.
  logits.resize(80, -1.0f);
  absl::StatusOr<int32_t> n = RouteToken(specs[0], logits, experts.data(), weights.data());
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, 4);
}

// --- cross-check against the torch reference -----------------------------------------------

RoutingSpec SpecFromJson(const nlohmann::json& j) {
  RoutingSpec s;
  s.algorithm = *ParseRoutingAlgorithm(j.at("algorithm").get<std::string>());
  s.k = j.at("k").get<int32_t>();
  s.p = j.at("p").get<float>();
  s.p_mode = j.at("p_mode").get<std::string>() == "within" ? TopPMode::kWithin : TopPMode::kExceed;
  s.min_k = j.at("min_k").get<int32_t>();
  s.temperature = j.at("temperature").get<float>();
  s.prob_temperature = j.at("prob_temperature").get<float>();
  s.renormalize = j.at("renormalize").get<bool>();
  const nlohmann::json& e = j.at("entropy");
  s.entropy = {.enabled = e.at("enabled").get<bool>(),
               .q = e.at("q").get<double>(),
               .threshold = e.at("threshold").get<double>(),
               .eps = e.at("eps").get<double>()};
  return s;
}

std::vector<float> Floats(const nlohmann::json& j) {
  std::vector<float> v;
  for (const auto& x : j) v.push_back(static_cast<float>(x.get<double>()));
  return v;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return m;
}

nlohmann::json RunReference() {
  const std::string cmd = absl::StrCat(MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR,
                                       "/tests/engine/routing/routing_reference.py");
  int rc = 0;
  const std::string out = ::moleserve::test_util::RunCommand(cmd, &rc);
  EXPECT_EQ(rc, 0) << "reference failed (is python3-torch installed?): " << cmd;
  nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << "reference printed no JSON";
  return j.is_discarded() ? nlohmann::json() : j;
}

TEST(RoutingTest, MatchesTorchReference) {
  const nlohmann::json ref = RunReference();
  ASSERT_TRUE(ref.contains("cases"));
  std::map<std::string, int> checked;
  double worst = 0;
  for (const nlohmann::json& c : ref.at("cases")) {
    const std::string rule = c.at("rule").get<std::string>();
    const std::string kind = c.at("kind").get<std::string>();
    SCOPED_TRACE(absl::StrCat(rule, " case ", checked[rule], ": ", c.dump()));
    if (kind == "token") {
      const RoutingSpec spec = SpecFromJson(c.at("spec"));
      const std::vector<float> logits = Floats(c.at("logits"));
      ASSERT_TRUE(ValidateRoutingSpec(spec, static_cast<int32_t>(logits.size())).ok());
      Routed r = Route(spec, logits);
      EXPECT_EQ(r.experts, c.at("experts").get<std::vector<int32_t>>());
      const std::vector<float> want = Floats(c.at("weights"));
      ASSERT_EQ(r.weights.size(), want.size());
      const double err = MaxAbsDiff(r.weights, want);
      EXPECT_LE(err, kWeightTolerance);
      worst = std::max(worst, err);
    } else if (kind == "xlora") {
      const std::vector<float> s = Floats(c.at("scalings"));
      const std::vector<float> w =
          XloraWeights(s, c.at("top_k").get<int32_t>(), c.at("softmax_topk").get<bool>());
      const std::vector<float> want = Floats(c.at("weights"));
      for (size_t i = 0; i < w.size(); ++i) {
        EXPECT_EQ(w[i] == 0.0f, want[i] == 0.0f) << "selection differs at " << i;
      }
      const double err = MaxAbsDiff(w, want);
      EXPECT_LE(err, kWeightTolerance);
      worst = std::max(worst, err);
    } else {
      ASSERT_EQ(kind, "rank");
      const RoutingSpec spec = SpecFromJson(c.at("spec"));
      const std::vector<float> z = Floats(c.at("z"));
      const std::vector<int32_t> want_kept = c.at("kept").get<std::vector<int32_t>>();
      std::vector<int32_t> kept(spec.k);
      std::vector<float> u(z.size());
      ASSERT_TRUE(RouteRanks(spec, z, Floats(c.at("router_logits")), Floats(c.at("select_bias")),
                             c.at("select_on_abs").get<bool>(), kept.data(), absl::MakeSpan(u))
                      .ok());
      EXPECT_EQ(kept, want_kept);
      const double err = MaxAbsDiff(u, Floats(c.at("u")));
      EXPECT_LE(err, kWeightTolerance);
      worst = std::max(worst, err);
    }
    ++checked[rule];
  }
  int total = 0;
  for (const auto& [rule, n] : checked) {
    EXPECT_GE(n, 20) << rule;
    total += n;
  }
  EXPECT_GE(total, 300);
  std::printf("checked %d cases against torch, max weight error %.3g\n", total, worst);
}

}  // namespace
}  // namespace moleserve::engine
