// PEFT LoRA directories (MOLE_FORMAT.md section 4): adapter_config.json +
// adapter_model.safetensors, loaded as one static LoRA per adapted module.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/adapters/json_fields.h"
#include "engine/adapters/loaders.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

namespace aj = adapter_json;
using aj::Json;

constexpr size_t kMaxPatternLength = 512;
constexpr size_t kMaxPatterns = 256;

// rank_pattern / alpha_pattern of a PEFT config: peft's get_pattern_key picks the first pattern
// key that equals the module key or matches "(.*\.)?(pattern)$" (Python `re`; PCRE2 here agrees
// on the module-name patterns configs use). Each pattern is compiled once per load; match and
// depth limits bound what a hostile pattern can cost, and hitting them is an error, not a silent
// "no match". Not thread-safe.
class PatternTable {
 public:
  static absl::StatusOr<std::unique_ptr<PatternTable>> Create(const Json& patterns,
                                                              const std::string& what) {
    auto table = std::unique_ptr<PatternTable>(new PatternTable(what));
    if (patterns.size() > kMaxPatterns) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", patterns.size(), " patterns; at most ", kMaxPatterns));
    }
    for (auto it = patterns.begin(); it != patterns.end(); ++it) {
      if (!it.value().is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": pattern '", it.key(), "' must map to a number"));
      }
      const std::string& pattern = it.key();
      if (pattern.size() > kMaxPatternLength) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": pattern too long"));
      }
      const std::string full = "(?:.*\\.)?(?:" + pattern + ")";
      int error = 0;
      PCRE2_SIZE offset = 0;
      pcre2_code* code =
          pcre2_compile(reinterpret_cast<PCRE2_SPTR>(full.data()), full.size(),
                        PCRE2_ANCHORED | PCRE2_ENDANCHORED, &error, &offset, nullptr);
      if (code == nullptr) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(error, message, sizeof(message));
        return absl::InvalidArgumentError(absl::StrCat(
            what, ": '", pattern,
            "' is not a valid regular expression: ", reinterpret_cast<const char*>(message)));
      }
      table->entries_.push_back({pattern, it.value().get<double>(), code});
    }
    return table;
  }
  ~PatternTable() {
    for (const Entry& e : entries_) pcre2_code_free(e.code);
    pcre2_match_data_free(data_);
    pcre2_match_context_free(context_);
  }

  // The value of the first matching pattern, or nullopt.
  absl::StatusOr<std::optional<std::pair<std::string, double>>> Match(const std::string& key) {
    for (const Entry& e : entries_) {
      if (e.pattern == key) return std::make_pair(e.pattern, e.value);
    }
    for (const Entry& e : entries_) {
      const int rc = pcre2_match(e.code, reinterpret_cast<PCRE2_SPTR>(key.data()), key.size(), 0, 0,
                                 data_, context_);
      if (rc >= 0) return std::make_pair(e.pattern, e.value);
      if (rc != PCRE2_ERROR_NOMATCH) {
        return absl::InvalidArgumentError(absl::StrCat(
            what_, ": pattern '", e.pattern, "' is too expensive to match (PCRE2 error ", rc, ")"));
      }
    }
    return std::nullopt;
  }

 private:
  struct Entry {
    std::string pattern;
    double value;
    pcre2_code* code;
  };
  explicit PatternTable(std::string what)
      : what_(std::move(what)),
        context_(pcre2_match_context_create(nullptr)),
        data_(pcre2_match_data_create(1, nullptr)) {
    pcre2_set_match_limit(context_, 10000);
    pcre2_set_depth_limit(context_, 1000);
  }
  std::string what_;
  std::vector<Entry> entries_;
  pcre2_match_context* context_;
  pcre2_match_data* data_;
};

struct ParsedName {
  int32_t layer = 0;
  LinearModule module = LinearModule::kQ;
  bool is_a = false;
};

