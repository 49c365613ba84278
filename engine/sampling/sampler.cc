#include "engine/sampling/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace moleserve::engine {
namespace {

// log(sum(exp(logits))) computed stably.
double LogSumExp(absl::Span<const float> logits) {
  const float m = *std::max_element(logits.begin(), logits.end());
  double s = 0.0;
  for (float v : logits) s += std::exp(static_cast<double>(v) - m);
  return m + std::log(s);
}

// Strict weak order: higher value first, then lower id.
struct ByValueDesc {
  const float* v;
  bool operator()(int32_t a, int32_t b) const { return v[a] > v[b] || (v[a] == v[b] && a < b); }
};

}  // namespace

float LogSoftmaxAt(absl::Span<const float> logits, int32_t id) {
  return static_cast<float>(logits[id] - LogSumExp(logits));
}

std::vector<std::pair<int32_t, float>> TopLogprobs(absl::Span<const float> logits, int32_t n) {
  n = std::min<int32_t>(n, static_cast<int32_t>(logits.size()));
  std::vector<std::pair<int32_t, float>> out;
  if (n <= 0) return out;
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), ByValueDesc{logits.data()});
  const double lse = LogSumExp(logits);
  for (int32_t i = 0; i < n; ++i)
    out.emplace_back(ids[i], static_cast<float>(logits[ids[i]] - lse));
  return out;
}

TokenSampler::TokenSampler(const SamplingParams& params, uint64_t seed,
                           absl::Span<const int32_t> prompt, int32_t top_logprobs)
    : params_(params), rng_state_(seed), top_logprobs_(top_logprobs) {
  if (params_.repetition_penalty != 1.0f) {
    for (int32_t id : prompt) seen_[id] = true;
  }
}

double TokenSampler::NextUniform() {
  // SplitMix64: specified here, so seeded results do not depend on the standard library.
  uint64_t z = (rng_state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

static_assert(kGreedyTemperature == kernels::kSampleGreedyTemperature);

kernels::SampleRowParams TokenSampler::NextRow(std::vector<int32_t>* penalty_ids,
                                               std::vector<int32_t>* penalty_counts,
                                               std::vector<int32_t>* bias_ids,
                                               std::vector<float>* bias_values) {
  kernels::SampleRowParams row{.temperature = params_.temperature,
                               .top_k = params_.top_k,
                               .top_p = params_.top_p,
                               .min_p = params_.min_p,
                               .repetition_penalty = params_.repetition_penalty,
                               .frequency_penalty = params_.frequency_penalty,
                               .presence_penalty = params_.presence_penalty,
                               .num_top_logprobs = top_logprobs_};
  if (params_.temperature >= kGreedyTemperature) row.uniform = NextUniform();
  row.penalty_begin = static_cast<int32_t>(penalty_ids->size());
  auto count_of = [&](int32_t id) {
    auto it = output_counts_.find(id);
    return it == output_counts_.end() ? 0 : it->second;
  };
  if (params_.repetition_penalty != 1.0f) {
    for (const auto& [id, unused] : seen_) {  // holds every output id too
      penalty_ids->push_back(id);
      penalty_counts->push_back(count_of(id));
    }
  } else if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) {
    for (const auto& [id, count] : output_counts_) {
      penalty_ids->push_back(id);
      penalty_counts->push_back(count);
    }
  }
  row.penalty_end = static_cast<int32_t>(penalty_ids->size());
  row.bias_begin = static_cast<int32_t>(bias_ids->size());
  for (const auto& [id, value] : params_.logit_bias) {
    bias_ids->push_back(id);
    bias_values->push_back(value);
  }
  row.bias_end = static_cast<int32_t>(bias_ids->size());
  return row;
}

void TokenSampler::Observe(int32_t id) {
  ++output_counts_[id];
  if (params_.repetition_penalty != 1.0f) seen_[id] = true;
}

SampledToken TokenSampler::Sample(absl::Span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  work_.assign(logits.begin(), logits.end());
  float* w = work_.data();
  if (params_.repetition_penalty != 1.0f) {
    for (const auto& [id, unused] : seen_) {
      w[id] = w[id] > 0 ? w[id] / params_.repetition_penalty : w[id] * params_.repetition_penalty;
    }
  }
  if (params_.frequency_penalty != 0.0f || params_.presence_penalty != 0.0f) {
    for (const auto& [id, count] : output_counts_) {
      w[id] -= params_.frequency_penalty * count + params_.presence_penalty;
    }
  }
  for (const auto& [id, value] : params_.logit_bias) w[id] += value;

  int32_t chosen = 0;
  if (params_.temperature < kGreedyTemperature) {
    for (int32_t i = 1; i < vocab; ++i) {
      if (w[i] > w[chosen]) chosen = i;
    }
  } else {
    // Scale relative to the maximum, in double: with temperature >= kGreedyTemperature and
    // finite logits nothing overflows, and the ordering (hence top-k/top-p) is unchanged.
    const float max_raw = *std::max_element(work_.begin(), work_.end());
    const double inv_t = 1.0 / params_.temperature;
    for (int32_t i = 0; i < vocab; ++i) {
      w[i] = static_cast<float>((static_cast<double>(w[i]) - max_raw) * inv_t);
    }
    order_.resize(vocab);
    std::iota(order_.begin(), order_.end(), 0);
    int32_t keep = vocab;
    if (params_.top_k > 0 && params_.top_k < vocab) {
      keep = params_.top_k;
      std::partial_sort(order_.begin(), order_.begin() + keep, order_.end(), ByValueDesc{w});
    } else {
      // Every candidate in order, so that a given uniform picks the same token as the device
      // sampler (kernels/common/sampling_math.h), which walks candidates in this order.
      std::sort(order_.begin(), order_.end(), ByValueDesc{w});
    }
    // Probabilities over the kept candidates; order_[0] holds the maximum.
    const float max_logit = w[order_[0]];
    std::vector<double> probs(keep);
    double total = 0.0;
    for (int32_t i = 0; i < keep; ++i) {
      probs[i] = std::exp(static_cast<double>(w[order_[i]]) - max_logit);
      total += probs[i];
    }
    if (params_.top_p < 1.0f) {
      double cum = 0.0;
      int32_t cut = keep;
      for (int32_t i = 0; i < keep; ++i) {
        cum += probs[i] / total;
        if (cum >= params_.top_p) {
          cut = i + 1;
          break;
        }
      }
      keep = cut;
      total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
    }
    if (params_.min_p > 0.0f) {
      // probs[0] is the largest; drop those below min_p * p_max.
      const double threshold = params_.min_p * probs[0];
      int32_t cut = 1;
      while (cut < keep && probs[cut] >= threshold) ++cut;
      keep = cut;
      total = std::accumulate(probs.begin(), probs.begin() + keep, 0.0);
    }
    const double r = NextUniform() * total;
    double cum = 0.0;
    chosen = order_[keep - 1];
    for (int32_t i = 0; i < keep; ++i) {
      cum += probs[i];
      if (r < cum) {
        chosen = order_[i];
        break;
      }
    }
  }

  SampledToken out;
  out.id = chosen;
  out.logprob = LogSoftmaxAt(logits, chosen);
  if (top_logprobs_ > 0) out.top = TopLogprobs(logits, top_logprobs_);
  Observe(chosen);
  return out;
}

}  // namespace moleserve::engine
