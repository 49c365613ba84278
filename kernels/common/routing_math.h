#pragma once

// Per-token router math of every MoLE family (MOLE_FORMAT.md section (c)), written once for the
// host and the device: the CUDA routing kernel (kernels/cuda/routing) runs these functions one
// thread per token, and the CPU twin (kernels/cpu/routing.cc) runs the same functions in a loop.
// tests/kernels/routing_twin_test.cc checks them against engine/routing (itself checked against
// torch), so the device's selection rules are verified without a GPU.
//
// Semantics are those of engine/routing: fp32 softmax of logits / temperature (max-subtracted),
// descending order with ties to the lower index, top-p "exceed" / "within" prefixes with min_k,
// DynMoLE's normalised Tsallis-entropy gate (in double), renormalisation for top-k. Widths up to
// kMaxRouteWidth (local arrays); wider routers are refused by the launchers.
//
// No CUDA headers: MOLESERVE_HD expands to __host__ __device__ only under nvcc.

#include <math.h>

#include <cstdint>

#include "kernels/common/params.h"

#if defined(__CUDACC__)
#define MOLESERVE_HD __host__ __device__
#else
#define MOLESERVE_HD
#endif

namespace moleserve::kernels::routing_math {

MOLESERVE_HD inline bool IsNan(float x) { return x != x; }

// "a before b": larger value first, ties to the lower index (NaN never reaches here).
MOLESERVE_HD inline bool Before(const float* v, int32_t a, int32_t b) {
  return v[a] > v[b] || (v[a] == v[b] && a < b);
}

// order[0..n) = indices of values sorted by Before (insertion sort: n <= kMaxRouteWidth).
MOLESERVE_HD inline void OrderDesc(const float* values, int32_t n, int32_t* order) {
  for (int32_t i = 0; i < n; ++i) {
    int32_t j = i;
    while (j > 0 && Before(values, i, order[j - 1])) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = i;
  }
}

// out = softmax(in / temperature); false when undefined (NaN or +inf scaled input, all -inf).
MOLESERVE_HD inline bool Softmax(const float* in, int32_t n, float temperature, float* out) {
  float m = -INFINITY;
  for (int32_t i = 0; i < n; ++i) {
    const float x = in[i] / temperature;
    if (IsNan(x) || x == INFINITY) return false;
    out[i] = x;
    m = fmaxf(m, x);
  }
  if (m == -INFINITY) return false;
  float sum = 0.0f;
  for (int32_t i = 0; i < n; ++i) {
    out[i] = expf(out[i] - m);
    sum += out[i];
  }
  for (int32_t i = 0; i < n; ++i) out[i] /= sum;
  return true;
}

// Kept prefix length under top-p (fp32 cumulative mass in sorted order), min_k forced, >= 1.
MOLESERVE_HD inline int32_t TopPPrefix(const float* p, const int32_t* order, int32_t n, float top_p,
                                       bool within, int32_t min_k) {
  int32_t keep = 0;
  float c = 0.0f;
  for (int32_t j = 0; j < n; ++j) {
    const float c_prev = c;
    c += p[order[j]];
    const bool kept = within ? c <= top_p : c_prev <= top_p;
    if (!kept) break;
    keep = j + 1;
  }
  if (keep < min_k) keep = min_k;
  return keep < 1 ? 1 : keep;
}

// H(p + eps) / H_max, Tsallis (Shannon when q == 1), in double.
MOLESERVE_HD inline double NormalizedTsallisEntropy(const float* p, int32_t n, double q,
                                                    double eps) {
  if (n <= 1) return 0.0;
  double h = 0.0, h_max = 0.0;
  if (q == 1.0) {
    for (int32_t i = 0; i < n; ++i) {
      const double pe = static_cast<double>(p[i]) + eps;
      h -= pe * log(pe);
    }
    h_max = log(static_cast<double>(n));
  } else {
    double s = 0.0;
    for (int32_t i = 0; i < n; ++i) s += pow(static_cast<double>(p[i]) + eps, q);
    h = (1.0 - s) / (q - 1.0);
    h_max = (1.0 - pow(static_cast<double>(n), 1.0 - q)) / (q - 1.0);
  }
  return h / h_max;
}

// X-LoRA's weights of one module (RouteRule::kXlora) from the token's scalings: the top k (k < 1:
// all) in descending order (ties: lower index), softmaxed over the kept ones when rp.renormalize.
// Returns the count, or 0 when a scaling is NaN or infinite (the classifier's output is
// undefined). `p` and `order` are scratch of n entries.
MOLESERVE_HD inline int32_t XloraOne(const RouteParams& rp, const float* scalings, int32_t* experts,
                                     float* weights, float* p, int32_t* order) {
  const int32_t n = rp.num_experts;
  for (int32_t i = 0; i < n; ++i) {
    if (IsNan(scalings[i]) || scalings[i] == INFINITY || scalings[i] == -INFINITY) return 0;
  }
  const int32_t count = rp.k < 1 || rp.k > n ? n : rp.k;
  OrderDesc(scalings, n, order);
  for (int32_t j = 0; j < count; ++j) {
    experts[j] = order[j];
    p[j] = scalings[order[j]];
  }
  if (rp.renormalize) {
    Softmax(p, count, 1.0f, weights);  // finite inputs: always defined
  } else {
    for (int32_t j = 0; j < count; ++j) weights[j] = p[j];
  }
  return count;
}

// One row's groups (SoftmaxGroupsParams): softmax or copy, NaN over an undefined group.
MOLESERVE_HD inline void SoftmaxGroupsRow(const SoftmaxGroupsParams& p, const float* x, float* y) {
  for (int64_t g = 0; g < p.cols; g += p.group) {
    if (!p.softmax) {
      for (int32_t i = 0; i < p.group; ++i) y[g + i] = x[g + i];
    } else if (!Softmax(x + g, p.group, p.temperature, y + g)) {
      for (int32_t i = 0; i < p.group; ++i) y[g + i] = NAN;
    }
  }
}

// One row of a Mixture of Routers (MixRouterParams): y[e] = log(sum_j g_j s_je), g = softmax of
// the main router's logits, s_j = softmax of sub-router j's; all NaN when a softmax is undefined.
// `s` is scratch of E entries.
MOLESERVE_HD inline void MixRouterRow(const MixRouterParams& p, const float* x, float* y,
                                      float* s) {
  const int32_t e = p.experts, m = p.routers;
  float g[kMaxMixRouters];
  bool ok = Softmax(x + int64_t{m} * e, m, 1.0f, g);
  for (int32_t i = 0; i < e; ++i) y[i] = 0.0f;
  for (int32_t j = 0; ok && j < m; ++j) {
    ok = Softmax(x + int64_t{j} * e, e, 1.0f, s);
    for (int32_t i = 0; ok && i < e; ++i) y[i] += g[j] * s[i];
  }
  for (int32_t i = 0; i < e; ++i) y[i] = ok ? logf(y[i]) : NAN;
}

// Routes one token (RouteParams). Writes experts / weights [0..count) and returns count, or 0
// when the logits are undefined (NaN, +inf, all -inf). `p` and `order` are scratch of n entries.
MOLESERVE_HD inline int32_t RouteOne(const RouteParams& rp, const float* logits, int32_t* experts,
                                     float* weights, float* p, int32_t* order) {
  const int32_t n = rp.num_experts;
  if (rp.rule == RouteRule::kXlora) return XloraOne(rp, logits, experts, weights, p, order);
  if (!Softmax(logits, n, rp.temperature, p)) return 0;
  int32_t count = 0;
  switch (rp.rule) {
    case RouteRule::kTopK:
      count = rp.k < 1 ? 1 : (rp.k > n ? n : rp.k);
      OrderDesc(p, n, order);
      break;
    case RouteRule::kSwitch:
      count = 1;
      OrderDesc(p, n, order);
      break;
    case RouteRule::kSoft:
      count = n;
      OrderDesc(p, n, order);
      break;
    case RouteRule::kTopP:
      if (rp.prob_temperature > 0.0f) {
        for (int32_t i = 0; i < n; ++i) p[i] /= rp.prob_temperature;
      }
      OrderDesc(p, n, order);
      count = TopPPrefix(p, order, n, rp.p, rp.p_within, rp.min_k);
      break;
    case RouteRule::kDynMole:
      OrderDesc(p, n, order);
      if (rp.entropy_gate && rp.entropy_q > 0.0 && rp.entropy_threshold < 1.0 &&
          NormalizedTsallisEntropy(p, n, rp.entropy_q, rp.entropy_eps) > rp.entropy_threshold) {
        count = n;
      } else {
        count = TopPPrefix(p, order, n, rp.p, /*within=*/true, rp.min_k);
      }
      break;
    case RouteRule::kXlora:  // handled above
      break;
  }
  if (count > n) count = n;
  while (rp.drop_zero && count > 1 && p[order[count - 1]] == 0.0f) --count;
  float sum = 0.0f;
  for (int32_t j = 0; j < count; ++j) {
    experts[j] = order[j];
    weights[j] = p[order[j]];
    sum += weights[j];
  }
  if (rp.rule == RouteRule::kTopK && rp.renormalize) {
    for (int32_t j = 0; j < count; ++j) weights[j] /= sum;
  }
  return count;
}

// Rank routing of one token (RankRouteParams): z [r] shrink output, router_logits [r] or null
// (FlyLoRA when null, SMoRA otherwise). Writes kept[0..k) and u[0..r); false on NaN or undefined
// softmax. `key`, `g` and `order` are scratch of r entries.
MOLESERVE_HD inline bool RouteRanksOne(const RankRouteParams& rp, const float* z,
                                       const float* router_logits, int32_t* kept, float* u,
                                       float* key, float* g, int32_t* order) {
  const int32_t r = rp.rank;
  const bool smora = router_logits != nullptr;
  for (int32_t i = 0; i < r; ++i) {
    if (IsNan(z[i]) || (smora && IsNan(router_logits[i])) ||
        (rp.select_bias != nullptr && IsNan(rp.select_bias[i]))) {
      return false;
    }
  }
  const float* base = smora ? router_logits : z;
  for (int32_t i = 0; i < r; ++i) {
    const float k = base[i] + (rp.select_bias == nullptr ? 0.0f : rp.select_bias[i]);
    key[i] = (rp.select_on_abs && !smora) ? fabsf(k) : k;
  }
  OrderDesc(key, r, order);
  const int32_t k = rp.k;
  for (int32_t j = 0; j < k; ++j) kept[j] = order[j];
  for (int32_t i = 0; i < r; ++i) u[i] = 0.0f;
  if (!smora) {
    for (int32_t j = 0; j < k; ++j) u[order[j]] = z[order[j]];
    return true;
  }
  if (!Softmax(router_logits, r, rp.temperature, g)) return false;
  float sum = 0.0f;
  for (int32_t j = 0; j < k; ++j) sum += g[order[j]];
  const float norm = rp.renormalize && sum > 0.0f ? sum : 1.0f;
  for (int32_t j = 0; j < k; ++j) u[order[j]] = g[order[j]] / norm * z[order[j]];
  return true;
}

// SegmentBuildParams, split so that each expert's part can run on its own thread:
// the number of tokens that chose expert e,
MOLESERVE_HD inline int32_t ExpertPairCount(const SegmentBuildParams& p, int32_t e) {
  int32_t n = 0;
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const int32_t c = p.count[t];
    for (int32_t j = 0; j < c; ++j) n += p.experts[int64_t{t} * p.num_experts + j] == e ? 1 : 0;
  }
  return n;
}

// and, once seg_start is known, expert e's segment: its pairs in token order, rank and offset.
MOLESERVE_HD inline void WriteExpertSegment(const SegmentBuildParams& p, int32_t e) {
  int32_t at = p.seg_start[e];
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    const int32_t c = p.count[t];
    for (int32_t j = 0; j < c; ++j) {
      const int64_t k = int64_t{t} * p.num_experts + j;
      if (p.experts[k] != e) continue;
      p.pair_row[at] = p.slot_rows ? static_cast<int32_t>(k) : p.rows[t];
      p.pair_weight[at] = p.weights[k] * p.scale[e];
      if (p.token_pair != nullptr) p.token_pair[k] = at;
      ++at;
    }
  }
  p.seg_rank[e] = p.rank;
  p.seg_row_offset[e] = int64_t{e} * p.rank;
  if (p.slot_count != nullptr) {  // column e of the slots
    for (int32_t t = 0; t < p.num_tokens; ++t) {
      p.slot_count[int64_t{t} * p.num_experts + e] = e < p.count[t] ? 1 : 0;
    }
  }
}

}  // namespace moleserve::kernels::routing_math
