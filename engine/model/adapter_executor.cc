#include "engine/model/adapter_executor.h"

#include <algorithm>
#include <cstring>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"
#include "kernels/common/bf16.h"

namespace moleserve::engine {

struct AdapterExecutor::Attached {
  std::shared_ptr<const Adapter> adapter;
  // Router weight and bias per host router.
  std::map<const RouterWeights*, std::pair<DeviceBuffer, DeviceBuffer>> routers;
  std::vector<std::pair<DeviceBuffer, DeviceBuffer>> classifier;  // X-LoRA: weight, bias
};

AdapterExecutor::AdapterExecutor(Backend* backend, const ModelConfig& config,
                                 ExpertCacheOptions cache_options)
    : backend_(backend),
      config_(config),
      dt_(backend->compute_dtype()),
      es_(static_cast<int64_t>(ScalarTypeSize(dt_))),
      cache_(backend, cache_options),
      sgmv_(backend, &cache_),
      records_(backend) {}
AdapterExecutor::~AdapterExecutor() = default;

absl::StatusOr<DeviceBuffer> AdapterExecutor::UploadFloats(const std::vector<float>& v) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, backend_->Allocate(v.size() * es_));
  RETURN_IF_ERROR(FromHostF32(v.data(), static_cast<int64_t>(v.size()), buf.data()));
  return buf;
}

absl::Status AdapterExecutor::FromHostF32(const float* src, int64_t n, void* dst) {
  if (dt_ == ScalarType::kF32) return backend_->CopyToDevice(dst, src, n * sizeof(float));
  host_bf16_.resize(n);
  for (int64_t i = 0; i < n; ++i) host_bf16_[i] = kernels::F32ToBf16(src[i]);
  return backend_->CopyToDevice(dst, host_bf16_.data(), n * sizeof(uint16_t));
}

absl::Status AdapterExecutor::ToHostF32(const void* src, int64_t n, float* dst) {
  if (dt_ == ScalarType::kF32) return backend_->CopyToHost(dst, src, n * sizeof(float));
  RETURN_IF_ERROR(Grow(&f32_, n * sizeof(float)));
  RETURN_IF_ERROR(backend_->Convert(
      {.src = src, .dst = f32_.data(), .n = n, .src_dtype = dt_, .dst_dtype = ScalarType::kF32}));
  return backend_->CopyToHost(dst, f32_.data(), n * sizeof(float));
}

absl::StatusOr<int32_t> AdapterExecutor::Attach(std::shared_ptr<const Adapter> adapter) {
  if (adapter->layers.size() != static_cast<size_t>(config_.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("adapter '", adapter->name, "' has ",
                                                   adapter->layers.size(), " layers, the model ",
                                                   config_.num_layers));
  }
  auto att = std::make_unique<Attached>();
  auto add_router = [&](const RouterWeights& r) -> absl::Status {
    std::pair<DeviceBuffer, DeviceBuffer> bufs;
    if (!r.weight.empty()) {
      ASSIGN_OR_RETURN(bufs.first, UploadFloats(r.weight));
    }
    if (!r.bias.empty()) {  // fp32: added to the fp32 router logits
      ASSIGN_OR_RETURN(bufs.second, backend_->Allocate(r.bias.size() * sizeof(float)));
      RETURN_IF_ERROR(
          backend_->CopyToDevice(bufs.second.data(), r.bias.data(), r.bias.size() * sizeof(float)));
    }
    att->routers[&r] = std::move(bufs);
    return absl::OkStatus();
  };
  absl::Status status;
  // LoRA experts live in the expert cache's pages (copied in on first use), not per adapter.
  std::vector<const LoraStack*> stacks;
  auto add_lora = [&](const LoraStack& s) {
    stacks.push_back(&s);
    return absl::OkStatus();
  };
  for (const AdapterLayer& layer : adapter->layers) {
    for (const auto& statics : layer.statics) {
      for (const LoraStack& s : statics) status.Update(add_lora(s));
    }
    for (const auto& r : layer.routed) {
      if (!r) continue;
      status.Update(add_lora(r->experts));
      status.Update(add_router(r->router));
    }
    if (layer.block_ffn) {
      status.Update(add_router(layer.block_ffn->router));
      for (const auto& s : layer.block_ffn->lora) {
        if (s) status.Update(add_lora(*s));
      }
    }
  }
  if (adapter->xlora) {
    for (const XloraSpec::Linear& lin : adapter->xlora->classifier) {
      std::pair<DeviceBuffer, DeviceBuffer> bufs;
      ASSIGN_OR_RETURN(bufs.first, UploadFloats(lin.weight));
      if (!lin.bias.empty()) {
        ASSIGN_OR_RETURN(bufs.second, UploadFloats(lin.bias));
      }
      att->classifier.push_back(std::move(bufs));
    }
  }
  if (!status.ok()) return status;  // `att` and what it uploaded go away
  const int32_t slot = next_slot_;
  if (absl::Status fits = cache_.AddOwner(slot, stacks); !fits.ok()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("adapter '", adapter->name, "' does not fit: ", fits.message()));
  }
  ++next_slot_;
  att->adapter = std::move(adapter);
  attached_[slot] = std::move(att);
  return slot;
}

void AdapterExecutor::Detach(int32_t slot) {
  EndPass();  // no pin of a previous pass may outlive its stacks
  auto it = attached_.find(slot);
  if (it == attached_.end()) return;
  cache_.RemoveOwner(slot);
  attached_.erase(it);
}

int64_t AdapterExecutor::DeviceBytes(int32_t slot) const {
  auto it = attached_.find(slot);
  if (it == attached_.end()) return 0;
  int64_t bytes = cache_.ResidentBytes(slot);
  for (const auto& [router, bufs] : it->second->routers) {
    bytes += static_cast<int64_t>(bufs.first.bytes() + bufs.second.bytes());
  }
  for (const auto& [weight, bias] : it->second->classifier) {
    bytes += static_cast<int64_t>(weight.bytes() + bias.bytes());
  }
  return bytes;
}

const Adapter* AdapterExecutor::adapter(int32_t slot) const {
  auto it = attached_.find(slot);
  return it == attached_.end() ? nullptr : it->second->adapter.get();
}

absl::Status AdapterExecutor::BeginPass(PassTokens tokens) {
  EndPass();
  pass_ = std::move(tokens);
  tokens_by_slot_.clear();
  active_ = false;
  const size_t t = pass_.slot.size();
  pass_.override_index.resize(t, -1);
  pass_.record.resize(t, -1);
  pass_.scalings.resize(t, nullptr);
  for (size_t i = 0; i < t; ++i) {
    const int32_t slot = pass_.slot[i];
    if (slot < 0) continue;
    if (!attached_.count(slot)) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: adapter slot ", slot, " is not attached"));
    }
    tokens_by_slot_[slot].push_back(static_cast<int32_t>(i));
    active_ = true;
  }
  return records_.Begin(pass_.record, pass_.num_records, active_);
}

