#pragma once

// LlamaModel: a Llama-family decoder (RMSNorm, RoPE, grouped-query attention over a paged KV
// cache, SwiGLU) running on a Backend over flat mixed prefill/decode batches.
//
// Lifecycle: Create() uploads the weights and allocates, once, the paged KV cache and every
// scratch buffer a step of up to `max_batch_tokens` tokens needs; Forward() allocates nothing.
// Device memory: owned by the model (weights, KV cache, scratch), freed on destruction.
// Thread safety: Forward() must be called by one thread at a time (the engine loop).

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/model/batch.h"
#include "engine/model/model_config.h"
#include "engine/model/weights.h"

namespace moleserve::engine {

struct LlamaModelOptions {
  int32_t num_kv_blocks = 1024;     // physical KV blocks per layer
  int32_t kv_block_size = 16;       // tokens per block
  int32_t max_batch_tokens = 2048;  // tokens per Forward
  int32_t max_seqs = 256;           // sequences per Forward (and logits rows)
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
  absl::Status Forward(const Batch& batch, std::vector<float>* logits);

  const ModelConfig& config() const { return config_; }
  const LlamaModelOptions& options() const { return options_; }
  // Bytes of KV cache per block (all layers, K and V).
  int64_t kv_bytes_per_block() const;

 private:
  LlamaModel(Backend* backend, const ModelConfig& config, const LlamaModelOptions& options)
      : backend_(backend), config_(config), options_(options) {}
  absl::Status Init(const WeightSource& weights);
  absl::Status ValidateBatch(const Batch& batch) const;
  absl::StatusOr<DeviceBuffer> Upload(const WeightSource& weights, const TensorSpec& spec);

  struct Layer {
    DeviceBuffer input_norm, q, k, v, o, post_norm, gate, up, down;
    DeviceBuffer q_bias, k_bias, v_bias, o_bias;  // empty unless the config has biases
    DeviceBuffer k_cache, v_cache;  // [num_kv_blocks, block_size, num_kv_heads, head_dim]
  };

  Backend* backend_;
  ModelConfig config_;
  LlamaModelOptions options_;
  DeviceBuffer embed_, final_norm_, lm_head_, inv_freq_;
  std::vector<Layer> layers_;
  // Scratch, sized for max_batch_tokens rows.
  DeviceBuffer x_, h_, q_, k_, v_, attn_, gate_, up_, o_, logits_;
  DeviceBuffer tokens_, positions_, token_seq_, block_tables_, block_offsets_, sample_rows_;
};

}  // namespace moleserve::engine
