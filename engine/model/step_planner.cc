#include "engine/model/step_planner.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <tuple>

#include "absl/base/casts.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {

namespace {

// Most routed (adapter, override) parts a planned pass holds (PlanPass).
constexpr int64_t kMaxPlannedRoutedAdapters = 8;
// Most bytes of block-FFN scratch (decision slots) a planned pass may use.
constexpr int64_t kMaxPlannedBlockBytes = int64_t{256} << 20;

int32_t NextPow2(int32_t v) {
  int32_t p = 1;
  while (p < v) p *= 2;
  return p;
}

}  // namespace

StepPlanner::StepPlanner(Backend* backend, const ModelConfig& config, ExpertCache* cache,
                         StepRecords* records)
    : backend_(backend),
      config_(config),
      cache_(cache),
      records_(records),
      dt_(backend->compute_dtype()),
      es_(static_cast<int64_t>(ScalarTypeSize(dt_))) {}

absl::Status StepPlanner::Grow(DeviceBuffer* buf, size_t bytes) {
  if (buf->bytes() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(*buf, backend_->Allocate(std::max(bytes, buf->bytes() * 2)));
  return absl::OkStatus();
}

void StepPlanner::End() {
  for (const auto& [stack, expert] : plan_.pins) cache_->Release(stack, expert);
  plan_ = StepPlan();
}

float* StepPlanner::xlora_table(int32_t slot) const {
  for (const auto& [s, table] : plan_.xlora_tables) {
    if (s == slot) return table;
  }
  return nullptr;
}

std::vector<int32_t> StepPlanner::routed_slots() const {
  std::vector<int32_t> slots;
  auto add = [&](int32_t slot) {
    if (std::find(slots.begin(), slots.end(), slot) == slots.end()) slots.push_back(slot);
  };
  for (const StepPlan::Routed& r : plan_.routed) add(r.slot);
  for (const StepPlan::Block& b : plan_.blocks) add(b.slot);
  return slots;
}

absl::StatusOr<bool> StepPlanner::Plan(const std::vector<PassAdapter>& adapters, int64_t t,
                                       const PassInputs& inputs) {
  End();
  std::vector<int32_t> slots;
  std::vector<const AttachedAdapter*> atts;
  int32_t max_rank = 0, max_experts = 0, routed_rank = 0;
  int32_t block_experts = 0, block_rank = 0;  // over the block-routed FFNs (MixLoRA)
  for (const PassAdapter& pa : adapters) {
    const AttachedAdapter& att = *pa.att;
    const Adapter& a = *att.adapter;
    for (const AdapterLayer& layer : a.layers) {
      if (layer.block_ffn) {
        const BlockFfn& ffn = *layer.block_ffn;
        if (ffn.num_experts > kernels::kMaxRouteWidth ||
            !ToRouteParams(ffn.routing, ffn.num_experts).ok()) {
          return false;
        }
        block_experts = std::max(block_experts, ffn.num_experts);
        for (const auto& lora : ffn.lora) {
          if (lora) block_rank = std::max(block_rank, lora->rank);
        }
      }
      for (int mi = 0; mi < kNumLinearModules; ++mi) {
        if (layer.statics[mi].size() > 1) return false;
        if (!layer.statics[mi].empty()) max_rank = std::max(max_rank, layer.statics[mi][0].rank);
        if (!layer.routed[mi]) continue;
        const RoutedModule& rm = *layer.routed[mi];
        if (rm.rank_granular) {  // FlyLoRA (no router) or SMoRA (linear router) over r ranks
          const int32_t r = rm.experts.rank;
          if (rm.experts.num_experts != 1 || rm.router_type == RouterType::kXloraRef ||
              !ToRankRouteParams(rm.routing, r, rm.select_on_abs).ok()) {
            return false;
          }
          max_experts = std::max(max_experts, r);
          routed_rank = std::max(routed_rank, r);
          continue;
        }
        const bool xlora = rm.router_type == RouterType::kXloraRef && a.xlora;
        if (rm.experts.num_experts > kernels::kMaxRouteWidth ||
            (!xlora &&
             ((rm.router_type != RouterType::kLinear && rm.router_type != RouterType::kMixture) ||
              !ToRouteParams(rm.routing, rm.experts.num_experts).ok()))) {
          return false;
        }
        max_experts = std::max(max_experts, rm.experts.num_experts);
        routed_rank = std::max(routed_rank, rm.experts.rank);
      }
    }
    slots.push_back(pa.slot);
    atts.push_back(&att);
  }
  const int32_t s_count = NextPow2(static_cast<int32_t>(slots.size()));
  const int32_t v = NextPow2(std::max(max_rank, 1));
  const int64_t sites = int64_t{config_.num_layers} * kNumLinearModules;

  // Host image of the tables, laid out as on the device (8-byte aligned parts): shared pair
  // tokens, segment starts, identity rows and per-adapter token masks; per site the static
  // tables; per routed group its scales and row tables.
  struct Layout {
    int64_t bytes = 0;
    int64_t Take(int64_t b) {
      const int64_t at = bytes;
      bytes += (b + 7) / 8 * 8;
      return at;
    }
  } layout;
  const int64_t pair_token_at = layout.Take(t * 4);
  const int64_t seg_start_at = layout.Take((s_count + 1) * 4);
  const int64_t identity_at = layout.Take(t * 4);
  const int64_t token_pair_at = layout.Take(t * 4);
  const int64_t token_count_at = layout.Take(t * 4);
  const int64_t masks_at = layout.Take(int64_t{s_count} * t * 4);
  struct SiteAt {
    int64_t weight, rank, off, a_rows, b_rows;
  };
  std::vector<SiteAt> site_at(sites);
  for (SiteAt& at : site_at) {
    at.weight = layout.Take(t * 4);
    at.rank = layout.Take(s_count * 4);
    at.off = layout.Take(s_count * 8);
    at.a_rows = layout.Take(int64_t{s_count} * v * 8);
    at.b_rows = layout.Take(int64_t{s_count} * v * 8);
  }
  // Per (layer, projection) with some static LoRA among its modules: the fused shrink's ranks,
  // row offsets and row tables (StepPlan::Fused).
  struct FusedAt {
    int64_t rank = -1, off = -1, a_rows = -1;
  };
  const int64_t fused_count = int64_t{config_.num_layers} * kNumProjections;
  std::vector<FusedAt> fused_at(fused_count);
  bool any_fused = false;
  for (int64_t f = 0; f < fused_count; ++f) {
    const int32_t layer = static_cast<int32_t>(f / kNumProjections);
    const auto modules = ProjectionModules(static_cast<Projection>(f % kNumProjections));
    const bool has_static = std::any_of(atts.begin(), atts.end(), [&](const AttachedAdapter* a) {
      return std::any_of(modules.begin(), modules.end(), [&](LinearModule m) {
        return !a->adapter->layers[layer].statics[static_cast<int>(m)].empty();
      });
    });
    if (!has_static) continue;
    any_fused = true;
    fused_at[f] = {layout.Take(s_count * 4), layout.Take(s_count * 8),
                   layout.Take(int64_t{s_count} * static_cast<int64_t>(modules.size()) * v * 8)};
  }
  // The padding rows' zeros, allocated once (Allocate zeroes) and never moved.
  if (any_fused && zero_row_.bytes() == 0) {
    absl::StatusOr<DeviceBuffer> zeros = backend_->Allocate(config_.hidden_size * es_);
    if (!zeros.ok()) {
      if (absl::IsResourceExhausted(zeros.status())) return false;  // runs unplanned
      return zeros.status();
    }
    zero_row_ = std::move(*zeros);
  }
  struct RoutedAt {
    int64_t scale, a_rows, b_rows;
    // Rank groups: per-token weights [T], selection bias [r], one segment's start [2], rank
    // and row offset.
    int64_t weight = -1, bias = -1, seg_start = -1, seg_rank = -1, seg_off = -1;
  };
  // X-LoRA adapters: the scalings of the step's tokens, [T, C] fp32 (C = the classifier's
  // width), read by every module of the adapter.
  std::vector<int64_t> xlora_at(atts.size(), -1);
  for (size_t j = 0; j < atts.size(); ++j) {
    const auto& xs = atts[j]->adapter->xlora;
    if (xs) xlora_at[j] = layout.Take(t * xs->classifier.back().out * 4);
  }
  // Each adapter's tokens by routing override (PassInputs): its routed groups and block FFNs
  // route each part with the part's spec under the part's mask (X-LoRA modules take no
  // override: they route the adapter's tokens at once).
  struct Part {
    int32_t adapter;
    int32_t override_index;  // -1: none
    int64_t mask_at;         // the adapter's mask when the part is all its tokens
  };
  std::vector<Part> parts;
  std::vector<std::vector<int32_t>> parts_of(atts.size());
  plan_.part_tokens.clear();
  for (size_t j = 0; j < atts.size(); ++j) {
    std::map<int32_t, std::vector<int32_t>> by_override;
    for (int32_t tok : *adapters[j].tokens) {
      const int32_t o = inputs.override_index == nullptr ? -1 : (*inputs.override_index)[tok];
      by_override[o].push_back(tok);
    }
    for (auto& [o, tokens] : by_override) {
      const bool whole = by_override.size() == 1;
      parts_of[j].push_back(static_cast<int32_t>(parts.size()));
      parts.push_back(
          {static_cast<int32_t>(j), o,
           whole ? masks_at + int64_t{static_cast<int32_t>(j)} * t * 4 : layout.Take(t * 4)});
      plan_.part_tokens.push_back(std::move(tokens));
    }
  }
  // The part's spec (the override applied; validated when the request was submitted).
  auto part_spec = [&](int32_t part, const RoutingSpec& base,
                       int32_t width) -> absl::StatusOr<RoutingSpec> {
    const int32_t o = parts[part].override_index;
    if (o < 0) return base;
    return ApplyRoutingOverride(base, (*inputs.overrides)[o], width);
  };
  auto override_key = [&](int32_t part) -> std::array<int64_t, 3> {
    const int32_t o = parts[part].override_index;
    if (o < 0) return {-1, -1, -1};
    const RoutingOverride& ov = (*inputs.overrides)[o];
    return {ov.algorithm ? static_cast<int64_t>(*ov.algorithm) : -1, ov.k ? *ov.k : -1,
            ov.p ? static_cast<int64_t>(absl::bit_cast<uint32_t>(*ov.p)) : -1};
  };
  std::vector<StepPlan::Routed> routed;
  std::vector<RoutedAt> routed_at;
  plan_.routed_of_site.assign(sites, {});
  for (int64_t site = 0; site < sites; ++site) {
    const int32_t layer = static_cast<int32_t>(site / kNumLinearModules);
    const int mi = static_cast<int>(site % kNumLinearModules);
    for (size_t j = 0; j < atts.size(); ++j) {
      const auto& r = atts[j]->adapter->layers[layer].routed[mi];
      if (!r) continue;
      const auto& xs = atts[j]->adapter->xlora;
      // The scaling pass with scaling_pass_value 0 is exactly the base model.
      if (xs && inputs.scaling_pass && xs->scaling_pass_value == 0.0f) continue;
      const int32_t e = r->experts.num_experts, rank = r->experts.rank;
      // X-LoRA modules: one entry for the adapter's tokens; others: one per override part.
      std::vector<int32_t> entry_parts = xs ? std::vector<int32_t>{-1} : parts_of[j];
      for (int32_t part : entry_parts) {
        plan_.routed_of_site[site].push_back(static_cast<int32_t>(routed.size()));
        StepPlan::Routed entry;
        entry.layer = layer;
        entry.module = static_cast<LinearModule>(mi);
        entry.slot_index = static_cast<int32_t>(j);
        entry.slot = slots[j];
        entry.rm = &*r;
        entry.att = atts[j];
        entry.part = part;
        if (xs) entry.xlora_cols = xs->classifier.back().out;
        if (part >= 0) {
          absl::StatusOr<RoutingSpec> spec =
              part_spec(part, r->routing, r->rank_granular ? rank : e);
          if (!spec.ok()) return false;  // refused at submission; never here
          entry.spec = *spec;
          entry.override_key = override_key(part);
        }
        routed.push_back(entry);
        routed_at.push_back({layout.Take(e * 4), layout.Take(int64_t{e} * rank * 8),
                             layout.Take(int64_t{e} * rank * 8)});
        if (r->rank_granular) {
          RoutedAt& at = routed_at.back();
          at.weight = layout.Take(t * 4);
          at.bias = layout.Take(rank * 4);
          at.seg_start = layout.Take(2 * 4);
          at.seg_rank = layout.Take(4);
          at.seg_off = layout.Take(8);
        }
      }
    }
  }
  // Block-routed FFNs (MixLoRA): per (adapter, layer, part) the gate/up/down stacks' scales and row
  // tables; shared: per-slot ones and identity [T * Eb], the weighted sums' rows T + t, and per
  // layer with blocks each token's row of the extended activations.
  struct BlockAt {
    std::array<int64_t, 3> scale{-1, -1, -1}, a_rows{-1, -1, -1}, b_rows{-1, -1, -1};
    int64_t slot_token = -1;
  };
  std::vector<StepPlan::Block> blocks;
  std::vector<BlockAt> block_at;
  plan_.blocks_of_layer.assign(config_.num_layers, {});
  std::vector<int64_t> select_at(config_.num_layers, -1);
  const int64_t eb = std::max(block_experts, 1);
  int64_t ones_at = -1, slots_at = -1, z_rows_at = -1;
  if (block_experts > 0) {
    ones_at = layout.Take(t * eb * 4);
    slots_at = layout.Take(t * eb * 4);
    z_rows_at = layout.Take(t * 4);
  }
  for (int32_t layer = 0; layer < config_.num_layers && block_experts > 0; ++layer) {
    for (size_t j = 0; j < atts.size(); ++j) {
      const auto& ffn = atts[j]->adapter->layers[layer].block_ffn;
      if (!ffn) continue;
      if (select_at[layer] < 0) select_at[layer] = layout.Take(t * 4);
      for (int32_t part : parts_of[j]) {
        StepPlan::Block entry;
        entry.layer = layer;
        entry.slot_index = static_cast<int32_t>(j);
        entry.slot = slots[j];
        entry.position = static_cast<int32_t>(plan_.blocks_of_layer[layer].size());
        entry.ffn = &*ffn;
        entry.att = atts[j];
        entry.part = part;
        absl::StatusOr<RoutingSpec> spec = part_spec(part, ffn->routing, ffn->num_experts);
        if (!spec.ok()) return false;  // refused at submission; never here
        entry.spec = *spec;
        entry.override_key = override_key(part);
        plan_.blocks_of_layer[layer].push_back(static_cast<int32_t>(blocks.size()));
        BlockAt at;
        at.slot_token = layout.Take(t * ffn->num_experts * 4);
        for (int i = 0; i < 3; ++i) {
          if (!ffn->lora[i]) continue;
          const int64_t rows = int64_t{ffn->num_experts} * ffn->lora[i]->rank;
          at.scale[i] = layout.Take(ffn->num_experts * 4);
          at.a_rows[i] = layout.Take(rows * 8);
          at.b_rows[i] = layout.Take(rows * 8);
        }
        blocks.push_back(entry);
        block_at.push_back(at);
      }
    }
  }
  int32_t block_positions = 0;  // most block FFNs at one layer
  for (const auto& of_layer : plan_.blocks_of_layer) {
    block_positions = std::max(block_positions, static_cast<int32_t>(of_layer.size()));
  }
  // A pass with adapters but nothing to apply (an X-LoRA scaling pass with scaling_pass_value 0)
  // is planned too: its modules issue nothing.
  // Each routed part routes every token of the step under its mask: bounded so that the router
  // work stays a small multiple of what gathering the adapter's tokens costs.
  std::vector<uint8_t> routes(parts.size() + atts.size(), 0);  // parts, then whole adapters
  for (const StepPlan::Routed& entry : routed) {
    routes[entry.part >= 0 ? entry.part : parts.size() + entry.slot_index] = 1;
  }
  for (const StepPlan::Block& entry : blocks) routes[entry.part] = 1;
  if (std::count(routes.begin(), routes.end(), 1) > kMaxPlannedRoutedAdapters) return false;
  plan_host_.assign(layout.bytes, 0);
  char* h = plan_host_.data();
  auto* pair_token = reinterpret_cast<int32_t*>(h + pair_token_at);
  auto* seg_start = reinterpret_cast<int32_t*>(h + seg_start_at);
  auto* identity = reinterpret_cast<int32_t*>(h + identity_at);
  auto* masks = reinterpret_cast<int32_t*>(h + masks_at);
  auto* token_pair = reinterpret_cast<int32_t*>(h + token_pair_at);
  auto* token_count = reinterpret_cast<int32_t*>(h + token_count_at);
  for (int64_t i = 0; i < t; ++i) identity[i] = static_cast<int32_t>(i);
  int64_t pairs = 0;
  int32_t j = 0;
  for (const PassAdapter& pa : adapters) {
    seg_start[j] = static_cast<int32_t>(pairs);
    for (int32_t tok : *pa.tokens) {
      token_pair[tok] = static_cast<int32_t>(pairs);
      token_count[tok] = 1;
      pair_token[pairs++] = tok;
      masks[int64_t{j} * t + tok] = 1;
    }
    ++j;
  }
  for (; j <= s_count; ++j) seg_start[j] = static_cast<int32_t>(pairs);
  for (size_t part = 0; part < parts.size(); ++part) {
    auto* mask = reinterpret_cast<int32_t*>(h + parts[part].mask_at);
    for (int32_t tok : plan_.part_tokens[part]) mask[tok] = 1;
  }
  if (block_experts > 0) {
    std::fill_n(reinterpret_cast<float*>(h + ones_at), t * eb, 1.0f);
    auto* slot_ids = reinterpret_cast<int32_t*>(h + slots_at);
    for (int64_t p = 0; p < t * eb; ++p) slot_ids[p] = static_cast<int32_t>(p);
    auto* z_rows = reinterpret_cast<int32_t*>(h + z_rows_at);
    for (int64_t i = 0; i < t; ++i) z_rows[i] = static_cast<int32_t>(t + i);
  }
  for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
    if (select_at[layer] < 0) continue;
    // Row t of the extended activations [base SwiGLU (T rows); weighted sums (T rows)].
    auto* select = reinterpret_cast<int32_t*>(h + select_at[layer]);
    for (int64_t i = 0; i < t; ++i) select[i] = static_cast<int32_t>(i);
    for (int32_t b : plan_.blocks_of_layer[layer]) {
      for (int32_t tok : *adapters[blocks[b].slot_index].tokens) {
        select[tok] = static_cast<int32_t>(t + tok);
      }
    }
  }

  // Pin every expert of the pass and fill the tables; when they do not all fit, no plan.
  auto pin = [&](const LoraStack* stack, int32_t expert, std::vector<const void*>* a,
                 std::vector<const void*>* b) -> absl::StatusOr<bool> {
    absl::Status pinned = cache_->Acquire(stack, expert, a, b);
    if (absl::IsResourceExhausted(pinned)) return false;
    RETURN_IF_ERROR(pinned);
    plan_.pins.push_back({stack, expert});
    return true;
  };
  // No plan: nothing stays pinned; running out of memory only means the pass runs eagerly.
  auto give_up = [&](absl::StatusOr<bool> why) -> absl::StatusOr<bool> {
    End();
    if (!why.ok() && absl::IsResourceExhausted(why.status())) return false;
    return why;
  };
  plan_.site_used.assign(sites, 0);
  std::vector<const void*> a_rows, b_rows;
  for (int64_t site = 0; site < sites; ++site) {
    const SiteAt& at = site_at[site];
    auto* weight = reinterpret_cast<float*>(h + at.weight);
    auto* seg_rank = reinterpret_cast<int32_t*>(h + at.rank);
    auto* seg_off = reinterpret_cast<int64_t*>(h + at.off);
    auto* a_table = reinterpret_cast<const void**>(h + at.a_rows);
    auto* b_table = reinterpret_cast<const void**>(h + at.b_rows);
    const int32_t layer = static_cast<int32_t>(site / kNumLinearModules);
    const int mi = static_cast<int>(site % kNumLinearModules);
    for (int32_t a = 0; a < s_count; ++a) {
      seg_off[a] = int64_t{a} * v;
      if (a >= static_cast<int32_t>(atts.size())) continue;
      const auto& statics = atts[a]->adapter->layers[layer].statics[mi];
      if (statics.empty()) continue;
      const LoraStack& stack = statics[0];
      a_rows.clear();
      b_rows.clear();
      absl::StatusOr<bool> ok = pin(&stack, 0, &a_rows, &b_rows);
      if (!ok.ok() || !*ok) return give_up(ok);
      seg_rank[a] = stack.rank;
      std::copy(a_rows.begin(), a_rows.end(), a_table + int64_t{a} * v);
      std::copy(b_rows.begin(), b_rows.end(), b_table + int64_t{a} * v);
      for (int32_t p = seg_start[a]; p < seg_start[a + 1]; ++p) weight[p] = stack.scale[0];
      plan_.site_used[site] = 1;
    }
  }
  // The fused shrinks' row tables from the sites' (just filled).
  for (int64_t f = 0; f < fused_count; ++f) {
    if (fused_at[f].rank < 0) continue;
    const int32_t layer = static_cast<int32_t>(f / kNumProjections);
    const auto modules = ProjectionModules(static_cast<Projection>(f % kNumProjections));
    const int64_t stride = static_cast<int64_t>(modules.size()) * v;
    auto* rank = reinterpret_cast<int32_t*>(h + fused_at[f].rank);
    auto* off = reinterpret_cast<int64_t*>(h + fused_at[f].off);
    auto* rows = reinterpret_cast<const void**>(h + fused_at[f].a_rows);
    for (int32_t a = 0; a < s_count; ++a) {
      off[a] = a * stride;
      for (size_t i = 0; i < modules.size(); ++i) {
        const SiteAt& at =
            site_at[int64_t{layer} * kNumLinearModules + static_cast<int>(modules[i])];
        const int32_t r = reinterpret_cast<const int32_t*>(h + at.rank)[a];
        const auto* site_rows =
            reinterpret_cast<const void* const*>(h + at.a_rows) + int64_t{a} * v;
        for (int32_t k = 0; k < v; ++k) {
          rows[a * stride + static_cast<int64_t>(i) * v + k] =
              k < r ? site_rows[k] : zero_row_.data();
        }
        if (r > 0) rank[a] = static_cast<int32_t>(stride);
      }
    }
  }
  for (size_t j = 0; j < atts.size(); ++j) {
    if (xlora_at[j] < 0) continue;
    const XloraSpec& xs = *atts[j]->adapter->xlora;
    const int64_t cols = xs.classifier.back().out;
    auto* table = reinterpret_cast<float*>(h + xlora_at[j]);
    for (int32_t tok : *adapters[j].tokens) {
      float* row = table + tok * cols;
      if (inputs.scaling_pass) {
        std::fill(row, row + cols, xs.scaling_pass_value);
      } else if (const float* src = (*inputs.scalings)[tok]; src != nullptr) {
        std::copy(src, src + cols, row);
      }  // else: written on the device before the first module reads it
    }
  }
  for (size_t r = 0; r < routed.size(); ++r) {
    const LoraStack& stack = routed[r].rm->experts;
    if (routed[r].xlora_cols > 0) {  // the LoRA scale times X-LoRA's global scaling weight
      const float g = routed[r].att->adapter->xlora->global_scaling_weight;
      auto* scale = reinterpret_cast<float*>(h + routed_at[r].scale);
      for (int32_t e = 0; e < stack.num_experts; ++e) scale[e] = stack.scale[e] * g;
    } else {
      std::memcpy(h + routed_at[r].scale, stack.scale.data(), stack.scale.size() * 4);
    }
    if (routed[r].rm->rank_granular) {
      // One segment over every token of the step (the adapter's mask picks its own): pair t is
      // token t, weighted by the LoRA scale.
      const RoutedAt& at = routed_at[r];
      auto* weight = reinterpret_cast<float*>(h + at.weight);
      std::fill(weight, weight + t, stack.scale[0]);
      const std::vector<float>& bias = routed[r].rm->router.select_bias;
      std::copy(bias.begin(), bias.end(), reinterpret_cast<float*>(h + at.bias));
      reinterpret_cast<int32_t*>(h + at.seg_start)[1] = static_cast<int32_t>(t);
      *reinterpret_cast<int32_t*>(h + at.seg_rank) = stack.rank;
      a_rows.clear();
      b_rows.clear();
      absl::StatusOr<bool> ok = pin(&stack, 0, &a_rows, &b_rows);
      if (!ok.ok() || !*ok) return give_up(ok);
      std::copy(a_rows.begin(), a_rows.end(),
                reinterpret_cast<const void**>(h + routed_at[r].a_rows));
      std::copy(b_rows.begin(), b_rows.end(),
                reinterpret_cast<const void**>(h + routed_at[r].b_rows));
      continue;
    }
    a_rows.clear();
    b_rows.clear();
    // Every expert, but only into free pages (as the eager device route does): when they do
    // not fit, evicting idle experts for a plan that may fail anyway would thrash the cache.
    absl::StatusOr<bool> ok = cache_->AcquireAllIfRoom(&stack, &a_rows, &b_rows);
    if (!ok.ok() || !*ok) return give_up(ok);
    for (int32_t e = 0; e < stack.num_experts; ++e) plan_.pins.push_back({&stack, e});
    std::copy(a_rows.begin(), a_rows.end(),
              reinterpret_cast<const void**>(h + routed_at[r].a_rows));
    std::copy(b_rows.begin(), b_rows.end(),
              reinterpret_cast<const void**>(h + routed_at[r].b_rows));
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    const int32_t e = blocks[b].ffn->num_experts;
    auto* slot_token = reinterpret_cast<int32_t*>(h + block_at[b].slot_token);
    for (int64_t p = 0; p < t * e; ++p) slot_token[p] = static_cast<int32_t>(p / e);
    for (int i = 0; i < 3; ++i) {
      const auto& lora = blocks[b].ffn->lora[i];
      if (!lora) continue;
      std::copy(lora->scale.begin(), lora->scale.end(),
                reinterpret_cast<float*>(h + block_at[b].scale[i]));
      a_rows.clear();
      b_rows.clear();
      absl::StatusOr<bool> ok = cache_->AcquireAllIfRoom(&*lora, &a_rows, &b_rows);
      if (!ok.ok() || !*ok) return give_up(ok);
      for (int32_t e = 0; e < lora->num_experts; ++e) plan_.pins.push_back({&*lora, e});
      std::copy(a_rows.begin(), a_rows.end(),
                reinterpret_cast<const void**>(h + block_at[b].a_rows[i]));
      std::copy(b_rows.begin(), b_rows.end(),
                reinterpret_cast<const void**>(h + block_at[b].b_rows[i]));
    }
  }
  // Routing records: each recording token's decisions at each routed site are copied (ops) into
  // plan_record_, at offsets laid out now; the placeholders follow once the buffers exist.
  const int64_t e_max = std::max(max_experts, 1);
  int64_t record_words = 0;
  for (StepPlan::Routed& entry : routed) {
    const int32_t e = entry.rm->experts.num_experts;
    const auto& tokens =
        entry.part >= 0 ? plan_.part_tokens[entry.part] : *adapters[entry.slot_index].tokens;
    if (std::none_of(tokens.begin(), tokens.end(),
                     [&](int32_t tok) { return records_->wants(tok); })) {
      continue;
    }
    entry.record_at = record_words;
    record_words += entry.rm->rank_granular ? t * RankKeep(entry) : DecisionWords(t, e);
  }
  for (StepPlan::Block& entry : blocks) {
    const auto& tokens = plan_.part_tokens[entry.part];
    if (std::none_of(tokens.begin(), tokens.end(),
                     [&](int32_t tok) { return records_->wants(tok); })) {
      continue;
    }
    entry.record_at = record_words;
    record_words += DecisionWords(t, entry.ffn->num_experts);
  }
  // Device buffers keep their addresses while they are big enough (graphs hold them); growing
  // one changes the key, so graphs captured with the old ones are never replayed.
  // ApplyPlanned's scratch: 6 [t, e_max] arrays, counts, segment starts and ranks, then the
  // 8-aligned segment offsets.
  const int64_t scratch_bytes = ((6 * t * e_max + t + 2 * (e_max + 1)) * 4 + 7) / 8 * 8 + 8 * e_max;
  const int64_t v_floats =
      std::max({t * v, t * e_max * std::max(routed_rank, 1), t * eb * std::max(block_rank, 1)});
  // The block FFNs' scratch (BlockLayout) and a zero block of T rows of the intermediate size.
  const BlockLayout bl = LayoutBlocks(t, block_experts > 0 ? eb : 0, block_positions);
  // The decision-slot buffers grow with T x E: long prefills with block FFNs run unplanned
  // (host routing, pairs only for the decisions) rather than hold that much device memory.
  if (bl.bytes > kMaxPlannedBlockBytes) return give_up(false);
  const int64_t zero_bytes = block_experts > 0 ? t * config_.intermediate_size * es_ : 0;
  const int64_t vs_floats = any_fused ? t * 3 * v : 0;  // the widest projection: q|k|v
  const bool grows = plan_buf_.bytes() < static_cast<size_t>(layout.bytes) ||
                     plan_block_.bytes() < static_cast<size_t>(bl.bytes) ||
                     plan_zeros_.bytes() < static_cast<size_t>(zero_bytes) ||
                     plan_v_.bytes() < static_cast<size_t>(v_floats * 4) ||
                     plan_vs_.bytes() < static_cast<size_t>(vs_floats * 4) ||
                     plan_scratch_.bytes() < static_cast<size_t>(scratch_bytes) ||
                     plan_record_.bytes() < static_cast<size_t>(record_words * 4);
  if (grows) ++epoch_;
  absl::Status st = Grow(&plan_buf_, layout.bytes);
  if (st.ok()) st = Grow(&plan_v_, v_floats * 4);
  if (st.ok() && vs_floats > 0) st = Grow(&plan_vs_, vs_floats * 4);
  if (st.ok()) st = Grow(&plan_scratch_, scratch_bytes);
  if (st.ok() && record_words > 0) st = Grow(&plan_record_, record_words * 4);
  if (st.ok() && bl.bytes > 0) st = Grow(&plan_block_, bl.bytes);
  if (st.ok() && zero_bytes > 0 && plan_zeros_.bytes() < static_cast<size_t>(zero_bytes)) {
    st = Grow(&plan_zeros_, zero_bytes);  // zeroed once: nothing writes it afterwards
    if (st.ok()) {
      const std::vector<char> zeros(plan_zeros_.bytes(), 0);
      st = backend_->CopyToDevice(plan_zeros_.data(), zeros.data(), zeros.size());
    }
  }
  if (st.ok()) st = backend_->CopyToDevice(plan_buf_.data(), h, layout.bytes);
  if (!st.ok()) return give_up(st);
  char* d = plan_buf_.as<char>();
  plan_.pair_token = reinterpret_cast<const int32_t*>(d + pair_token_at);
  plan_.seg_start = reinterpret_cast<const int32_t*>(d + seg_start_at);
  plan_.fused.assign(fused_count, {});
  for (int64_t f = 0; f < fused_count; ++f) {
    if (fused_at[f].rank < 0) continue;
    plan_.fused[f] = {true, reinterpret_cast<const int32_t*>(d + fused_at[f].rank),
                      reinterpret_cast<const int64_t*>(d + fused_at[f].off),
                      reinterpret_cast<const void* const*>(d + fused_at[f].a_rows)};
  }
  plan_.sites.resize(sites);
  for (int64_t site = 0; site < sites; ++site) {
    const SiteAt& at = site_at[site];
    StepPlan::Site& s = plan_.sites[site];
    s.weight = reinterpret_cast<const float*>(d + at.weight);
    s.seg_rank = reinterpret_cast<const int32_t*>(d + at.rank);
    s.seg_off = reinterpret_cast<const int64_t*>(d + at.off);
    s.a_rows = reinterpret_cast<const void* const*>(d + at.a_rows);
    s.b_rows = reinterpret_cast<const void* const*>(d + at.b_rows);
  }
  for (size_t r = 0; r < routed.size(); ++r) {
    if (routed[r].rm->rank_granular) {
      const RoutedAt& at = routed_at[r];
      routed[r].weight = reinterpret_cast<const float*>(d + at.weight);
      routed[r].select_bias = routed[r].rm->router.select_bias.empty()
                                  ? nullptr
                                  : reinterpret_cast<const float*>(d + at.bias);
      routed[r].seg_start = reinterpret_cast<const int32_t*>(d + at.seg_start);
      routed[r].seg_rank = reinterpret_cast<const int32_t*>(d + at.seg_rank);
      routed[r].seg_off = reinterpret_cast<const int64_t*>(d + at.seg_off);
    }
    routed[r].mask = reinterpret_cast<const int32_t*>(
        d + (routed[r].part >= 0 ? parts[routed[r].part].mask_at
                                 : masks_at + int64_t{routed[r].slot_index} * t * 4));
    if (routed[r].xlora_cols > 0) {
      const XloraSpec& xs = *routed[r].att->adapter->xlora;
      routed[r].scalings =
          reinterpret_cast<const float*>(d + xlora_at[routed[r].slot_index]) +
          (xs.layerwise ? int64_t{routed[r].rm->xlora_index} * xs.num_adapters : 0);
    }
    routed[r].scale = reinterpret_cast<const float*>(d + routed_at[r].scale);
    routed[r].a_rows = reinterpret_cast<const void* const*>(d + routed_at[r].a_rows);
    routed[r].b_rows = reinterpret_cast<const void* const*>(d + routed_at[r].b_rows);
  }
  for (size_t b = 0; b < blocks.size(); ++b) {
    blocks[b].mask = reinterpret_cast<const int32_t*>(d + parts[blocks[b].part].mask_at);
    blocks[b].slot_token = reinterpret_cast<const int32_t*>(d + block_at[b].slot_token);
    for (int i = 0; i < 3; ++i) {
      if (block_at[b].scale[i] < 0) continue;
      blocks[b].scale[i] = reinterpret_cast<const float*>(d + block_at[b].scale[i]);
      blocks[b].a_rows[i] = reinterpret_cast<const void* const*>(d + block_at[b].a_rows[i]);
      blocks[b].b_rows[i] = reinterpret_cast<const void* const*>(d + block_at[b].b_rows[i]);
    }
  }
  plan_.select.assign(config_.num_layers, nullptr);
  for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
    if (select_at[layer] >= 0) {
      plan_.select[layer] = reinterpret_cast<const int32_t*>(d + select_at[layer]);
    }
  }
  if (block_experts > 0) {
    plan_.ones = reinterpret_cast<const float*>(d + ones_at);
    plan_.slots = reinterpret_cast<const int32_t*>(d + slots_at);
    plan_.z_rows = reinterpret_cast<const int32_t*>(d + z_rows_at);
  }
  plan_.blocks = std::move(blocks);
  plan_.block_layout = bl;
  for (size_t j = 0; j < atts.size(); ++j) {
    if (xlora_at[j] >= 0) {
      plan_.xlora_tables.push_back({slots[j], reinterpret_cast<float*>(d + xlora_at[j])});
    }
  }
  plan_.identity = reinterpret_cast<const int32_t*>(d + identity_at);
  plan_.token_pair = reinterpret_cast<const int32_t*>(d + token_pair_at);
  plan_.token_count = reinterpret_cast<const int32_t*>(d + token_count_at);
  plan_.routed = std::move(routed);
  plan_.segments = s_count;
  plan_.v_stride = v;
  plan_.tokens = t;
  plan_.max_experts = static_cast<int32_t>(e_max);
  plan_.key = {s_count, v, epoch_};
  if (!plan_.routed.empty() || !plan_.blocks.empty()) {
    // Routing parameters are host scalars of the launches: the adapters themselves are part of
    // the key (slots are never reused).
    plan_.key.push_back(-1);
    plan_.key.insert(plan_.key.end(), slots.begin(), slots.end());
    // The override parts (their adapter, whether they are all its tokens, their override),
    // which fix where every part mask and entry table lies; per entry, its part and where its
    // records go (the parts' tokens are data).
    plan_.key.push_back(static_cast<int64_t>(parts.size()));
    for (size_t part = 0; part < parts.size(); ++part) {
      const std::array<int64_t, 3> ov = override_key(static_cast<int32_t>(part));
      plan_.key.push_back(parts[part].adapter);
      plan_.key.push_back(parts_of[parts[part].adapter].size() == 1 ? 1 : 0);
      plan_.key.insert(plan_.key.end(), ov.begin(), ov.end());
    }
    for (const StepPlan::Routed& entry : plan_.routed) {
      plan_.key.push_back(entry.part);
      plan_.key.push_back(entry.record_at);
    }
    for (const StepPlan::Block& entry : plan_.blocks) {
      plan_.key.push_back(entry.part);
      plan_.key.push_back(entry.record_at);
    }
  }
  for (int64_t site = 0; site < sites; site += 64) {  // the statically adapted sites
    int64_t word = 0;
    for (int64_t i = site; i < std::min(sites, site + 64); ++i) {
      word |= int64_t{plan_.site_used[i]} << (i - site);
    }
    plan_.key.push_back(word);
  }
  // Placeholders for the decisions, in the order the eager pass records them (site by site).
  for (int64_t site = 0; site < sites; ++site) {
    // MixLoRA's decisions come between up_proj and down_proj, as the eager pass records them.
    if (site % kNumLinearModules == static_cast<int>(LinearModule::kDown)) {
      for (int32_t b : plan_.blocks_of_layer[site / kNumLinearModules]) {
        const StepPlan::Block& entry = plan_.blocks[b];
        if (entry.record_at < 0) continue;
        const int32_t e = entry.ffn->num_experts;
        DeferDecisions(plan_.part_tokens[entry.part], entry.layer, "ffn", entry.record_at, e);
      }
    }
    for (int32_t r : plan_.routed_of_site[site]) {
      const StepPlan::Routed& entry = plan_.routed[r];
      if (entry.record_at < 0) continue;
      const int32_t e = entry.rm->experts.num_experts;
      const auto& tokens =
          entry.part >= 0 ? plan_.part_tokens[entry.part] : *adapters[entry.slot_index].tokens;
      if (!entry.rm->rank_granular) {
        DeferDecisions(tokens, entry.layer, LinearModuleName(entry.module), entry.record_at, e);
        continue;
      }
      const int32_t k = RankKeep(entry);  // the kept ranks, k of them, weights 1
      for (int32_t tok : tokens) {
        records_->Defer(tok, entry.layer, LinearModuleName(entry.module), entry.record_at + tok * k,
                        /*weights_at=*/-1, /*count_at=*/-1, k);
      }
    }
  }
  if (record_words > 0) records_->UseDeviceWords(&plan_record_, record_words);
  if (!plan_.routed.empty() || !plan_.blocks.empty()) records_->MarkDeviceRouted();
  plan_.active = true;
  return true;
}

