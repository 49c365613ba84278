#pragma once

// LlamaModel: a Llama-family decoder (RMSNorm, RoPE, grouped-query attention over a paged KV
// cache, SwiGLU) running on a Backend over flat mixed prefill/decode batches.
//
// Weights (converted from the checkpoint's dtype on upload), KV cache and activations are in the
// backend's compute dtype (fp32 on CPU, bf16 on CUDA) with fp32 math inside the ops; lm_head
// writes fp32 logits (never rounded to bf16), which the device sampler reads.
//
// Lifecycle: Create() uploads the weights and allocates, once, the paged KV cache and every
// scratch buffer a step of up to `max_batch_tokens` tokens needs; Forward() allocates nothing.
// Device memory: owned by the model (weights, KV cache, scratch), freed on destruction.
// Thread safety: Forward() must be called by one thread at a time (the engine loop).

#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/model/adapter_executor.h"
#include "engine/model/batch.h"
#include "engine/model_io/model_config.h"
#include "engine/model_io/weights.h"

namespace moleserve::engine {

struct LlamaModelOptions {
  int32_t num_kv_blocks = 1024;     // physical KV blocks per layer
  int32_t kv_block_size = 16;       // tokens per block
  int32_t max_batch_tokens = 2048;  // tokens per Forward
  int32_t max_seqs = 256;           // sequences per Forward (and logits rows)
  // Tokens one sequence may hold (the served context, --max-model-len); 0 = the model's
  // max_position_embeddings. Sizes the block tables.
  int32_t max_context = 0;
  ExpertCacheOptions expert_cache;  // device pool of LoRA expert pages
  // When set, the adapters' experts live in this cache instead (not owned; it outlives the model:
  // the engine keeps it next to the KV blocks and hands it to the executor too); expert_cache is
  // then unused.
  ExpertCache* shared_expert_cache = nullptr;
  // Decode fast path: pure decode steps (one token per sequence) without adapters or with plain
  // LoRAs only replay a graph of the whole forward pass captured once per batch size (and, with
  // LoRAs, per plan shape: AdapterExecutor::plan_key) (Backend::CaptureGraph: CUDA graphs), so
  // launches cost one call instead of one per op.
  bool decode_graphs = true;
};

// The sampling of one step (ForwardSample): one row per Batch::sample_rows entry, in that order
// (TokenSampler::NextRow makes them), and the rows' penalty and logit bias entries.
struct StepSampling {
  std::vector<kernels::SampleRowParams> rows;
  std::vector<int32_t> penalty_ids;
  std::vector<int32_t> penalty_counts;
  std::vector<int32_t> bias_ids;
  std::vector<float> bias_values;
  void Clear() {
    rows.clear();
    penalty_ids.clear();
    penalty_counts.clear();
    bias_ids.clear();
    bias_values.clear();
  }
};

// What the device sampler returned: rows[r] per sample row; row r's alternatives (when some row
// asked for them; empty otherwise) are top_ids / top_logprobs
// [r * kMaxSampleTopLogprobs, + rows[r].num_top).
struct StepSamples {
  std::vector<kernels::SampledRow> rows;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
};

// What a forward pass reports besides logits (all per sample row).
struct ForwardExtras {
  // The routing of each routed site, for sequences with seq_return_routing.
  std::vector<std::vector<RoutingRecord>> routing;
  // X-LoRA sequences: the scalings the row used ([C] classifier output), for freezing.
  std::vector<std::vector<float>> xlora_scalings;
};

class LlamaModel {
 public:
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Create(Backend* backend,
                                                            const ModelConfig& config,
                                                            const WeightSource& weights,
                                                            const LlamaModelOptions& options);

  // Runs the batch and writes the logits of batch.sample_rows to `logits` ([N, vocab] fp32,
  // resized). K/V of every token are written to the cache at its position. kInvalidArgument when
  // the batch breaks its invariants or exceeds the options (nothing is computed then).
  absl::Status Forward(const Batch& batch, std::vector<float>* logits,
                       ForwardExtras* extras = nullptr);
  // Runs the batch and samples the next token of every sample row on the backend
  // (Backend::Sample): only the chosen ids, their logprobs and the alternatives some row asked
  // for come back (16 bytes per row, plus 160 when any row wants top logprobs), never the
  // logits. A row whose logits are not finite comes back with finite = 0. kInvalidArgument as
  // Forward, or when `sampling` does not match the batch.
  absl::Status ForwardSample(const Batch& batch, const StepSampling& sampling, StepSamples* out,
                             ForwardExtras* extras = nullptr);

