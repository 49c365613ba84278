// The device routing code (kernels/common/routing_math.h, run by the CUDA routing kernels one
// thread per token and by their CPU twins kernels::cpu::Route / RankRoute) against engine/routing,
// the host implementation that routing_test.cc checks against torch. Both run the same fp32
// operations in the same order, so the chosen experts must be identical and the weights equal to
// the last bit (tolerance: exact).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "engine/routing/routing.h"
#include "kernels/cpu/ops.h"

namespace moleserve::engine {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Logits with repeated values (ties) and, now and then, -inf entries.
std::vector<float> TieHeavyLogits(int64_t tokens, int32_t e, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, 9);
  std::vector<float> v(tokens * e);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t i = 0; i < e; ++i) {
      float& x = v[t * e + i];
      const int r = pick(rng);
      if (r == 0 && i > 0) {
        x = v[t * e + i - 1];  // a tie with the previous expert
      } else if (r == 1 && i > 0 && e > 2) {
        x = -kInf;
      } else {
        x = std::round(normal(rng) * 4.0f) / 4.0f;  // coarse grid: more ties
      }
    }
  }
  return v;
}

struct Case {
  const char* name;
  RoutingSpec spec;
};

std::vector<Case> Cases() {
  std::vector<Case> cases;
  cases.push_back({"topk2", {.algorithm = RoutingAlgorithm::kTopK, .k = 2}});
  cases.push_back(
      {"topk3_raw_T2",
       {.algorithm = RoutingAlgorithm::kTopK, .k = 3, .temperature = 2.0f, .renormalize = false}});
  cases.push_back({"top_p_exceed", {.algorithm = RoutingAlgorithm::kTopP, .p = 0.6f}});
  cases.push_back(
      {"top_p_within_min2",
       {.algorithm = RoutingAlgorithm::kTopP, .p = 0.5f, .p_mode = TopPMode::kWithin, .min_k = 2}});
  cases.push_back({"top_p_prob_temperature",
                   {.algorithm = RoutingAlgorithm::kTopP, .p = 0.8f, .prob_temperature = 1.5f}});
  RoutingSpec dyn{.algorithm = RoutingAlgorithm::kDynMole, .p = 0.75f, .min_k = 2};
  dyn.entropy.enabled = true;
  cases.push_back({"dynmole_tsallis", dyn});
  dyn.entropy.q = 1.0;
  dyn.entropy.threshold = 0.6;
  cases.push_back({"dynmole_shannon", dyn});
  dyn.entropy.enabled = false;
  cases.push_back({"dynmole_no_gate", dyn});
  cases.push_back({"soft", {.algorithm = RoutingAlgorithm::kSoft, .temperature = 0.7f}});
  cases.push_back({"switch", {.algorithm = RoutingAlgorithm::kSwitch}});
  return cases;
}

TEST(RoutingTwinTest, EveryRuleMatchesEngineRoutingExactly) {
  for (int32_t e : {1, 2, 3, 8, 16, 64, 128}) {
    const int64_t tokens = 257;
    const std::vector<float> logits = TieHeavyLogits(tokens, e, 17u + e);
    for (const Case& c : Cases()) {
      RoutingSpec spec = c.spec;
      spec.k = std::min(spec.k, e);
      spec.min_k = std::min(spec.min_k, e);
      if (!ValidateRoutingSpec(spec, e).ok()) continue;
      SCOPED_TRACE(::testing::Message() << c.name << " E=" << e);
      absl::StatusOr<kernels::RouteParams> params = ToRouteParams(spec, e);
      ASSERT_TRUE(params.ok()) << params.status();
      std::vector<int32_t> experts(tokens * e, -1), count(tokens, -1);
      std::vector<float> weights(tokens * e, -1.0f);
      params->logits = logits.data();
      params->experts = experts.data();
      params->weights = weights.data();
      params->count = count.data();
      params->num_tokens = tokens;
      ASSERT_EQ(kernels::cpu::Route(*params, nullptr), kernels::KernelStatus::kOk);
      std::vector<int32_t> want_e(e);
      std::vector<float> want_w(e);
      for (int64_t t = 0; t < tokens; ++t) {
        absl::StatusOr<int32_t> n = RouteToken(spec, absl::MakeConstSpan(logits.data() + t * e, e),
                                               want_e.data(), want_w.data());
        if (!n.ok()) {
          EXPECT_EQ(count[t], 0) << "token " << t << ": " << n.status();
          continue;
        }
        ASSERT_EQ(count[t], *n) << "token " << t;
        for (int32_t j = 0; j < *n; ++j) {
          EXPECT_EQ(experts[t * e + j], want_e[j]) << "token " << t << " slot " << j;
          EXPECT_EQ(weights[t * e + j], want_w[j]) << "token " << t << " slot " << j;
        }
      }
    }
  }
}