std::vector<int32_t> AdapterExecutor::plan_routed_slots() const {
  std::vector<int32_t> slots;
  for (const StepPlan::Routed& r : plan_.routed) {
    for (const auto& [slot, att] : attached_) {
      if (att.get() == r.att && std::find(slots.begin(), slots.end(), slot) == slots.end()) {
        slots.push_back(slot);
      }
    }
  }
  return slots;
}

void AdapterExecutor::EndPass() {
  for (const auto& [stack, expert] : plan_.pins) cache_.Release(stack, expert);
  plan_ = StepPlan();
}

namespace {

// Most adapters with routed groups a planned pass holds (PlanPass).
constexpr int64_t kMaxPlannedRoutedAdapters = 8;

int32_t NextPow2(int32_t v) {
  int32_t p = 1;
  while (p < v) p *= 2;
  return p;
}

}  // namespace

absl::StatusOr<bool> AdapterExecutor::PlanPass() {
  EndPass();
  if (!active_ || pass_.scaling_pass) return false;
  for (int32_t o : pass_.override_index) {
    if (o >= 0) return false;  // per-request routing: one Route call per spec, run eagerly
  }
  const int64_t t = static_cast<int64_t>(pass_.slot.size());
  std::vector<int32_t> slots;
  std::vector<const Attached*> atts;
  int32_t max_rank = 0, max_experts = 0, routed_rank = 0;
  for (const auto& [slot, tokens] : tokens_by_slot_) {
    const Attached& att = *attached_.at(slot);
    const Adapter& a = *att.adapter;
    if (a.xlora) return false;
    for (const AdapterLayer& layer : a.layers) {
      if (layer.block_ffn) return false;
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
        if (rm.router_type != RouterType::kLinear ||
            rm.experts.num_experts > kernels::kMaxRouteWidth ||
            !ToRouteParams(rm.routing, rm.experts.num_experts).ok()) {
          return false;
        }
        max_experts = std::max(max_experts, rm.experts.num_experts);
        routed_rank = std::max(routed_rank, rm.experts.rank);
      }
    }
    slots.push_back(slot);
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
  struct RoutedAt {
    int64_t scale, a_rows, b_rows;
    // Rank groups: per-token weights [T], selection bias [r], one segment's start [2], rank
    // and row offset.
    int64_t weight = -1, bias = -1, seg_start = -1, seg_rank = -1, seg_off = -1;
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
      const int32_t e = r->experts.num_experts, rank = r->experts.rank;
      plan_.routed_of_site[site].push_back(static_cast<int32_t>(routed.size()));
      StepPlan::Routed entry;
      entry.layer = layer;
      entry.module = static_cast<LinearModule>(mi);
      entry.slot_index = static_cast<int32_t>(j);
      entry.rm = &*r;
      entry.att = atts[j];
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
  if (max_rank == 0 && routed.empty()) return false;
  // Each routed adapter routes every token of the step under its mask: bounded so that the
  // router work stays a small multiple of what gathering the adapter's tokens costs.
  std::vector<uint8_t> routes(atts.size(), 0);
  for (const StepPlan::Routed& entry : routed) routes[entry.slot_index] = 1;
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
  for (const auto& [slot, tokens] : tokens_by_slot_) {
    seg_start[j] = static_cast<int32_t>(pairs);
    for (int32_t tok : tokens) {
      token_pair[tok] = static_cast<int32_t>(pairs);
      token_count[tok] = 1;
      pair_token[pairs++] = tok;
      masks[int64_t{j} * t + tok] = 1;
    }
    ++j;
  }
  for (; j <= s_count; ++j) seg_start[j] = static_cast<int32_t>(pairs);

  // Pin every expert of the pass and fill the tables; when they do not all fit, no plan.
  auto pin = [&](const LoraStack* stack, int32_t expert, std::vector<const void*>* a,
                 std::vector<const void*>* b) -> absl::StatusOr<bool> {
    absl::Status pinned = cache_.Acquire(stack, expert, a, b);
    if (absl::IsResourceExhausted(pinned)) return false;
    RETURN_IF_ERROR(pinned);
    plan_.pins.push_back({stack, expert});
    return true;
  };
  // No plan: nothing stays pinned; running out of memory only means the pass runs eagerly.
  auto give_up = [&](absl::StatusOr<bool> why) -> absl::StatusOr<bool> {
    EndPass();
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
  for (size_t r = 0; r < routed.size(); ++r) {
    const LoraStack& stack = routed[r].rm->experts;
    std::memcpy(h + routed_at[r].scale, stack.scale.data(), stack.scale.size() * 4);
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
    absl::StatusOr<bool> ok = cache_.AcquireAllIfRoom(&stack, &a_rows, &b_rows);
    if (!ok.ok() || !*ok) return give_up(ok);
    for (int32_t e = 0; e < stack.num_experts; ++e) plan_.pins.push_back({&stack, e});
    std::copy(a_rows.begin(), a_rows.end(),
              reinterpret_cast<const void**>(h + routed_at[r].a_rows));
    std::copy(b_rows.begin(), b_rows.end(),
              reinterpret_cast<const void**>(h + routed_at[r].b_rows));
  }
  // Routing records: each recording token's decisions at each routed site are copied (ops) into
  // plan_record_, at offsets laid out now; the placeholders follow once the buffers exist.
  const int64_t e_max = std::max(max_experts, 1);
  int64_t record_words = 0;
  for (StepPlan::Routed& entry : routed) {
    const int32_t e = entry.rm->experts.num_experts;
    const auto& tokens = tokens_by_slot_.at(slots[entry.slot_index]);
    if (std::none_of(tokens.begin(), tokens.end(),
                     [&](int32_t tok) { return pass_.record[tok] >= 0; })) {
      continue;
    }
    entry.record_at = record_words;
    record_words += entry.rm->rank_granular ? t * RankKeep(*entry.rm) : 2 * t * e + t;
  }
  // Device buffers keep their addresses while they are big enough (graphs hold them); growing
  // one changes the key, so graphs captured with the old ones are never replayed.
  // ApplyPlanned's scratch: 6 [t, e_max] arrays, counts, segment starts and ranks, then the
  // 8-aligned segment offsets.
  const int64_t scratch_bytes = ((6 * t * e_max + t + 2 * (e_max + 1)) * 4 + 7) / 8 * 8 + 8 * e_max;
  const int64_t v_floats = std::max(t * v, t * e_max * std::max(routed_rank, 1));
  const bool grows = plan_buf_.bytes() < static_cast<size_t>(layout.bytes) ||
                     plan_v_.bytes() < static_cast<size_t>(v_floats * 4) ||
                     plan_scratch_.bytes() < static_cast<size_t>(scratch_bytes) ||
                     plan_record_.bytes() < static_cast<size_t>(record_words * 4);
  if (grows) ++plan_epoch_;
  absl::Status st = Grow(&plan_buf_, layout.bytes);
  if (st.ok()) st = Grow(&plan_v_, v_floats * 4);
  if (st.ok()) st = Grow(&plan_scratch_, scratch_bytes);
  if (st.ok() && record_words > 0) st = Grow(&plan_record_, record_words * 4);
  if (st.ok()) st = backend_->CopyToDevice(plan_buf_.data(), h, layout.bytes);
  if (!st.ok()) return give_up(st);
  char* d = plan_buf_.as<char>();
  plan_.pair_token = reinterpret_cast<const int32_t*>(d + pair_token_at);
  plan_.seg_start = reinterpret_cast<const int32_t*>(d + seg_start_at);
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
    routed[r].mask = reinterpret_cast<const int32_t*>(d + masks_at) + routed[r].slot_index * t;
    routed[r].scale = reinterpret_cast<const float*>(d + routed_at[r].scale);
    routed[r].a_rows = reinterpret_cast<const void* const*>(d + routed_at[r].a_rows);
    routed[r].b_rows = reinterpret_cast<const void* const*>(d + routed_at[r].b_rows);
  }
  plan_.identity = reinterpret_cast<const int32_t*>(d + identity_at);
  plan_.token_pair = reinterpret_cast<const int32_t*>(d + token_pair_at);
  plan_.token_count = reinterpret_cast<const int32_t*>(d + token_count_at);
  plan_.routed = std::move(routed);
  plan_.segments = s_count;
  plan_.v_stride = v;
  plan_.tokens = t;
  plan_.max_experts = static_cast<int32_t>(e_max);
  plan_.key = {s_count, v, plan_epoch_};
  if (!plan_.routed.empty()) {
    // Routing parameters are host scalars of the launches: the adapters themselves are part of
    // the key (slots are never reused).
    plan_.key.push_back(-1);
    plan_.key.insert(plan_.key.end(), slots.begin(), slots.end());
    for (const StepPlan::Routed& entry : plan_.routed) plan_.key.push_back(entry.record_at);
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
    for (int32_t r : plan_.routed_of_site[site]) {
      const StepPlan::Routed& entry = plan_.routed[r];
      if (entry.record_at < 0) continue;
      const int32_t e = entry.rm->experts.num_experts;
      for (int32_t tok : tokens_by_slot_.at(slots[entry.slot_index])) {
        if (entry.rm->rank_granular) {  // the kept ranks, k of them, weights 1
          const int32_t k = RankKeep(*entry.rm);
          records_.Defer(tok, entry.layer, LinearModuleName(entry.module),
                         entry.record_at + tok * k, /*weights_at=*/-1, /*count_at=*/-1, k);
          continue;
        }
        records_.Defer(tok, entry.layer, LinearModuleName(entry.module), entry.record_at + tok * e,
                       entry.record_at + t * e + tok * e, entry.record_at + 2 * t * e + tok, 0);
      }
    }
  }
  if (record_words > 0) records_.UseDeviceWords(&plan_record_, record_words);
  if (!plan_.routed.empty()) records_.MarkDeviceRouted();
  plan_.active = true;
  return true;
}

absl::Status AdapterExecutor::ApplyPlanned(int32_t layer, LinearModule m, const void* x, void* y) {
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
      RETURN_IF_ERROR(ApplyPlannedRanks(entry, x, in, y, out));
      continue;
    }
    const int32_t e = rm.experts.num_experts, rank = rm.experts.rank;
    const auto& [weight, bias] = entry.att->routers.at(&rm.router);
    // Router logits of every token of the step (the adapter's mask picks its own), fp32.
    RETURN_IF_ERROR(backend_->Gemm({.x = x,
                                    .w = weight.data(),
                                    .y = logits,
                                    .m = t,
                                    .n = e,
                                    .k = in,
                                    .dtype = dt_,
                                    .y_f32 = true}));
    if (!rm.router.bias.empty()) {
      RETURN_IF_ERROR(backend_->BiasAdd(
          {.x = logits, .bias = bias.data(), .rows = t, .cols = e, .dtype = ScalarType::kF32}));
    }
    ASSIGN_OR_RETURN(kernels::RouteParams route, ToRouteParams(rm.routing, e));
    route.logits = logits;
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
                                             .undefined = records_.undefined_counter(),
                                             .num_tokens = static_cast<int32_t>(t),
                                             .num_experts = e,
                                             .rank = rank}));
    RETURN_IF_ERROR(backend_->SgmvShrink({.x = x,
                                          .v = plan_v_.as<float>(),
                                          .x_row = pair_row,
                                          .seg_start = seg_start,
                                          .seg_rank = seg_rank,
                                          .seg_row_offset = seg_off,
                                          .a_rows = entry.a_rows,
                                          .num_segments = e,
                                          .in = in,
                                          .v_stride = rank,
                                          .dtype = dt_}));
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
                                              .dtype = dt_}));
    if (entry.record_at >= 0) {  // the decisions, for the step's one copy back
      int32_t* dst = plan_record_.as<int32_t>() + entry.record_at;
      for (auto [src, words, at] : {std::tuple<const void*, int64_t, int64_t>{experts, t * e, 0},
                                    {weights, t * e, t * e},
                                    {count, t, 2 * t * e}}) {
        RETURN_IF_ERROR(backend_->Convert({.src = src,
                                           .dst = dst + at,
                                           .n = words,
                                           .src_dtype = ScalarType::kF32,
                                           .dst_dtype = ScalarType::kF32}));
      }
    }
  }
  if (!plan_.site_used[site]) return absl::OkStatus();
  const StepPlan::Site& s = plan_.sites[site];
  RETURN_IF_ERROR(backend_->SgmvShrink({.x = x,
                                        .v = plan_v_.as<float>(),
                                        .x_row = plan_.pair_token,
                                        .seg_start = plan_.seg_start,
                                        .seg_rank = s.seg_rank,
                                        .seg_row_offset = s.seg_off,
                                        .a_rows = s.a_rows,
                                        .num_segments = plan_.segments,
                                        .in = in,
                                        .v_stride = plan_.v_stride,
                                        .dtype = dt_}));
  // One pair per adapted token (its adapter's static LoRA; rank 0 where it has none here).
  return backend_->SgmvExpandRows({.v = plan_v_.as<float>(),
                                   .y = y,
                                   .token_pair = plan_.token_pair,
                                   .count = plan_.token_count,
                                   .weight = s.weight,
                                   .seg_start = plan_.seg_start,
                                   .seg_rank = s.seg_rank,
                                   .seg_row_offset = s.seg_off,
                                   .b_rows = s.b_rows,
                                   .num_tokens = t,
                                   .pair_stride = 1,
                                   .num_segments = plan_.segments,
                                   .out = out,
                                   .v_stride = plan_.v_stride,
                                   .dtype = dt_});
}

