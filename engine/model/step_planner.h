#pragma once

// StepPlanner: lays out a whole pass's adapter work before it runs, so that the modules issue
// only ops (no host work, no copies) and a decode step can be captured in a graph
// (AdapterExecutor::PlanPass / ApplyLinear).
//
// Plan() takes the pass's adapters and, when each is plain LoRA, module-scope routed with a
// linear router, rank-wise (FlyLoRA, SMoRA) or X-LoRA (modules weighted by the step's scalings:
// a [T, C] table per adapter, filled from the host or on the device by the classifier) or
// MixLoRA's block-routed FFN (BlockAct / BlockDown, per decision slot), with at most one static
// LoRA per module, and all
// their experts fit the cache at once: pins every expert for the pass and uploads in one copy
// every table the pass needs. Device tables (plan_buf_): shared pair_token [T] (x_row = y_row),
// seg_start [S + 1], identity rows [T], each adapted token's static pair and count [T], and the
// adapters' token masks [S, T]; per site weight [T], seg_rank [S], seg_off [S] and row tables
// [S * V] for A and B (segment j is the j-th adapter of the pass); per routed group its scales
// [E] and row tables [E * r] (rank groups: also per-token weights, the selection bias and one
// segment over every token). Apply() then runs a site: per routed group router logits of all
// the step's tokens (X-LoRA: its scalings table, RouteRule::kXlora), Route and BuildSegments
// under the mask of the adapter's override part, a shrink and a row-owned
// expand (rank groups: the shrink, the gate's logits, RankRoute under the mask, the expand);
// then one shrink and expand for the static LoRAs. Routing decisions are copied on the device
// into plan_record_ and come back with the step's results (StepRecords::UseDeviceWords).
//
// key() is what the launches depend on besides the token count (segments, rank stride, which
// sites are adapted, the buffers' epoch, and the adapters when a routed group takes part): a
// graph captured for one key replays correctly for any plan with the same key. The buffers grow
// on demand; each growth bumps epoch() (a graph captured before reads freed memory).
//
// Thread safety: none; the engine loop drives it. Memory: owns the plan's device buffers; pins
// experts of `cache` from Plan() to End().

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/expert_cache/expert_cache.h"
#include "engine/model/attached_adapter.h"
#include "engine/model/step_records.h"
#include "engine/model_io/model_config.h"

namespace moleserve::engine {

class StepPlanner {
 public:
  // One adapter of the pass: its slot, what is attached, and its tokens (ascending).
  struct PassAdapter {
    int32_t slot;
    const AttachedAdapter* att;
    const std::vector<int32_t>* tokens;
  };

  StepPlanner(Backend* backend, const ModelConfig& config, ExpertCache* cache,
              StepRecords* records);

  // Per-token inputs of the pass. Where X-LoRA tokens take their scalings from: scalings[t] ([C]
  // fp32 host values of token t, or nullptr: written into xlora_table() on the device before the
  // pass's first module), or, in the scaling pass, scaling_pass_value for every entry. Routing
  // overrides: override_index[t] into overrides, -1 = none (null: none at all).
  struct PassInputs {
    const std::vector<const float*>* scalings = nullptr;
    bool scaling_pass = false;
    const std::vector<int32_t>* override_index = nullptr;
    const std::vector<RoutingOverride>* overrides = nullptr;
  };

  // Plans a pass of `num_tokens` tokens over `adapters` (in slot order); leaves placeholders in
  // the records for the tokens that record routing. False (nothing planned, nothing pinned) when
  // some adapter cannot be planned or the experts do not fit; running out of device memory for
  // the tables also gives false (the pass runs eagerly).
  absl::StatusOr<bool> Plan(const std::vector<PassAdapter>& adapters, int64_t num_tokens,
                            const PassInputs& inputs);
  // The planned X-LoRA adapter's scalings table [num_tokens, C] fp32 on the device (rows of its
  // tokens), or nullptr when `slot` is not an X-LoRA adapter of the plan.
  float* xlora_table(int32_t slot) const;
  bool active() const { return plan_.active; }
  // y [T, y_stride] (0: out) += the planned adapters' deltas at (layer, m); x [T, in].
  absl::Status Apply(int32_t layer, LinearModule m, const void* x, void* y, int64_t y_stride = 0);
  // The same for every module of fused projection p (AdapterExecutor::ApplyProjection), y
  // [T, ProjectionWidth(p)]: the modules' static LoRAs in one shrink (their A rows side by side
  // per segment), then per module its routed groups and the static expand into its columns.
  absl::Status ApplyProjection(int32_t layer, Projection p, const void* x, void* y);
  // MixLoRA's block FFN at `layer` (AdapterExecutor::BlockFfnAct / BlockFfnDown): router logits,
  // Route and the gate/up LoRAs per decision slot, SwiGLU, the weighted sum into `act`; then the
  // down LoRA per decision, summed per token in decision order into `o`.
  // gate_up: [T, 2I], the fused projection's gate and up halves.
  absl::Status BlockAct(int32_t layer, const void* h, const void* gate_up, void* act);
  absl::Status BlockDown(int32_t layer, void* o);
  // Releases what the plan pinned; no plan afterwards.
  void End();