TEST(RoutingTwinTest, XloraRuleReadsStridedScalingsUnderTheMask) {
  // Layerwise X-LoRA scalings: [T, 3 modules x N], module 1's N columns routed; odd tokens are
  // another adapter's (inactive).
  const int32_t n = 5, cols = 3 * n;
  const int64_t tokens = 64;
  const std::vector<float> scalings = TieHeavyLogits(tokens, cols, 99u);
  std::vector<int32_t> active(tokens);
  for (int64_t t = 0; t < tokens; ++t) active[t] = t % 2 == 0;
  for (int32_t top_k : {0, 1, 3}) {
    for (bool softmax_topk : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "top_k " << top_k << " softmax " << softmax_topk);
      kernels::RouteParams p = XloraRouteParams(n, top_k, softmax_topk);
      std::vector<int32_t> experts(tokens * n, -1), count(tokens, -1);
      std::vector<float> weights(tokens * n, -1.0f);
      p.logits = scalings.data() + n;
      p.logits_stride = cols;
      p.experts = experts.data();
      p.weights = weights.data();
      p.count = count.data();
      p.active = active.data();
      p.num_tokens = tokens;
      ASSERT_EQ(kernels::cpu::Route(p, nullptr), kernels::KernelStatus::kOk);
      std::vector<int32_t> want_e(n);
      std::vector<float> want_w(n);
      for (int64_t t = 0; t < tokens; ++t) {
        if (!active[t]) {
          EXPECT_EQ(count[t], 0) << "inactive token " << t;
          continue;
        }
        absl::StatusOr<int32_t> k =
            RouteXlora(absl::MakeConstSpan(scalings.data() + t * cols + n, n), top_k, softmax_topk,
                       want_e.data(), want_w.data());
        if (!k.ok()) {  // the grid has -inf entries: undefined, as on the host
          EXPECT_EQ(count[t], 0) << "token " << t;
          continue;
        }
        ASSERT_EQ(count[t], *k) << "token " << t;
        for (int32_t j = 0; j < *k; ++j) {
          EXPECT_EQ(experts[t * n + j], want_e[j]) << "token " << t;
          EXPECT_EQ(weights[t * n + j], want_w[j]) << "token " << t;
        }
      }
    }
  }
}

