// mole/1 directories (engine/adapters/README.md): mole_config.json + *.safetensors.

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/adapters/json_fields.h"
#include "engine/adapters/loaders.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

namespace aj = adapter_json;
using aj::Json;

struct Targets {
  std::vector<int32_t> layers;
  std::vector<LinearModule> modules;
};

absl::StatusOr<Targets> ParseTargets(const Json& obj, int32_t num_layers, const std::string& ctx) {
  auto it = obj.find("targets");
  if (it == obj.end() || !it->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, ": missing 'targets' object"));
  }
  Targets t;
  auto layers = it->find("layers");
  if (layers == it->end() || (layers->is_string() && *layers == "all")) {
    for (int32_t l = 0; l < num_layers; ++l) t.layers.push_back(l);
  } else if (layers->is_array()) {
    std::set<int32_t> seen;
    for (const Json& e : *layers) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= num_layers) {
        return absl::InvalidArgumentError(absl::StrCat(
            ctx, ": targets.layers must be \"all\" or layer indices in 0..", num_layers - 1));
      }
      if (seen.insert(e.get<int32_t>()).second) t.layers.push_back(e.get<int32_t>());
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, ": targets.layers must be \"all\" or a list of layer indices"));
  }
  ASSIGN_OR_RETURN(std::vector<std::string> modules,
                   aj::StringList(*it, "modules", ctx + ".targets"));
  for (const std::string& m : modules) {
    std::optional<LinearModule> mod = ParseLinearModule(m);
    if (!mod) {
      return absl::InvalidArgumentError(
          absl::StrCat(ctx, ": unsupported target module '", m,
                       "' (supported: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"));
    }
    if (std::find(t.modules.begin(), t.modules.end(), *mod) == t.modules.end()) {
      t.modules.push_back(*mod);
    }
  }
  if (t.modules.empty())
    return absl::InvalidArgumentError(absl::StrCat(ctx, ": no target modules"));
  return t;
}

// A config number used as a float (LoRA scale, probability, temperature): finite after the cast.
absl::StatusOr<float> FiniteFloat(double v, const std::string& what) {
  const float f = static_cast<float>(v);
  if (!std::isfinite(f)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " = ", v, " is not a finite float"));
  }
  return f;
}

absl::StatusOr<std::vector<float>> FiniteFloats(const std::vector<double>& v,
                                                const std::string& what) {
  std::vector<float> out;
  for (double d : v) {
    ASSIGN_OR_RETURN(float f, FiniteFloat(d, what));
    out.push_back(f);
  }
  return out;
}

absl::StatusOr<int32_t> CheckedCount(double v, int32_t lo, int32_t hi, const std::string& what) {
  if (v != std::floor(v) || v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " = ", v, " must be an integer in ", lo, "..", hi));
  }
  return static_cast<int32_t>(v);
}

absl::StatusOr<RoutingSpec> ParseRouting(const Json& group, int32_t num_layers,
                                         const std::string& ctx,
                                         std::vector<int32_t>* k_per_layer) {
  auto it = group.find("routing");
  if (it == group.end() || !it->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(ctx, ": missing 'routing' object"));
  }
  const Json& r = *it;
  const std::string rctx = ctx + ".routing";
  RoutingSpec spec;
  ASSIGN_OR_RETURN(std::string algorithm, aj::String(r, "algorithm", std::nullopt, rctx));
  absl::StatusOr<RoutingAlgorithm> alg = ParseRoutingAlgorithm(algorithm);
  if (!alg.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(rctx, ": unknown routing algorithm '", algorithm, "'"));
  }
  spec.algorithm = *alg;
  ASSIGN_OR_RETURN(std::vector<double> k, aj::PerLayer(r, "k", 2.0, num_layers, rctx));
  for (double v : k) {
    ASSIGN_OR_RETURN(int32_t ki, CheckedCount(v, 1, 1 << 20, rctx + ".k"));
    k_per_layer->push_back(ki);
  }
  ASSIGN_OR_RETURN(double p, aj::Number(r, "p", 0.0, rctx));
  ASSIGN_OR_RETURN(spec.p, FiniteFloat(p, rctx + ".p"));
  ASSIGN_OR_RETURN(std::string mode, aj::String(r, "p_mode", "exceed", rctx));
  if (mode == "exceed") {
    spec.p_mode = TopPMode::kExceed;
  } else if (mode == "within") {
    spec.p_mode = TopPMode::kWithin;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(rctx, ": p_mode '", mode, "' is not \"exceed\" or \"within\""));
  }
  ASSIGN_OR_RETURN(int64_t min_k, aj::Int(r, "min_k", 0, rctx));
  if (min_k < 0 || min_k > (1 << 20)) {
    return absl::InvalidArgumentError(absl::StrCat(rctx, ": min_k must be >= 0"));
  }
  spec.min_k = static_cast<int32_t>(min_k);
  ASSIGN_OR_RETURN(double t, aj::Number(r, "temperature", 1.0, rctx));
  ASSIGN_OR_RETURN(spec.temperature, FiniteFloat(t, rctx + ".temperature"));
  ASSIGN_OR_RETURN(double pt, aj::Number(r, "prob_temperature", 0.0, rctx));
  ASSIGN_OR_RETURN(spec.prob_temperature, FiniteFloat(pt, rctx + ".prob_temperature"));
  const bool renorm_default =
      spec.algorithm == RoutingAlgorithm::kTopK || spec.algorithm == RoutingAlgorithm::kRankTopK;
  ASSIGN_OR_RETURN(spec.renormalize, aj::Bool(r, "renormalize", renorm_default, rctx));
  auto ent = r.find("entropy");
  if (ent != r.end() && !ent->is_null()) {
    if (!ent->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(rctx, ": 'entropy' must be an object"));
    }
    const std::string ectx = rctx + ".entropy";
    ASSIGN_OR_RETURN(std::string type, aj::String(*ent, "type", "tsallis", ectx));
    if (type != "tsallis") {
      return absl::InvalidArgumentError(absl::StrCat(
          ectx, ": entropy type '", type, "' is not supported (tsallis; q = 1 is Shannon)"));
    }
    spec.entropy.enabled = true;
    ASSIGN_OR_RETURN(spec.entropy.q, aj::Number(*ent, "q", 1.1, ectx));
    ASSIGN_OR_RETURN(spec.entropy.threshold, aj::Number(*ent, "threshold", 0.9, ectx));
    ASSIGN_OR_RETURN(spec.entropy.eps, aj::Number(*ent, "eps", 1e-5, ectx));
  }
  return spec;
}

