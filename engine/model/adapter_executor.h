#pragma once

// AdapterExecutor: runs the MoLE part of a forward pass for the adapters attached to a model.
// LlamaModel calls it after each base linear module (static LoRAs, module-scope routed groups,
// rank-granular groups, X-LoRA modules) and for block-routed FFNs (MixLoRA), once per layer.
//
// Per module, the (token, expert, weight) pairs of every adapter in the pass are grouped by expert
// into segments and applied with one segmented-GEMM shrink + expand (Backend::SgmvShrink /
// SgmvExpandRows) whose row tables point at the attached experts' rank rows. The expand is owned
// by output rows: a token's deltas are summed in fp32 in a fixed order (decision order for
// routed experts) and added once, with no atomics, so a pass gives the same bits on every run.
// Activations, routers and pages are in the backend's compute dtype (fp32 on CPU, bf16 on CUDA; the
// SGMV intermediate v is fp32). Module-scope groups with a linear router are routed on the device
// (Backend::Route + BuildSegments) and so are rank-granular groups (Backend::RankRoute), with the
// selection rules of engine/routing and no host round trip; so are X-LoRA modules in planned
// passes (RouteRule::kXlora over the step's scalings), and so are block-routed FFNs in planned
// passes (StepPlanner::BlockAct). Unplanned passes route X-LoRA and block FFNs on the host
// (engine/routing: the same rules and bits).
//
// Expert weights live in the paged expert cache (engine/expert_cache): each SGMV call pins the
// experts of its segments (copying misses in from the adapter's host memory) and releases them
// after its kernels; when the pinned experts fill the cache, the call is split into parts that fit.
//
// Parts, each owning its buffers: SgmvRunner (segments, pins, the shrink and expand of eager
// calls), StepPlanner (a planned pass: every table in one upload, then ops only, so decode steps
// can be graphed), StepRecords (routing records and the undefined-logits count, brought back with
// the step's results). This class keeps the attached adapters, the pass's tokens, the eager
// routing paths (device and host) and the block FFN; XloraClassifier runs X-LoRA's classifier.
//
// Lifecycle: Attach registers an adapter (routers and the X-LoRA classifier are uploaded; its LoRA
// experts are registered with the cache) until Detach; BeginPass sets up one pass
// (which adapter each token uses, X-LoRA scalings, which tokens record their routing); then the
// model calls ApplyLinear / BlockFfn* layer by layer. Scratch buffers grow on demand and are kept.
// Thread safety: not thread-safe; the engine loop drives it. Device memory: owned (adapter weights
// and scratch), freed on Detach / destruction.

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/expert_cache/expert_cache.h"
#include "engine/model/attached_adapter.h"
#include "engine/model/sgmv_runner.h"
#include "engine/model/step_planner.h"
#include "engine/model/step_records.h"
#include "engine/model/xlora_classifier.h"
#include "engine/model_io/model_config.h"
#include "engine/routing/routing.h"

namespace moleserve::engine {

struct PassTokens {
  // slot[t]: attached adapter of token t, -1 = base model.
  std::vector<int32_t> slot;
  // override_index[t]: index into overrides, -1 = none.
  std::vector<int32_t> override_index;
  std::vector<RoutingOverride> overrides;
  // record[t]: index into the records output, -1 = do not record.
  std::vector<int32_t> record;
  int32_t num_records = 0;
  // X-LoRA: scalings[t] points at the token's [num_modules * N] weights (after the classifier's
  // softmax); nullptr for tokens of other adapters.
  std::vector<const float*> scalings;
  // The X-LoRA scaling pass: X-LoRA tokens use scaling_pass_value for every scaling.
  bool scaling_pass = false;
};

// Which pass of a step: the main pass, or X-LoRA's scaling pass before it.
enum class PassRole { kMain = 0, kScaling = 1 };

class AdapterExecutor {
 public:
  // Adapter experts live in `cache` (not owned; it outlives the executor). `max_tokens`: the most
  // tokens one pass routes (the model's max_batch_tokens), which sizes the mixture routers'
  // scratch at Attach.
  AdapterExecutor(Backend* backend, const ModelConfig& config, ExpertCache* cache,
                  int64_t max_tokens);
  ~AdapterExecutor();