absl::Status StepPlanner::Apply(int32_t layer, LinearModule m, const void* x, void* y,
                                int64_t y_stride) {
  const int64_t site = int64_t{layer} * kNumLinearModules + static_cast<int>(m);
  const int64_t in = LinearModuleShape(config_, m)[0];
  RETURN_IF_ERROR(ApplyRouted(layer, m, x, y, y_stride));
  if (!plan_.site_used[site]) return absl::OkStatus();
  const StepPlan::Site& s = plan_.sites[site];
  RETURN_IF_ERROR(
      backend_->SgmvShrink({.x = x,
                            .v = plan_v_.as<float>(),
                            .x_row = plan_.pair_token,
                            .seg_start = plan_.seg_start,
                            .seg_rank = s.seg_rank,
                            .seg_row_offset = s.seg_off,
                            .a_rows = s.a_rows,
                            .num_segments = plan_.segments,
                            .in = in,
                            .v_stride = plan_.v_stride,
                            .dtype = dt_,
                            .max_pairs = kernels::PairsThatFit(plan_v_.bytes(), plan_.v_stride)}));
  return ExpandStatic(site, plan_v_.as<float>(), plan_.v_stride, y, y_stride);
}

absl::Status StepPlanner::ApplyProjection(int32_t layer, Projection p, const void* x, void* y) {
  const std::span<const LinearModule> modules = ProjectionModules(p);
  const int64_t width = ProjectionWidth(config_, p);
  const StepPlan::Fused& fused =
      plan_.fused[int64_t{layer} * kNumProjections + static_cast<int>(p)];
  const int32_t fused_stride = static_cast<int32_t>(modules.size()) * plan_.v_stride;
  if (fused.used) {
    // The modules' static LoRAs in one shrink: segment j's A rows are its q (gate) rows, then its
    // k rows, then its v (up) rows, each padded to V with a zero row, so module i's ranks are
    // columns [i V, i V + r) of v. Its own buffer: the routed groups below use plan_v_.
    RETURN_IF_ERROR(
        backend_->SgmvShrink({.x = x,
                              .v = plan_vs_.as<float>(),
                              .x_row = plan_.pair_token,
                              .seg_start = plan_.seg_start,
                              .seg_rank = fused.seg_rank,
                              .seg_row_offset = fused.seg_off,
                              .a_rows = fused.a_rows,
                              .num_segments = plan_.segments,
                              .in = config_.hidden_size,
                              .v_stride = fused_stride,
                              .dtype = dt_,
                              .max_pairs = kernels::PairsThatFit(plan_vs_.bytes(), fused_stride)}));
  }
  for (size_t i = 0; i < modules.size(); ++i) {
    const LinearModule m = modules[i];
    void* columns = static_cast<char*>(y) + ProjectionColumn(config_, m) * es_;
    RETURN_IF_ERROR(ApplyRouted(layer, m, x, columns, width));
    const int64_t site = int64_t{layer} * kNumLinearModules + static_cast<int>(m);
    if (!plan_.site_used[site]) continue;
    RETURN_IF_ERROR(ExpandStatic(site, plan_vs_.as<float>() + i * plan_.v_stride, fused_stride,
                                 columns, width));
  }
  return absl::OkStatus();
}

