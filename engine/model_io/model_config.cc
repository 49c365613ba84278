#include "engine/model_io/model_config.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <tuple>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/json_depth.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

using nlohmann::json;

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", what));
}

template <typename T>
absl::Status ReadNumber(const json& j, const char* key, T* out, bool required) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? Bad(absl::StrCat("missing required field '", key, "'")) : absl::OkStatus();
  }
  if constexpr (std::is_integral_v<T>) {
    if (!it->is_number_integer()) return Bad(absl::StrCat("field '", key, "' must be an integer"));
    const int64_t v = it->is_number_unsigned() && it->get<uint64_t>() > INT64_MAX
                          ? INT64_MAX
                          : it->get<int64_t>();
    if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max()) {
      return Bad(absl::StrCat("field '", key, "' = ", it->dump(), " is out of range"));
    }
    *out = static_cast<T>(v);
  } else {
    if (!it->is_number()) return Bad(absl::StrCat("field '", key, "' must be a number"));
    *out = it->get<T>();
  }
  return absl::OkStatus();
}

}  // namespace

int64_t ModelConfig::ParameterCount() const {
  const int64_t h = hidden_size;
  const int64_t q = static_cast<int64_t>(num_heads) * head_dim;
  const int64_t kv = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int64_t per_layer = h * q + 2 * h * kv + q * h + 3 * h * intermediate_size + 2 * h +
                            (qkv_bias ? q + 2 * kv : 0) + (o_bias ? h : 0);
  return vocab_size * h * (tie_word_embeddings ? 1 : 2) + num_layers * per_layer + h;
}

absl::Status ModelConfig::Validate() const {
  auto positive = [](const char* name, int64_t v) -> absl::Status {
    if (v <= 0) return Bad(absl::StrCat(name, " must be > 0, got ", v));
    return absl::OkStatus();
  };
  for (auto [n, v] : {std::pair<const char*, int64_t>{"vocab_size", vocab_size},
                      {"hidden_size", hidden_size},
                      {"intermediate_size", intermediate_size},
                      {"num_hidden_layers", num_layers},
                      {"num_attention_heads", num_heads},
                      {"num_key_value_heads", num_kv_heads},
                      {"head_dim", head_dim},
                      {"max_position_embeddings", max_position_embeddings}}) {
    if (auto s = positive(n, v); !s.ok()) return s;
  }
  // Sanity bounds far above any supported model: a typo must not become a terabyte allocation.
  for (auto [n, v, cap] :
       {std::tuple<const char*, int64_t, int64_t>{"vocab_size", vocab_size, 1 << 22},
        {"hidden_size", hidden_size, 1 << 16},
        {"intermediate_size", intermediate_size, 1 << 18},
        {"num_hidden_layers", num_layers, 1024},
        {"num_attention_heads", num_heads, 1024},
        {"head_dim", head_dim, 1024},
        {"max_position_embeddings", max_position_embeddings, 1 << 24}}) {
    if (v > cap) return Bad(absl::StrCat(n, " = ", v, " exceeds the supported maximum ", cap));
  }
  if (num_heads % num_kv_heads != 0) {
    return Bad(absl::StrCat("num_attention_heads (", num_heads,
                            ") must be a multiple of num_key_value_heads (", num_kv_heads, ")"));
  }
  if (head_dim % 2 != 0) return Bad(absl::StrCat("head_dim must be even, got ", head_dim));
  if (sliding_window < 0) return Bad("sliding_window must be >= 0");
  if (!(rms_norm_eps > 0.0f)) return Bad("rms_norm_eps must be > 0");
  if (!(rope_theta > 0.0f)) return Bad("rope_theta must be > 0");
  if (bos_token_id && (*bos_token_id < 0 || *bos_token_id >= vocab_size)) {
    return Bad(absl::StrCat("bos_token_id ", *bos_token_id, " outside the vocabulary"));
  }
  for (int32_t e : eos_token_ids) {
    if (e < 0 || e >= vocab_size)
      return Bad(absl::StrCat("eos_token_id ", e, " outside the vocabulary"));
  }
  return absl::OkStatus();
}

