#include "engine/model/model_config.h"

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <tuple>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

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
  const int64_t per_layer = h * q + 2 * h * kv + q * h + 3 * h * intermediate_size + 2 * h;
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

absl::StatusOr<ModelConfig> ParseHfConfig(absl::string_view json_text) {
  json j = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Bad("not a JSON object");
  ModelConfig c;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->size() != 1 || !(*arch)[0].is_string()) {
    return Bad("'architectures' must be a list with one architecture name");
  }
  c.architecture = (*arch)[0].get<std::string>();
  if (c.architecture != "LlamaForCausalLM") {
    return Bad(absl::StrCat("unsupported architecture '", c.architecture,
                            "' (supported: LlamaForCausalLM)"));
  }
  if (auto it = j.find("hidden_act"); it != j.end() && *it != "silu") {
    return Bad(absl::StrCat("unsupported hidden_act ", it->dump(), " (supported: \"silu\")"));
  }
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    return Bad(absl::StrCat("unsupported rope_scaling ", it->dump()));
  }
  for (const char* flag : {"attention_bias", "mlp_bias"}) {
    if (auto it = j.find(flag); it != j.end() && it->is_boolean() && it->get<bool>()) {
      return Bad(absl::StrCat("unsupported option ", flag, "=true"));
    }
  }
  absl::Status s;
  if (!(s = ReadNumber(j, "vocab_size", &c.vocab_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "hidden_size", &c.hidden_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "intermediate_size", &c.intermediate_size, true)).ok()) return s;
  if (!(s = ReadNumber(j, "num_hidden_layers", &c.num_layers, true)).ok()) return s;
  if (!(s = ReadNumber(j, "num_attention_heads", &c.num_heads, true)).ok()) return s;
  c.num_kv_heads = c.num_heads;
  if (!(s = ReadNumber(j, "num_key_value_heads", &c.num_kv_heads, false)).ok()) return s;
  c.head_dim = c.num_heads > 0 ? c.hidden_size / c.num_heads : 0;
  if (!(s = ReadNumber(j, "head_dim", &c.head_dim, false)).ok()) return s;
  if (!(s = ReadNumber(j, "rms_norm_eps", &c.rms_norm_eps, false)).ok()) return s;
  if (!(s = ReadNumber(j, "rope_theta", &c.rope_theta, false)).ok()) return s;
  if (!(s = ReadNumber(j, "max_position_embeddings", &c.max_position_embeddings, false)).ok()) {
    return s;
  }
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean()) {
    c.tie_word_embeddings = it->get<bool>();
  }
  if (auto it = j.find("bos_token_id"); it != j.end() && it->is_number_integer()) {
    c.bos_token_id = it->get<int32_t>();
  }
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (it->is_number_integer()) {
      c.eos_token_ids.push_back(it->get<int32_t>());
    } else if (it->is_array()) {
      for (const auto& e : *it) {
        if (!e.is_number_integer()) return Bad("eos_token_id entries must be integers");
        c.eos_token_ids.push_back(e.get<int32_t>());
      }
    }
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
  j["model_type"] = "llama";
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
  j["rope_scaling"] = nullptr;
  j["attention_bias"] = false;
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

}  // namespace moleserve::engine