  // Uploads the adapter; returns its slot. kInvalidArgument when it does not fit the model,
  // kResourceExhausted when the expert cache cannot hold its largest expert.
  absl::StatusOr<int32_t> Attach(std::shared_ptr<const Adapter> adapter);
  void Detach(int32_t slot);
  const Adapter* adapter(int32_t slot) const;
  // Device bytes the adapter holds now: routers, classifier and its resident experts.
  int64_t DeviceBytes(int32_t slot) const;
  ExpertCache& cache() { return *cache_; }
  const ExpertCache& cache() const { return *cache_; }
  // SGMV calls split because their experts did not fit the cache at once.
  int64_t splits() const { return sgmv_.splits(); }

  // Starts a pass over `tokens` (size T) in `role`, which becomes the current pass; ends that
  // role's previous plan only (a graphed X-LoRA step plans its scaling pass, then its main pass,
  // then runs both). kInvalidArgument on an unknown slot.
  absl::Status BeginPass(PassTokens tokens, PassRole role = PassRole::kMain);
  // Makes `role`'s pass (begun before) the current one: ApplyLinear and the rest act on it.
  void UsePass(PassRole role) { role_ = role; }
  // Plans the pass: when every adapter of the pass is plain LoRA, module-scope routed with a
  // linear router, rank-wise (FlyLoRA, SMoRA), X-LoRA or a block-routed FFN (at most one static
  // LoRA per module; per-request routing overrides route their own tokens) and all their experts
  // fit the cache at once,
  // pins them for the whole pass and uploads, in one copy, every table the pass needs: the
  // static segments of every site, each adapter's token mask, the routed groups' scales and row
  // tables. ApplyLinear then issues only ops, with no host work and no copies: per routed group
  // router logits of all the step's tokens, Route and BuildSegments under the adapter's mask, a
  // shrink and an expand (rank groups: the shrink, the gate's logits, RankRoute under the mask
  // and the expand); then one shrink and expand for the static LoRAs. So the pass can be
  // captured in a graph. Routing records are copied on the device and come back with the step's
  // results. False (nothing planned, nothing pinned) otherwise; the pass then runs as before.
  absl::StatusOr<bool> PlanPass();
  bool planned() const { return P().planner.active(); }
  // What the launches of a planned pass depend on besides the token count (segments, rank
  // stride, which sites are adapted, the plan buffers' allocation, and the adapters when a
  // routed group takes part): a graph captured for one key replays correctly for any planned
  // pass with the same key.
  const std::vector<int64_t>& plan_key() const { return P().planner.key(); }
  // The plan buffers' allocation epoch (a graph captured before it grew reads freed memory),
  // and the slots whose routers the planned pass's launches read (routed groups, block FFNs).
  int64_t plan_epoch() const { return P().planner.epoch(); }
  std::vector<int32_t> plan_routed_slots() const { return P().planner.routed_slots(); }
  // Ends both passes: releases what their plans pinned.
  void EndPass();
  // The main pass's planned scalings table of X-LoRA adapter `slot` (StepPlanner::xlora_table).
  float* xlora_table(int32_t slot) const { return passes_[0].planner.xlora_table(slot); }
  // True when some token of the pass uses an adapter.
  bool active() const { return P().active; }

  // y[t] += adapter deltas of module m for every adapter token, x [T, in], y [T, y_stride]
  // (0: out): y_stride is the width of a fused projection whose columns y starts at.
  absl::Status ApplyLinear(int32_t layer, LinearModule m, const void* x, void* y,
                           int64_t y_stride = 0);
  // The same for every module of fused projection p (q|k|v, gate|up) over one input: y
  // [T, ProjectionWidth(p)] holds the modules' outputs side by side. A planned pass shrinks the
  // modules' static LoRAs in one call (StepPlanner::ApplyProjection).
  absl::Status ApplyProjection(int32_t layer, Projection p, const void* x, void* y);

  // True when some token of the pass has a block-routed FFN at `layer`.
  bool HasBlockFfn(int32_t layer) const;
  // Block-routed FFN (MOLE_FORMAT 1.3, serving rewrite). In: h [T, H] (FFN input), gate_up
  // [T, 2I] the fused gate|up base results (with static deltas). Out: act [T, I], the input of
  // the down projection: the base SwiGLU for other tokens, sum_e w_e a_e for routed ones. Keeps
  // the pairs for BlockFfnDown, which adds sum_e w_e s_d B_d,e A_d,e a_e to o [T, H].
  absl::Status BlockFfnAct(int32_t layer, const void* h, const void* gate_up, void* act);
  absl::Status BlockFfnDown(int32_t layer, void* o);