namespace {

// Reads rope_theta and the scaling from `rope` (an object: rope_scaling or rope_parameters).
absl::Status ParseRope(const json& rope, ModelConfig* c) {
  if (!rope.is_object())
    return Bad(absl::StrCat("rope scaling must be an object, got ", rope.dump()));
  // transformers >= 4.45 reads "type" over "rope_type" when both are present.
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    if (auto it = rope.find(key); it != rope.end() && it->is_string())
      type = it->get<std::string>();
  }
  if (type.empty()) {
    // E.g. {"factor": 8} or transformers-5 per-layer-type parameters: never guess "no scaling".
    return Bad(absl::StrCat("rope scaling ", rope.dump(), " has no string 'rope_type'"));
  }
  if (auto s = ReadNumber(rope, "rope_theta", &c->rope_theta, false); !s.ok()) return s;
  RopeScaling& r = c->rope_scaling;
  if (type == "default") {
    r.type = RopeScalingType::kNone;
    return absl::OkStatus();
  }
  if (type != "linear" && type != "llama3") {
    return Bad(absl::StrCat("unsupported rope scaling type '", type, "' in ", rope.dump(),
                            " (supported: default, linear, llama3)"));
  }
  r.type = type == "linear" ? RopeScalingType::kLinear : RopeScalingType::kLlama3;
  if (auto s = ReadNumber(rope, "factor", &r.factor, true); !s.ok()) return s;
  if (!(r.factor >= 1.0))
    return Bad(absl::StrCat("rope scaling factor must be >= 1, got ", r.factor));
  if (r.type == RopeScalingType::kLlama3) {
    absl::Status s;
    if (!(s = ReadNumber(rope, "low_freq_factor", &r.low_freq_factor, true)).ok()) return s;
    if (!(s = ReadNumber(rope, "high_freq_factor", &r.high_freq_factor, true)).ok()) return s;
    if (!(s = ReadNumber(rope, "original_max_position_embeddings",
                         &r.original_max_position_embeddings, true))
             .ok()) {
      return s;
    }
    if (!(r.high_freq_factor > r.low_freq_factor) || !(r.low_freq_factor > 0) ||
        r.original_max_position_embeddings <= 0) {
      return Bad(absl::StrCat("inconsistent llama3 rope scaling ", rope.dump()));
    }
  }
  return absl::OkStatus();
}

bool TrueFlag(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

}  // namespace

absl::StatusOr<std::vector<int32_t>> ReadTokenIds(const nlohmann::json& value,
                                                  absl::string_view what) {
  std::vector<int32_t> ids;
  auto one = [&](const json& v) -> absl::Status {
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > INT32_MAX) ||
        (!v.is_number_unsigned() && (v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX))) {
      return Bad(absl::StrCat(what, ": ", v.dump(), " is not a token id"));
    }
    ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    return absl::OkStatus();
  };
  if (value.is_array()) {
    for (const auto& v : value) RETURN_IF_ERROR(one(v));
  } else {
    RETURN_IF_ERROR(one(value));
  }
  return ids;
}