absl::StatusOr<RouterWeights> ReadRouter(TensorSet& tensors, const std::string& prefix,
                                         int32_t rows, int64_t in, bool bias, bool select_bias,
                                         bool has_weight, int32_t mixture = 0) {
  RouterWeights r;
  r.rows = rows;
  r.in = in;
  r.mixture = mixture;
  if (mixture > 0) {
    // MoR: sub.{j}.weight [rows, in] for each sub-router, then main.weight [M, in], stacked
    // into one GEMM (RouterWeights).
    r.weight.reserve(static_cast<size_t>(r.gemm_rows() * in));
    for (int32_t j = 0; j <= mixture; ++j) {
      const bool main = j == mixture;
      ASSIGN_OR_RETURN(
          std::vector<float> w,
          tensors.Read(main ? prefix + ".main.weight" : absl::StrCat(prefix, ".sub.", j, ".weight"),
                       {main ? mixture : rows, in}));
      r.weight.insert(r.weight.end(), w.begin(), w.end());
    }
  } else if (has_weight) {
    ASSIGN_OR_RETURN(r.weight, tensors.Read(prefix + ".weight", {rows, in}));
  }
  if (bias) {
    ASSIGN_OR_RETURN(r.bias, tensors.Read(prefix + ".bias", {rows}));
  }
  if (select_bias) {
    ASSIGN_OR_RETURN(r.select_bias, tensors.Read(prefix + ".select_bias", {rows}));
  }
  return r;
}

// Reads an optional per-expert scale override tensor.
absl::Status ReadScaleOverride(TensorSet& tensors, const std::string& name, LoraStack* stack) {
  std::optional<std::vector<int64_t>> shape = tensors.Shape(name);
  if (!shape) return absl::OkStatus();
  const int64_t n = stack->num_experts;
  std::vector<int64_t> want = {n};
  if (*shape != want && !(n == 1 && shape->empty())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", name, "' has shape [", absl::StrJoin(*shape, ", "), "], expected [", n, "]"));
  }
  ASSIGN_OR_RETURN(stack->scale, tensors.Read(name, *shape));
  return absl::OkStatus();
}