  // After a pass: kInvalidArgument when some token routed on the device had undefined router
  // logits (NaN, +inf or all -inf), as host routing reports it. One device read when any group
  // was routed on the device, nothing otherwise.
  absl::Status CheckRouting();
  // The same in two halves, so a step synchronises once: IssueResultCopies queues (without
  // waiting) the copies of the device-routed decisions that records() still lacks and of the
  // undefined-logits count; after the caller's synchronising copy, CollectResults fills those
  // records and returns what CheckRouting would.
  absl::Status IssueResultCopies();
  absl::Status CollectResults();

  // X-LoRA classifier of the adapter in `slot` on rows `rows` of the final-norm hidden states
  // `hidden` ([*, H], device), on the device (XloraClassifier), brought to the host: out [n, C]
  // scalings, softmaxed per module row when enable_softmax (C = N, or num_modules * N when
  // layerwise).
  absl::Status XloraScalings(int32_t slot, const void* hidden, const std::vector<int32_t>& rows,
                             std::vector<float>* out);
  // The same, ops only, for a graphed step (XloraClassifier::Run): rows of `ids` (device) with
  // active[i] != 0 into out (fp32, row stride out_stride). ReserveXlora first, outside capture.
  absl::Status ReserveXlora(int32_t slot, int64_t rows);
  absl::Status XloraScalingsOnDevice(int32_t slot, const void* hidden, const int32_t* ids,
                                     int64_t rows, const int32_t* active, float* out,
                                     int64_t out_stride);
  int64_t xlora_epoch() const { return xlora_.epoch(); }
  // Grows whenever a buffer some graph may read is replaced: both plans' and the classifier's.
  int64_t buffers_epoch() const {
    return passes_[0].planner.epoch() + passes_[1].planner.epoch() + xlora_.epoch();
  }

  // The routing recorded during the pass, indexed by PassTokens::record.
  std::vector<std::vector<RoutingRecord>>& records() { return records_.records(); }

 private:
  using Attached = AttachedAdapter;
  using Pair = SgmvRunner::Pair;
  using Segment = SgmvRunner::Segment;

  // fp32 host values uploaded in the compute dtype.
  absl::StatusOr<DeviceBuffer> UploadFloats(const std::vector<float>& v);
  absl::Status FromHostF32(const float* src, int64_t n, void* dst);
  // n compute-dtype values on the device as fp32 on the host.
  absl::Status ToHostF32(const void* src, int64_t n, float* dst);
  absl::Status Grow(DeviceBuffer* buf, size_t bytes);
  // An output gate's logits [tokens, E] (RouterType::kOutputGate), fp32 on the device: every
  // expert's output (a dense SGMV pass), the gate's GEMM over their concatenation, then
  // Backend::OutputGateScale (L2 normalisation; -inf for the request's disabled experts).
  absl::StatusOr<const float*> OutputGateLogitsOnDevice(const Attached& owner,
                                                        const RoutedModule& rm, const void* x,
                                                        int64_t in, int64_t out,
                                                        const std::vector<int32_t>& tokens);
  // Router logits [n, rows] of `tokens` (rows of x, width in): GEMM + bias on the backend, as
  // fp32 on the device (RouterLogitsOnDevice) or on the host.
  absl::StatusOr<const float*> RouterLogitsOnDevice(const Attached& owner,
                                                    const RouterWeights& router, const void* x,
                                                    int64_t in, const std::vector<int32_t>& tokens);
  absl::Status RouterLogits(const Attached& owner, const RouterWeights& router, const void* x,
                            int64_t in, const std::vector<int32_t>& tokens,
                            std::vector<float>* logits);
  // A module-scope routed group with a linear router, routed on the device: router logits,
  // Backend::Route, Backend::BuildSegments and one shrink + expand, with no host round trip
  // (decisions come to the host only for routing records). False when the stack's experts are
  // not all resident and do not fit the free pages (ExpertCache::AcquireAllIfRoom): the caller
  // routes on the host, which copies in only the routed experts and can split the call.
  absl::StatusOr<bool> RouteOnDevice(const Attached& att, int32_t layer, LinearModule m,
                                     const RoutedModule& rm, const std::vector<int32_t>& tokens,
                                     const void* x, int64_t in, void* y, int64_t out,
                                     int64_t y_stride);
  // Applies a rank-granular group to the tokens of one adapter.
  absl::Status ApplyRankGroup(const Attached& att, int32_t layer, LinearModule m,
                              const RoutedModule& rm, const std::vector<int32_t>& tokens,
                              const void* x, void* y, int64_t y_stride);
  // The routing spec of `token` at a site whose own spec is `base`: base, or base with the
  // token's request override applied (memoised in `cache`, one per site and pass).
  struct SpecCache {
    int32_t override_index = -1;
    RoutingSpec spec;
  };
  const RoutingSpec& SpecFor(int32_t token, const RoutingSpec& base, int32_t num_experts,
                             SpecCache* cache) const;