absl::StatusOr<ModelConfig> ParseHfConfig(absl::string_view json_text) {
  if (JsonNestingDepth(std::string_view(json_text.data(), json_text.size())) > kMaxJsonDepth) {
    return Bad(absl::StrCat("nested deeper than ", kMaxJsonDepth, " levels"));
  }
  json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not a JSON object");
  ModelConfig c;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->size() != 1 || !(*arch)[0].is_string()) {
    return Bad("'architectures' must be a list with one architecture name");
  }
  c.architecture = (*arch)[0].get<std::string>();
  const bool llama = c.architecture == "LlamaForCausalLM";
  const bool mistral = c.architecture == "MistralForCausalLM";
  const bool qwen2 = c.architecture == "Qwen2ForCausalLM";
  if (!llama && !mistral && !qwen2) {
    return Bad(absl::StrCat("unsupported architecture '", c.architecture,
                            "' (supported: LlamaForCausalLM, MistralForCausalLM, "
                            "Qwen2ForCausalLM)"));
  }
  if (auto it = j.find("hidden_act"); it != j.end() && *it != "silu") {
    return Bad(absl::StrCat("unsupported hidden_act ", it->dump(), " (supported: \"silu\")"));
  }
  if (TrueFlag(j, "mlp_bias")) return Bad("unsupported option mlp_bias=true");
  if (llama && TrueFlag(j, "attention_bias")) c.qkv_bias = c.o_bias = true;
  if (qwen2) {
    c.qkv_bias = true;  // Qwen2 always has q/k/v biases
    if (TrueFlag(j, "use_sliding_window")) {
      return Bad("unsupported option use_sliding_window=true (Qwen2 sliding-window layers)");
    }
  }
  // transformers' per-architecture defaults for keys a config.json may leave out.
  if (mistral) c.max_position_embeddings = 4096 * 32;
  if (qwen2) c.max_position_embeddings = 32768;
  if (mistral) {
    c.sliding_window = 4096;  // MistralConfig's default; an explicit null turns it off
    if (auto it = j.find("sliding_window"); it != j.end() && it->is_null()) c.sliding_window = 0;
    if (auto it = j.find("sliding_window"); it != j.end() && !it->is_null()) {
      if (auto s = ReadNumber(j, "sliding_window", &c.sliding_window, true); !s.ok()) return s;
      if (c.sliding_window <= 0) return Bad("sliding_window must be > 0 or null");
    }
  }
  absl::Status s;
  if (!(s = ReadNumber(j, "rope_theta", &c.rope_theta, false)).ok()) return s;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (auto it = j.find(key); it != j.end() && !it->is_null()) {
      if (!(s = ParseRope(*it, &c)).ok()) return s;
    }
  }
  if (!(s = ReadNumber(j, "vocab_size", &c.vocab_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "hidden_size", &c.hidden_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "intermediate_size", &c.intermediate_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "num_hidden_layers", &c.num_layers, true)).ok()) return s;
  if (!(s = ReadNumber(j, "num_attention_heads", &c.num_heads, true)).ok()) return s;
  c.num_kv_heads = c.num_heads;
  if (!(s = ReadNumber(j, "num_key_value_heads", &c.num_kv_heads, false)).ok()) return s;
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  if (auto it = j.find("head_dim"); it != j.end() && !it->is_null()) {
    if (!(s = ReadNumber(j, "head_dim", &c.head_dim, true)).ok()) return s;
  }
  if (!(s = ReadNumber(j, "rms_norm_eps", &c.rms_norm_eps, false)).ok()) return s;
  if (!(s = ReadNumber(j, "max_position_embeddings", &c.max_position_embeddings, false)).ok()) {
    return s;
  }
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean()) {
    c.tie_word_embeddings = it->get<bool>();
  }
  if (auto it = j.find("bos_token_id"); it != j.end() && !it->is_null()) {
    int32_t bos = 0;
    if (!(s = ReadNumber(j, "bos_token_id", &bos, true)).ok()) return s;
    c.bos_token_id = bos;
  }
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    ASSIGN_OR_RETURN(c.eos_token_ids, ReadTokenIds(*it, "eos_token_id"));
  }
  if (auto it = j.find("_name_or_path");
      it != j.end() && it->is_string() && !it->get<std::string>().empty()) {
    c.name = it->get<std::string>();
  }
  if (absl::Status v = c.Validate(); !v.ok()) return v;
  return c;
}

std::string ToHfConfigJson(const ModelConfig& c) {
  json j;
  j["architectures"] = {c.architecture};
  j["model_type"] = c.architecture == "MistralForCausalLM" ? "mistral"
                    : c.architecture == "Qwen2ForCausalLM" ? "qwen2"
                                                           : "llama";
  j["_name_or_path"] = c.name;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  switch (c.rope_scaling.type) {
    case RopeScalingType::kNone:
      j["rope_scaling"] = nullptr;
      break;
    case RopeScalingType::kLinear:
      j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", c.rope_scaling.factor}};
      break;
    case RopeScalingType::kLlama3:
      j["rope_scaling"] = {
          {"rope_type", "llama3"},
          {"factor", c.rope_scaling.factor},
          {"low_freq_factor", c.rope_scaling.low_freq_factor},
          {"high_freq_factor", c.rope_scaling.high_freq_factor},
          {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
      break;
  }
  if (c.architecture == "LlamaForCausalLM") j["attention_bias"] = c.qkv_bias;
  if (c.architecture == "MistralForCausalLM") {
    j["sliding_window"] = c.sliding_window > 0 ? json(c.sliding_window) : json(nullptr);
  }
  if (c.architecture == "Qwen2ForCausalLM") j["use_sliding_window"] = false;
  j["mlp_bias"] = false;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["torch_dtype"] = "float32";
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  return j.dump(2);
}

std::vector<double> RopeInverseFrequencies(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<double> inv(half);
  for (int i = 0; i < half; ++i) {
    inv[i] = 1.0 / std::pow(static_cast<double>(c.rope_theta), 2.0 * i / c.head_dim);
  }
  const RopeScaling& r = c.rope_scaling;
  if (r.type == RopeScalingType::kLinear) {
    for (double& f : inv) f /= r.factor;
  } else if (r.type == RopeScalingType::kLlama3) {
    // transformers' _compute_llama3_parameters: long wavelengths are slowed by `factor`, short
    // ones kept, and the band between is interpolated.
    const double old_len = r.original_max_position_embeddings;
    const double low_freq_wavelen = old_len / r.low_freq_factor;
    const double high_freq_wavelen = old_len / r.high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        f /= r.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1.0 - smooth) * f / r.factor + smooth * f;
      }
    }
  }
  return inv;
}

}  // namespace moleserve::engine