absl::StatusOr<XloraSpec> ParseXlora(const Json& x, TensorSet& tensors, const ModelConfig& base,
                                     std::map<std::string, int32_t>* module_index) {
  const std::string ctx = "xlora";
  XloraSpec spec;
  ASSIGN_OR_RETURN(std::vector<std::string> adapters, aj::StringList(x, "adapters", ctx));
  spec.num_adapters = static_cast<int32_t>(adapters.size());
  if (spec.num_adapters < 1) {
    return absl::InvalidArgumentError("xlora: 'adapters' lists no adapter");
  }
  auto mi = x.find("module_index");
  if (mi == x.end() || !mi->is_object() || mi->empty()) {
    return absl::InvalidArgumentError("xlora: missing 'module_index' object");
  }
  std::set<int64_t> seen;
  for (auto it = mi->begin(); it != mi->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= static_cast<int64_t>(mi->size()) ||
        !seen.insert(it.value().get<int64_t>()).second) {
      return absl::InvalidArgumentError(absl::StrCat("xlora.module_index: '", it.key(),
                                                     "' must map to a distinct index in 0..",
                                                     mi->size() - 1));
    }
    (*module_index)[it.key()] = it.value().get<int32_t>();
  }
  spec.num_modules = static_cast<int32_t>(mi->size());
  ASSIGN_OR_RETURN(spec.layerwise, aj::Bool(x, "layerwise_scalings", false, ctx));
  ASSIGN_OR_RETURN(spec.enable_softmax, aj::Bool(x, "enable_softmax", true, ctx));
  ASSIGN_OR_RETURN(double temp, aj::Number(x, "softmax_temperature", 1.0, ctx));
  if (temp <= 0) return absl::InvalidArgumentError("xlora: softmax_temperature must be > 0");
  ASSIGN_OR_RETURN(spec.softmax_temperature, FiniteFloat(temp, "xlora.softmax_temperature"));
  ASSIGN_OR_RETURN(int64_t top_k, aj::Int(x, "top_k", 0, ctx));
  if (top_k < 0 || top_k > spec.num_adapters) {
    return absl::InvalidArgumentError(
        absl::StrCat("xlora: top_k = ", top_k, " must be in 0..", spec.num_adapters));
  }
  spec.top_k = static_cast<int32_t>(top_k);
  ASSIGN_OR_RETURN(spec.softmax_topk, aj::Bool(x, "softmax_topk", false, ctx));
  if (spec.softmax_topk && spec.top_k == 0) {
    return absl::InvalidArgumentError("xlora: softmax_topk needs top_k");
  }
  ASSIGN_OR_RETURN(double spv, aj::Number(x, "scaling_pass_value", 0.0, ctx));
  ASSIGN_OR_RETURN(spec.scaling_pass_value, FiniteFloat(spv, "xlora.scaling_pass_value"));
  ASSIGN_OR_RETURN(double gsw, aj::Number(x, "global_scaling_weight", 1.0, ctx));
  ASSIGN_OR_RETURN(spec.global_scaling_weight, FiniteFloat(gsw, "xlora.global_scaling_weight"));

  auto cls = x.find("classifier");
  if (cls == x.end() || !cls->is_object()) {
    return absl::InvalidArgumentError("xlora: missing 'classifier' object");
  }
  ASSIGN_OR_RETURN(int64_t depth, aj::Int(*cls, "depth", 1, "xlora.classifier"));
  if (depth < 1 || depth > 16) {
    return absl::InvalidArgumentError("xlora.classifier: depth must be in 1..16");
  }
  ASSIGN_OR_RETURN(bool bias, aj::Bool(*cls, "bias", true, "xlora.classifier"));
  ASSIGN_OR_RETURN(spec.relu, aj::Bool(*cls, "relu", true, "xlora.classifier"));
  const int64_t out_final = int64_t{spec.num_adapters} * (spec.layerwise ? spec.num_modules : 1);
  int64_t in = base.hidden_size;
  for (int64_t i = 0; i < depth; ++i) {
    const std::string name = absl::StrCat("xlora.classifier.", i, ".weight");
    std::optional<std::vector<int64_t>> shape = tensors.Shape(name);
    if (!shape || shape->size() != 2 || (*shape)[1] != in) {
      return absl::InvalidArgumentError(
          absl::StrCat("xlora classifier tensor '", name, "' is missing or not [*, ", in, "]"));
    }
    const int64_t out = i + 1 == depth ? out_final : (*shape)[0];
    if ((*shape)[0] != out || out <= 0 || out > (1 << 16)) {
      return absl::InvalidArgumentError(absl::StrCat("xlora classifier tensor '", name, "' has ",
                                                     (*shape)[0], " rows, expected ", out));
    }
    XloraSpec::Linear lin;
    lin.in = in;
    lin.out = out;
    ASSIGN_OR_RETURN(lin.weight, tensors.Read(name, {out, in}));
    if (bias) {
      ASSIGN_OR_RETURN(lin.bias,
                       tensors.Read(absl::StrCat("xlora.classifier.", i, ".bias"), {out}));
    }
    spec.classifier.push_back(std::move(lin));
    in = out;
  }
  return spec;
}

// The checks of the optional `base_model` block: the adapter was made for this model's shape.
absl::Status CheckBaseModel(const Json& cfg, const ModelConfig& base, const std::string& ctx) {
  auto bm = cfg.find("base_model");
  if (bm == cfg.end() || !bm->is_object()) return absl::OkStatus();
  const std::pair<const char*, int64_t> checks[] = {{"num_layers", base.num_layers},
                                                    {"hidden_size", base.hidden_size},
                                                    {"intermediate_size", base.intermediate_size},
                                                    {"num_attention_heads", base.num_heads},
                                                    {"num_key_value_heads", base.num_kv_heads}};
  for (const auto& [key, have] : checks) {
    ASSIGN_OR_RETURN(int64_t want, aj::Int(*bm, key, have, ctx + ".base_model"));
    if (want != have) {
      return absl::InvalidArgumentError(absl::StrCat("adapter was made for a base model with ", key,
                                                     " = ", want, "; the served model has ", have));
    }
  }
  return absl::OkStatus();
}