  Backend* backend_;
  ModelConfig config_;
  ScalarType dt_;  // the backend's compute dtype: activations, routers, classifier, pages
  int64_t es_;     // its element size in bytes
  ExpertCache* cache_;
  int64_t max_tokens_;
  SgmvRunner sgmv_;  // static LoRAs, host-routed groups, rank groups, the block FFN's LoRAs
  std::map<int32_t, std::unique_ptr<Attached>> attached_;
  int32_t next_slot_ = 0;

  // Current pass.
  // A pass: its tokens, whether some token uses an adapter, each adapter's tokens (ascending),
  // and its plan. One per role, so a graphed step can hold the scaling pass's plan and the main
  // pass's at once; each role keeps its own plan buffers (their addresses are in graphs).
  struct Pass {
    Pass(Backend* backend, const ModelConfig& config, ExpertCache* cache, StepRecords* records)
        : planner(backend, config, cache, records) {}
    PassTokens tokens;
    bool active = false;
    std::map<int32_t, std::vector<int32_t>> by_slot;
    StepPlanner planner;
  };
  Pass& P() { return passes_[static_cast<int>(role_)]; }
  const Pass& P() const { return passes_[static_cast<int>(role_)]; }
  std::vector<float> zeros_;  // host zeros for clearing device rows (grown on demand)
  // Block FFN pairs of the current layer: (token, expert, weight) in segment order.
  struct BlockPairs {
    std::vector<Segment> by_expert_h;  // x_row = token, y_row = pair (gate/up LoRA)
    std::vector<Segment> by_expert_a;  // x_row = pair, y_row = token (down LoRA, weight w * s)
    int64_t num_pairs = 0;
  } block_;

  // Scratch (grown on demand).
  DeviceBuffer ids_, gathered_, logits_, block_g_, block_u_, ext_, ext_ids_, f32_;
  // The block FFN's weighted sum (GatherAdd): target rows, sources, counts, weights.
  DeviceBuffer gather_rows_, gather_src_, gather_count_, gather_w_;
  // RouteOnDevice's segments, built on the device: pairs, per-token pairs, segment and row
  // tables, v.
  DeviceBuffer dev_pair_x_, dev_pair_w_, dev_row_pair_, dev_seg_start_, dev_seg_rank_, dev_seg_off_,
      dev_a_rows_, dev_b_rows_, dev_v_;
  // Device routing: decisions and the LoRA scales of the stack.
  // (Rank groups: route_experts_ holds the kept ranks, route_count_ the ok flags, scale_ the
  // selection bias, rank_u_ the gated shrink output.)
  DeviceBuffer route_rows_, route_experts_, route_weights_, route_count_, scale_, rank_u_;
  DeviceBuffer gate_d_;     // output gates: the experts' outputs
  DeviceBuffer gate_mask_;  // output gates: 0 or -inf per token and expert
  StepRecords records_;
  Pass passes_[2];                   // by PassRole
  PassRole role_ = PassRole::kMain;  // the current pass
  XloraClassifier xlora_;            // X-LoRA classifiers' scratch
  std::vector<uint16_t> host_bf16_;  // FromHostF32's conversion buffer
};

}  // namespace moleserve::engine