TEST(RoutingTwinTest, SoftmaxGroupsMatchesEngineSoftmaxPerGroup) {
  // X-LoRA's classifier output: rows of 6 modules x 4 adapters, written into a wider table
  // under a mask; -inf entries make some groups undefined (all NaN, as SoftmaxF32).
  const int64_t rows = 40, cols = 24, stride = 30;
  std::vector<float> x = TieHeavyLogits(rows, cols, 5u);
  std::fill(x.begin() + 2 * cols + 4, x.begin() + 2 * cols + 8, -kInf);  // row 2, group 1
  std::vector<int32_t> active(rows);
  for (int64_t r = 0; r < rows; ++r) active[r] = r % 4 != 1;
  for (bool softmax : {true, false}) {
    std::vector<float> y(rows * stride, -7.0f);
    ASSERT_EQ(kernels::cpu::SoftmaxGroups({.x = x.data(),
                                           .y = y.data(),
                                           .active = active.data(),
                                           .rows = rows,
                                           .cols = cols,
                                           .y_stride = stride,
                                           .group = 4,
                                           .temperature = 0.8f,
                                           .softmax = softmax},
                                          nullptr),
              kernels::KernelStatus::kOk);
    std::vector<float> want(4);
    int undefined = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < stride; ++c) {
        const float got = y[r * stride + c];
        if (!active[r] || c >= cols) {
          ASSERT_EQ(got, -7.0f) << "row " << r << " col " << c << ": not written";
          continue;
        }
        const int64_t g = c / 4 * 4;
        if (softmax) {
          SoftmaxF32(absl::MakeConstSpan(x.data() + r * cols + g, 4), 0.8f, absl::MakeSpan(want));
        } else {
          std::copy(x.data() + r * cols + g, x.data() + r * cols + g + 4, want.begin());
        }
        if (std::isnan(want[c - g])) {
          ++undefined;
          ASSERT_TRUE(std::isnan(got)) << "row " << r << " col " << c;
        } else {
          ASSERT_EQ(got, want[c - g]) << "row " << r << " col " << c;
        }
      }
    }
    EXPECT_EQ(undefined >= 4, softmax) << "the -inf-only group is undefined under softmax";
  }
  EXPECT_EQ(kernels::cpu::SoftmaxGroups({.rows = 1, .cols = 10, .group = 4}, nullptr),
            kernels::KernelStatus::kInvalidShape);
}

// Mixture of Routers: the kernel's log of the mixed probabilities against the mixture computed
// here in double from engine/routing's softmax; then Route on those logits keeps the experts of
// the largest mixed probabilities with those probabilities, renormalised.
TEST(RoutingTwinTest, MixRouterGivesTheLogOfTheMixedProbabilities) {
  const int64_t rows = 30;
  const int32_t e = 6, m = 3;
  const int64_t width = int64_t{m} * e + m;
  std::vector<float> x = TieHeavyLogits(rows, width, 9u);
  x[4 * width + 2] = std::numeric_limits<float>::quiet_NaN();  // row 4: undefined sub-router
  std::vector<int32_t> active(rows);
  for (int64_t r = 0; r < rows; ++r) active[r] = r % 5 != 3;
  std::vector<float> y(rows * e, -7.0f);
  ASSERT_EQ(kernels::cpu::MixRouter({.x = x.data(),
                                     .y = y.data(),
                                     .active = active.data(),
                                     .rows = rows,
                                     .experts = e,
                                     .routers = m},
                                    nullptr),
            kernels::KernelStatus::kOk);
  std::vector<float> g(m), sub(e);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.data() + r * width;
    if (!active[r]) {
      for (int32_t i = 0; i < e; ++i) ASSERT_EQ(y[r * e + i], -7.0f) << "row " << r;
      continue;
    }
    if (r == 4) {
      for (int32_t i = 0; i < e; ++i) ASSERT_TRUE(std::isnan(y[r * e + i])) << i;
      continue;
    }
    SoftmaxF32(absl::MakeConstSpan(row + m * e, m), 1.0f, absl::MakeSpan(g));
    std::vector<double> p(e, 0.0);
    for (int32_t j = 0; j < m; ++j) {
      SoftmaxF32(absl::MakeConstSpan(row + j * e, e), 1.0f, absl::MakeSpan(sub));
      for (int32_t i = 0; i < e; ++i) p[i] += double{g[j]} * sub[i];
    }
    if (std::isnan(p[0])) {  // a sub-router or the main router is undefined (all -inf)
      for (int32_t i = 0; i < e; ++i) ASSERT_TRUE(std::isnan(y[r * e + i])) << "row " << r;
      continue;
    }
    for (int32_t i = 0; i < e; ++i) {
      ASSERT_NEAR(y[r * e + i], std::log(p[i]), 1e-5) << "row " << r << " expert " << i;
    }
    // Top-2 of the mixed probabilities, renormalised.
    RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopK, .k = 2};
    int32_t experts[kernels::kMaxRouteWidth];
    float weights[kernels::kMaxRouteWidth];
    absl::StatusOr<int32_t> n =
        RouteToken(spec, absl::MakeConstSpan(y.data() + r * e, e), experts, weights);
    ASSERT_TRUE(n.ok());
    ASSERT_EQ(*n, 2);
    std::vector<int32_t> order(e);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    if (p[order[1]] - p[order[2]] < 1e-5) continue;  // a near-tie: either pick is right
    EXPECT_EQ(experts[0], order[0]) << "row " << r;
    EXPECT_EQ(experts[1], order[1]) << "row " << r;
    EXPECT_NEAR(weights[0], p[order[0]] / (p[order[0]] + p[order[1]]), 1e-6) << "row " << r;
  }
  EXPECT_EQ(kernels::cpu::MixRouter({.rows = 1, .experts = e, .routers = 0}, nullptr),
            kernels::KernelStatus::kInvalidShape);
  EXPECT_EQ(kernels::cpu::MixRouter(
                {.x = x.data(), .y = x.data(), .rows = 1, .experts = e, .routers = m}, nullptr),
            kernels::KernelStatus::kInvalidArgument);
}

