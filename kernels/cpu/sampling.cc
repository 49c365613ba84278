// CPU twin of the device sampler (params.h SampleParams): per row, the sequential algorithm of
// engine/sampling's TokenSampler (sorted candidates, probabilities and sums in double) over the
// shared per-element math of sampling_math.h. Rows run in parallel on the pool; each row uses its
// slice of `work` and a thread-local candidate list.

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/common/sampling_math.h"
#include "kernels/cpu/ops.h"

namespace moleserve::kernels::cpu {
namespace {

namespace sm = sampling_math;

struct ByValueDesc {
  const float* v;
  bool operator()(int32_t a, int32_t b) const { return sm::Before(v[a], a, v[b], b); }
};

double LogSumExp(const float* x, int32_t n) {
  const float m = *std::max_element(x, x + n);
  double s = 0.0;
  for (int32_t i = 0; i < n; ++i) s += std::exp(static_cast<double>(x[i]) - m);
  return m + std::log(s);
}

// Index of the chosen token among w[0..vocab) (already penalised) under rp.
int32_t Choose(const SampleRowParams& rp, float* w, int32_t vocab, std::vector<int32_t>& order,
               std::vector<double>& probs) {
  if (rp.temperature < kSampleGreedyTemperature) {
    int32_t chosen = 0;
    for (int32_t i = 1; i < vocab; ++i) {
      if (w[i] > w[chosen]) chosen = i;
    }
    return chosen;
  }
  const float max_w = *std::max_element(w, w + vocab);
  const double inv_t = 1.0 / rp.temperature;
  for (int32_t i = 0; i < vocab; ++i) w[i] = sm::ScaledLogit(w[i], max_w, inv_t);
  order.resize(vocab);
  std::iota(order.begin(), order.end(), 0);
  int32_t keep = vocab;
  if (rp.top_k > 0 && rp.top_k < vocab) {
    keep = rp.top_k;
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), ByValueDesc{w});
  } else {
    std::sort(order.begin(), order.end(), ByValueDesc{w});
  }
  probs.resize(keep);
  double total = 0.0;
  for (int32_t i = 0; i < keep; ++i) {
    probs[i] = std::exp(static_cast<double>(w[order[i]]) - w[order[0]]);
    total += probs[i];
  }
  if (rp.top_p < 1.0f) {
    double cum = 0.0;
    int32_t cut = keep;
    for (int32_t i = 0; i < keep; ++i) {
      cum += probs[i] / total;
      if (cum >= rp.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  }
  if (rp.min_p > 0.0f) {
    const double threshold = rp.min_p * probs[0];
    int32_t cut = 1;
    while (cut < keep && probs[cut] >= threshold) ++cut;
    keep = cut;
    total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
  }
  const double target = rp.uniform * total;
  double cum = 0.0;
  for (int32_t i = 0; i < keep; ++i) {
    cum += probs[i];
    if (target < cum) return order[i];
  }
  return order[keep - 1];
}

}  // namespace

KernelStatus Sample(const SampleParams& p, ThreadPool* pool) {
  if (p.rows < 0 || p.vocab < 1) return KernelStatus::kInvalidShape;
  if (p.rows == 0) return KernelStatus::kOk;
  if (p.logits == nullptr || p.work == nullptr || p.row_params == nullptr || p.out == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    const SampleRowParams& rp = p.row_params[r];
    if (rp.num_top_logprobs < 0 || rp.num_top_logprobs > kMaxSampleTopLogprobs ||
        (rp.num_top_logprobs > 0 && (p.top_ids == nullptr || p.top_logprobs == nullptr)) ||
        rp.penalty_begin < 0 || rp.penalty_end < rp.penalty_begin ||
        (rp.penalty_end > rp.penalty_begin &&
         (p.penalty_ids == nullptr || p.penalty_counts == nullptr)) ||
        rp.bias_begin < 0 || rp.bias_end < rp.bias_begin ||
        (rp.bias_end > rp.bias_begin && (p.bias_ids == nullptr || p.bias_values == nullptr)) ||
        rp.forced_id >= p.vocab) {
      return KernelStatus::kInvalidArgument;
    }
  }
  const int32_t vocab = p.vocab;
  ParallelFor(pool, p.rows, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> order;
    std::vector<double> probs;
    for (int64_t r = begin; r < end; ++r) {
      const SampleRowParams& rp = p.row_params[r];
      const float* x = p.logits + r * vocab;
      SampledRow& out = p.out[r];
      out = SampledRow();
      if (!std::all_of(x, x + vocab, [](float v) { return sm::IsFinite(v); })) continue;
      out.finite = 1;
      const double lse = LogSumExp(x, vocab);
      const int32_t n = std::min(rp.num_top_logprobs, vocab);
      if (n > 0) {
        order.resize(vocab);
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + n, order.end(), ByValueDesc{x});
        for (int32_t j = 0; j < n; ++j) {
          p.top_ids[r * kMaxSampleTopLogprobs + j] = order[j];
          p.top_logprobs[r * kMaxSampleTopLogprobs + j] = static_cast<float>(x[order[j]] - lse);
        }
      }
      out.num_top = n;
      if (rp.forced_id >= 0) {  // scored, not sampled
        out.id = rp.forced_id;
        out.logprob = static_cast<float>(x[out.id] - lse);
        continue;
      }
      float* w = p.work + r * vocab;
      std::copy(x, x + vocab, w);
      for (int32_t e = rp.penalty_begin; e < rp.penalty_end; ++e) {
        const int32_t id = p.penalty_ids[e];
        if (id >= 0 && id < vocab) w[id] = sm::PenalizedLogit(x[id], p.penalty_counts[e], rp);
      }
      for (int32_t e = rp.bias_begin; e < rp.bias_end; ++e) {
        const int32_t id = p.bias_ids[e];
        if (id >= 0 && id < vocab) w[id] += p.bias_values[e];
      }
      out.id = Choose(rp, w, vocab, order, probs);
      out.logprob = static_cast<float>(x[out.id] - lse);
    }
  });
  return KernelStatus::kOk;
}

}  // namespace moleserve::kernels::cpu