// One routed group's header: its fields parsed and checked against each other, before any of
// its tensors is read.
struct GroupHeader {
  const Json* json = nullptr;
  std::string id;
  std::string ctx;  // "mole_config.json.routed_groups['<id>']"
  std::string scope;
  std::string granularity;
  Targets targets;
  std::vector<double> num_experts;  // per layer
  std::vector<float> scale;         // per layer
  std::vector<double> rank;         // per layer, 0 = not given
  RouterType router_type = RouterType::kLinear;
  bool router_bias = false;
  bool select_bias = false;
  bool select_on_abs = false;
  int32_t mixture = 0;  // kMixture: sub-routers
  bool rank_granular = false;
  bool xlora_group = false;  // scope model_scalings
  RoutingSpec routing;
  std::vector<int32_t> k_per_layer;
};

// LoadMoleDirectory's steps, in order: static LoRAs, the X-LoRA block, routed groups (each a
// header, then block-FFN or module sites), then the final checks. Each step adds to `adapter`.
class MoleLoader {
 public:
  MoleLoader(const ModelConfig& base, const AdapterLimits& limits, TensorSet* tensors,
             Adapter* adapter)
      : base_(base), limits_(limits), tensors_(*tensors), adapter_(*adapter) {}

  absl::Status StaticLoras(const Json& cfg);
  absl::Status Xlora(const Json& cfg);
  absl::Status RoutedGroups(const Json& cfg);
  absl::Status Finish();

 private:
  absl::StatusOr<GroupHeader> ParseGroupHeader(const Json& g, size_t index);
  absl::Status BlockFfnSites(const GroupHeader& h, int32_t group_index, GroupInfo* info);
  absl::Status ModuleSites(const GroupHeader& h, int32_t group_index, GroupInfo* info);
  // The config's rank (when given) must be the tensors' rank.
  static absl::Status CheckRank(const GroupHeader& h, int32_t layer, int32_t have,
                                const std::string& tensor);

  static constexpr const char* kCtx = "mole_config.json";
  const ModelConfig& base_;
  const AdapterLimits& limits_;
  TensorSet& tensors_;
  Adapter& adapter_;
  std::set<std::string> ids_;  // static and group ids share one namespace (tensor prefixes)
  std::map<std::string, int32_t> module_index_;  // X-LoRA's "layers.<l>.<module>" -> index
  std::set<int32_t> xlora_indices_used_;
};

absl::Status MoleLoader::StaticLoras(const Json& cfg) {
  const std::string ctx = kCtx;
  auto st = cfg.find("static_loras");
  if (st == cfg.end() || st->is_null()) return absl::OkStatus();
  if (!st->is_array()) return absl::InvalidArgumentError(ctx + ": 'static_loras' must be a list");
  const int32_t num_layers = base_.num_layers;
  for (size_t i = 0; i < st->size(); ++i) {
    const Json& s = (*st)[i];
    std::string sctx = absl::StrCat(ctx, ".static_loras[", i, "]");
    if (!s.is_object()) return absl::InvalidArgumentError(sctx + " must be an object");
    ASSIGN_OR_RETURN(std::string id, aj::String(s, "id", std::nullopt, sctx));
    ASSIGN_OR_RETURN(Targets targets, ParseTargets(s, num_layers, sctx));
    ASSIGN_OR_RETURN(std::vector<double> scale_json,
                     aj::PerLayer(s, "scale", std::nullopt, num_layers, sctx));
    ASSIGN_OR_RETURN(std::vector<float> scale, FiniteFloats(scale_json, sctx + ".scale"));
    if (!ids_.insert(id).second) {
      return absl::InvalidArgumentError(absl::StrCat(sctx, ": id '", id, "' is used twice"));
    }
    GroupInfo info{.id = id,
                   .scope = "static",
                   .granularity = "lora",
                   .algorithm = "static",
                   .max_experts = 1,
                   .min_experts = 1};
    for (int32_t l : targets.layers) {
      for (LinearModule m : targets.modules) {
        const auto [in, out] = LinearModuleShape(base_, m);
        const std::string prefix =
            absl::StrCat("static.", id, ".layers.", l, ".", LinearModuleName(m));
        ASSIGN_OR_RETURN(LoraStack stack, ReadLoraStack(tensors_, prefix + ".A", prefix + ".B",
                                                        /*stacked=*/false, in, out, limits_));
        stack.scale.assign(1, scale[l]);
        RETURN_IF_ERROR(ReadScaleOverride(tensors_, prefix + ".scale", &stack));
        info.ranks.push_back(stack.rank);
        ++info.num_modules;
        adapter_.layers[l].statics[static_cast<int>(m)].push_back(std::move(stack));
      }
    }
    adapter_.groups.push_back(std::move(info));
  }
  return absl::OkStatus();
}

