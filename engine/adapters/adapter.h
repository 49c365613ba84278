#pragma once

// Adapter: one MoLE model on the base model, fully validated, in host memory (fp32), immutable
// once built (engine/adapters/README.md is the format contract).
//
// Structure: per base-model layer, per linear module, any number of always-on ("static") LoRAs
// and at most one routed group (module scope, rank-granular, or X-LoRA); per layer, optionally one
// block-routed FFN (MixLoRA / LLaVA-MoLE). An X-LoRA adapter also carries its classifier.
//
//   ASSIGN_OR_RETURN(std::shared_ptr<const Adapter> a,
//                    LoadAdapter("/adapters/mixlora", "mixlora", base_config, {}));
//
// Lifetime and thread safety: an Adapter is shared as shared_ptr<const Adapter> and never changes,
// so any thread may read it. Host memory only; the model uploads what it runs.

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model_io/model_config.h"
#include "engine/routing/routing.h"

namespace moleserve::engine {

// The seven linear modules of a Llama decoder layer, in checkpoint order.
enum class LinearModule : int8_t { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLinearModules = 7;
const char* LinearModuleName(LinearModule m);  // "q_proj" ...
std::optional<LinearModule> ParseLinearModule(std::string_view name);
// {in_features, out_features} of module m in the base model.
std::array<int64_t, 2> LinearModuleShape(const ModelConfig& config, LinearModule m);

// The base model's fused projections: q|k|v and gate|up, each one GEMM over the same input whose
// output rows hold the modules' outputs side by side (LlamaModel), their static LoRAs' shrinks
// fused the same way (StepPlanner::ApplyProjection).
enum class Projection : int8_t { kQkv, kGateUp };
inline constexpr int kNumProjections = 2;
// Its modules, in column order.
std::span<const LinearModule> ProjectionModules(Projection p);
// The projection module m belongs to (nullopt: o_proj, down_proj), its first column in the
// projection's rows, and the rows' width.
std::optional<Projection> ProjectionOf(LinearModule m);
int64_t ProjectionColumn(const ModelConfig& config, LinearModule m);
int64_t ProjectionWidth(const ModelConfig& config, Projection p);

// E LoRA experts of one linear module, stacked (E = 1 for a static LoRA and for a rank group).
// Ranks are padded to `rank` with zero rows of A and zero columns of B (exact).
struct LoraStack {
  int32_t num_experts = 0;
  int32_t rank = 0;
  int64_t in = 0;
  int64_t out = 0;
  std::vector<float> a;            // [E, rank, in]
  std::vector<float> bt;           // [E, rank, out]: B transposed, so a rank row is contiguous
  std::vector<float> scale;        // [E] LoRA scale s_e (alpha/r or alpha/sqrt(r))
  std::vector<int32_t> true_rank;  // [E] unpadded ranks (FLOP and byte accounting)
  int64_t bytes() const;
};

// A router's parameters (fp32). Empty `weight` for routers that have no GEMM (implicit_A,
// xlora_ref). A Mixture of Routers (`mixture` > 0 sub-routers M) stacks its sub-routers and its
// main router into one GEMM: `weight` is [M * rows + M, in] (sub-router j's rows, then the main
// router's M rows) and its logits become rows values through Backend::MixRouter.
struct RouterWeights {
  int32_t rows = 0;  // experts, or ranks for a rank group
  int64_t in = 0;
  int32_t mixture = 0;  // MoR sub-routers; 0 = a single linear router
  int64_t gemm_rows() const { return mixture > 0 ? int64_t{mixture} * rows + mixture : rows; }
  std::vector<float> weight;       // [gemm_rows(), in]
  std::vector<float> bias;         // [rows] or empty
  std::vector<float> select_bias;  // [rows] (selection only) or empty
};

// kOutputGate (Microsoft's MoLE, Wu, Huang, Wei 2024): the gate reads the experts' outputs, not
// the module input: logits = W [N, N*out] normalize(concat_e s_e B_e A_e x) (L2), dense.
enum class RouterType { kLinear, kMixture, kImplicitA, kXloraRef, kOutputGate };

// A routed group on one module of one layer.
struct RoutedModule {
  int32_t group = 0;  // index into Adapter::groups
  RouterType router_type = RouterType::kLinear;
  bool rank_granular = false;  // FlyLoRA / SMoRA: experts.num_experts == 1, routing over ranks
  bool select_on_abs = false;  // FlyLoRA reference variant
  int32_t xlora_index = -1;    // kXloraRef: this module's row of the X-LoRA scalings
  RoutingSpec routing;         // unused for kXloraRef
  RouterWeights router;
  LoraStack experts;
};

// MixLoRA's block-routed FFN on one layer: one router on the FFN input shared by gate/up/down;
// expert e is the whole FFN with LoRA-adapted projections (MOLE_FORMAT section 1.3).
struct BlockFfn {
  int32_t group = 0;
  int32_t num_experts = 0;
  RoutingSpec routing;
  RouterWeights router;                          // [E, hidden]
  std::array<std::optional<LoraStack>, 3> lora;  // gate, up, down; absent = base projection
};

struct AdapterLayer {
  std::array<std::vector<LoraStack>, kNumLinearModules> statics;
  std::array<std::optional<RoutedModule>, kNumLinearModules> routed;
  std::optional<BlockFfn> block_ffn;
};

// X-LoRA's classifier and scaling options (MOLE_FORMAT section 2).
struct XloraSpec {
  struct Linear {
    int64_t in = 0;
    int64_t out = 0;
    std::vector<float> weight;  // [out, in]
    std::vector<float> bias;    // [out] or empty
  };
  std::vector<Linear> classifier;  // ReLU between Linears when `relu`
  bool relu = true;
  int32_t num_adapters = 0;
  int32_t num_modules = 0;  // LoRA modules indexed by module_index
  bool layerwise = false;
  bool enable_softmax = true;
  float softmax_temperature = 1.0f;
  int32_t top_k = 0;  // 0 = dense
  bool softmax_topk = false;
  float scaling_pass_value = 0.0f;
  float global_scaling_weight = 1.0f;
  std::optional<int32_t> freeze_after;  // freeze scalings after this many decode steps
};

// Summary of one group for ListModels and routing overrides.
struct GroupInfo {
  std::string id;
  std::string scope;        // "static" | "module" | "block_ffn" | "model_scalings"
  std::string granularity;  // "lora" | "rank"
  std::string algorithm;    // routing algorithm name, "xlora" or "static"
  int32_t max_experts = 0;
  int32_t min_experts = 0;
  std::vector<int32_t> ranks;  // distinct ranks, ascending
  int32_t num_modules = 0;     // (layer, module) sites
};

struct Adapter {
  std::string name;
  std::string source_family;         // "lora", "mixlora", "mola", "xlora", ...
  std::string format;                // "mole/1" or "peft"
  std::vector<AdapterLayer> layers;  // one per base-model layer
  std::optional<XloraSpec> xlora;
  std::vector<GroupInfo> groups;
  int64_t bytes = 0;  // LoRA + router + classifier parameters, fp32