TEST(RoutingTwinTest, UndefinedLogitsGiveCountZero) {
  const int32_t e = 4;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> logits = {1, nan, 0, 0, kInf, 0, 0, 0, -kInf, -kInf, -kInf, -kInf, 1, 2, 3, 4};
  std::vector<int32_t> experts(16), count(4, -1);
  std::vector<float> weights(16);
  absl::StatusOr<kernels::RouteParams> p =
      ToRouteParams({.algorithm = RoutingAlgorithm::kTopK, .k = 2}, e);
  ASSERT_TRUE(p.ok());
  p->logits = logits.data();
  p->experts = experts.data();
  p->weights = weights.data();
  p->count = count.data();
  p->num_tokens = 4;
  ASSERT_EQ(kernels::cpu::Route(*p, nullptr), kernels::KernelStatus::kOk);
  EXPECT_EQ(count, (std::vector<int32_t>{0, 0, 0, 2}));
  EXPECT_EQ(experts[12], 3);
  EXPECT_EQ(experts[13], 2);
}

TEST(RoutingTwinTest, RankRoutingMatchesEngineRoutingExactly) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int32_t r : {1, 4, 16, 64, 128}) {
    for (bool smora : {false, true}) {
      for (bool abs : {false, true}) {
        for (bool bias : {false, true}) {
          for (bool renorm : {false, true}) {
            SCOPED_TRACE(::testing::Message() << "r=" << r << " smora=" << smora << " abs=" << abs
                                              << " bias=" << bias << " renorm=" << renorm);
            const int64_t tokens = 33;
            const int32_t stride = r + 3;  // a padded v row, as the SGMV shrink writes it
            std::vector<float> z(tokens * stride), logits(smora ? tokens * r : 0), sb(bias ? r : 0);
            for (float& x : z) x = std::round(normal(rng) * 8.0f) / 8.0f;
            for (float& x : logits) x = normal(rng);
            for (float& x : sb) x = normal(rng) * 0.1f;
            RoutingSpec spec{.algorithm = RoutingAlgorithm::kRankTopK,
                             .k = std::max(1, r / 4),
                             .temperature = 0.9f,
                             .renormalize = renorm};
            absl::StatusOr<kernels::RankRouteParams> p = ToRankRouteParams(spec, r, abs);
            ASSERT_TRUE(p.ok()) << p.status();
            std::vector<float> u(tokens * stride, 7.0f);
            std::vector<int32_t> kept(tokens * spec.k), ok(tokens);
            p->z = z.data();
            p->z_stride = stride;
            p->router_logits = smora ? logits.data() : nullptr;
            p->select_bias = bias ? sb.data() : nullptr;
            p->u = u.data();
            p->kept = kept.data();
            p->ok = ok.data();
            p->num_tokens = tokens;
            ASSERT_EQ(kernels::cpu::RankRoute(*p, nullptr), kernels::KernelStatus::kOk);
            std::vector<int32_t> want_kept(spec.k);
            std::vector<float> want_u(r);
            for (int64_t t = 0; t < tokens; ++t) {
              absl::Span<const float> lg;
              if (smora) lg = absl::MakeConstSpan(logits.data() + t * r, r);
              ASSERT_TRUE(RouteRanks(spec, absl::MakeConstSpan(z.data() + t * stride, r), lg, sb,
                                     abs, want_kept.data(), absl::MakeSpan(want_u))
                              .ok());
              ASSERT_EQ(ok[t], 1);
              for (int32_t j = 0; j < spec.k; ++j) EXPECT_EQ(kept[t * spec.k + j], want_kept[j]);
              for (int32_t i = 0; i < r; ++i) EXPECT_EQ(u[t * stride + i], want_u[i]);
              for (int32_t i = r; i < stride; ++i) EXPECT_EQ(u[t * stride + i], 7.0f);
            }
          }
        }
      }
    }
  }
}