absl::Status StepPlanner::ExpandStatic(int64_t site, const float* v, int32_t v_stride, void* y,
                                       int64_t y_stride) {
  const StepPlan::Site& s = plan_.sites[site];
  const int64_t out =
      LinearModuleShape(config_, static_cast<LinearModule>(site % kNumLinearModules))[1];
  // One pair per adapted token (its adapter's static LoRA; rank 0 where it has none here).
  return backend_->SgmvExpandRows({.v = v,
                                   .y = y,
                                   .token_pair = plan_.token_pair,
                                   .count = plan_.token_count,
                                   .weight = s.weight,
                                   .seg_start = plan_.seg_start,
                                   .seg_rank = s.seg_rank,
                                   .seg_row_offset = s.seg_off,
                                   .b_rows = s.b_rows,
                                   .num_tokens = plan_.tokens,
                                   .pair_stride = 1,
                                   .num_segments = plan_.segments,
                                   .out = out,
                                   .v_stride = v_stride,
                                   .dtype = dt_,
                                   .y_stride = y_stride});
}

absl::Status StepPlanner::ApplyRouted(int32_t layer, LinearModule m, const void* x, void* y,
                                      int64_t y_stride) {
  const int64_t site = int64_t{layer} * kNumLinearModules + static_cast<int>(m);
  const auto [in, out] = LinearModuleShape(config_, m);
  const int64_t t = plan_.tokens;
  const int64_t e_max = plan_.max_experts;
  // Scratch words: logits | experts | weights | pair rows | pair weights | token pairs | count |
  // segments.
  float* logits = plan_scratch_.as<float>();
  int32_t* experts = plan_scratch_.as<int32_t>() + t * e_max;
  float* weights = plan_scratch_.as<float>() + 2 * t * e_max;
  int32_t* pair_row = plan_scratch_.as<int32_t>() + 3 * t * e_max;
  float* pair_w = plan_scratch_.as<float>() + 4 * t * e_max;
  int32_t* token_pair = plan_scratch_.as<int32_t>() + 5 * t * e_max;
  int32_t* count = plan_scratch_.as<int32_t>() + 6 * t * e_max;
  int32_t* seg_start = count + t;
  int32_t* seg_rank = seg_start + e_max + 1;
  // int64 offsets after them, 8-aligned.
  auto* seg_off = reinterpret_cast<int64_t*>(
      plan_scratch_.as<char>() + ((6 * t * e_max + t + 2 * (e_max + 1)) * 4 + 7) / 8 * 8);
  for (int32_t r : plan_.routed_of_site[site]) {
    const StepPlan::Routed& entry = plan_.routed[r];
    const RoutedModule& rm = *entry.rm;
    if (rm.rank_granular) {
      RETURN_IF_ERROR(ApplyRanks(entry, x, in, y, out, y_stride));
      continue;
    }
    const int32_t e = rm.experts.num_experts, rank = rm.experts.rank;
    kernels::RouteParams route;
    if (entry.xlora_cols > 0) {  // X-LoRA: the weights come from the step's scalings
      const XloraSpec& xs = *entry.att->adapter->xlora;
      route = XloraRouteParams(e, xs.top_k, xs.softmax_topk);
      route.logits = entry.scalings;
      route.logits_stride = entry.xlora_cols;
    } else {
      // Router logits of every token of the step (the adapter's mask picks its own), fp32.
      RETURN_IF_ERROR(entry.att->RouterLogits(backend_, rm.router, x, t, in, logits));
      ASSIGN_OR_RETURN(route, ToRouteParams(entry.spec, e));
      route.logits = logits;
    }
    route.experts = experts;
    route.weights = weights;
    route.count = count;
    route.active = entry.mask;
    route.num_tokens = t;
    RETURN_IF_ERROR(backend_->Route(route));
    RETURN_IF_ERROR(backend_->BuildSegments({.experts = experts,
                                             .weights = weights,
                                             .count = count,
                                             .rows = plan_.identity,
                                             .scale = entry.scale,
                                             .active = entry.mask,
                                             .pair_row = pair_row,
                                             .pair_weight = pair_w,
                                             .seg_start = seg_start,
                                             .seg_rank = seg_rank,
                                             .seg_row_offset = seg_off,
                                             .token_pair = token_pair,
                                             .undefined = records_->undefined_counter(),
                                             .num_tokens = static_cast<int32_t>(t),
                                             .num_experts = e,
                                             .rank = rank}));
    RETURN_IF_ERROR(
        backend_->SgmvShrink({.x = x,
                              .v = plan_v_.as<float>(),
                              .x_row = pair_row,
                              .seg_start = seg_start,
                              .seg_rank = seg_rank,
                              .seg_row_offset = seg_off,
                              .a_rows = entry.a_rows,
                              .num_segments = e,
                              .in = in,
                              .v_stride = rank,
                              .dtype = dt_,
                              .max_pairs = kernels::PairsThatFit(plan_v_.bytes(), rank)}));
    // Each token's k experts summed in its decision order and added once: no atomics, the
    // same bits on every run (SgmvExpandRows).
    RETURN_IF_ERROR(backend_->SgmvExpandRows({.v = plan_v_.as<float>(),
                                              .y = y,
                                              .token_pair = token_pair,
                                              .count = count,
                                              .active = entry.mask,
                                              .weight = pair_w,
                                              .seg_start = seg_start,
                                              .seg_rank = seg_rank,
                                              .seg_row_offset = seg_off,
                                              .b_rows = entry.b_rows,
                                              .num_tokens = t,
                                              .pair_stride = e,
                                              .num_segments = e,
                                              .out = out,
                                              .v_stride = rank,
                                              .dtype = dt_,
                                              .y_stride = y_stride}));
    if (entry.record_at >= 0) {  // the decisions, for the step's one copy back
      RETURN_IF_ERROR(CopyDecisions(entry.record_at, experts, weights, count, e));
    }
  }
  return absl::OkStatus();
}

