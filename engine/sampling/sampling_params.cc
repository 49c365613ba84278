#include "engine/sampling/sampling_params.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moleserve::engine {
namespace {

absl::Status Bad(const char* field, float value, const char* range) {
  return absl::InvalidArgumentError(
      absl::StrCat("sampling.", field, " = ", value, " is outside ", range));
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size) {
  if (!std::isfinite(p.temperature) || p.temperature < 0.0f) {
    return Bad("temperature", p.temperature, "[0, inf) (0 means greedy)");
  }
  if (!std::isfinite(p.top_p) || p.top_p <= 0.0f || p.top_p > 1.0f) {
    return Bad("top_p", p.top_p, "(0, 1]");
  }
  if (p.top_k < 0) return Bad("top_k", static_cast<float>(p.top_k), "[0, vocab] (0 means off)");
  if (!std::isfinite(p.min_p) || p.min_p < 0.0f || p.min_p > 1.0f) {
    return Bad("min_p", p.min_p, "[0, 1]");
  }
  if (!std::isfinite(p.repetition_penalty) || p.repetition_penalty < 0.01f ||
      p.repetition_penalty > 100.0f) {
    return Bad("repetition_penalty", p.repetition_penalty, "[0.01, 100] (1 means off)");
  }
  if (!std::isfinite(p.frequency_penalty) || std::fabs(p.frequency_penalty) > 2.0f) {
    return Bad("frequency_penalty", p.frequency_penalty, "[-2, 2]");
  }
  if (!std::isfinite(p.presence_penalty) || std::fabs(p.presence_penalty) > 2.0f) {
    return Bad("presence_penalty", p.presence_penalty, "[-2, 2]");
  }
  if (p.logit_bias.size() > kMaxLogitBiasEntries) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.logit_bias has ", p.logit_bias.size(),
                                                   " entries; at most ", kMaxLogitBiasEntries));
  }
  std::vector<int32_t> ids;
  for (const auto& [id, value] : p.logit_bias) {
    if (id < 0 || (vocab_size > 0 && id >= vocab_size)) {
      return absl::InvalidArgumentError(absl::StrCat("sampling.logit_bias: token id ", id,
                                                     " is outside the vocabulary [0, ", vocab_size,
                                                     ")"));
    }
    if (!std::isfinite(value) || std::fabs(value) > kMaxLogitBias) {
      return Bad("logit_bias", value, "[-100, 100]");
    }
    ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  if (std::adjacent_find(ids.begin(), ids.end()) != ids.end()) {
    return absl::InvalidArgumentError("sampling.logit_bias names a token id twice");
  }
  return absl::OkStatus();
}

absl::Status ValidateStoppingParams(const StoppingParams& p, int32_t vocab_size) {
  if (p.max_new_tokens < 0) {
    return absl::InvalidArgumentError("stopping.max_new_tokens must be >= 0");
  }
  if (p.stop.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.stop has ", p.stop.size(), " strings; at most ", kMaxStopStrings));
  }
  for (const std::string& s : p.stop) {
    if (s.empty() || s.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stopping.stop strings must be 1..", kMaxStopStringBytes, " bytes, got ", s.size()));
    }
  }
  for (int32_t id : p.stop_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stopping.stop_token_ids: ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace moleserve::engine