// BuildSegments turns Route's decisions into the same segments the host path builds: for each
// expert in order, the tokens that chose it in token order, weight x LoRA scale; tokens with
// undefined logits are counted and get no pairs.
TEST(RoutingTwinTest, BuildSegmentsMatchesTheHostGrouping) {
  const int32_t e = 8, rank = 4;
  const int64_t tokens = 50;
  std::vector<float> logits = TieHeavyLogits(tokens, e, 99);
  logits[7 * e] = std::numeric_limits<float>::quiet_NaN();  // token 7: undefined
  RoutingSpec spec{.algorithm = RoutingAlgorithm::kTopP, .p = 0.7f};
  absl::StatusOr<kernels::RouteParams> route = ToRouteParams(spec, e);
  ASSERT_TRUE(route.ok());
  std::vector<int32_t> experts(tokens * e), count(tokens), rows(tokens);
  std::vector<float> weights(tokens * e), scale(e);
  for (int32_t i = 0; i < e; ++i) scale[i] = 0.5f + i;
  for (int64_t t = 0; t < tokens; ++t) rows[t] = static_cast<int32_t>(3 * t + 1);
  route->logits = logits.data();
  route->experts = experts.data();
  route->weights = weights.data();
  route->count = count.data();
  route->num_tokens = tokens;
  ASSERT_EQ(kernels::cpu::Route(*route, nullptr), kernels::KernelStatus::kOk);
  std::vector<int32_t> pair_row(tokens * e, -1), seg_start(e + 1), seg_rank(e);
  std::vector<float> pair_weight(tokens * e);
  std::vector<int64_t> seg_off(e);
  int32_t undefined = 5;  // accumulated into
  ASSERT_EQ(kernels::cpu::BuildSegments({.experts = experts.data(),
                                         .weights = weights.data(),
                                         .count = count.data(),
                                         .rows = rows.data(),
                                         .scale = scale.data(),
                                         .pair_row = pair_row.data(),
                                         .pair_weight = pair_weight.data(),
                                         .seg_start = seg_start.data(),
                                         .seg_rank = seg_rank.data(),
                                         .seg_row_offset = seg_off.data(),
                                         .undefined = &undefined,
                                         .num_tokens = static_cast<int32_t>(tokens),
                                         .num_experts = e,
                                         .rank = rank},
                                        nullptr),
            kernels::KernelStatus::kOk);
  EXPECT_EQ(undefined, 6);
  // The host grouping (AdapterExecutor's host path) from engine/routing's decisions.
  std::vector<std::vector<std::pair<int32_t, float>>> want(e);
  std::vector<int32_t> ex(e);
  std::vector<float> w(e);
  for (int64_t t = 0; t < tokens; ++t) {
    absl::StatusOr<int32_t> n =
        RouteToken(spec, absl::MakeConstSpan(logits.data() + t * e, e), ex.data(), w.data());
    if (!n.ok()) continue;
    for (int32_t j = 0; j < *n; ++j) want[ex[j]].push_back({rows[t], w[j] * scale[ex[j]]});
  }
  ASSERT_EQ(seg_start[0], 0);
  for (int32_t x = 0; x < e; ++x) {
    ASSERT_EQ(seg_start[x + 1] - seg_start[x], static_cast<int32_t>(want[x].size())) << x;
    EXPECT_EQ(seg_rank[x], rank);
    EXPECT_EQ(seg_off[x], int64_t{x} * rank);
    for (size_t i = 0; i < want[x].size(); ++i) {
      EXPECT_EQ(pair_row[seg_start[x] + i], want[x][i].first);
      EXPECT_EQ(pair_weight[seg_start[x] + i], want[x][i].second);
    }
  }
}