int32_t AdapterExecutor::RankKeep(const RoutedModule& rm) {
  absl::StatusOr<kernels::RankRouteParams> p =
      ToRankRouteParams(rm.routing, rm.experts.rank, rm.select_on_abs);
  return p.ok() ? p->k : 0;  // PlanPass admits only groups whose parameters convert
}

absl::Status AdapterExecutor::ApplyPlannedRanks(const StepPlan::Routed& entry, const void* x,
                                                int64_t in, void* y, int64_t out) {
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
                                        .dtype = dt_}));
  const float* router_logits = nullptr;
  if (rm.router_type == RouterType::kLinear) {  // SMoRA's gate, fp32
    const auto& [weight, bias] = entry.att->routers.at(&rm.router);
    RETURN_IF_ERROR(backend_->Gemm({.x = x,
                                    .w = weight.data(),
                                    .y = logits,
                                    .m = t,
                                    .n = r,
                                    .k = in,
                                    .dtype = dt_,
                                    .y_f32 = true}));
    if (!rm.router.bias.empty()) {
      RETURN_IF_ERROR(backend_->BiasAdd(
          {.x = logits, .bias = bias.data(), .rows = t, .cols = r, .dtype = ScalarType::kF32}));
    }
    router_logits = logits;
  }
  ASSIGN_OR_RETURN(kernels::RankRouteParams route,
                   ToRankRouteParams(rm.routing, r, rm.select_on_abs));
  route.z = plan_v_.as<float>();
  route.router_logits = router_logits;
  route.select_bias = entry.select_bias;
  route.u = u;
  route.kept = kept;
  route.ok = ok;
  route.undefined = records_.undefined_counter();
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
                                            .dtype = dt_}));
  if (entry.record_at < 0) return absl::OkStatus();
  return backend_->Convert({.src = kept,
                            .dst = plan_record_.as<int32_t>() + entry.record_at,
                            .n = t * route.k,
                            .src_dtype = ScalarType::kF32,
                            .dst_dtype = ScalarType::kF32});
}