  const std::vector<int64_t>& key() const { return plan_.key; }
  int64_t epoch() const { return epoch_; }
  // The slots whose routers the plan's launches read (routed groups and block FFNs).
  std::vector<int32_t> routed_slots() const;

 private:
  // The block FFNs' scratch in plan_block_ (byte offsets): router logits; per position k its
  // decisions (experts, weights, count); the segments of the projection being applied (pairs,
  // weights, starts, ranks, offsets, the decisions' pairs and slot counts) and a word for the
  // undefined counts of repeated builds; then, in the compute dtype, the extended activations
  // [2T, I], the up projections [T * Eb, I] and per position the gate projections (then the
  // experts' activations) [T * Eb, I].
  struct BlockLayout {
    int64_t logits = 0, experts = 0, weights = 0, count = 0, per_position = 0;
    int64_t pair_row = 0, pair_w = 0, seg_start = 0, seg_rank = 0, seg_off = 0, token_pair = 0,
            slot_count = 0, spare = 0, ext = 0, up = 0, gate = 0, gate_stride = 0, bytes = 0;
  };
  struct StepPlan {
    struct Site {
      const float* weight = nullptr;
      const int32_t* seg_rank = nullptr;
      const int64_t* seg_off = nullptr;
      const void* const* a_rows = nullptr;
      const void* const* b_rows = nullptr;
    };
    struct Routed {  // one adapter's routed group at one site
      int32_t layer = 0;
      LinearModule module = LinearModule::kQ;
      int32_t slot_index = 0;  // j: the adapter's place in the pass
      int32_t slot = 0;        // its slot
      const RoutedModule* rm = nullptr;
      const AttachedAdapter* att = nullptr;
      const int32_t* mask = nullptr;
      const float* scale = nullptr;
      const void* const* a_rows = nullptr;
      const void* const* b_rows = nullptr;
      int64_t record_at = -1;  // words of plan_record_ when some of its tokens record routing
      // Rank groups: per-token weights (the LoRA scale), selection bias or null, and the one
      // segment over every token.
      const float* weight = nullptr;
      const float* select_bias = nullptr;
      const int32_t* seg_start = nullptr;
      const int32_t* seg_rank = nullptr;
      const int64_t* seg_off = nullptr;
      // X-LoRA modules: the width of the adapter's scalings rows and this module's first column
      // in its table (the weights come from the scalings, not from a router).
      int64_t xlora_cols = 0;
      const float* scalings = nullptr;
      // The override part it routes (part_tokens; -1: the adapter's tokens, for X-LoRA), the
      // spec it routes with (the group's, the part's override applied) and the override's key.
      int32_t part = -1;
      RoutingSpec spec;
      std::array<int64_t, 3> override_key{-1, -1, -1};
    };
    // Per (layer, projection): the static LoRAs' fused shrink, segment j's rows for module i at
    // j * P V + i V (P modules; zero rows pad each module's rank to V).
    struct Fused {
      bool used = false;
      const int32_t* seg_rank = nullptr;  // [S]: P V, or 0 where the adapter has none here
      const int64_t* seg_off = nullptr;   // [S]
      const void* const* a_rows = nullptr;
    };
    std::vector<Fused> fused;  // [layer * kNumProjections + projection]
    bool active = false;
    int32_t segments = 0;  // S, a power of two
    int32_t v_stride = 0;  // V, a power of two
    int64_t tokens = 0;
    int32_t max_experts = 0;
    const int32_t* pair_token = nullptr;
    const int32_t* seg_start = nullptr;
    const int32_t* identity = nullptr;
    const int32_t* token_pair = nullptr;   // [T] each adapted token's static pair
    const int32_t* token_count = nullptr;  // [T] 1 for adapted tokens, 0 for the base model
    std::vector<uint8_t> site_used;        // some adapter has a static LoRA at the site
    std::vector<Site> sites;
    std::vector<Routed> routed;
    std::vector<std::vector<int32_t>> routed_of_site;
    std::vector<std::pair<const LoraStack*, int32_t>> pins;
    std::vector<std::pair<int32_t, float*>> xlora_tables;  // (slot, its scalings table)
    struct Block {  // one adapter's block-routed FFN (MixLoRA) at one layer
      int32_t layer = 0;
      int32_t slot_index = 0;  // the adapter's place in the pass
      int32_t slot = 0;
      int32_t position = 0;  // among the layer's blocks: its scratch (BlockLayout)
      const BlockFfn* ffn = nullptr;
      const AttachedAdapter* att = nullptr;
      const int32_t* mask = nullptr;
      // gate, up, down: scales [E] and row tables [E * r]; null when the projection has no LoRA
      std::array<const float*, 3> scale{};
      std::array<const void*const*, 3> a_rows{}, b_rows{};
      const int32_t* slot_token = nullptr;  // [T * E]: the token of decision slot p, p / E
      int64_t record_at = -1;
      int32_t part = 0;  // as Routed
      RoutingSpec spec;
      std::array<int64_t, 3> override_key{-1, -1, -1};
    };
    std::vector<Block> blocks;
    std::vector<std::vector<int32_t>> blocks_of_layer;
    std::vector<std::vector<int32_t>> part_tokens;  // each override part's tokens (ascending)
    std::vector<const int32_t*> select;  // per layer with blocks: [T] rows of the extended act
    const float* ones = nullptr;         // [T * Eb]
    const int32_t* slots = nullptr;      // [T * Eb]: p
    const int32_t* z_rows = nullptr;     // [T]: T + t
    BlockLayout block_layout;            // where the block FFNs' scratch lies in plan_block_
    std::vector<int64_t> key;
  };
  // The routed groups at (layer, m), in plan order, added into y.
  absl::Status ApplyRouted(int32_t layer, LinearModule m, const void* x, void* y, int64_t y_stride);
  // The static LoRAs' expand at `site` from v (rows v_stride apart) into y.
  absl::Status ExpandStatic(int64_t site, const float* v, int32_t v_stride, void* y,
                            int64_t y_stride);
  // A planned rank group (FlyLoRA, SMoRA): z = A x and the gate's logits for every token, then
  // RankRoute and the expand under the adapter's mask; the kept ranks go to the records.
  absl::Status ApplyRanks(const StepPlan::Routed& entry, const void* x, int64_t in, void* y,
                          int64_t out, int64_t y_stride);
  BlockLayout LayoutBlocks(int64_t tokens, int64_t block_experts, int64_t positions) const;
  // BuildSegments for projection i (gate 0, up 1, down 2) of `entry` from its decisions, then
  // one shrink: pairs read x rows (tokens, or decision slots for the down projection). i = -1:
  // a build with no projection, to count the undefined decisions once.
  absl::Status BlockShrink(const StepPlan::Block& entry, int i, const void* x, int64_t in,
                           bool slot_rows, bool count_undefined);
  // Routed decisions in plan_record_ from record_at: experts [T, E], weights [T, E], count [T]
  // (DecisionWords of them). CopyDecisions copies a Route's outputs there (ops); DeferDecisions
  // leaves the records' placeholders for `tokens` at (layer, module).
  static int64_t DecisionWords(int64_t tokens, int32_t e) { return 2 * tokens * e + tokens; }
  absl::Status CopyDecisions(int64_t record_at, const int32_t* experts, const float* weights,
                             const int32_t* count, int32_t e);
  void DeferDecisions(const std::vector<int32_t>& tokens, int32_t layer, const char* module,
                      int64_t record_at, int32_t e);
  // k, the ranks a planned rank group keeps per token.
  static int32_t RankKeep(const StepPlan::Routed& entry);
  absl::Status Grow(DeviceBuffer* buf, size_t bytes);

  Backend* backend_;
  ModelConfig config_;
  ExpertCache* cache_;
  StepRecords* records_;
  ScalarType dt_;
  int64_t es_;  // its element size
  StepPlan plan_;
  // Grown on demand; each growth bumps epoch_.
  DeviceBuffer plan_buf_, plan_v_, plan_scratch_, plan_record_, plan_block_, plan_zeros_;
  DeviceBuffer plan_vs_;   // the fused static shrinks' output (grown on demand)
  DeviceBuffer zero_row_;  // hidden_size zeros in the compute dtype: fused shrinks' padding rows
  std::vector<char> plan_host_;
  int64_t epoch_ = 0;
};

}  // namespace moleserve::engine