absl::Status MoleLoader::Xlora(const Json& cfg) {
  const std::string ctx = kCtx;
  auto x = cfg.find("xlora");
  if (x == cfg.end() || x->is_null()) return absl::OkStatus();
  if (!x->is_object()) return absl::InvalidArgumentError(ctx + ": 'xlora' must be an object");
  ASSIGN_OR_RETURN(XloraSpec spec, ParseXlora(*x, tensors_, base_, &module_index_));
  adapter_.xlora = std::move(spec);
  if (auto inf = cfg.find("inference"); inf != cfg.end() && inf->is_object()) {
    ASSIGN_OR_RETURN(int64_t freeze,
                     aj::Int(*inf, "freeze_scalings_after", -1, ctx + ".inference"));
    if (freeze < -1 || freeze > (1 << 30)) {
      return absl::InvalidArgumentError(
          "mole_config.json: inference.freeze_scalings_after must be a token count >= 0");
    }
    if (freeze >= 0) adapter_.xlora->freeze_after = static_cast<int32_t>(freeze);
  }
  return absl::OkStatus();
}

absl::StatusOr<GroupHeader> MoleLoader::ParseGroupHeader(const Json& g, size_t index) {
  const int32_t num_layers = base_.num_layers;
  GroupHeader h;
  h.json = &g;
  h.ctx = absl::StrCat(kCtx, ".routed_groups[", index, "]");
  if (!g.is_object()) return absl::InvalidArgumentError(h.ctx + " must be an object");
  ASSIGN_OR_RETURN(h.id, aj::String(g, "id", std::nullopt, h.ctx));
  h.ctx = absl::StrCat(kCtx, ".routed_groups['", h.id, "']");
  const std::string& gctx = h.ctx;
  ASSIGN_OR_RETURN(h.scope, aj::String(g, "scope", "module", gctx));
  ASSIGN_OR_RETURN(h.granularity, aj::String(g, "granularity", "lora", gctx));
  ASSIGN_OR_RETURN(h.targets, ParseTargets(g, num_layers, gctx));
  ASSIGN_OR_RETURN(h.num_experts, aj::PerLayer(g, "num_experts", std::nullopt, num_layers, gctx));
  ASSIGN_OR_RETURN(std::vector<double> scale_json,
                   aj::PerLayer(g, "scale", std::nullopt, num_layers, gctx));
  ASSIGN_OR_RETURN(h.scale, FiniteFloats(scale_json, gctx + ".scale"));
  ASSIGN_OR_RETURN(h.rank, aj::PerLayer(g, "rank", 0.0, num_layers, gctx));
  if (!ids_.insert("group:" + h.id).second) {
    return absl::InvalidArgumentError(absl::StrCat(gctx, ": id '", h.id, "' is used twice"));
  }
  ASSIGN_OR_RETURN(std::string act, aj::String(g, "act_fn", "silu", gctx));
  if (act != "silu") {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": act_fn '", act, "' is not supported (silu, as the base)"));
  }
  const Json empty = Json::object();
  if (g.contains("router") && !g["router"].is_null() && !g["router"].is_object()) {
    return absl::InvalidArgumentError(gctx + ": 'router' must be an object");
  }
  const Json& router = g.contains("router") && g["router"].is_object() ? g["router"] : empty;
  const std::string rctx = gctx + ".router";
  ASSIGN_OR_RETURN(std::string router_type_name, aj::String(router, "type", "linear", rctx));
  ASSIGN_OR_RETURN(h.router_bias, aj::Bool(router, "bias", false, rctx));
  ASSIGN_OR_RETURN(h.select_bias, aj::Bool(router, "select_bias", false, rctx));
  ASSIGN_OR_RETURN(h.select_on_abs, aj::Bool(router, "select_on_abs", false, rctx));
  if (router.contains("num_routers") && router_type_name != "mixture") {
    return absl::InvalidArgumentError(rctx + ": num_routers applies to router type mixture only");
  }
  if (router_type_name == "linear") {
    h.router_type = RouterType::kLinear;
  } else if (router_type_name == "mixture") {
    h.router_type = RouterType::kMixture;
    ASSIGN_OR_RETURN(double routers, aj::Number(router, "num_routers", std::nullopt, rctx));
    if (routers != std::floor(routers) || routers < 1 || routers > kernels::kMaxMixRouters) {
      return absl::InvalidArgumentError(
          absl::StrCat(rctx, ".num_routers must be an integer in 1..", kernels::kMaxMixRouters));
    }
    h.mixture = static_cast<int32_t>(routers);
  } else if (router_type_name == "output_gate") {
    h.router_type = RouterType::kOutputGate;
  } else if (router_type_name == "implicit_A") {
    h.router_type = RouterType::kImplicitA;
  } else if (router_type_name == "xlora_ref") {
    h.router_type = RouterType::kXloraRef;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(rctx, ": router type '", router_type_name,
                     "' is not supported (linear, mixture, output_gate, implicit_A, xlora_ref)"));
  }
  h.rank_granular = h.granularity == "rank";
  if (!h.rank_granular && h.granularity != "lora") {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": granularity '", h.granularity, "' is not \"lora\" or \"rank\""));
  }
  h.xlora_group = h.scope == "model_scalings";
  if (h.xlora_group != (h.router_type == RouterType::kXloraRef)) {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": scope model_scalings goes with router type xlora_ref"));
  }
  if (h.xlora_group) {
    if (!adapter_.xlora) {
      return absl::InvalidArgumentError(
          absl::StrCat(gctx, ": scope model_scalings needs the 'xlora' block"));
    }
    h.k_per_layer.assign(num_layers, 1);
  } else {
    ASSIGN_OR_RETURN(h.routing, ParseRouting(g, num_layers, gctx, &h.k_per_layer));
  }
  if (h.rank_granular != (!h.xlora_group && h.routing.algorithm == RoutingAlgorithm::kRankTopK)) {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": granularity rank goes with routing algorithm rank_topk"));
  }
  if (h.router_type == RouterType::kImplicitA && !h.rank_granular) {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": router type implicit_A needs granularity rank"));
  }
  if (h.select_bias && !h.rank_granular) {
    return absl::InvalidArgumentError(absl::StrCat(
        gctx, ": router.select_bias applies to rank-granular groups (FlyLoRA, SMoRA) only"));
  }
  if (h.router_bias && h.router_type != RouterType::kLinear) {
    return absl::InvalidArgumentError(absl::StrCat(gctx, ": router.bias needs a linear router"));
  }
  for (double e : h.router_type == RouterType::kMixture ? h.num_experts : std::vector<double>{}) {
    if (e > kernels::kMaxRouteWidth) {
      return absl::InvalidArgumentError(absl::StrCat(gctx, ": a mixture router routes at most ",
                                                     kernels::kMaxRouteWidth, " experts, not ", e));
    }
  }
  if (h.router_type == RouterType::kOutputGate &&
      (h.rank_granular || h.scope != "module" ||
       (h.routing.algorithm != RoutingAlgorithm::kSoft &&
        h.routing.algorithm != RoutingAlgorithm::kTopK))) {
    return absl::InvalidArgumentError(absl::StrCat(
        gctx,
        ": an output_gate router needs scope module, granularity lora and routing soft (or "
        "topk: keep the k largest gates, renormalised)"));
  }
  if (h.router_type == RouterType::kMixture &&
      (h.rank_granular || h.routing.temperature != 1.0f || h.routing.prob_temperature != 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx,
                     ": a mixture router needs granularity lora and routing temperature 1 (its "
                     "probabilities are mixed, not its logits)"));
  }
  return h;
}