absl::Status StepPlanner::CopyDecisions(int64_t record_at, const int32_t* experts,
                                        const float* weights, const int32_t* count, int32_t e) {
  const int64_t t = plan_.tokens;
  int32_t* dst = plan_record_.as<int32_t>() + record_at;
  for (auto [src, words, at] : {std::tuple<const void*, int64_t, int64_t>{experts, t * e, 0},
                                {weights, t * e, t * e},
                                {count, t, 2 * t * e}}) {
    RETURN_IF_ERROR(backend_->Convert({.src = src,
                                       .dst = dst + at,
                                       .n = words,
                                       .src_dtype = ScalarType::kF32,
                                       .dst_dtype = ScalarType::kF32}));
  }
  return absl::OkStatus();
}

void StepPlanner::DeferDecisions(const std::vector<int32_t>& tokens, int32_t layer,
                                 const char* module, int64_t record_at, int32_t e) {
  const int64_t t = plan_.tokens;
  for (int32_t tok : tokens) {
    records_->Defer(tok, layer, module, record_at + tok * e, record_at + t * e + tok * e,
                    record_at + 2 * t * e + tok, 0);
  }
}

int32_t StepPlanner::RankKeep(const StepPlan::Routed& entry) {
  absl::StatusOr<kernels::RankRouteParams> p =
      ToRankRouteParams(entry.spec, entry.rm->experts.rank, entry.rm->select_on_abs);
  return p.ok() ? p->k : 0;  // PlanPass admits only groups whose parameters convert
}