absl::Status AdapterExecutor::Grow(DeviceBuffer* buf, size_t bytes) {
  if (buf->bytes() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(*buf, backend_->Allocate(std::max(bytes, buf->bytes() * 2)));
  return absl::OkStatus();
}

const RoutingSpec& AdapterExecutor::SpecFor(int32_t token, const RoutingSpec& base,
                                            int32_t num_experts, SpecCache* cache) const {
  const int32_t o = pass_.override_index[token];
  if (o < 0) return base;
  // Tokens of one sequence come in a row: apply its override once per site, not per token.
  if (cache->override_index != o) {
    absl::StatusOr<RoutingSpec> spec = ApplyRoutingOverride(base, pass_.overrides[o], num_experts);
    cache->spec = spec.ok() ? *spec : base;  // validated at Submit; cannot fail here
    cache->override_index = o;
  }
  return cache->spec;
}

absl::StatusOr<const float*> AdapterExecutor::RouterLogitsOnDevice(
    const Attached& owner, const RouterWeights& router, const void* x, int64_t in,
    const std::vector<int32_t>& tokens) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const auto& [weight, bias] = owner.routers.at(&router);
  RETURN_IF_ERROR(Grow(&ids_, n * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&gathered_, n * in * es_));
  RETURN_IF_ERROR(Grow(&logits_, n * router.rows * sizeof(float)));
  RETURN_IF_ERROR(backend_->CopyToDevice(ids_.data(), tokens.data(), n * sizeof(int32_t)));
  RETURN_IF_ERROR(backend_->Embedding({.ids = ids_.as<int32_t>(),
                                       .table = x,
                                       .out = gathered_.data(),
                                       .num_tokens = n,
                                       .hidden = in,
                                       .dtype = dt_}));
  RETURN_IF_ERROR(backend_->Gemm({.x = gathered_.data(),
                                  .w = weight.data(),
                                  .y = logits_.data(),
                                  .m = n,
                                  .n = router.rows,
                                  .k = in,
                                  .dtype = dt_,
                                  .y_f32 = true}));
  if (!router.bias.empty()) {
    RETURN_IF_ERROR(backend_->BiasAdd({.x = logits_.data(),
                                       .bias = bias.data(),
                                       .rows = n,
                                       .cols = router.rows,
                                       .dtype = ScalarType::kF32}));
  }
  return logits_.as<float>();
}

absl::Status AdapterExecutor::RouterLogits(const Attached& owner, const RouterWeights& router,
                                           const void* x, int64_t in,
                                           const std::vector<int32_t>& tokens,
                                           std::vector<float>* logits) {
  ASSIGN_OR_RETURN(const float* device, RouterLogitsOnDevice(owner, router, x, in, tokens));
  logits->resize(tokens.size() * router.rows);
  return backend_->CopyToHost(logits->data(), device, logits->size() * sizeof(float));
}