absl::Status MoleLoader::CheckRank(const GroupHeader& h, int32_t layer, int32_t have,
                                   const std::string& tensor) {
  if (h.rank[layer] != 0 && h.rank[layer] != have) {
    return absl::InvalidArgumentError(absl::StrCat(h.ctx, ": rank ", h.rank[layer], " at layer ",
                                                   layer, " but tensor '", tensor, "' has rank ",
                                                   have));
  }
  return absl::OkStatus();
}

absl::Status MoleLoader::BlockFfnSites(const GroupHeader& h, int32_t group_index, GroupInfo* info) {
  const std::string& gctx = h.ctx;
  if (h.rank_granular ||
      (h.router_type != RouterType::kLinear && h.router_type != RouterType::kMixture)) {
    return absl::InvalidArgumentError(
        absl::StrCat(gctx, ": block_ffn needs granularity lora and a linear or mixture router"));
  }
  for (LinearModule m : h.targets.modules) {
    if (m != LinearModule::kGate && m != LinearModule::kUp && m != LinearModule::kDown) {
      return absl::InvalidArgumentError(
          absl::StrCat(gctx, ": block_ffn targets only gate_proj, up_proj and down_proj, not ",
                       LinearModuleName(m)));
    }
  }
  for (int32_t l : h.targets.layers) {
    AdapterLayer& layer = adapter_.layers[l];
    if (layer.block_ffn) {
      return absl::InvalidArgumentError(
          absl::StrCat(gctx, ": layer ", l, " already has a block_ffn group"));
    }
    for (LinearModule m : {LinearModule::kGate, LinearModule::kUp, LinearModule::kDown}) {
      if (layer.routed[static_cast<int>(m)]) {
        return absl::InvalidArgumentError(absl::StrCat(
            gctx, ": layer ", l, " ", LinearModuleName(m), " already has a routed group"));
      }
    }
    ASSIGN_OR_RETURN(int32_t e, CheckedCount(h.num_experts[l], 1, limits_.max_experts,
                                             absl::StrCat(gctx, ".num_experts[", l, "]")));
    BlockFfn ffn;
    ffn.group = group_index;
    ffn.num_experts = e;
    ffn.routing = h.routing;
    ffn.routing.k = h.k_per_layer[l];
    absl::Status valid = ValidateRoutingSpec(ffn.routing, e);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(gctx, " layer ", l, ": ", valid.message()));
    }
    const std::string prefix = absl::StrCat("groups.", h.id, ".layers.", l);
    ASSIGN_OR_RETURN(ffn.router,
                     ReadRouter(tensors_, prefix + ".router", e, base_.hidden_size, h.router_bias,
                                h.select_bias, /*has_weight=*/true, h.mixture));
    for (LinearModule m : h.targets.modules) {
      const auto [in, out] = LinearModuleShape(base_, m);
      const std::string mp = absl::StrCat(prefix, ".", LinearModuleName(m));
      ASSIGN_OR_RETURN(LoraStack stack, ReadLoraStack(tensors_, mp + ".A", mp + ".B",
                                                      /*stacked=*/true, in, out, limits_));
      if (stack.num_experts != e) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", mp, ".A' stacks ", stack.num_experts, " experts, the group has ", e));
      }
      RETURN_IF_ERROR(CheckRank(h, l, stack.rank, mp + ".A"));
      stack.scale.assign(e, h.scale[l]);
      RETURN_IF_ERROR(ReadScaleOverride(tensors_, mp + ".scale", &stack));
      info->ranks.push_back(stack.rank);
      ++info->num_modules;
      ffn.lora[static_cast<int>(m) - static_cast<int>(LinearModule::kGate)] = std::move(stack);
    }
    info->max_experts = std::max(info->max_experts, e);
    info->min_experts = std::min(info->min_experts, e);
    layer.block_ffn = std::move(ffn);
  }
  return absl::OkStatus();
}