absl::Status StepPlanner::ApplyRanks(const StepPlan::Routed& entry, const void* x, int64_t in,
                                     void* y, int64_t out, int64_t y_stride) {
  const RoutedModule& rm = *entry.rm;
  const int64_t t = plan_.tokens;
  const int32_t r = rm.experts.rank;
  // Scratch (ApplyPlanned's layout): logits [t, r] | kept [t, k] | u [t, r] | ... | ok [t].
  const int64_t e_max = plan_.max_experts;
  float* logits = plan_scratch_.as<float>();
  int32_t* kept = plan_scratch_.as<int32_t>() + t * e_max;
  float* u = plan_scratch_.as<float>() + 2 * t * e_max;
  int32_t* ok = plan_scratch_.as<int32_t>() + 6 * t * e_max;
  // z = A x for every token of the step, one segment (the adapter's mask picks its own).
  RETURN_IF_ERROR(backend_->SgmvShrink({.x = x,
                                        .v = plan_v_.as<float>(),
                                        .x_row = plan_.identity,
                                        .seg_start = entry.seg_start,
                                        .seg_rank = entry.seg_rank,
                                        .seg_row_offset = entry.seg_off,
                                        .a_rows = entry.a_rows,
                                        .num_segments = 1,
                                        .in = in,
                                        .v_stride = r,
                                        .dtype = dt_,
                                        .max_pairs = kernels::PairsThatFit(plan_v_.bytes(), r)}));
  const float* router_logits = nullptr;
  if (rm.router_type == RouterType::kLinear) {  // SMoRA's gate, fp32
    RETURN_IF_ERROR(entry.att->RouterLogits(backend_, rm.router, x, t, in, logits));
    router_logits = logits;
  }
  ASSIGN_OR_RETURN(kernels::RankRouteParams route,
                   ToRankRouteParams(entry.spec, r, rm.select_on_abs));
  route.z = plan_v_.as<float>();
  route.router_logits = router_logits;
  route.select_bias = entry.select_bias;
  route.u = u;
  route.kept = kept;
  route.ok = ok;
  route.undefined = records_->undefined_counter();
  route.active = entry.mask;
  route.num_tokens = t;
  route.z_stride = r;
  RETURN_IF_ERROR(backend_->RankRoute(route));
  // y += s B u, one pair per token of the adapter.
  RETURN_IF_ERROR(backend_->SgmvExpandRows({.v = u,
                                            .y = y,
                                            .token_pair = plan_.identity,
                                            .count = plan_.token_count,
                                            .active = entry.mask,
                                            .weight = entry.weight,
                                            .seg_start = entry.seg_start,
                                            .seg_rank = entry.seg_rank,
                                            .seg_row_offset = entry.seg_off,
                                            .b_rows = entry.b_rows,
                                            .num_tokens = t,
                                            .pair_stride = 1,
                                            .num_segments = 1,
                                            .out = out,
                                            .v_stride = r,
                                            .dtype = dt_,
                                            .y_stride = y_stride}));
  if (entry.record_at < 0) return absl::OkStatus();
  return backend_->Convert({.src = kept,
                            .dst = plan_record_.as<int32_t>() + entry.record_at,
                            .n = t * route.k,
                            .src_dtype = ScalarType::kF32,
                            .dst_dtype = ScalarType::kF32});
}