absl::StatusOr<bool> AdapterExecutor::RouteOnDevice(const Attached& att, int32_t layer,
                                                    LinearModule m, const RoutedModule& rm,
                                                    const std::vector<int32_t>& tokens,
                                                    const void* x, int64_t in, void* y,
                                                    int64_t out) {
  const LoraStack& stack = rm.experts;
  const int32_t e_count = stack.num_experts;
  const int32_t rank = stack.rank;
  // Every expert of the stack pinned, its rows in expert order (seg_row_offset = e * rank). When
  // that would evict other experts, the host path routes and copies in only the routed experts.
  std::vector<const void*> a_rows, b_rows;
  ASSIGN_OR_RETURN(bool pinned, cache_.AcquireAllIfRoom(&stack, &a_rows, &b_rows));
  if (!pinned) return false;
  absl::Cleanup unpin = [&] {
    for (int32_t e = 0; e < e_count; ++e) cache_.Release(&stack, e);
  };
  // Tokens grouped by their routing spec (per-request overrides), one Route call per group.
  std::vector<int32_t> ordered = tokens;
  std::stable_sort(ordered.begin(), ordered.end(), [&](int32_t a, int32_t b) {
    return pass_.override_index[a] < pass_.override_index[b];
  });
  const int64_t n = static_cast<int64_t>(ordered.size());
  ASSIGN_OR_RETURN(const float* logits, RouterLogitsOnDevice(att, rm.router, x, in, ordered));
  RETURN_IF_ERROR(Grow(&route_experts_, n * e_count * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&route_weights_, n * e_count * sizeof(float)));
  RETURN_IF_ERROR(Grow(&route_count_, n * sizeof(int32_t)));
  SpecCache scratch;
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n && pass_.override_index[ordered[end]] == pass_.override_index[ordered[begin]]) {
      ++end;
    }
    const RoutingSpec& spec = SpecFor(ordered[begin], rm.routing, e_count, &scratch);
    ASSIGN_OR_RETURN(kernels::RouteParams route, ToRouteParams(spec, e_count));
    route.logits = logits + begin * e_count;
    route.experts = route_experts_.as<int32_t>() + begin * e_count;
    route.weights = route_weights_.as<float>() + begin * e_count;
    route.count = route_count_.as<int32_t>() + begin;
    route.num_tokens = end - begin;
    RETURN_IF_ERROR(backend_->Route(route));
    begin = end;
  }
  // Pairs, segments and row tables on the device; then one shrink and one expand.
  const int64_t max_pairs = n * e_count;
  struct Upload {
    DeviceBuffer* buf;
    const void* src;
    size_t bytes;
  };
  for (const Upload& u : {Upload{&route_rows_, ordered.data(), ordered.size() * 4},
                          Upload{&scale_, stack.scale.data(), stack.scale.size() * 4},
                          Upload{&dev_a_rows_, a_rows.data(), a_rows.size() * sizeof(void*)},
                          Upload{&dev_b_rows_, b_rows.data(), b_rows.size() * sizeof(void*)}}) {
    RETURN_IF_ERROR(Grow(u.buf, u.bytes));
    RETURN_IF_ERROR(backend_->CopyToDevice(u.buf->data(), u.src, u.bytes));
  }
  RETURN_IF_ERROR(Grow(&dev_pair_x_, max_pairs * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&dev_pair_w_, max_pairs * sizeof(float)));
  RETURN_IF_ERROR(Grow(&dev_row_pair_, max_pairs * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&dev_seg_start_, (e_count + 1) * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&dev_seg_rank_, e_count * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&dev_seg_off_, e_count * sizeof(int64_t)));
  RETURN_IF_ERROR(Grow(&dev_v_, max_pairs * rank * sizeof(float)));
  RETURN_IF_ERROR(backend_->BuildSegments({.experts = route_experts_.as<int32_t>(),
                                           .weights = route_weights_.as<float>(),
                                           .count = route_count_.as<int32_t>(),
                                           .rows = route_rows_.as<int32_t>(),
                                           .scale = scale_.as<float>(),
                                           .pair_row = dev_pair_x_.as<int32_t>(),
                                           .pair_weight = dev_pair_w_.as<float>(),
                                           .seg_start = dev_seg_start_.as<int32_t>(),
                                           .seg_rank = dev_seg_rank_.as<int32_t>(),
                                           .seg_row_offset = dev_seg_off_.as<int64_t>(),
                                           .token_pair = dev_row_pair_.as<int32_t>(),
                                           .undefined = records_.undefined_counter(),
                                           .num_tokens = static_cast<int32_t>(n),
                                           .num_experts = e_count,
                                           .rank = rank}));
  records_.MarkDeviceRouted();
  RETURN_IF_ERROR(backend_->SgmvShrink({.x = x,
                                        .v = dev_v_.as<float>(),
                                        .x_row = dev_pair_x_.as<int32_t>(),
                                        .seg_start = dev_seg_start_.as<int32_t>(),
                                        .seg_rank = dev_seg_rank_.as<int32_t>(),
                                        .seg_row_offset = dev_seg_off_.as<int64_t>(),
                                        .a_rows = dev_a_rows_.as<const void*>(),
                                        .num_segments = e_count,
                                        .in = in,
                                        .v_stride = rank,
                                        .dtype = dt_}));
  // Row i of the call is token ordered[i]: its k experts summed in decision order, added once.
  RETURN_IF_ERROR(backend_->SgmvExpandRows({.v = dev_v_.as<float>(),
                                            .y = y,
                                            .y_row = route_rows_.as<int32_t>(),
                                            .token_pair = dev_row_pair_.as<int32_t>(),
                                            .count = route_count_.as<int32_t>(),
                                            .weight = dev_pair_w_.as<float>(),
                                            .seg_start = dev_seg_start_.as<int32_t>(),
                                            .seg_rank = dev_seg_rank_.as<int32_t>(),
                                            .seg_row_offset = dev_seg_off_.as<int64_t>(),
                                            .b_rows = dev_b_rows_.as<const void*>(),
                                            .num_tokens = n,
                                            .pair_stride = e_count,
                                            .num_segments = e_count,
                                            .out = out,
                                            .v_stride = rank,
                                            .dtype = dt_}));
  // Routing records are the only reason to bring the decisions to the host: kept on the device
  // now, copied with the step's results (IssueResultCopies).
  if (std::any_of(ordered.begin(), ordered.end(),
                  [&](int32_t t) { return pass_.record[t] >= 0; })) {
    ASSIGN_OR_RETURN(const int64_t experts_at, records_.Keep(route_experts_.data(), n * e_count));
    ASSIGN_OR_RETURN(const int64_t weights_at, records_.Keep(route_weights_.data(), n * e_count));
    ASSIGN_OR_RETURN(const int64_t count_at, records_.Keep(route_count_.data(), n));
    for (int64_t i = 0; i < n; ++i) {
      records_.Defer(ordered[i], layer, LinearModuleName(m), experts_at + i * e_count,
                     weights_at + i * e_count, count_at + i, 0);
    }
  }
  return true;
}

absl::Status AdapterExecutor::IssueResultCopies() { return records_.IssueCopies(); }

absl::Status AdapterExecutor::CollectResults() { return records_.Collect(); }

absl::Status AdapterExecutor::CheckRouting() { return records_.Check(); }