absl::StatusOr<ParsedName> ParsePeftName(const std::string& name, int32_t num_layers) {
  auto unsupported = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", why));
  };
  if (absl::StrContains(name, "lora_embedding")) {
    return unsupported("embedding LoRAs are not supported");
  }
  if (absl::StrContains(name, "lora_magnitude_vector")) {
    return unsupported("DoRA (use_dora) is not supported");
  }
  const std::string kPrefix = "base_model.model.model.layers.";
  if (!absl::StartsWith(name, kPrefix)) {
    return unsupported(
        "not a LoRA of a decoder-layer linear module (only q/k/v/o/gate/up/down_proj "
        "of model.layers.* are supported)");
  }
  std::vector<std::string> parts = absl::StrSplit(name.substr(kPrefix.size()), '.');
  // {l}.{self_attn|mlp}.{module}.lora_{A|B}.weight
  ParsedName p;
  if (parts.size() != 5 || !absl::SimpleAtoi(parts[0], &p.layer) || parts[4] != "weight" ||
      (parts[3] != "lora_A" && parts[3] != "lora_B")) {
    return unsupported(
        "unexpected tensor name (expected ...layers.{l}.{self_attn|mlp}.{module}"
        ".lora_{A|B}.weight)");
  }
  if (p.layer < 0 || p.layer >= num_layers) {
    return unsupported(absl::StrCat("layer ", p.layer, " does not exist in the base model (",
                                    num_layers, " layers)"));
  }
  std::optional<LinearModule> m = ParseLinearModule(parts[2]);
  const bool attn = parts[1] == "self_attn";
  if (!m || (attn != (*m < LinearModule::kGate)) || (!attn && parts[1] != "mlp")) {
    return unsupported(absl::StrCat("module '", parts[1], ".", parts[2], "' is not supported"));
  }
  p.module = *m;
  p.is_a = parts[3] == "lora_A";
  return p;
}

}  // namespace

absl::StatusOr<LoraStack> ReadLoraStack(TensorSet& tensors, const std::string& a_name,
                                        const std::string& b_name, bool stacked, int64_t in,
                                        int64_t out, const AdapterLimits& limits) {
  std::optional<std::vector<int64_t>> a_shape = tensors.Shape(a_name);
  std::optional<std::vector<int64_t>> b_shape = tensors.Shape(b_name);
  if (!a_shape) return absl::InvalidArgumentError(absl::StrCat("missing tensor '", a_name, "'"));
  if (!b_shape) return absl::InvalidArgumentError(absl::StrCat("missing tensor '", b_name, "'"));
  const size_t dims = stacked ? 3 : 2;
  if (a_shape->size() != dims || b_shape->size() != dims) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensors '", a_name, "' and '", b_name, "' must have ", dims, " dimensions"));
  }
  const int64_t e = stacked ? (*a_shape)[0] : 1;
  const int64_t r = (*a_shape)[dims - 2];
  if (r < 1 || r > limits.max_rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", a_name, "': rank ", r, " outside 1..", limits.max_rank));
  }
  if (e < 1 || e > limits.max_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", a_name, "': ", e, " experts, outside 1..", limits.max_experts));
  }
  std::vector<int64_t> want_a =
      stacked ? std::vector<int64_t>{e, r, in} : std::vector<int64_t>{r, in};
  std::vector<int64_t> want_b =
      stacked ? std::vector<int64_t>{e, out, r} : std::vector<int64_t>{out, r};
  if (*a_shape != want_a || *b_shape != want_b) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoRA '", a_name, "' has shapes A [", absl::StrJoin(*a_shape, ", "), "], B [",
                     absl::StrJoin(*b_shape, ", "), "]; the base module needs A [",
                     absl::StrJoin(want_a, ", "), "], B [", absl::StrJoin(want_b, ", "), "]"));
  }
  LoraStack s;
  s.num_experts = static_cast<int32_t>(e);
  s.rank = static_cast<int32_t>(r);
  s.in = in;
  s.out = out;
  ASSIGN_OR_RETURN(s.a, tensors.Read(a_name, want_a));
  ASSIGN_OR_RETURN(std::vector<float> b, tensors.Read(b_name, want_b));
  s.bt.resize(b.size());
  for (int64_t x = 0; x < e; ++x) {
    const float* src = b.data() + x * out * r;
    float* dst = s.bt.data() + x * r * out;
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < r; ++i) dst[i * out + o] = src[o * r + i];
    }
  }
  s.scale.assign(e, 1.0f);
  s.true_rank.assign(e, static_cast<int32_t>(r));
  return s;
}

absl::Status CheckAdapterSize(const TensorSet& tensors, const AdapterLimits& limits) {
  const int64_t bytes = tensors.TotalElements() * static_cast<int64_t>(sizeof(float));
  if (bytes > limits.max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the tensors hold ", bytes, " bytes as fp32, more than the limit of ", limits.max_bytes));
  }
  return absl::OkStatus();
}

absl::Status CheckAllTensorsUsed(const TensorSet& tensors) {
  std::vector<std::string> unused = tensors.Unused();
  if (unused.empty()) return absl::OkStatus();
  if (unused.size() > 5) unused.resize(5);
  return absl::InvalidArgumentError(
      absl::StrCat("tensors the adapter's config does not describe (unsupported or misnamed): ",
                   absl::StrJoin(unused, ", ")));
}