StepPlanner::BlockLayout StepPlanner::LayoutBlocks(int64_t t, int64_t eb, int64_t positions) const {
  BlockLayout l;
  if (eb == 0) return l;
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t r = at;
    at += (bytes + 255) / 256 * 256;
    return r;
  };
  const int64_t slots = t * eb;
  l.logits = take(slots * 4);
  l.experts = take(slots * 4);
  l.weights = take(slots * 4);
  l.count = take(t * 4);
  l.per_position = at - l.experts;
  at += l.per_position * (positions - 1);
  l.pair_row = take(slots * 4);
  l.pair_w = take(slots * 4);
  l.seg_start = take((eb + 1) * 4);
  l.seg_rank = take(eb * 4);
  l.seg_off = take(eb * 8);
  l.token_pair = take(slots * 4);
  l.slot_count = take(slots * 4);
  l.spare = take(4);
  const int64_t inter = config_.intermediate_size;
  l.ext = take(2 * t * inter * es_);
  l.up = take(slots * inter * es_);
  l.gate = take(slots * inter * es_);
  l.gate_stride = l.gate - l.up;
  at += l.gate_stride * (positions - 1);
  l.bytes = at;
  return l;
}

absl::Status StepPlanner::BlockShrink(const StepPlan::Block& entry, int i, const void* x,
                                      int64_t in, bool slot_rows, bool count_undefined) {
  const BlockLayout& l = plan_.block_layout;
  char* base = plan_block_.as<char>();
  const int64_t pos = l.per_position * entry.position;
  const int32_t e = entry.ffn->num_experts;
  const int32_t rank = i >= 0 && entry.ffn->lora[i] ? entry.ffn->lora[i]->rank : 0;
  auto* pair_row = reinterpret_cast<int32_t*>(base + l.pair_row);
  auto* seg_start = reinterpret_cast<int32_t*>(base + l.seg_start);
  auto* seg_rank = reinterpret_cast<int32_t*>(base + l.seg_rank);
  auto* seg_off = reinterpret_cast<int64_t*>(base + l.seg_off);
  // The gate and up LoRAs weigh each pair by their scale alone; the down LoRA by the gate
  // weight times its scale. (A counting build, rank 0, weighs by ones.)
  RETURN_IF_ERROR(backend_->BuildSegments(
      {.experts = reinterpret_cast<const int32_t*>(base + l.experts + pos),
       .weights = i == 2 ? reinterpret_cast<const float*>(base + l.weights + pos) : plan_.ones,
       .count = reinterpret_cast<const int32_t*>(base + l.count + pos),
       .rows = plan_.identity,
       .scale = rank > 0 ? entry.scale[i] : plan_.ones,
       .active = entry.mask,
       .pair_row = pair_row,
       .pair_weight = reinterpret_cast<float*>(base + l.pair_w),
       .seg_start = seg_start,
       .seg_rank = seg_rank,
       .seg_row_offset = seg_off,
       .token_pair = reinterpret_cast<int32_t*>(base + l.token_pair),
       .slot_count = reinterpret_cast<int32_t*>(base + l.slot_count),
       .slot_rows = slot_rows,
       .undefined = count_undefined ? records_->undefined_counter()
                                    : reinterpret_cast<int32_t*>(base + l.spare),
       .num_tokens = static_cast<int32_t>(plan_.tokens),
       .num_experts = e,
       .rank = rank}));
  if (rank == 0) return absl::OkStatus();
  return backend_->SgmvShrink({.x = x,
                               .v = plan_v_.as<float>(),
                               .x_row = pair_row,
                               .seg_start = seg_start,
                               .seg_rank = seg_rank,
                               .seg_row_offset = seg_off,
                               .a_rows = entry.a_rows[i],
                               .num_segments = e,
                               .in = in,
                               .v_stride = rank,
                               .dtype = dt_,
                               .max_pairs = kernels::PairsThatFit(plan_v_.bytes(), rank)});
}