absl::Status AdapterExecutor::ApplyRankGroup(const Attached& att, int32_t layer, LinearModule m,
                                             const RoutedModule& rm,
                                             const std::vector<int32_t>& tokens, const void* x,
                                             void* y) {
  const LoraStack& stack = rm.experts;
  const int32_t r = stack.rank;
  const int64_t n = static_cast<int64_t>(tokens.size());
  // One segment over the adapter's tokens: z = A x (v row = token ordinal), then the per-token
  // rank mask / gates turn z into u on the device (Backend::RankRoute), then y += s B u.
  std::vector<Segment> segment{{&stack, 0, {}}};
  for (int32_t t : tokens) segment[0].pairs.push_back({t, t, stack.scale[0]});
  absl::Cleanup unpin = [this] { sgmv_.ReleasePins(); };
  size_t next = 0;
  ASSIGN_OR_RETURN(SgmvRunner::Call call, sgmv_.Upload(segment, &next));
  RETURN_IF_ERROR(sgmv_.Shrink(call, x, stack.in));
  const float* logits = nullptr;
  if (rm.router_type == RouterType::kLinear) {
    ASSIGN_OR_RETURN(logits, RouterLogitsOnDevice(att, rm.router, x, stack.in, tokens));
  }
  RETURN_IF_ERROR(Grow(&rank_u_, n * r * sizeof(float)));
  RETURN_IF_ERROR(Grow(&route_experts_, n * r * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&route_count_, n * sizeof(int32_t)));
  const std::vector<float>& bias = rm.router.select_bias;
  if (!bias.empty()) {
    RETURN_IF_ERROR(Grow(&scale_, bias.size() * sizeof(float)));
    RETURN_IF_ERROR(backend_->CopyToDevice(scale_.data(), bias.data(), bias.size() * 4));
  }
  // One call per run of tokens with the same routing spec (per-request overrides change k).
  std::vector<std::pair<int64_t, int32_t>> runs;  // (first token ordinal, k)
  SpecCache scratch;
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n && pass_.override_index[tokens[end]] == pass_.override_index[tokens[begin]]) {
      ++end;
    }
    const RoutingSpec& spec = SpecFor(tokens[begin], rm.routing, r, &scratch);
    ASSIGN_OR_RETURN(kernels::RankRouteParams route, ToRankRouteParams(spec, r, rm.select_on_abs));
    route.z = sgmv_.v() + begin * r;
    route.router_logits = logits == nullptr ? nullptr : logits + begin * r;
    route.select_bias = bias.empty() ? nullptr : scale_.as<float>();
    route.u = rank_u_.as<float>() + begin * r;
    route.kept = route_experts_.as<int32_t>() + begin * r;  // k <= r entries per token
    route.ok = route_count_.as<int32_t>() + begin;
    route.undefined = records_.undefined_counter();
    route.num_tokens = end - begin;
    route.z_stride = r;
    RETURN_IF_ERROR(backend_->RankRoute(route));
    runs.push_back({begin, spec.k});
    begin = end;
  }
  records_.MarkDeviceRouted();
  // Routing records are the only reason to bring the decisions to the host.
  if (std::any_of(tokens.begin(), tokens.end(), [&](int32_t t) { return pass_.record[t] >= 0; })) {
    ASSIGN_OR_RETURN(const int64_t kept_at, records_.Keep(route_experts_.data(), n * r));
    for (size_t g = 0; g < runs.size(); ++g) {
      const auto [begin, k] = runs[g];
      const int64_t end = g + 1 < runs.size() ? runs[g + 1].first : n;
      for (int64_t i = begin; i < end; ++i) {
        records_.Defer(tokens[i], layer, LinearModuleName(m), kept_at + begin * r + (i - begin) * k,
                       /*weights_at=*/-1, /*count_at=*/-1, k);
      }
    }
  }
  return sgmv_.Expand(call, y, stack.out, rank_u_.as<float>());
}

absl::Status AdapterExecutor::ApplyLinear(int32_t layer, LinearModule m, const void* x, void* y) {
  if (!active_) return absl::OkStatus();
  if (plan_.active) return ApplyPlanned(layer, m, x, y);
  const auto [in, out] = LinearModuleShape(config_, m);
  const int mi = static_cast<int>(m);
  std::vector<Segment> segments;
  std::vector<float> logits;
  std::vector<int32_t> experts;
  std::vector<float> weights;
  for (const auto& [slot, tokens] : tokens_by_slot_) {
    const Attached& att = *attached_.at(slot);
    const Adapter& a = *att.adapter;
    const AdapterLayer& L = a.layers[layer];
    for (const LoraStack& s : L.statics[mi]) {
      Segment seg{&s, 0, {}};
      for (int32_t t : tokens) seg.pairs.push_back({t, t, s.scale[0]});
      segments.push_back(std::move(seg));
    }
    if (!L.routed[mi]) continue;
    const RoutedModule& rm = *L.routed[mi];
    if (rm.rank_granular) {
      RETURN_IF_ERROR(ApplyRankGroup(att, layer, m, rm, tokens, x, y));
      continue;
    }
    const LoraStack& stack = rm.experts;
    const int32_t e_count = stack.num_experts;
    if (rm.router_type == RouterType::kLinear && e_count <= kernels::kMaxRouteWidth) {
      ASSIGN_OR_RETURN(bool routed, RouteOnDevice(att, layer, m, rm, tokens, x, in, y, out));
      if (routed) continue;
    }
    std::vector<Segment> per_expert(e_count);
    for (int32_t e = 0; e < e_count; ++e) per_expert[e] = Segment{&stack, e, {}};
    experts.resize(e_count);
    weights.resize(e_count);
    if (rm.router_type == RouterType::kXloraRef) {
      const XloraSpec& xs = *a.xlora;
      std::vector<float> scal(e_count);
      for (int32_t t : tokens) {
        if (pass_.scaling_pass) {
          if (xs.scaling_pass_value == 0.0f) break;  // exactly the base model
          std::fill(scal.begin(), scal.end(), xs.scaling_pass_value);
        } else {
          const float* s = pass_.scalings[t];
          if (s == nullptr) return absl::InternalError("X-LoRA token without scalings");
          const float* row = s + (xs.layerwise ? int64_t{rm.xlora_index} * e_count : 0);
          std::copy(row, row + e_count, scal.begin());
        }
        XloraModuleWeights(scal, xs.top_k, xs.softmax_topk, absl::MakeSpan(weights));
        int32_t n = 0;
        for (int32_t e = 0; e < e_count; ++e) {
          if (weights[e] == 0.0f) continue;
          per_expert[e].pairs.push_back(
              {t, t, weights[e] * stack.scale[e] * xs.global_scaling_weight});
        }
        // Record in descending weight order, ties to the lower index.
        std::vector<int32_t> order(e_count);
        TopKIndices(weights, e_count, order.data());
        std::vector<float> w_sorted;
        for (int32_t e : order) {
          if (weights[e] != 0.0f) {
            experts[n++] = e;
            w_sorted.push_back(weights[e]);
          }
        }
        records_.Record(t, layer, LinearModuleName(m), experts.data(), w_sorted.data(), n);
      }
    } else {
      RETURN_IF_ERROR(RouterLogits(att, rm.router, x, in, tokens, &logits));
      SpecCache scratch;
      for (size_t i = 0; i < tokens.size(); ++i) {
        const int32_t t = tokens[i];
        const RoutingSpec& spec = SpecFor(t, rm.routing, e_count, &scratch);
        ASSIGN_OR_RETURN(int32_t n,
                         RouteToken(spec, absl::MakeConstSpan(logits.data() + i * e_count, e_count),
                                    experts.data(), weights.data()));
        for (int32_t j = 0; j < n; ++j) {
          per_expert[experts[j]].pairs.push_back({t, t, weights[j] * stack.scale[experts[j]], j});
        }
        records_.Record(t, layer, LinearModuleName(m), experts.data(), weights.data(), n);
      }
    }
    for (Segment& s : per_expert) segments.push_back(std::move(s));
  }
  return sgmv_.Run(segments, x, in, y, out);
}