  // MoLE adapters: Attach uploads one and returns the slot that Batch::seq_adapter names;
  // Detach frees it (no batch may name the slot afterwards).
  absl::StatusOr<int32_t> AttachAdapter(std::shared_ptr<const Adapter> adapter) {
    return adapters_.Attach(std::move(adapter));
  }
  // Also frees the decode graphs that read its routers.
  void DetachAdapter(int32_t slot);
  AdapterExecutor& adapters() { return adapters_; }
  const AdapterExecutor& adapters() const { return adapters_; }

  const ModelConfig& config() const { return config_; }
  const LlamaModelOptions& options() const { return options_; }
  // Decode graphs captured so far (one per batch size), and why graphs are off if they are.
  int64_t decode_graphs() const { return static_cast<int64_t>(decode_graphs_.size()); }
  // Off: adapter passes are not planned (AdapterExecutor::PlanPass), so adapter steps run
  // module by module, routing MixLoRA and X-LoRA on the host, and are never graphed. For tests
  // and benchmarks that compare the two paths; on by default.
  void set_planned_passes(bool on) { planned_passes_ = on; }
  const absl::Status& graph_status() const { return graph_status_; }
  // Bytes of KV cache per block (all layers, K and V).
  int64_t kv_bytes_per_block() const;
  // Block-table entries one step's batch may carry (all sequences' tables together): blocks
  // shared through the prefix cache appear in several tables.
  int64_t BlockTableCapacity() const;

 private:
  LlamaModel(Backend* backend, const ModelConfig& config, const LlamaModelOptions& options)
      : backend_(backend),
        config_(config),
        options_(options),
        dt_(backend->compute_dtype()),
        es_(static_cast<int64_t>(ScalarTypeSize(dt_))),
        own_cache_(options.shared_expert_cache != nullptr
                       ? nullptr
                       : std::make_unique<ExpertCache>(backend, options.expert_cache)),
        adapters_(
            backend, config,
            options.shared_expert_cache != nullptr ? options.shared_expert_cache : own_cache_.get(),
            options.max_batch_tokens) {}
  absl::Status Init(const WeightSource& weights);
  absl::Status ValidateBatch(const Batch& batch) const;
  absl::Status ValidateSampling(const Batch& batch, const StepSampling& sampling) const;
  // Everything up to the fp32 logits of the sample rows on the device (logits_); nothing is
  // synchronised.
  absl::Status RunToLogits(const Batch& b, ForwardExtras* extras);
  absl::Status SampleOnDevice(const StepSampling& sampling, StepSamples* out);
  // After the step's synchronising copy: the routing decisions copied with it
  // (AdapterExecutor::CollectResults) into extras->routing of the recording rows.
  absl::Status TakeRouting(const Batch& b, ForwardExtras* extras);
  // Embedding and every decoder layer over `b` (whose index arrays are uploaded here), leaving
  // the last hidden states (before the final norm) in x_.
  // A batch's index arrays on the device: the step's, and the X-LoRA scaling pass's.
  struct BatchArrays {
    DeviceBuffer tokens, positions, token_seq, block_tables, block_offsets;
  };
  absl::Status RunDecoder(const Batch& b, PassTokens tokens, PassRole role = PassRole::kMain);
  // RunDecoder's parts: the batch's index arrays to the device, then the ops only.
  absl::Status UploadBatch(const Batch& b, BatchArrays& arrays);
  absl::Status DecoderLayers(const Batch& b, const BatchArrays& in);
  // The X-LoRA scaling pass of `b`: its X-LoRA sequences without frozen scalings, over their
  // aux KV blocks (sub), sub_of_token[i] the batch token of sub token i, and the pass's tokens.
  struct ScalingPass {
    Batch sub;
    std::vector<int32_t> sub_of_token;
    PassTokens pass;
  };
  ScalingPass BuildScalingPass(const Batch& b) const;
  // The width C of X-LoRA adapter `slot`'s scalings rows.
  int64_t XloraColumns(int32_t slot) const;
  // Final norm and lm_head of the n rows named by sample_rows_ (uploaded) into logits_, fp32
  // from the GEMM's accumulator (GemmParams::y_f32); LogitsToHost copies them out.
  absl::Status Head(int64_t n);
  absl::Status LogitsToHost(std::vector<float>* logits);
  // The decode fast path (LlamaModelOptions::decode_graphs).
  static constexpr int32_t kMaxGraphBatch = 256;
  // X-LoRA adapters whose classifier one decode graph runs, at most.
  static constexpr size_t kMaxGraphXlora = 8;
  bool IsGraphableDecode(const Batch& b) const;
  // True when the step ran through a graph; false when graphs turned out unavailable (the
  // caller runs the step eagerly).
  // `records`: the routing of sequences with seq_return_routing is recorded (TakeRouting).
  absl::StatusOr<bool> DecodeWithGraph(const Batch& b, bool records);
  // y = RMSNorm(x) * weight over `rows` rows of hidden_size; with `residual`, the residual add
  // fused in front: residual += x, y = RMSNorm(residual) * weight (RmsNormParams::residual).
  absl::Status RmsNormRows(const DeviceBuffer& x, const DeviceBuffer& weight, DeviceBuffer& y,
                           int64_t rows, DeviceBuffer* residual = nullptr);
  // The tensors of `specs` read (shapes and finiteness checked), concatenated in order (so
  // [n_i, k] matrices make one [sum n_i, k]: a fused projection) and uploaded in the compute
  // dtype.
  absl::StatusOr<DeviceBuffer> Upload(const WeightSource& weights,
                                      const std::vector<TensorSpec>& specs);