absl::Status StepPlanner::BlockAct(int32_t layer, const void* h, const void* gate_up, void* act) {
  const int64_t t = plan_.tokens;
  const int64_t hidden = config_.hidden_size, inter = config_.intermediate_size;
  const void* gate = gate_up;  // columns [0, I) and [I, 2I) of rows 2I wide
  const void* up = static_cast<const char*>(gate_up) + inter * es_;
  const BlockLayout& l = plan_.block_layout;
  char* base = plan_block_.as<char>();
  // ext = [base SwiGLU of every token; zeros]: row T + t gets token t's weighted sum.
  char* ext = base + l.ext;
  RETURN_IF_ERROR(backend_->SiluMul({.gate = gate,
                                     .up = up,
                                     .out = ext,
                                     .rows = t,
                                     .cols = inter,
                                     .dtype = dt_,
                                     .in_stride = 2 * inter}));
  RETURN_IF_ERROR(backend_->Convert({.src = plan_zeros_.data(),
                                     .dst = ext + t * inter * es_,
                                     .n = t * inter,
                                     .src_dtype = dt_,
                                     .dst_dtype = dt_}));
  for (int32_t b : plan_.blocks_of_layer[layer]) {
    const StepPlan::Block& entry = plan_.blocks[b];
    const BlockFfn& ffn = *entry.ffn;
    const int32_t e = ffn.num_experts;
    const int64_t pos = l.per_position * entry.position;
    auto* logits = reinterpret_cast<float*>(base + l.logits);
    auto* experts = reinterpret_cast<int32_t*>(base + l.experts + pos);
    auto* weights = reinterpret_cast<float*>(base + l.weights + pos);
    auto* count = reinterpret_cast<int32_t*>(base + l.count + pos);
    char* act_slots = base + l.gate + l.gate_stride * entry.position;  // gate, then activations
    char* up_slots = base + l.up;
    RETURN_IF_ERROR(entry.att->RouterLogits(backend_, ffn.router, h, t, hidden, logits));
    ASSIGN_OR_RETURN(kernels::RouteParams route, ToRouteParams(entry.spec, e));
    route.logits = logits;
    route.experts = experts;
    route.weights = weights;
    route.count = count;
    route.active = entry.mask;
    route.num_tokens = t;
    RETURN_IF_ERROR(backend_->Route(route));
    // Undefined logits counted once, by a build with no projection.
    RETURN_IF_ERROR(BlockShrink(entry, /*i=*/-1, nullptr, 0, false, /*count_undefined=*/true));
    // Per decision slot p = t * E + j: the token's base gate and up rows, plus the chosen
    // expert's LoRA deltas (one output row per slot).
    for (auto [src, dst, i] :
         {std::tuple<const void*, char*, int>{gate, act_slots, 0}, {up, up_slots, 1}}) {
      RETURN_IF_ERROR(backend_->Embedding({.ids = entry.slot_token,
                                           .table = src,
                                           .out = dst,
                                           .num_tokens = t * e,
                                           .hidden = inter,
                                           .dtype = dt_,
                                           .table_stride = 2 * inter}));
      if (!ffn.lora[i]) continue;
      RETURN_IF_ERROR(BlockShrink(entry, i, h, hidden, /*slot_rows=*/false, false));
      RETURN_IF_ERROR(backend_->SgmvExpandRows(
          {.v = plan_v_.as<float>(),
           .y = dst,
           .token_pair = reinterpret_cast<const int32_t*>(base + l.token_pair),
           .count = reinterpret_cast<const int32_t*>(base + l.slot_count),
           .weight = reinterpret_cast<const float*>(base + l.pair_w),
           .seg_start = reinterpret_cast<const int32_t*>(base + l.seg_start),
           .seg_rank = reinterpret_cast<const int32_t*>(base + l.seg_rank),
           .seg_row_offset = reinterpret_cast<const int64_t*>(base + l.seg_off),
           .b_rows = entry.b_rows[i],
           .num_tokens = t * e,
           .pair_stride = 1,
           .num_segments = e,
           .out = inter,
           .v_stride = ffn.lora[i]->rank,
           .dtype = dt_}));
    }
    RETURN_IF_ERROR(backend_->SiluMul({.gate = act_slots,
                                       .up = up_slots,
                                       .out = act_slots,
                                       .rows = t * e,
                                       .cols = inter,
                                       .dtype = dt_}));
    // Row T + t = sum_j w_j a_{t, j}, in decision order, added once.
    RETURN_IF_ERROR(backend_->GatherAdd({.x = act_slots,
                                         .y = ext,
                                         .y_row = plan_.z_rows,
                                         .src = plan_.slots,
                                         .count = count,
                                         .weight = weights,
                                         .rows = t,
                                         .src_stride = e,
                                         .x_rows = t * e,
                                         .cols = inter,
                                         .dtype = dt_}));
    if (entry.record_at >= 0) {  // the decisions, for the step's one copy back
      RETURN_IF_ERROR(CopyDecisions(entry.record_at, experts, weights, count, e));
    }
  }
  return backend_->Embedding({.ids = plan_.select[layer],
                              .table = ext,
                              .out = act,
                              .num_tokens = t,
                              .hidden = inter,
                              .dtype = dt_});
}