  bool is_xlora() const { return xlora.has_value(); }
  // Total experts over all groups and sites (static LoRAs count one each).
  int64_t num_experts() const;
};

struct AdapterLimits {
  int32_t max_rank = 256;
  int32_t max_experts = 64;
  int64_t max_bytes = int64_t{8} << 30;
};

// Loads a mole/1 directory (mole_config.json) or a PEFT LoRA directory (adapter_config.json),
// validates everything against `base` (shapes, ranks 1..max_rank, expert counts, NaN/Inf, routing
// parameters, router tensors present) and returns it. Errors are kInvalidArgument (bad or
// unsupported content, naming the file, tensor or key; a file that is not a regular file),
// kDataLoss (a truncated safetensors file, offsets past its end), kNotFound (no config file, a
// missing file) and errno-derived codes such as kPermissionDenied (a file the server may not
// read).
absl::StatusOr<std::shared_ptr<const Adapter>> LoadAdapter(const std::string& dir,
                                                           const std::string& name,
                                                           const ModelConfig& base,
                                                           const AdapterLimits& limits);

// kInvalidArgument when `override_spec` cannot apply to every routed group of `adapter`.
absl::Status ValidateRoutingOverride(const Adapter& adapter, const RoutingOverride& override_spec);

}  // namespace moleserve::engine