  // q|k|v and gate|up are fused: one GEMM each, their outputs side by side in a row (qkv_,
  // gate_up_), read by the next ops through row strides.
  struct Layer {
    DeviceBuffer input_norm, qkv, o, post_norm, gate_up, down;
    DeviceBuffer qkv_bias, o_bias;  // empty unless the config has biases
    DeviceBuffer k_cache, v_cache;  // [num_kv_blocks, block_size, num_kv_heads, head_dim]
  };

  Backend* backend_;
  ModelConfig config_;
  LlamaModelOptions options_;
  ScalarType dt_;  // the backend's compute dtype: weights, KV cache and activations
  int64_t es_;     // its element size
  std::unique_ptr<ExpertCache> own_cache_;  // without a shared cache
  AdapterExecutor adapters_;
  DeviceBuffer embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
  // Scratch, sized for max_batch_tokens rows.
  DeviceBuffer x_, h_, qkv_, attn_, gate_up_, act_, o_;
  DeviceBuffer logits_;  // fp32 on every backend (lm_head writes fp32: no bf16 rounding)
  // {batch size, AdapterExecutor::plan_key()...} -> Backend graph
  struct GraphEntry {
    int64_t graph = -1;
    int64_t epoch = -1;          // plan buffers' epoch for adapter graphs; -1 = no adapters
    std::vector<int32_t> slots;  // adapters whose routers the graph reads
    uint64_t last_used = 0;
  };
  // Adapter graphs kept at most (the least recently launched is freed first); graphs of an old
  // plan epoch or a detached adapter are freed at once.
  static constexpr int64_t kMaxAdapterGraphs = 64;
  void DropGraphs(const std::function<bool(const GraphEntry&)>& stale);
  std::map<std::vector<int64_t>, GraphEntry> decode_graphs_;
  uint64_t graph_clock_ = 0;
  bool graphs_unavailable_ = false;  // the backend has no graphs
  bool planned_passes_ = true;       // set_planned_passes
  bool routing_to_take_ = false;     // the eager pass left records for TakeRouting
  absl::Status graph_status_;        // why, when it has none
  BatchArrays step_arrays_, scaling_arrays_;
  DeviceBuffer sample_rows_;
  // A graphed X-LoRA step: each token's row in the scaling pass, then one token mask per
  // classified adapter ([1 + kMaxGraphXlora, kMaxGraphBatch]); the classified scalings come back
  // into xlora_host_ (pinned), row `row` of the step from float `at`, `cols` of them.
  DeviceBuffer xlora_rows_, xlora_host_;
  struct XloraBack {
    int32_t row;
    int64_t at, cols;
  };
  std::vector<XloraBack> xlora_back_;
  // The device sampler's buffers: fp32 work rows, row parameters, penalty and bias entries
  // (penalty ids, counts, bias ids, values; grown on demand) and the packed results; sample_host_
  // (Backend::AllocateHost: pinned on CUDA) receives them.
  DeviceBuffer sample_work_, sample_params_, penalties_, sample_out_, sample_host_;
};

}  // namespace moleserve::engine