absl::Status AdapterExecutor::XloraScalings(int32_t slot, const void* hidden,
                                            const std::vector<int32_t>& rows,
                                            std::vector<float>* out) {
  auto it = attached_.find(slot);
  if (it == attached_.end() || !it->second->adapter->xlora) {
    return absl::InternalError("X-LoRA scalings asked of a non-X-LoRA adapter");
  }
  const Attached& att = *it->second;
  const XloraSpec& xs = *att.adapter->xlora;
  const int64_t n = static_cast<int64_t>(rows.size());
  int64_t widest = config_.hidden_size;
  for (const XloraSpec::Linear& lin : xs.classifier) widest = std::max(widest, lin.out);
  RETURN_IF_ERROR(Grow(&cls_in_, n * widest * es_));
  RETURN_IF_ERROR(Grow(&cls_out_, n * widest * es_));
  RETURN_IF_ERROR(Grow(&ids_, n * sizeof(int32_t)));
  RETURN_IF_ERROR(backend_->CopyToDevice(ids_.data(), rows.data(), n * sizeof(int32_t)));
  RETURN_IF_ERROR(backend_->Embedding({.ids = ids_.as<int32_t>(),
                                       .table = hidden,
                                       .out = cls_in_.data(),
                                       .num_tokens = n,
                                       .hidden = config_.hidden_size,
                                       .dtype = dt_}));
  std::vector<float> host;
  for (size_t li = 0; li < xs.classifier.size(); ++li) {
    const XloraSpec::Linear& lin = xs.classifier[li];
    const auto& [weight, bias] = att.classifier[li];
    RETURN_IF_ERROR(backend_->Gemm({.x = cls_in_.data(),
                                    .w = weight.data(),
                                    .y = cls_out_.data(),
                                    .m = n,
                                    .n = lin.out,
                                    .k = lin.in,
                                    .dtype = dt_}));
    if (!lin.bias.empty()) {
      RETURN_IF_ERROR(backend_->BiasAdd(
          {.x = cls_out_.data(), .bias = bias.data(), .rows = n, .cols = lin.out, .dtype = dt_}));
    }
    host.resize(n * lin.out);
    RETURN_IF_ERROR(ToHostF32(cls_out_.data(), n * lin.out, host.data()));
    if (li + 1 == xs.classifier.size()) break;
    if (xs.relu) {
      for (float& v : host) v = std::max(v, 0.0f);
    }
    RETURN_IF_ERROR(FromHostF32(host.data(), static_cast<int64_t>(host.size()), cls_in_.data()));
  }
  const int64_t c = xs.classifier.back().out;
  out->resize(n * c);
  for (int64_t t = 0; t < n; ++t) {
    const float* src = host.data() + t * c;
    float* dst = out->data() + t * c;
    if (!xs.enable_softmax) {
      std::copy(src, src + c, dst);
      continue;
    }
    // Softmax over the N adapters of each module row.
    for (int64_t row = 0; row < c; row += xs.num_adapters) {
      SoftmaxF32(absl::MakeConstSpan(src + row, xs.num_adapters), xs.softmax_temperature,
                 absl::MakeSpan(dst + row, xs.num_adapters));
    }
  }
  return absl::OkStatus();
}

bool AdapterExecutor::HasBlockFfn(int32_t layer) const {
  for (const auto& [slot, tokens] : tokens_by_slot_) {
    if (attached_.at(slot)->adapter->layers[layer].block_ffn) return true;
  }
  return false;
}