absl::Status MoleLoader::ModuleSites(const GroupHeader& h, int32_t group_index, GroupInfo* info) {
  const std::string& gctx = h.ctx;
  for (int32_t l : h.targets.layers) {
    for (LinearModule m : h.targets.modules) {
      AdapterLayer& layer = adapter_.layers[l];
      const int mi = static_cast<int>(m);
      if (layer.routed[mi] || (layer.block_ffn && m >= LinearModule::kGate)) {
        return absl::InvalidArgumentError(absl::StrCat(
            gctx, ": layer ", l, " ", LinearModuleName(m), " already has a routed group"));
      }
      const auto [in, out] = LinearModuleShape(base_, m);
      const std::string mp = absl::StrCat("groups.", h.id, ".layers.", l, ".", LinearModuleName(m));
      RoutedModule rm;
      rm.group = group_index;
      rm.router_type = h.router_type;
      rm.rank_granular = h.rank_granular;
      rm.select_on_abs = h.select_on_abs;
      ASSIGN_OR_RETURN(rm.experts, ReadLoraStack(tensors_, mp + ".A", mp + ".B",
                                                 /*stacked=*/true, in, out, limits_));
      const int32_t e = rm.experts.num_experts;
      ASSIGN_OR_RETURN(int32_t want_e, CheckedCount(h.num_experts[l], 1, limits_.max_experts,
                                                    absl::StrCat(gctx, ".num_experts[", l, "]")));
      if (e != want_e || (h.rank_granular && e != 1)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", mp, ".A' stacks ", e,
                                                       " experts, the group has ",
                                                       h.rank_granular ? 1 : want_e));
      }
      RETURN_IF_ERROR(CheckRank(h, l, rm.experts.rank, mp + ".A"));
      rm.experts.scale.assign(e, h.scale[l]);
      RETURN_IF_ERROR(ReadScaleOverride(tensors_, mp + ".scale", &rm.experts));
      if (h.xlora_group) {
        const std::string key = absl::StrCat("layers.", l, ".", LinearModuleName(m));
        auto it = module_index_.find(key);
        if (it == module_index_.end()) {
          return absl::InvalidArgumentError(
              absl::StrCat("xlora.module_index has no entry '", key, "'"));
        }
        if (e != adapter_.xlora->num_adapters) {
          return absl::InvalidArgumentError(
              absl::StrCat("tensor '", mp, ".A' stacks ", e, " experts; X-LoRA has ",
                           adapter_.xlora->num_adapters, " adapters"));
        }
        rm.xlora_index = it->second;
        xlora_indices_used_.insert(it->second);
        const Json& g = *h.json;
        if (auto tr = g.find("true_ranks"); tr != g.end() && !tr->is_null()) {
          if (!tr->is_array() || tr->size() != static_cast<size_t>(e)) {
            return absl::InvalidArgumentError(
                absl::StrCat(gctx, ": true_ranks must list one rank per expert (", e, ")"));
          }
          for (int32_t i = 0; i < e; ++i) {
            const Json& v = (*tr)[i];
            if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
                v.get<int64_t>() > rm.experts.rank) {
              return absl::InvalidArgumentError(
                  absl::StrCat(gctx, ": true_ranks[", i, "] must be in 0..", rm.experts.rank));
            }
            rm.experts.true_rank[i] = v.get<int32_t>();
          }
        }
      } else {
        rm.routing = h.routing;
        rm.routing.k = h.k_per_layer[l];
        const int32_t rows = h.rank_granular ? rm.experts.rank : e;
        absl::Status valid = ValidateRoutingSpec(rm.routing, rows);
        if (!valid.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat(gctx, " layer ", l, " ", LinearModuleName(m), ": ", valid.message()));
        }
        // An output gate reads the concatenated outputs of the E experts: [E, E * out].
        const int64_t router_in = h.router_type == RouterType::kOutputGate ? int64_t{e} * out : in;
        ASSIGN_OR_RETURN(
            rm.router,
            ReadRouter(tensors_, mp + ".router", rows, router_in, h.router_bias, h.select_bias,
                       h.router_type == RouterType::kLinear || h.mixture > 0 ||
                           h.router_type == RouterType::kOutputGate,
                       h.mixture));
      }
      info->ranks.push_back(rm.experts.rank);
      info->max_experts = std::max(info->max_experts, e);
      info->min_experts = std::min(info->min_experts, e);
      ++info->num_modules;
      layer.routed[mi] = std::move(rm);
    }
  }
  return absl::OkStatus();
}

