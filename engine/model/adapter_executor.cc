#include "engine/model/adapter_executor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"
#include "kernels/common/bf16.h"

namespace moleserve::engine {

AdapterExecutor::AdapterExecutor(Backend* backend, const ModelConfig& config, ExpertCache* cache,
                                 int64_t max_tokens)
    : backend_(backend),
      config_(config),
      dt_(backend->compute_dtype()),
      es_(static_cast<int64_t>(ScalarTypeSize(dt_))),
      cache_(cache),
      max_tokens_(max_tokens),
      sgmv_(backend, cache),
      records_(backend),
      passes_{Pass(backend, config, cache, &records_), Pass(backend, config, cache, &records_)},
      xlora_(backend, config) {}
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
  int64_t mix_rows = 0;  // the widest mixture router's GEMM
  auto add_router = [&](const RouterWeights& r) -> absl::Status {
    if (r.mixture > 0) mix_rows = std::max(mix_rows, r.gemm_rows());
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
    const auto& layers = adapter->xlora->classifier;
    for (size_t li = 0; li < layers.size(); ++li) {
      const XloraSpec::Linear& lin = layers[li];
      std::pair<DeviceBuffer, DeviceBuffer> bufs;
      ASSIGN_OR_RETURN(bufs.first, UploadFloats(lin.weight));
      if (!lin.bias.empty() && li + 1 < layers.size()) {
        ASSIGN_OR_RETURN(bufs.second, UploadFloats(lin.bias));
      } else if (!lin.bias.empty()) {  // the last layer's: fp32, added to the fp32 logits
        ASSIGN_OR_RETURN(bufs.second, backend_->Allocate(lin.bias.size() * sizeof(float)));
        RETURN_IF_ERROR(backend_->CopyToDevice(bufs.second.data(), lin.bias.data(),
                                               lin.bias.size() * sizeof(float)));
      }
      att->classifier.push_back(std::move(bufs));
    }
  }
  if (mix_rows > 0) {
    // Sized once for the largest pass: a decode graph may hold its address (never reallocated).
    absl::StatusOr<DeviceBuffer> scratch =
        backend_->Allocate(static_cast<size_t>(max_tokens_ * mix_rows) * sizeof(float));
    if (scratch.ok()) {
      att->mix_scratch = *std::move(scratch);
    } else {
      status.Update(scratch.status());
    }
  }
  if (!status.ok()) return status;  // `att` and what it uploaded go away
  const int32_t slot = next_slot_;
  if (absl::Status fits = cache_->AddOwner(slot, stacks); !fits.ok()) {
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
  cache_->RemoveOwner(slot);
  attached_.erase(it);
}

int64_t AdapterExecutor::DeviceBytes(int32_t slot) const {
  auto it = attached_.find(slot);
  if (it == attached_.end()) return 0;
  int64_t bytes = cache_->ResidentBytes(slot);
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

absl::Status AdapterExecutor::BeginPass(PassTokens tokens, PassRole role) {
  role_ = role;
  P().planner.End();
  P().tokens = std::move(tokens);
  P().by_slot.clear();
  P().active = false;
  const size_t t = P().tokens.slot.size();
  P().tokens.override_index.resize(t, -1);
  P().tokens.record.resize(t, -1);
  P().tokens.scalings.resize(t, nullptr);
  for (size_t i = 0; i < t; ++i) {
    const int32_t slot = P().tokens.slot[i];
    if (slot < 0) continue;
    if (!attached_.count(slot)) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: adapter slot ", slot, " is not attached"));
    }
    P().by_slot[slot].push_back(static_cast<int32_t>(i));
    P().active = true;
  }
  return records_.Begin(P().tokens.record, P().tokens.num_records, P().active);
}

void AdapterExecutor::EndPass() {
  for (Pass& pass : passes_) pass.planner.End();
  role_ = PassRole::kMain;
}

absl::StatusOr<bool> AdapterExecutor::PlanPass() {
  P().planner.End();
  if (!P().active) return false;
  std::vector<StepPlanner::PassAdapter> adapters;
  for (const auto& [slot, tokens] : P().by_slot) {
    adapters.push_back({slot, attached_.at(slot).get(), &tokens});
  }
  return P().planner.Plan(adapters, static_cast<int64_t>(P().tokens.slot.size()),
                          {.scalings = &P().tokens.scalings,
                           .scaling_pass = P().tokens.scaling_pass,
                           .override_index = &P().tokens.override_index,
                           .overrides = &P().tokens.overrides});
}

absl::Status AdapterExecutor::Grow(DeviceBuffer* buf, size_t bytes) {
  if (buf->bytes() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(*buf, backend_->Allocate(std::max(bytes, buf->bytes() * 2)));
  return absl::OkStatus();
}

const RoutingSpec& AdapterExecutor::SpecFor(int32_t token, const RoutingSpec& base,
                                            int32_t num_experts, SpecCache* cache) const {
  const int32_t o = P().tokens.override_index[token];
  if (o < 0) return base;
  // Tokens of one sequence come in a row: apply its override once per site, not per token.
  if (cache->override_index != o) {
    absl::StatusOr<RoutingSpec> spec =
        ApplyRoutingOverride(base, P().tokens.overrides[o], num_experts);
    cache->spec = spec.ok() ? *spec : base;  // validated at Submit; cannot fail here
    cache->override_index = o;
  }
  return cache->spec;
}

absl::StatusOr<const float*> AdapterExecutor::RouterLogitsOnDevice(
    const Attached& owner, const RouterWeights& router, const void* x, int64_t in,
    const std::vector<int32_t>& tokens) {
  const int64_t n = static_cast<int64_t>(tokens.size());
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
  RETURN_IF_ERROR(
      owner.RouterLogits(backend_, router, gathered_.data(), n, in, logits_.as<float>()));
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
                                                    const void* x, int64_t in, void* y, int64_t out,
                                                    int64_t y_stride) {
  const LoraStack& stack = rm.experts;
  const int32_t e_count = stack.num_experts;
  const int32_t rank = stack.rank;
  // Every expert of the stack pinned, its rows in expert order (seg_row_offset = e * rank). When
  // that would evict other experts, the host path routes and copies in only the routed experts.
  std::vector<const void*> a_rows, b_rows;
  ASSIGN_OR_RETURN(bool pinned, cache_->AcquireAllIfRoom(&stack, &a_rows, &b_rows));
  if (!pinned) return false;
  absl::Cleanup unpin = [&] {
    for (int32_t e = 0; e < e_count; ++e) cache_->Release(&stack, e);
  };
  // Tokens grouped by their routing spec (per-request overrides), one Route call per group.
  std::vector<int32_t> ordered = tokens;
  std::stable_sort(ordered.begin(), ordered.end(), [&](int32_t a, int32_t b) {
    return P().tokens.override_index[a] < P().tokens.override_index[b];
  });
  const int64_t n = static_cast<int64_t>(ordered.size());
  const bool output_gate = rm.router_type == RouterType::kOutputGate;
  ASSIGN_OR_RETURN(const float* logits, output_gate
                                            ? OutputGateLogitsOnDevice(att, rm, x, in, out, ordered)
                                            : RouterLogitsOnDevice(att, rm.router, x, in, ordered));
  RETURN_IF_ERROR(Grow(&route_experts_, n * e_count * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&route_weights_, n * e_count * sizeof(float)));
  RETURN_IF_ERROR(Grow(&route_count_, n * sizeof(int32_t)));
  SpecCache scratch;
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n &&
           P().tokens.override_index[ordered[end]] == P().tokens.override_index[ordered[begin]]) {
      ++end;
    }
    const RoutingSpec& spec = SpecFor(ordered[begin], rm.routing, e_count, &scratch);
    ASSIGN_OR_RETURN(kernels::RouteParams route, ToRouteParams(spec, e_count));
    route.logits = logits + begin * e_count;
    route.drop_zero = output_gate;  // a disabled expert is not routed to
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
                                        .dtype = dt_,
                                        .max_pairs = kernels::PairsThatFit(dev_v_.bytes(), rank)}));
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
                                            .dtype = dt_,
                                            .y_stride = y_stride}));
  // Routing records are the only reason to bring the decisions to the host: kept on the device
  // now, copied with the step's results (IssueResultCopies).
  if (std::any_of(ordered.begin(), ordered.end(),
                  [&](int32_t t) { return P().tokens.record[t] >= 0; })) {
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
                                             void* y, int64_t y_stride) {
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
    while (end < n &&
           P().tokens.override_index[tokens[end]] == P().tokens.override_index[tokens[begin]]) {
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
  if (std::any_of(tokens.begin(), tokens.end(),
                  [&](int32_t t) { return P().tokens.record[t] >= 0; })) {
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
  return sgmv_.Expand(call, y, stack.out, y_stride, rank_u_.as<float>());
}

absl::StatusOr<const float*> AdapterExecutor::OutputGateLogitsOnDevice(
    const Attached& owner, const RoutedModule& rm, const void* x, int64_t in, int64_t out,
    const std::vector<int32_t>& tokens) {
  // Every expert's output first: row i * E + e of d is s_e B_e A_e x[tokens[i]], so row i of
  // d viewed as [n, E * out] is token i's concatenation.
  const LoraStack& stack = rm.experts;
  const int32_t e_count = stack.num_experts;
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t width = int64_t{e_count} * out;
  RETURN_IF_ERROR(Grow(&gate_d_, static_cast<size_t>(n * width * es_)));
  RETURN_IF_ERROR(backend_->Zero(gate_d_.data(), static_cast<size_t>(n * width * es_)));
  std::vector<Segment> dense(e_count);
  for (int32_t e = 0; e < e_count; ++e) {
    dense[e] = Segment{&stack, e, {}};
    for (int64_t i = 0; i < n; ++i) {
      dense[e].pairs.push_back({tokens[i], static_cast<int32_t>(i * e_count + e), stack.scale[e]});
    }
  }
  RETURN_IF_ERROR(sgmv_.Run(dense, x, in, gate_d_.data(), out, out));
  // The gate W [E, E * out] on the concatenation, then its L2 normalisation (torch's
  // F.normalize: norm at least 1e-12) and the request's disabled experts (-inf: gate 0).
  RETURN_IF_ERROR(Grow(&logits_, n * e_count * sizeof(float)));
  RETURN_IF_ERROR(backend_->Gemm({.x = gate_d_.data(),
                                  .w = owner.routers.at(&rm.router).first.data(),
                                  .y = logits_.data(),
                                  .m = n,
                                  .n = e_count,
                                  .k = width,
                                  .dtype = dt_,
                                  .y_f32 = true}));
  const float* mask = nullptr;
  if (std::any_of(tokens.begin(), tokens.end(), [&](int32_t t) {
        const int32_t o = P().tokens.override_index[t];
        return o >= 0 && !P().tokens.overrides[o].disabled_experts.empty();
      })) {
    std::vector<float> host(static_cast<size_t>(n * e_count), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const int32_t o = P().tokens.override_index[tokens[i]];
      if (o < 0) continue;
      for (int32_t e : P().tokens.overrides[o].disabled_experts) {
        host[i * e_count + e] = -std::numeric_limits<float>::infinity();
      }
    }
    RETURN_IF_ERROR(Grow(&gate_mask_, host.size() * sizeof(float)));
    RETURN_IF_ERROR(
        backend_->CopyToDevice(gate_mask_.data(), host.data(), host.size() * sizeof(float)));
    mask = gate_mask_.as<float>();
  }
  RETURN_IF_ERROR(backend_->OutputGateScale({.d = gate_d_.data(),
                                             .logits = logits_.as<float>(),
                                             .mask = mask,
                                             .rows = n,
                                             .width = width,
                                             .experts = e_count,
                                             .dtype = dt_}));
  return logits_.as<float>();
}

absl::Status AdapterExecutor::ApplyLinear(int32_t layer, LinearModule m, const void* x, void* y,
                                          int64_t y_stride) {
  if (!P().active) return absl::OkStatus();
  if (P().planner.active()) return P().planner.Apply(layer, m, x, y, y_stride);
  const auto [in, out] = LinearModuleShape(config_, m);
  const int mi = static_cast<int>(m);
  std::vector<Segment> segments;
  std::vector<float> logits;
  std::vector<int32_t> experts;
  std::vector<float> weights;
  for (const auto& [slot, tokens] : P().by_slot) {
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
      RETURN_IF_ERROR(ApplyRankGroup(att, layer, m, rm, tokens, x, y, y_stride));
      continue;
    }
    const LoraStack& stack = rm.experts;
    const int32_t e_count = stack.num_experts;
    if ((rm.router_type == RouterType::kLinear || rm.router_type == RouterType::kMixture ||
         rm.router_type == RouterType::kOutputGate) &&
        e_count <= kernels::kMaxRouteWidth) {
      ASSIGN_OR_RETURN(bool routed,
                       RouteOnDevice(att, layer, m, rm, tokens, x, in, y, out, y_stride));
      if (routed) continue;
    }
    std::vector<Segment> per_expert(e_count);
    for (int32_t e = 0; e < e_count; ++e) per_expert[e] = Segment{&stack, e, {}};
    experts.resize(e_count);
    weights.resize(e_count);
    if (rm.router_type == RouterType::kXloraRef) {
      const XloraSpec& xs = *a.xlora;
      // The scaling pass with scaling_pass_value 0 is exactly the base model.
      if (P().tokens.scaling_pass && xs.scaling_pass_value == 0.0f) continue;
      std::vector<float> pass_value(P().tokens.scaling_pass ? e_count : 0, xs.scaling_pass_value);
      for (int32_t t : tokens) {
        const float* row = pass_value.data();
        if (!P().tokens.scaling_pass) {
          const float* s = P().tokens.scalings[t];
          if (s == nullptr) return absl::InternalError("X-LoRA token without scalings");
          row = s + (xs.layerwise ? int64_t{rm.xlora_index} * e_count : 0);
        }
        ASSIGN_OR_RETURN(int32_t n, RouteXlora(absl::MakeConstSpan(row, e_count), xs.top_k,
                                               xs.softmax_topk, experts.data(), weights.data()));
        // The planned pass's product: weight * (LoRA scale * global scaling weight).
        for (int32_t j = 0; j < n; ++j) {
          const int32_t e = experts[j];
          per_expert[e].pairs.push_back(
              {t, t, weights[j] * (stack.scale[e] * xs.global_scaling_weight), j});
        }
        records_.Record(t, layer, LinearModuleName(m), experts.data(), weights.data(), n);
      }
    } else {
      if (rm.router_type == RouterType::kOutputGate) {
        // A request's disabled experts get no gate; softmax renormalises the rest.
        ASSIGN_OR_RETURN(const float* device,
                         OutputGateLogitsOnDevice(att, rm, x, in, out, tokens));
        logits.resize(tokens.size() * e_count);
        RETURN_IF_ERROR(backend_->CopyToHost(logits.data(), device, logits.size() * sizeof(float)));
      } else {
        RETURN_IF_ERROR(RouterLogits(att, rm.router, x, in, tokens, &logits));
      }
      SpecCache scratch;
      for (size_t i = 0; i < tokens.size(); ++i) {
        const int32_t t = tokens[i];
        const RoutingSpec& spec = SpecFor(t, rm.routing, e_count, &scratch);
        ASSIGN_OR_RETURN(int32_t n,
                         RouteToken(spec, absl::MakeConstSpan(logits.data() + i * e_count, e_count),
                                    experts.data(), weights.data()));
        if (rm.router_type == RouterType::kOutputGate) {
          // A disabled expert's gate is exactly 0 (its logit is -inf): it is not applied.
          while (n > 0 && weights[n - 1] == 0.0f) --n;
        }
        for (int32_t j = 0; j < n; ++j) {
          per_expert[experts[j]].pairs.push_back({t, t, weights[j] * stack.scale[experts[j]], j});
        }
        records_.Record(t, layer, LinearModuleName(m), experts.data(), weights.data(), n);
      }
    }
    for (Segment& s : per_expert) segments.push_back(std::move(s));
  }
  return sgmv_.Run(segments, x, in, y, out, y_stride);
}

absl::Status AdapterExecutor::ApplyProjection(int32_t layer, Projection p, const void* x, void* y) {
  if (!P().active) return absl::OkStatus();
  if (P().planner.active()) return P().planner.ApplyProjection(layer, p, x, y);
  const int64_t width = ProjectionWidth(config_, p);
  for (LinearModule m : ProjectionModules(p)) {
    char* columns = static_cast<char*>(y) + ProjectionColumn(config_, m) * es_;
    RETURN_IF_ERROR(ApplyLinear(layer, m, x, columns, width));
  }
  return absl::OkStatus();
}

absl::Status AdapterExecutor::XloraScalings(int32_t slot, const void* hidden,
                                            const std::vector<int32_t>& rows,
                                            std::vector<float>* out) {
  auto it = attached_.find(slot);
  if (it == attached_.end() || !it->second->adapter->xlora) {
    return absl::InternalError("X-LoRA scalings asked of a non-X-LoRA adapter");
  }
  const Attached& att = *it->second;
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t c = att.adapter->xlora->classifier.back().out;
  RETURN_IF_ERROR(xlora_.Reserve(att, n));
  RETURN_IF_ERROR(Grow(&ids_, n * sizeof(int32_t)));
  RETURN_IF_ERROR(Grow(&f32_, n * c * sizeof(float)));
  RETURN_IF_ERROR(backend_->CopyToDevice(ids_.data(), rows.data(), n * sizeof(int32_t)));
  RETURN_IF_ERROR(
      xlora_.Run(att, hidden, ids_.as<int32_t>(), n, /*active=*/nullptr, f32_.as<float>(), c));
  out->resize(n * c);
  return backend_->CopyToHost(out->data(), f32_.data(), n * c * sizeof(float));
}

absl::Status AdapterExecutor::ReserveXlora(int32_t slot, int64_t rows) {
  return xlora_.Reserve(*attached_.at(slot), rows);
}

absl::Status AdapterExecutor::XloraScalingsOnDevice(int32_t slot, const void* hidden,
                                                    const int32_t* ids, int64_t rows,
                                                    const int32_t* active, float* out,
                                                    int64_t out_stride) {
  return xlora_.Run(*attached_.at(slot), hidden, ids, rows, active, out, out_stride);
}

bool AdapterExecutor::HasBlockFfn(int32_t layer) const {
  for (const auto& [slot, tokens] : P().by_slot) {
    if (attached_.at(slot)->adapter->layers[layer].block_ffn) return true;
  }
  return false;
}

absl::Status AdapterExecutor::BlockFfnAct(int32_t layer, const void* h, const void* gate_up,
                                          void* act) {
  if (P().planner.active()) return P().planner.BlockAct(layer, h, gate_up, act);
  const int64_t t_count = static_cast<int64_t>(P().tokens.slot.size());
  const int64_t hidden = config_.hidden_size;
  const int64_t inter = config_.intermediate_size;
  const void* gate = gate_up;  // columns [0, I) and [I, 2I) of rows 2I wide
  const void* up = static_cast<const char*>(gate_up) + inter * es_;
  block_ = BlockPairs();
  // Route every block token; pairs in (adapter, expert) order.
  std::vector<int32_t> pair_token;
  std::vector<float> pair_weight;
  std::vector<Segment> gate_segs, up_segs;
  std::vector<int32_t> ordinal(t_count, -1);
  int32_t num_block_tokens = 0;
  std::vector<float> logits;
  for (const auto& [slot, tokens] : P().by_slot) {
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
                                           .dtype = dt_,
                                           .table_stride = 2 * inter}));
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
  RETURN_IF_ERROR(backend_->SiluMul({.gate = gate,
                                     .up = up,
                                     .out = ext_.data(),
                                     .rows = t_count,
                                     .cols = inter,
                                     .dtype = dt_,
                                     .in_stride = 2 * inter}));
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
  if (P().planner.active()) return P().planner.BlockDown(layer, o);
  if (block_.num_pairs == 0) return absl::OkStatus();
  return sgmv_.Run(block_.by_expert_a, block_g_.data(), config_.intermediate_size, o,
                   config_.hidden_size);
}

}  // namespace moleserve::engine