TEST(RoutingTwinTest, BuildSegmentsGivesDecisionSlotsForMixlora) {
  // MixLoRA's planned block FFN: slot p = t * E + j is decision j of token t; slot_count marks
  // the decisions, token_pair maps each to its pair, and slot_rows makes the pairs read slots.
  const int32_t e = 4;
  const int64_t tokens = 30;
  const std::vector<float> logits = TieHeavyLogits(tokens, e, 7);
  absl::StatusOr<kernels::RouteParams> route =
      ToRouteParams({.algorithm = RoutingAlgorithm::kTopP, .p = 0.6f}, e);
  ASSERT_TRUE(route.ok());
  std::vector<int32_t> experts(tokens * e), count(tokens), active(tokens);
  std::vector<float> weights(tokens * e), ones(e, 1.0f);
  for (int64_t t = 0; t < tokens; ++t) active[t] = t % 5 != 2;
  route->logits = logits.data();
  route->experts = experts.data();
  route->weights = weights.data();
  route->count = count.data();
  route->active = active.data();
  route->num_tokens = tokens;
  ASSERT_EQ(kernels::cpu::Route(*route, nullptr), kernels::KernelStatus::kOk);
  std::vector<int32_t> pair_row(tokens * e, -1), seg_start(e + 1), seg_rank(e),
      token_pair(tokens * e, -1), slot_count(tokens * e, -1);
  std::vector<float> pair_weight(tokens * e);
  std::vector<int64_t> seg_off(e);
  int32_t undefined = 0;
  ASSERT_EQ(kernels::cpu::BuildSegments({.experts = experts.data(),
                                         .weights = weights.data(),
                                         .count = count.data(),
                                         .scale = ones.data(),
                                         .active = active.data(),
                                         .pair_row = pair_row.data(),
                                         .pair_weight = pair_weight.data(),
                                         .seg_start = seg_start.data(),
                                         .seg_rank = seg_rank.data(),
                                         .seg_row_offset = seg_off.data(),
                                         .token_pair = token_pair.data(),
                                         .slot_count = slot_count.data(),
                                         .slot_rows = true,
                                         .undefined = &undefined,
                                         .num_tokens = static_cast<int32_t>(tokens),
                                         .num_experts = e,
                                         .rank = 2},
                                        nullptr),
            kernels::KernelStatus::kOk);
  int32_t decisions = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t j = 0; j < e; ++j) {
      const int64_t slot = t * e + j;
      ASSERT_EQ(slot_count[slot], j < count[t] ? 1 : 0) << "slot " << slot;
      if (j >= count[t]) continue;
      ++decisions;
      const int32_t p = token_pair[slot];
      ASSERT_GE(p, seg_start[experts[slot]]);
      ASSERT_LT(p, seg_start[experts[slot] + 1]);
      EXPECT_EQ(pair_row[p], slot) << "the pair reads its decision's slot";
      EXPECT_EQ(pair_weight[p], weights[slot]);
    }
    if (!active[t]) {
      EXPECT_EQ(count[t], 0);
    }
  }
  EXPECT_EQ(seg_start[e], decisions);
  // Top-p keeps more than one expert for some active tokens.
  EXPECT_GT(decisions, std::count(active.begin(), active.end(), 1));
}