absl::Status AdapterExecutor::BlockFfnAct(int32_t layer, const void* h, const void* gate,
                                          const void* up, void* act) {
  const int64_t t_count = static_cast<int64_t>(pass_.slot.size());
  const int64_t hidden = config_.hidden_size;
  const int64_t inter = config_.intermediate_size;
  block_ = BlockPairs();
  // Route every block token; pairs in (adapter, expert) order.
  std::vector<int32_t> pair_token;
  std::vector<float> pair_weight;
  std::vector<Segment> gate_segs, up_segs;
  std::vector<int32_t> ordinal(t_count, -1);
  int32_t num_block_tokens = 0;
  std::vector<float> logits;
  for (const auto& [slot, tokens] : tokens_by_slot_) {
    const Attached& att = *attached_.at(slot);
    const Adapter& a = *att.adapter;
    if (!a.layers[layer].block_ffn) continue;
    const BlockFfn& ffn = *a.layers[layer].block_ffn;
    const int32_t e_count = ffn.num_experts;
    for (int32_t t : tokens) ordinal[t] = num_block_tokens++;
    RETURN_IF_ERROR(RouterLogits(att, ffn.router, h, hidden, tokens, &logits));
    std::vector<std::vector<std::pair<int32_t, float>>> by_expert(e_count);
    std::vector<int32_t> experts(e_count);
    std::vector<float> weights(e_count);
    SpecCache scratch;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const RoutingSpec& spec = SpecFor(tokens[i], ffn.routing, e_count, &scratch);
      ASSIGN_OR_RETURN(int32_t n,
                       RouteToken(spec, absl::MakeConstSpan(logits.data() + i * e_count, e_count),
                                  experts.data(), weights.data()));
      for (int32_t j = 0; j < n; ++j) by_expert[experts[j]].push_back({tokens[i], weights[j]});
      records_.Record(tokens[i], layer, "ffn", experts.data(), weights.data(), n);
    }
    const LoraStack* g = ffn.lora[0] ? &*ffn.lora[0] : nullptr;
    const LoraStack* u = ffn.lora[1] ? &*ffn.lora[1] : nullptr;
    const LoraStack* d = ffn.lora[2] ? &*ffn.lora[2] : nullptr;
    for (int32_t e = 0; e < e_count; ++e) {
      Segment gs{g, e, {}}, us{u, e, {}}, ds{d, e, {}};
      for (const auto& [t, w] : by_expert[e]) {
        const int32_t p = static_cast<int32_t>(pair_token.size());
        pair_token.push_back(t);
        pair_weight.push_back(w);
        if (g) gs.pairs.push_back({t, p, g->scale[e]});
        if (u) us.pairs.push_back({t, p, u->scale[e]});
        if (d) ds.pairs.push_back({p, t, w * d->scale[e]});
      }
      if (g) gate_segs.push_back(std::move(gs));
      if (u) up_segs.push_back(std::move(us));
      if (d) block_.by_expert_a.push_back(std::move(ds));
    }
  }
  const int64_t num_pairs = static_cast<int64_t>(pair_token.size());
  block_.num_pairs = num_pairs;
  // Per-pair copies of the shared base results, then each expert's gate/up LoRA deltas.
  RETURN_IF_ERROR(Grow(&block_g_, std::max<int64_t>(num_pairs, 1) * inter * es_));
  RETURN_IF_ERROR(Grow(&block_u_, std::max<int64_t>(num_pairs, 1) * inter * es_));
  RETURN_IF_ERROR(Grow(&ids_, std::max<int64_t>(num_pairs, t_count) * sizeof(int32_t)));
  if (num_pairs > 0) {
    RETURN_IF_ERROR(
        backend_->CopyToDevice(ids_.data(), pair_token.data(), num_pairs * sizeof(int32_t)));
    for (auto [src, dst] : {std::pair{gate, &block_g_}, std::pair{up, &block_u_}}) {
      RETURN_IF_ERROR(backend_->Embedding({.ids = ids_.as<int32_t>(),
                                           .table = src,
                                           .out = dst->data(),
                                           .num_tokens = num_pairs,
                                           .hidden = inter,
                                           .dtype = dt_}));
    }
    RETURN_IF_ERROR(sgmv_.Run(gate_segs, h, hidden, block_g_.data(), inter));
    RETURN_IF_ERROR(sgmv_.Run(up_segs, h, hidden, block_u_.data(), inter));
    RETURN_IF_ERROR(backend_->SiluMul({.gate = block_g_.data(),
                                       .up = block_u_.data(),
                                       .out = block_g_.data(),
                                       .rows = num_pairs,
                                       .cols = inter,
                                       .dtype = dt_}));
  }
  // ext = [base SwiGLU of all T tokens ; zeroed rows for the block tokens], then
  // ext[T + ordinal(t)] += w * a_pair, and act[t] = ext[t or T + ordinal(t)].
  const int64_t ext_rows = t_count + num_block_tokens;
  RETURN_IF_ERROR(Grow(&ext_, ext_rows * inter * es_));
  RETURN_IF_ERROR(backend_->SiluMul(
      {.gate = gate, .up = up, .out = ext_.data(), .rows = t_count, .cols = inter, .dtype = dt_}));
  if (zeros_.size() < static_cast<size_t>(num_block_tokens * inter)) {
    zeros_.resize(num_block_tokens * inter, 0.0f);
  }
  // All-zero bytes are 0 in every dtype.
  RETURN_IF_ERROR(backend_->CopyToDevice(ext_.as<char>() + t_count * inter * es_, zeros_.data(),
                                         num_block_tokens * inter * es_));
  if (num_pairs > 0) {
    // Row T + ordinal(t) sums its token's pairs (expert order) and adds once: no atomics.
    std::vector<int32_t> rows(num_block_tokens), count(num_block_tokens, 0);
    for (int32_t r = 0; r < num_block_tokens; ++r) rows[r] = static_cast<int32_t>(t_count) + r;
    for (int64_t p = 0; p < num_pairs; ++p) ++count[ordinal[pair_token[p]]];
    const int32_t stride = *std::max_element(count.begin(), count.end());
    std::vector<int32_t> src(int64_t{num_block_tokens} * stride, 0);
    std::fill(count.begin(), count.end(), 0);
    for (int64_t p = 0; p < num_pairs; ++p) {
      const int32_t r = ordinal[pair_token[p]];
      src[int64_t{r} * stride + count[r]++] = static_cast<int32_t>(p);
    }
    struct Upload {
      DeviceBuffer* buf;
      const void* src;
      size_t bytes;
    };
    for (const Upload& u : {Upload{&gather_rows_, rows.data(), rows.size() * 4},
                            Upload{&gather_src_, src.data(), src.size() * 4},
                            Upload{&gather_count_, count.data(), count.size() * 4},
                            Upload{&gather_w_, pair_weight.data(), pair_weight.size() * 4}}) {
      RETURN_IF_ERROR(Grow(u.buf, u.bytes));
      RETURN_IF_ERROR(backend_->CopyToDevice(u.buf->data(), u.src, u.bytes));
    }
    RETURN_IF_ERROR(backend_->GatherAdd({.x = block_g_.data(),
                                         .y = ext_.data(),
                                         .y_row = gather_rows_.as<int32_t>(),
                                         .src = gather_src_.as<int32_t>(),
                                         .count = gather_count_.as<int32_t>(),
                                         .weight = gather_w_.as<float>(),
                                         .rows = num_block_tokens,
                                         .src_stride = stride,
                                         .x_rows = num_pairs,
                                         .cols = inter,
                                         .dtype = dt_}));
  }
  std::vector<int32_t> ext_ids(t_count);
  for (int64_t t = 0; t < t_count; ++t) {
    ext_ids[t] = ordinal[t] < 0 ? static_cast<int32_t>(t) : t_count + ordinal[t];
  }
  RETURN_IF_ERROR(Grow(&ext_ids_, t_count * sizeof(int32_t)));
  RETURN_IF_ERROR(backend_->CopyToDevice(ext_ids_.data(), ext_ids.data(), t_count * 4));
  return backend_->Embedding({.ids = ext_ids_.as<int32_t>(),
                              .table = ext_.data(),
                              .out = act,
                              .num_tokens = t_count,
                              .hidden = inter,
                              .dtype = dt_});
}

absl::Status AdapterExecutor::BlockFfnDown(int32_t layer, void* o) {
  if (block_.num_pairs == 0) return absl::OkStatus();
  return sgmv_.Run(block_.by_expert_a, block_g_.data(), config_.intermediate_size, o,
                   config_.hidden_size);
}

}  // namespace moleserve::engine