absl::Status MoleLoader::RoutedGroups(const Json& cfg) {
  auto gs = cfg.find("routed_groups");
  if (gs == cfg.end() || gs->is_null()) return absl::OkStatus();
  if (!gs->is_array()) {
    return absl::InvalidArgumentError(std::string(kCtx) + ": 'routed_groups' must be a list");
  }
  for (size_t gi = 0; gi < gs->size(); ++gi) {
    ASSIGN_OR_RETURN(GroupHeader h, ParseGroupHeader((*gs)[gi], gi));
    GroupInfo info{
        .id = h.id,
        .scope = h.scope,
        .granularity = h.granularity,
        .algorithm = h.xlora_group ? "xlora" : RoutingAlgorithmName(h.routing.algorithm)};
    info.min_experts = 1 << 30;
    const int32_t group_index = static_cast<int32_t>(adapter_.groups.size());
    if (h.scope == "block_ffn") {
      RETURN_IF_ERROR(BlockFfnSites(h, group_index, &info));
    } else if (h.scope == "module" || h.xlora_group) {
      RETURN_IF_ERROR(ModuleSites(h, group_index, &info));
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          h.ctx, ": scope '", h.scope, "' is not module, block_ffn or model_scalings"));
    }
    std::sort(info.ranks.begin(), info.ranks.end());
    info.ranks.erase(std::unique(info.ranks.begin(), info.ranks.end()), info.ranks.end());
    if (info.min_experts > info.max_experts) info.min_experts = info.max_experts;
    adapter_.groups.push_back(std::move(info));
  }
  return absl::OkStatus();
}

absl::Status MoleLoader::Finish() {
  if (adapter_.xlora && xlora_indices_used_.empty()) {
    return absl::InvalidArgumentError(
        "an 'xlora' block needs a routed group with scope model_scalings");
  }
  RETURN_IF_ERROR(CheckAllTensorsUsed(tensors_));
  if (adapter_.groups.empty()) {
    return absl::InvalidArgumentError(std::string(kCtx) + ": no static_loras and no routed_groups");
  }
  ComputeAdapterBytes(&adapter_);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Adapter>> LoadMoleDirectory(const std::string& dir,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits) {
  ASSIGN_OR_RETURN(Json cfg,
                   aj::ParseFile((std::filesystem::path(dir) / "mole_config.json").string()));
  const std::string ctx = "mole_config.json";
  ASSIGN_OR_RETURN(std::string format, aj::String(cfg, "format", std::nullopt, ctx));
  ASSIGN_OR_RETURN(int64_t version, aj::Int(cfg, "format_version", std::nullopt, ctx));
  if (format != "mole" || version != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(ctx, ": format '", format, "' version ", version, " is not mole/1"));
  }
  RETURN_IF_ERROR(CheckBaseModel(cfg, base, ctx));
  ASSIGN_OR_RETURN(std::vector<std::string> files, ListSafetensors(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<TensorSet> tensors, TensorSet::Open(files));
  RETURN_IF_ERROR(CheckAdapterSize(*tensors, limits));

  auto adapter = std::make_unique<Adapter>();
  adapter->format = "mole/1";
  ASSIGN_OR_RETURN(adapter->source_family, aj::String(cfg, "source_family", "mole", ctx));
  adapter->layers.resize(base.num_layers);
  MoleLoader loader(base, limits, tensors.get(), adapter.get());
  RETURN_IF_ERROR(loader.StaticLoras(cfg));
  RETURN_IF_ERROR(loader.Xlora(cfg));  // before the groups that refer to it
  RETURN_IF_ERROR(loader.RoutedGroups(cfg));
  RETURN_IF_ERROR(loader.Finish());
  return adapter;
}

}  // namespace moleserve::engine