absl::Status StepPlanner::BlockDown(int32_t layer, void* o) {
  const int64_t t = plan_.tokens;
  const BlockLayout& l = plan_.block_layout;
  char* base = plan_block_.as<char>();
  for (int32_t b : plan_.blocks_of_layer[layer]) {
    const StepPlan::Block& entry = plan_.blocks[b];
    const BlockFfn& ffn = *entry.ffn;
    if (!ffn.lora[2]) continue;
    const int32_t e = ffn.num_experts;
    const int64_t pos = l.per_position * entry.position;
    // Pairs read their decision slot's activation; each token sums its experts' deltas in
    // decision order and adds them once.
    RETURN_IF_ERROR(BlockShrink(entry, 2, base + l.gate + l.gate_stride * entry.position,
                                config_.intermediate_size, /*slot_rows=*/true, false));
    RETURN_IF_ERROR(backend_->SgmvExpandRows(
        {.v = plan_v_.as<float>(),
         .y = o,
         .token_pair = reinterpret_cast<const int32_t*>(base + l.token_pair),
         .count = reinterpret_cast<const int32_t*>(base + l.count + pos),
         .active = entry.mask,
         .weight = reinterpret_cast<const float*>(base + l.pair_w),
         .seg_start = reinterpret_cast<const int32_t*>(base + l.seg_start),
         .seg_rank = reinterpret_cast<const int32_t*>(base + l.seg_rank),
         .seg_row_offset = reinterpret_cast<const int64_t*>(base + l.seg_off),
         .b_rows = entry.b_rows[2],
         .num_tokens = t,
         .pair_stride = e,
         .num_segments = e,
         .out = config_.hidden_size,
         .v_stride = ffn.lora[2]->rank,
         .dtype = dt_}));
  }
  return absl::OkStatus();
}

}  // namespace moleserve::engine
