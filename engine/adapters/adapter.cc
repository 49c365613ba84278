#include "engine/adapters/adapter.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engine/adapters/loaders.h"
#include "engine/core/quote.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

constexpr const char* kModuleNames[kNumLinearModules] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

}  // namespace

const char* LinearModuleName(LinearModule m) { return kModuleNames[static_cast<int>(m)]; }

std::optional<LinearModule> ParseLinearModule(std::string_view name) {
  for (int i = 0; i < kNumLinearModules; ++i) {
    if (name == kModuleNames[i]) return static_cast<LinearModule>(i);
  }
  return std::nullopt;
}

std::span<const LinearModule> ProjectionModules(Projection p) {
  static constexpr LinearModule kQkv[] = {LinearModule::kQ, LinearModule::kK, LinearModule::kV};
  static constexpr LinearModule kGateUp[] = {LinearModule::kGate, LinearModule::kUp};
  return p == Projection::kQkv ? std::span<const LinearModule>(kQkv)
                               : std::span<const LinearModule>(kGateUp);
}

std::optional<Projection> ProjectionOf(LinearModule m) {
  switch (m) {
    case LinearModule::kQ:
    case LinearModule::kK:
    case LinearModule::kV:
      return Projection::kQkv;
    case LinearModule::kGate:
    case LinearModule::kUp:
      return Projection::kGateUp;
    default:
      return std::nullopt;
  }
}

int64_t ProjectionColumn(const ModelConfig& c, LinearModule m) {
  const std::optional<Projection> p = ProjectionOf(m);
  if (!p) return 0;
  int64_t column = 0;
  for (LinearModule before : ProjectionModules(*p)) {
    if (before == m) break;
    column += LinearModuleShape(c, before)[1];
  }
  return column;
}

int64_t ProjectionWidth(const ModelConfig& c, Projection p) {
  int64_t width = 0;
  for (LinearModule m : ProjectionModules(p)) width += LinearModuleShape(c, m)[1];
  return width;
}

std::array<int64_t, 2> LinearModuleShape(const ModelConfig& c, LinearModule m) {
  const int64_t h = c.hidden_size;
  const int64_t q = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv = int64_t{c.num_kv_heads} * c.head_dim;
  switch (m) {
    case LinearModule::kQ:
      return {h, q};
    case LinearModule::kK:
    case LinearModule::kV:
      return {h, kv};
    case LinearModule::kO:
      return {q, h};
    case LinearModule::kGate:
    case LinearModule::kUp:
      return {h, c.intermediate_size};
    case LinearModule::kDown:
      return {c.intermediate_size, h};
  }
  return {0, 0};
}

int64_t LoraStack::bytes() const {
  return static_cast<int64_t>((a.size() + bt.size() + scale.size()) * sizeof(float));
}

int64_t Adapter::num_experts() const {
  int64_t n = 0;
  for (const AdapterLayer& layer : layers) {
    for (const auto& statics : layer.statics) n += static_cast<int64_t>(statics.size());
    for (const auto& routed : layer.routed) {
      if (routed) n += routed->rank_granular ? routed->experts.rank : routed->experts.num_experts;
    }
    if (layer.block_ffn) n += layer.block_ffn->num_experts;
  }
  return n;
}

absl::Status ValidateRoutingOverride(const Adapter& adapter, const RoutingOverride& ov) {
  if (ov.empty()) return absl::OkStatus();
  bool any = false;
  for (size_t l = 0; l < adapter.layers.size(); ++l) {
    const AdapterLayer& layer = adapter.layers[l];
    auto check = [&](const RoutingSpec& spec, int32_t n, const char* where) -> absl::Status {
      any = true;
      absl::StatusOr<RoutingSpec> s = ApplyRoutingOverride(spec, ov, n);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("routing override for adapter ",
                                                       Quote(adapter.name), ", layer ", l, " ",
                                                       where, ": ", s.status().message()));
      }
      return absl::OkStatus();
    };
    for (int m = 0; m < kNumLinearModules; ++m) {
      const auto& r = layer.routed[m];
      if (!r || r->router_type == RouterType::kXloraRef) continue;
      RETURN_IF_ERROR(check(r->routing, r->rank_granular ? r->experts.rank : r->experts.num_experts,
                            LinearModuleName(static_cast<LinearModule>(m))));
    }
    if (layer.block_ffn) {
      RETURN_IF_ERROR(check(layer.block_ffn->routing, layer.block_ffn->num_experts, "ffn"));
    }
  }
  if (!ov.disabled_experts.empty()) {
    bool gated = false;
    for (const AdapterLayer& layer : adapter.layers) {
      for (const auto& r : layer.routed) {
        if (!r || r->router_type != RouterType::kOutputGate) continue;
        gated = true;
        const int32_t n = r->experts.num_experts;
        std::vector<bool> off(n, false);
        for (int32_t e : ov.disabled_experts) {
          if (e < 0 || e >= n) {
            return absl::InvalidArgumentError(
                absl::StrCat("routing.disabled_experts: ", e, " is not an expert of adapter ",
                             Quote(adapter.name), " (it has ", n, ")"));
          }
          off[e] = true;
        }
        if (std::count(off.begin(), off.end(), false) == 0) {
          return absl::InvalidArgumentError("routing.disabled_experts turns every expert off");
        }
      }
    }
    if (!gated) {
      return absl::InvalidArgumentError(absl::StrCat(
          "routing.disabled_experts applies to output-gated groups (router type output_gate); "
          "adapter ",
          Quote(adapter.name), " has none"));
    }
  }
  if (!any) {
    return absl::InvalidArgumentError(absl::StrCat(
        "routing override: adapter ", Quote(adapter.name), " has no router to override",
        adapter.is_xlora() ? " (X-LoRA scalings come from its classifier)" : ""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const Adapter>> LoadAdapter(const std::string& dir,
                                                           const std::string& name,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("adapter ", Quote(name), ": ", dir, " is not a directory"));
  }
  absl::StatusOr<std::unique_ptr<Adapter>> adapter;
  if (fs::exists(fs::path(dir) / "mole_config.json", ec)) {
    adapter = LoadMoleDirectory(dir, base, limits);
  } else if (fs::exists(fs::path(dir) / "adapter_config.json", ec)) {
    adapter = LoadPeftDirectory(dir, base, limits);
  } else {
    return absl::NotFoundError(absl::StrCat("adapter ", Quote(name), ": ", dir,
                                            " has neither mole_config.json (mole/1) nor "
                                            "adapter_config.json (PEFT LoRA)"));
  }
  if (!adapter.ok()) {
    return absl::Status(adapter.status().code(), absl::StrCat("adapter ", Quote(name), " (", dir,
                                                              "): ", adapter.status().message()));
  }
  (*adapter)->name = name;
  if ((*adapter)->bytes > limits.max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("adapter ", Quote(name), ": ", (*adapter)->bytes,
                                                   " bytes exceed the limit of ",
                                                   limits.max_bytes));
  }
  return std::shared_ptr<const Adapter>(std::move(*adapter));
}

}  // namespace moleserve::engine