void ComputeAdapterBytes(Adapter* adapter) {
  int64_t bytes = 0;
  auto router_bytes = [](const RouterWeights& r) {
    return static_cast<int64_t>((r.weight.size() + r.bias.size() + r.select_bias.size()) *
                                sizeof(float));
  };
  for (const AdapterLayer& layer : adapter->layers) {
    for (const auto& statics : layer.statics) {
      for (const LoraStack& s : statics) bytes += s.bytes();
    }
    for (const auto& r : layer.routed) {
      if (r) bytes += r->experts.bytes() + router_bytes(r->router);
    }
    if (layer.block_ffn) {
      bytes += router_bytes(layer.block_ffn->router);
      for (const auto& s : layer.block_ffn->lora) {
        if (s) bytes += s->bytes();
      }
    }
  }
  if (adapter->xlora) {
    for (const auto& lin : adapter->xlora->classifier) {
      bytes += static_cast<int64_t>((lin.weight.size() + lin.bias.size()) * sizeof(float));
    }
  }
  adapter->bytes = bytes;
}

absl::StatusOr<std::unique_ptr<Adapter>> LoadPeftDirectory(const std::string& dir,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits) {
  namespace fs = std::filesystem;
  ASSIGN_OR_RETURN(Json cfg, aj::ParseFile((fs::path(dir) / "adapter_config.json").string()));
  const std::string ctx = "adapter_config.json";
  ASSIGN_OR_RETURN(std::string peft_type, aj::String(cfg, "peft_type", "LORA", ctx));
  if (peft_type != "LORA") {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, ": peft_type '", peft_type,
                     "' is not a plain LoRA; convert MoLE formats with tools/mole_convert.py"));
  }
  ASSIGN_OR_RETURN(bool dora, aj::Bool(cfg, "use_dora", false, ctx));
  if (dora) return absl::InvalidArgumentError(ctx + ": use_dora (DoRA) is not supported");
  ASSIGN_OR_RETURN(bool nola, aj::Bool(cfg, "use_nola", false, ctx));
  if (nola) {
    return absl::InvalidArgumentError(
        ctx +
        ": use_nola (NOLA's peft fork): its LoRA matrices are regenerated from seeded random "
        "bases; convert it with tools/mole_convert.py --family nola --nola-device cpu|cuda");
  }
  if (auto mts = cfg.find("modules_to_save");
      mts != cfg.end() && !mts->is_null() && !(mts->is_array() && mts->empty())) {
    return absl::InvalidArgumentError(
        ctx + ": modules_to_save is not supported (it replaces whole base modules)");
  }
  ASSIGN_OR_RETURN(bool fan_in_fan_out, aj::Bool(cfg, "fan_in_fan_out", false, ctx));
  if (fan_in_fan_out) {
    return absl::InvalidArgumentError(ctx + ": fan_in_fan_out (GPT-2 Conv1D) is not supported");
  }
  ASSIGN_OR_RETURN(std::string bias, aj::String(cfg, "bias", "none", ctx));
  if (bias != "none") {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, ": bias '", bias, "' is not supported (only \"none\")"));
  }
  ASSIGN_OR_RETURN(bool lora_bias, aj::Bool(cfg, "lora_bias", false, ctx));
  if (lora_bias) return absl::InvalidArgumentError(ctx + ": lora_bias is not supported");
  ASSIGN_OR_RETURN(int64_t r_default, aj::Int(cfg, "r", 8, ctx));
  ASSIGN_OR_RETURN(double alpha_default, aj::Number(cfg, "lora_alpha", 8.0, ctx));
  ASSIGN_OR_RETURN(bool rslora, aj::Bool(cfg, "use_rslora", false, ctx));
  const Json empty = Json::object();
  const Json& rank_json =
      cfg.contains("rank_pattern") && cfg["rank_pattern"].is_object() ? cfg["rank_pattern"] : empty;
  const Json& alpha_json = cfg.contains("alpha_pattern") && cfg["alpha_pattern"].is_object()
                               ? cfg["alpha_pattern"]
                               : empty;
  ASSIGN_OR_RETURN(std::unique_ptr<PatternTable> rank_pattern,
                   PatternTable::Create(rank_json, ctx + ".rank_pattern"));
  ASSIGN_OR_RETURN(std::unique_ptr<PatternTable> alpha_pattern,
                   PatternTable::Create(alpha_json, ctx + ".alpha_pattern"));
  // target_modules: reject names of modules we cannot adapt; the tensors say what is adapted.
  if (auto tm = cfg.find("target_modules"); tm != cfg.end() && tm->is_array()) {
    for (const Json& t : *tm) {
      if (!t.is_string())
        return absl::InvalidArgumentError(ctx + ": target_modules must be strings");
      const std::string name = t.get<std::string>();
      const std::string leaf = name.substr(name.rfind('.') + 1);
      if (!ParseLinearModule(leaf)) {
        return absl::InvalidArgumentError(absl::StrCat(
            ctx, ": target module '", name,
            "' is not supported (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"));
      }
    }
  }
  std::optional<std::vector<int32_t>> layers_to_transform;
  if (auto lt = cfg.find("layers_to_transform"); lt != cfg.end() && !lt->is_null()) {
    layers_to_transform.emplace();
    std::vector<Json> entries;
    if (lt->is_array()) {
      entries.assign(lt->begin(), lt->end());
    } else {
      entries.push_back(*lt);
    }
    for (const Json& e : entries) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= base.num_layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            ctx, ": layers_to_transform must list layer indices in 0..", base.num_layers - 1));
      }
      layers_to_transform->push_back(static_cast<int32_t>(e.get<int64_t>()));
    }
  }

  ASSIGN_OR_RETURN(std::vector<std::string> files, ListSafetensors(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorSet> tensors, TensorSet::Open(files));
  RETURN_IF_ERROR(CheckAdapterSize(*tensors, limits));
  // Collect the adapted (layer, module) sites from the tensor names.
  std::set<std::pair<int32_t, int>> sites;
  for (const std::string& name : tensors->Names()) {
    ASSIGN_OR_RETURN(ParsedName p, ParsePeftName(name, base.num_layers));
    if (layers_to_transform && std::find(layers_to_transform->begin(), layers_to_transform->end(),
                                         p.layer) == layers_to_transform->end()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' adapts layer ", p.layer,
                                                     ", outside layers_to_transform"));
    }
    sites.insert({p.layer, static_cast<int>(p.module)});
  }
  if (sites.empty()) return absl::InvalidArgumentError("adapter has no LoRA tensors");

  auto adapter = std::make_unique<Adapter>();
  adapter->format = "peft";
  adapter->source_family = "lora";
  adapter->layers.resize(base.num_layers);
  GroupInfo info{.id = "lora",
                 .scope = "static",
                 .granularity = "lora",
                 .algorithm = "static",
                 .max_experts = 1,
                 .min_experts = 1};
  for (const auto& [l, mi] : sites) {
    const LinearModule m = static_cast<LinearModule>(mi);
    const auto [in, out] = LinearModuleShape(base, m);
    const std::string prefix =
        absl::StrCat("base_model.model.model.layers.", l, ".",
                     m < LinearModule::kGate ? "self_attn." : "mlp.", LinearModuleName(m));
    ASSIGN_OR_RETURN(LoraStack stack,
                     ReadLoraStack(*tensors, prefix + ".lora_A.weight", prefix + ".lora_B.weight",
                                   /*stacked=*/false, in, out, limits));
    // Pattern keys match the module path without the "base_model.model." wrapper.
    const std::string key =
        absl::StrCat("model.layers.", l, ".", m < LinearModule::kGate ? "self_attn." : "mlp.",
                     LinearModuleName(m));
    int64_t r = r_default;
    double alpha = alpha_default;
    ASSIGN_OR_RETURN(auto rk, rank_pattern->Match(key));
    if (rk) {
      if (rk->second != std::floor(rk->second) || rk->second < 1 || rk->second > (1 << 20)) {
        return absl::InvalidArgumentError(
            absl::StrCat(ctx, ".rank_pattern: '", rk->first, "' must map to a positive integer"));
      }
      r = static_cast<int64_t>(rk->second);
    }
    ASSIGN_OR_RETURN(auto ak, alpha_pattern->Match(key));
    if (ak) alpha = ak->second;
    if (r != stack.rank) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LoRA of ", key, " has rank ", stack.rank, " but adapter_config.json says r = ", r,
          rk ? absl::StrCat(" (rank_pattern '", rk->first, "')") : std::string()));
    }
    const float s = static_cast<float>(rslora ? alpha / std::sqrt(static_cast<double>(r))
                                              : alpha / static_cast<double>(r));
    if (!std::isfinite(s)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx, ": lora_alpha ", alpha, " gives a non-finite scale for ", key));
    }
    stack.scale.assign(1, s);
    info.ranks.push_back(stack.rank);
    ++info.num_modules;
    adapter->layers[l].statics[mi].push_back(std::move(stack));
  }
  std::sort(info.ranks.begin(), info.ranks.end());
  info.ranks.erase(std::unique(info.ranks.begin(), info.ranks.end()), info.ranks.end());
  adapter->groups.push_back(std::move(info));
  RETURN_IF_ERROR(CheckAllTensorsUsed(*tensors));
  ComputeAdapterBytes(adapter.get());
  return adapter;
}

}  // namespace moleserve::engine