// Rank top-2 of 4 ranks over the 3 tokens of z [3, 4] on the CPU twin (active: a token mask or
// nullptr), into the caller's outputs.
void RankTop2Of4(const std::vector<float>& z, std::vector<float>* u, std::vector<int32_t>* kept,
                 std::vector<int32_t>* ok, int32_t* undefined, const int32_t* active) {
  absl::StatusOr<kernels::RankRouteParams> p =
      ToRankRouteParams({.algorithm = RoutingAlgorithm::kRankTopK, .k = 2}, 4, false);
  ASSERT_TRUE(p.ok());
  p->z = z.data();
  p->u = u->data();
  p->kept = kept->data();
  p->ok = ok->data();
  p->undefined = undefined;
  p->active = active;
  p->num_tokens = 3;
  ASSERT_EQ(kernels::cpu::RankRoute(*p, nullptr), kernels::KernelStatus::kOk);
}

TEST(RoutingTwinTest, RankRoutingCountsUndefinedTokens) {
  std::vector<float> z = {1, 2, 3, 4, 1, std::numeric_limits<float>::quiet_NaN(), 0, 0, 4, 3, 2, 1};
  std::vector<float> u(12);
  std::vector<int32_t> kept(3 * 2), ok(3);
  int32_t undefined = 1;  // accumulated into
  ASSERT_NO_FATAL_FAILURE(RankTop2Of4(z, &u, &kept, &ok, &undefined, nullptr));
  EXPECT_EQ(ok, (std::vector<int32_t>{1, 0, 1}));
  EXPECT_EQ(undefined, 2);
  EXPECT_EQ(kept[0], 3);  // token 0 keeps ranks 3 and 2
  EXPECT_EQ(kept[1], 2);
  EXPECT_EQ(kept[4], 0);  // token 2 keeps ranks 0 and 1
  EXPECT_EQ(kept[5], 1);
}

TEST(RoutingTwinTest, RankRoutingSkipsInactiveTokens) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> z = {1, 2, 3, 4, nan, nan, 0, 0, 4, 3, 2, 1};
  std::vector<float> u(12, -7.0f);
  std::vector<int32_t> kept(3 * 2, -7), ok(3, -7), active = {1, 0, 1};
  int32_t undefined = 0;
  ASSERT_NO_FATAL_FAILURE(RankTop2Of4(z, &u, &kept, &ok, &undefined, active.data()));
  // Token 1 (NaN, but masked) is neither routed nor undefined; the others as without a mask.
  EXPECT_EQ(ok, (std::vector<int32_t>{1, 1, 1}));
  EXPECT_EQ(undefined, 0);
  EXPECT_EQ(kept, (std::vector<int32_t>{3, 2, -7, -7, 0, 1}));
  for (int i = 4; i < 8; ++i) EXPECT_EQ(u[i], -7.0f) << i;
  EXPECT_EQ(u[3], 4.0f);  // token 0 keeps z[3] and z[2]
  EXPECT_EQ(u[0], 0.0f);
}

TEST(RoutingTwinTest, RefusesWidthsTheDeviceCannotRoute) {
  EXPECT_FALSE(ToRouteParams({.algorithm = RoutingAlgorithm::kTopK, .k = 2}, 129).ok());
  EXPECT_FALSE(ToRouteParams({.algorithm = RoutingAlgorithm::kRankTopK, .k = 2}, 8).ok());
  EXPECT_FALSE(ToRankRouteParams({.algorithm = RoutingAlgorithm::kTopK, .k = 2}, 8, false).ok());
  EXPECT_FALSE(
      ToRankRouteParams({.algorithm = RoutingAlgorithm::kRankTopK, .k = 9}, 8, false).ok());
  kernels::RouteParams p{.num_tokens = 1, .num_experts = 129};
  EXPECT_EQ(kernels::cpu::Route(p, nullptr), kernels::KernelStatus::kInvalidShape);
  kernels::RankRouteParams rp{.num_tokens = 1, .rank = 8, .z_stride = 4, .k = 2};
  EXPECT_EQ(kernels::cpu::RankRoute(rp, nullptr), kernels::KernelStatus::kInvalidShape);
}

}  // namespace
}  // namespace moleserve::engine
