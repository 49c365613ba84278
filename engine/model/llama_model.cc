#include "engine/model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status_macros.h"
#include "kernels/common/bf16.h"

namespace moleserve::engine {
namespace {

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Create(Backend* backend,
                                                               const ModelConfig& config,
                                                               const WeightSource& weights,
                                                               const LlamaModelOptions& options) {
  RETURN_IF_ERROR(config.Validate());
  if (options.num_kv_blocks <= 0 || options.kv_block_size <= 0 || options.max_batch_tokens <= 0 ||
      options.max_seqs <= 0) {
    return absl::InvalidArgumentError(
        "model options: num_kv_blocks, kv_block_size, max_batch_tokens and max_seqs must be > 0");
  }
  const ScalarType dt = backend->compute_dtype();
  if (dt != ScalarType::kF32 && dt != ScalarType::kBF16) {
    return absl::UnimplementedError(absl::StrCat("LlamaModel runs fp32 or bf16; the ",
                                                 backend->name(), " backend computes in ",
                                                 ScalarTypeName(dt)));
  }
  std::unique_ptr<LlamaModel> model(new LlamaModel(backend, config, options));
  RETURN_IF_ERROR(model->Init(weights));
  return model;
}

int64_t LlamaModel::kv_bytes_per_block() const {
  return 2LL * config_.num_layers * options_.kv_block_size * config_.num_kv_heads *
         config_.head_dim * static_cast<int64_t>(ScalarTypeSize(backend_->compute_dtype()));
}

absl::StatusOr<DeviceBuffer> LlamaModel::Upload(const WeightSource& weights,
                                                const std::vector<TensorSpec>& specs) {
  int64_t total = 0;
  for (const TensorSpec& spec : specs) total += Numel(spec.shape);
  std::vector<float> host(total);
  float* at = host.data();
  for (const TensorSpec& spec : specs) {
    ASSIGN_OR_RETURN(std::vector<int64_t> stored, weights.Shape(spec.name));
    if (stored != spec.shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", spec.name, "' has shape [",
                                                     absl::StrJoin(stored, ", "), "], expected [",
                                                     absl::StrJoin(spec.shape, ", "), "]"));
    }
    const int64_t n = Numel(spec.shape);
    RETURN_IF_ERROR(weights.ReadF32(spec.name, spec.shape, at));
    if (!std::all_of(at, at + n, [](float v) { return std::isfinite(v); })) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", spec.name, "' contains NaN or Inf"));
    }
    at += n;
  }
  ASSIGN_OR_RETURN(DeviceBuffer buf, backend_->Allocate(host.size() * es_));
  if (dt_ == ScalarType::kF32) {
    RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), host.data(), host.size() * sizeof(float)));
  } else {
    std::vector<uint16_t> bf16(host.size());
    for (size_t i = 0; i < host.size(); ++i) bf16[i] = kernels::F32ToBf16(host[i]);
    RETURN_IF_ERROR(backend_->CopyToDevice(buf.data(), bf16.data(), bf16.size() * 2));
  }
  return buf;
}

absl::Status LlamaModel::Init(const WeightSource& weights) {
  const ModelConfig& c = config_;
  std::vector<TensorSpec> specs = LlamaTensorSpecs(c);
  size_t next = 0;
  // The next `n` specs into one buffer (concatenated).
  auto take = [&](DeviceBuffer* dst, size_t n = 1) -> absl::Status {
    ASSIGN_OR_RETURN(*dst, Upload(weights, std::vector<TensorSpec>(specs.begin() + next,
                                                                   specs.begin() + next + n)));
    next += n;
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(take(&embed_));
  layers_.resize(c.num_layers);
  const int64_t kv_elems = static_cast<int64_t>(options_.num_kv_blocks) * options_.kv_block_size *
                           c.num_kv_heads * c.head_dim;
  for (Layer& layer : layers_) {
    // Same order as LlamaTensorSpecs: q, k, v (then their biases) and gate, up are adjacent.
    RETURN_IF_ERROR(take(&layer.input_norm));
    RETURN_IF_ERROR(take(&layer.qkv, 3));
    RETURN_IF_ERROR(take(&layer.o));
    if (c.qkv_bias) RETURN_IF_ERROR(take(&layer.qkv_bias, 3));
    if (c.o_bias) RETURN_IF_ERROR(take(&layer.o_bias));
    RETURN_IF_ERROR(take(&layer.post_norm));
    RETURN_IF_ERROR(take(&layer.gate_up, 2));
    RETURN_IF_ERROR(take(&layer.down));
    ASSIGN_OR_RETURN(layer.k_cache, backend_->Allocate(kv_elems * es_));
    ASSIGN_OR_RETURN(layer.v_cache, backend_->Allocate(kv_elems * es_));
  }
  RETURN_IF_ERROR(take(&final_norm_));
  if (!c.tie_word_embeddings) RETURN_IF_ERROR(take(&lm_head_));

  std::vector<float> inv_freq;
  for (double f : RopeInverseFrequencies(c)) inv_freq.push_back(static_cast<float>(f));
  ASSIGN_OR_RETURN(inv_freq_, backend_->Allocate(inv_freq.size() * sizeof(float)));
  RETURN_IF_ERROR(
      backend_->CopyToDevice(inv_freq_.data(), inv_freq.data(), inv_freq.size() * sizeof(float)));

  const int64_t t = options_.max_batch_tokens;
  const int64_t f = es_;  // activations are in the compute dtype
  const int64_t q_width = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_width = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  struct Scratch {
    DeviceBuffer* buf;
    int64_t bytes;
  };
  for (auto [buf, bytes] :
       {Scratch{&x_, t * c.hidden_size * f}, Scratch{&h_, t * c.hidden_size * f},
        Scratch{&qkv_, t * (q_width + 2 * kv_width) * f}, Scratch{&attn_, t * q_width * f},
        Scratch{&gate_up_, t * 2 * c.intermediate_size * f},
        Scratch{&act_, t * c.intermediate_size * f}, Scratch{&o_, t * c.hidden_size * f},
        Scratch{&logits_, int64_t{options_.max_seqs} * c.vocab_size * 4},
        Scratch{&sample_work_, int64_t{options_.max_seqs} * c.vocab_size * 4},
        Scratch{&sample_params_,
                int64_t{options_.max_seqs} * int64_t{sizeof(kernels::SampleRowParams)}},
        Scratch{&sample_out_,
                int64_t{options_.max_seqs} * (int64_t{sizeof(kernels::SampledRow)} +
                                              2 * kernels::kMaxSampleTopLogprobs * 4)},
        Scratch{&sample_rows_, int64_t{options_.max_seqs} * 4},
        Scratch{&xlora_rows_, (1 + kMaxGraphXlora) * int64_t{kMaxGraphBatch} * 4}}) {
    ASSIGN_OR_RETURN(*buf, backend_->Allocate(bytes));
  }
  for (BatchArrays* a : {&step_arrays_, &scaling_arrays_}) {
    for (auto [buf, bytes] :
         {Scratch{&a->tokens, t * 4}, Scratch{&a->positions, t * 4}, Scratch{&a->token_seq, t * 4},
          Scratch{&a->block_offsets, (int64_t{options_.max_seqs} + 1) * 4},
          Scratch{&a->block_tables, BlockTableCapacity() * 4}}) {
      ASSIGN_OR_RETURN(*buf, backend_->Allocate(bytes));
    }
  }
  ASSIGN_OR_RETURN(sample_host_, backend_->AllocateHost(sample_out_.bytes()));
  return absl::OkStatus();
}

int64_t LlamaModel::BlockTableCapacity() const {
  // Sequences share prefix-cache blocks, so their tables together may name a block many times:
  // each table holds at most the blocks of a whole context (and of the whole cache).
  const int64_t context =
      options_.max_context > 0 ? options_.max_context : int64_t{config_.max_position_embeddings};
  const int64_t per_seq = std::min<int64_t>(
      options_.num_kv_blocks, (context + options_.kv_block_size - 1) / options_.kv_block_size);
  return std::max<int64_t>(options_.num_kv_blocks, per_seq * options_.max_seqs);
}

absl::Status LlamaModel::ValidateBatch(const Batch& b) const {
  const int32_t n = b.num_tokens();
  if (n == 0) return absl::InvalidArgumentError("batch: no tokens");
  if (n > options_.max_batch_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch: ", n, " tokens exceed max_batch_tokens ", options_.max_batch_tokens));
  }
  if (b.positions.size() != b.tokens.size() || b.token_seq.size() != b.tokens.size()) {
    return absl::InvalidArgumentError("batch: tokens, positions and token_seq differ in length");
  }
  if (b.num_seqs() < 1 || b.num_seqs() > options_.max_seqs ||
      b.sample_rows.size() > static_cast<size_t>(options_.max_seqs)) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch: ", b.num_seqs(), " sequences, allowed 1..", options_.max_seqs));
  }
  if (static_cast<int64_t>(b.block_tables.size()) > BlockTableCapacity() ||
      static_cast<int64_t>(b.aux_block_tables.size()) > BlockTableCapacity()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch: more block-table entries than the tables hold (", BlockTableCapacity(), ")"));
  }
  for (int32_t s = 0; s < b.num_seqs(); ++s) {
    if (b.block_table_offsets[s] > b.block_table_offsets[s + 1]) {
      return absl::InvalidArgumentError("batch: block_table_offsets must be non-decreasing");
    }
  }
  if (b.block_table_offsets.back() != static_cast<int32_t>(b.block_tables.size())) {
    return absl::InvalidArgumentError("batch: block_table_offsets does not end at the table size");
  }
  for (int32_t block : b.block_tables) {
    if (block < 0 || block >= options_.num_kv_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("batch: KV block ", block, " out of range"));
    }
  }
  for (int32_t i = 0; i < n; ++i) {
    if (b.tokens[i] < 0 || b.tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "batch: token id ", b.tokens[i], " outside the vocabulary of ", config_.vocab_size));
    }
    const int32_t s = b.token_seq[i];
    if (s < 0 || s >= b.num_seqs()) return absl::InvalidArgumentError("batch: bad token_seq");
    const int64_t capacity =
        int64_t{b.block_table_offsets[s + 1] - b.block_table_offsets[s]} * options_.kv_block_size;
    if (b.positions[i] < 0 || b.positions[i] >= capacity) {
      return absl::InvalidArgumentError(
          absl::StrCat("batch: position ", b.positions[i], " not covered by its block table"));
    }
  }
  for (int32_t r : b.sample_rows) {
    if (r < 0 || r >= n) return absl::InvalidArgumentError("batch: sample row out of range");
  }
  const size_t s = static_cast<size_t>(b.num_seqs());
  if (!b.seq_adapter.empty()) {
    if (b.seq_adapter.size() != s || (!b.seq_override.empty() && b.seq_override.size() != s) ||
        (!b.seq_return_routing.empty() && b.seq_return_routing.size() != s) ||
        (!b.seq_frozen_scalings.empty() && b.seq_frozen_scalings.size() != s) ||
        b.aux_block_table_offsets.size() != s + 1) {
      return absl::InvalidArgumentError("batch: MoLE fields must have one entry per sequence");
    }
    for (int32_t o : b.seq_override) {
      if (o < -1 || o >= static_cast<int32_t>(b.overrides.size())) {
        return absl::InvalidArgumentError("batch: bad routing override index");
      }
    }
    for (int32_t slot : b.seq_adapter) {
      if (slot >= 0 && adapters_.adapter(slot) == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("batch: adapter slot ", slot, " is not attached"));
      }
    }
    for (size_t q = 0; q < s; ++q) {
      if (b.aux_block_table_offsets[q] > b.aux_block_table_offsets[q + 1] ||
          b.aux_block_table_offsets[q + 1] > static_cast<int32_t>(b.aux_block_tables.size())) {
        return absl::InvalidArgumentError("batch: bad aux_block_table_offsets");
      }
    }
    for (int32_t block : b.aux_block_tables) {
      if (block < 0 || block >= options_.num_kv_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("batch: KV block ", block, " out of range"));
      }
    }
    for (int32_t i = 0; i < n; ++i) {
      const int32_t q = b.token_seq[i];
      const Adapter* a = b.seq_adapter[q] >= 0 ? adapters_.adapter(b.seq_adapter[q]) : nullptr;
      if (a == nullptr || !a->xlora ||
          (!b.seq_frozen_scalings.empty() && b.seq_frozen_scalings[q] != nullptr)) {
        continue;
      }
      const int64_t capacity =
          int64_t{b.aux_block_table_offsets[q + 1] - b.aux_block_table_offsets[q]} *
          options_.kv_block_size;
      if (b.positions[i] >= capacity) {
        return absl::InvalidArgumentError(absl::StrCat("batch: X-LoRA position ", b.positions[i],
                                                       " not covered by its scaling-pass table"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::RmsNormRows(const DeviceBuffer& x, const DeviceBuffer& weight,
                                     DeviceBuffer& y, int64_t rows, DeviceBuffer* residual) {
  return backend_->RmsNorm({.x = x.data(),
                            .weight = weight.data(),
                            .y = y.data(),
                            .rows = rows,
                            .cols = config_.hidden_size,
                            .eps = config_.rms_norm_eps,
                            .dtype = dt_,
                            .residual = residual != nullptr ? residual->data() : nullptr});
}

absl::Status LlamaModel::UploadBatch(const Batch& b, BatchArrays& a) {
  auto upload = [&](DeviceBuffer& dst, const std::vector<int32_t>& src) {
    return backend_->CopyToDevice(dst.data(), src.data(), src.size() * sizeof(int32_t));
  };
  RETURN_IF_ERROR(upload(a.tokens, b.tokens));
  RETURN_IF_ERROR(upload(a.positions, b.positions));
  RETURN_IF_ERROR(upload(a.token_seq, b.token_seq));
  RETURN_IF_ERROR(upload(a.block_tables, b.block_tables));
  return upload(a.block_offsets, b.block_table_offsets);
}

absl::Status LlamaModel::RunDecoder(const Batch& b, PassTokens pass, PassRole role) {
  RETURN_IF_ERROR(adapters_.BeginPass(std::move(pass), role));
  // Planned passes (AdapterExecutor::PlanPass): every table in one upload, no host work between
  // modules.
  if (planned_passes_) RETURN_IF_ERROR(adapters_.PlanPass().status());
  BatchArrays& arrays = role == PassRole::kMain ? step_arrays_ : scaling_arrays_;
  RETURN_IF_ERROR(UploadBatch(b, arrays));
  return DecoderLayers(b, arrays);
}

absl::Status LlamaModel::DecoderLayers(const Batch& b, const BatchArrays& in) {
  const ModelConfig& c = config_;
  const int64_t t = b.num_tokens();
  const int64_t h = c.hidden_size;
  const int64_t q_width = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv_width = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t inter = c.intermediate_size;
  const ScalarType dt = dt_;

  auto gemm = [&](const DeviceBuffer& x, const DeviceBuffer& w, DeviceBuffer& y, int64_t rows,
                  int64_t out, int64_t in) {
    return backend_->Gemm(
        {.x = x.data(), .w = w.data(), .y = y.data(), .m = rows, .n = out, .k = in, .dtype = dt});
  };

  auto bias = [&](DeviceBuffer& x, const DeviceBuffer& b, int64_t cols) {
    return backend_->BiasAdd(
        {.x = x.data(), .bias = b.data(), .rows = t, .cols = cols, .dtype = dt});
  };
  // The fused projections' outputs: q | k | v and gate | up side by side in each row.
  const int64_t qkv_width = q_width + 2 * kv_width;
  char* const q = qkv_.as<char>();
  char* const k = q + q_width * es_;
  char* const v = k + kv_width * es_;
  char* const gate = gate_up_.as<char>();
  char* const up = gate + inter * es_;

  RETURN_IF_ERROR(backend_->Embedding({.ids = in.tokens.as<int32_t>(),
                                       .table = embed_.data(),
                                       .out = x_.data(),
                                       .num_tokens = t,
                                       .hidden = h,
                                       .dtype = dt}));
  // The residual adds are fused into the RMSNorm that follows them (RmsNormParams::residual):
  // x += block output, h = norm(x) in one kernel. The first layer's input norm has no add in
  // front; the last layer's MLP add is a plain Add (the final norm runs on the sample rows only).
  auto add_norm = [&](const DeviceBuffer& weight) {
    return RmsNormRows(o_, weight, h_, t, /*residual=*/&x_);
  };
  RETURN_IF_ERROR(RmsNormRows(x_, layers_[0].input_norm, h_, t));
  for (int32_t l = 0; l < c.num_layers; ++l) {
    Layer& layer = layers_[l];
    // Attention block (h_ holds the input norm of x_).
    RETURN_IF_ERROR(gemm(h_, layer.qkv, qkv_, t, qkv_width, h));
    if (c.qkv_bias) RETURN_IF_ERROR(bias(qkv_, layer.qkv_bias, qkv_width));
    RETURN_IF_ERROR(adapters_.ApplyProjection(l, Projection::kQkv, h_.data(), qkv_.data()));
    const kernels::PagedKvLayout kv{.k_cache = layer.k_cache.data(),
                                    .v_cache = layer.v_cache.data(),
                                    .block_tables = in.block_tables.as<int32_t>(),
                                    .block_table_offsets = in.block_offsets.as<int32_t>(),
                                    .num_seqs = b.num_seqs(),
                                    .block_size = options_.kv_block_size,
                                    .num_kv_heads = c.num_kv_heads,
                                    .head_dim = c.head_dim};
    // RoPE on q and k fused into the cache write (one kernel): q in place for the attention,
    // k rotated into the cache.
    RETURN_IF_ERROR(backend_->KvWrite({.kv = kv,
                                       .k = k,
                                       .v = v,
                                       .token_seq = in.token_seq.as<int32_t>(),
                                       .positions = in.positions.as<int32_t>(),
                                       .num_tokens = t,
                                       .dtype = dt,
                                       .kv_stride = qkv_width,
                                       .rope_inv_freq = inv_freq_.as<float>(),
                                       .q = q,
                                       .num_q_heads = c.num_heads,
                                       .q_stride = qkv_width}));
    RETURN_IF_ERROR(backend_->PagedAttention(
        {.kv = kv,
         .q = q,
         .out = attn_.data(),
         .token_seq = in.token_seq.as<int32_t>(),
         .positions = in.positions.as<int32_t>(),
         .num_tokens = t,
         .num_q_heads = c.num_heads,
         .scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim))),
         .sliding_window = c.sliding_window,
         .dtype = dt,
         .q_stride = qkv_width}));
    RETURN_IF_ERROR(gemm(attn_, layer.o, o_, t, h, q_width));
    if (c.o_bias) RETURN_IF_ERROR(bias(o_, layer.o_bias, h));
    RETURN_IF_ERROR(adapters_.ApplyLinear(l, LinearModule::kO, attn_.data(), o_.data()));
    // MLP block (SwiGLU), on norm(x + attention).
    RETURN_IF_ERROR(add_norm(layer.post_norm));
    RETURN_IF_ERROR(gemm(h_, layer.gate_up, gate_up_, t, 2 * inter, h));
    RETURN_IF_ERROR(adapters_.ApplyProjection(l, Projection::kGateUp, h_.data(), gate_up_.data()));
    const bool block_ffn = adapters_.HasBlockFfn(l);
    if (block_ffn) {
      // MixLoRA: act = the base SwiGLU, or sum_e w_e a_e for routed tokens.
      RETURN_IF_ERROR(adapters_.BlockFfnAct(l, h_.data(), gate_up_.data(), act_.data()));
    } else {
      RETURN_IF_ERROR(backend_->SiluMul({.gate = gate,
                                         .up = up,
                                         .out = act_.data(),
                                         .rows = t,
                                         .cols = inter,
                                         .dtype = dt,
                                         .in_stride = 2 * inter}));
    }
    RETURN_IF_ERROR(gemm(act_, layer.down, o_, t, h, inter));
    RETURN_IF_ERROR(adapters_.ApplyLinear(l, LinearModule::kDown, act_.data(), o_.data()));
    if (block_ffn) RETURN_IF_ERROR(adapters_.BlockFfnDown(l, o_.data()));
    if (l + 1 < c.num_layers) {
      RETURN_IF_ERROR(add_norm(layers_[l + 1].input_norm));
    } else {
      RETURN_IF_ERROR(backend_->Add(
          {.a = x_.data(), .b = o_.data(), .out = x_.data(), .n = t * h, .dtype = dt}));
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Forward(const Batch& b, std::vector<float>* logits,
                                 ForwardExtras* extras) {
  RETURN_IF_ERROR(ValidateBatch(b));
  RETURN_IF_ERROR(RunToLogits(b, extras));
  const int64_t n = static_cast<int64_t>(b.sample_rows.size());
  logits->resize(n * config_.vocab_size);
  if (n == 0) {
    RETURN_IF_ERROR(backend_->Synchronize());
  } else {
    RETURN_IF_ERROR(LogitsToHost(logits));
  }
  return TakeRouting(b, extras);  // after the sync: the routing copies are done
}

absl::Status LlamaModel::ForwardSample(const Batch& b, const StepSampling& sampling,
                                       StepSamples* out, ForwardExtras* extras) {
  RETURN_IF_ERROR(ValidateBatch(b));
  RETURN_IF_ERROR(ValidateSampling(b, sampling));
  RETURN_IF_ERROR(RunToLogits(b, extras));
  if (b.sample_rows.empty()) {
    out->rows.clear();
    RETURN_IF_ERROR(backend_->Synchronize());
  } else {
    RETURN_IF_ERROR(SampleOnDevice(sampling, out));
  }
  return TakeRouting(b, extras);
}

absl::Status LlamaModel::ValidateSampling(const Batch& b, const StepSampling& s) const {
  if (s.rows.size() != b.sample_rows.size()) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: ", s.rows.size(), " rows for ",
                                                   b.sample_rows.size(), " sample rows"));
  }
  if (s.penalty_ids.size() != s.penalty_counts.size() ||
      s.penalty_ids.size() > static_cast<size_t>(INT32_MAX / 2)) {
    return absl::InvalidArgumentError("sampling: penalty ids and counts differ in length");
  }
  if (s.bias_ids.size() != s.bias_values.size() ||
      s.bias_ids.size() > static_cast<size_t>(INT32_MAX / 4)) {
    return absl::InvalidArgumentError("sampling: bias ids and values differ in length");
  }
  const auto entries = static_cast<int32_t>(s.penalty_ids.size());
  const auto bias_entries = static_cast<int32_t>(s.bias_ids.size());
  for (const kernels::SampleRowParams& r : s.rows) {
    if (r.num_top_logprobs < 0 || r.num_top_logprobs > kernels::kMaxSampleTopLogprobs ||
        r.penalty_begin < 0 || r.penalty_begin > r.penalty_end || r.penalty_end > entries ||
        r.bias_begin < 0 || r.bias_begin > r.bias_end || r.bias_end > bias_entries ||
        r.forced_id >= config_.vocab_size) {
      return absl::InvalidArgumentError(
          "sampling: top logprobs outside 0..20, a penalty or bias range outside the entries, "
          "or a scored token outside the vocabulary");
    }
  }
  for (const std::vector<int32_t>* ids : {&s.penalty_ids, &s.bias_ids}) {
    for (int32_t id : *ids) {
      if (id < 0 || id >= config_.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("sampling: penalty or bias token id ", id, " outside the vocabulary"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::SampleOnDevice(const StepSampling& s, StepSamples* out) {
  const int64_t n = static_cast<int64_t>(s.rows.size());
  const int64_t entries = static_cast<int64_t>(s.penalty_ids.size());
  const int64_t bias_entries = static_cast<int64_t>(s.bias_ids.size());
  // [penalty ids][penalty counts][bias ids][bias values], 4 bytes each.
  const int64_t entry_bytes = 2 * (entries + bias_entries) * 4;
  if (entry_bytes > 0) {
    if (penalties_.bytes() < static_cast<size_t>(entry_bytes)) {
      penalties_.Reset();
      ASSIGN_OR_RETURN(penalties_, backend_->Allocate(entry_bytes * 2));  // room to grow
    }
    int32_t* dev = penalties_.as<int32_t>();
    if (entries > 0) {
      RETURN_IF_ERROR(backend_->CopyToDevice(dev, s.penalty_ids.data(), entries * 4));
      RETURN_IF_ERROR(backend_->CopyToDevice(dev + entries, s.penalty_counts.data(), entries * 4));
    }
    if (bias_entries > 0) {
      RETURN_IF_ERROR(
          backend_->CopyToDevice(dev + 2 * entries, s.bias_ids.data(), bias_entries * 4));
      RETURN_IF_ERROR(backend_->CopyToDevice(dev + 2 * entries + bias_entries, s.bias_values.data(),
                                             bias_entries * 4));
    }
  }
  RETURN_IF_ERROR(backend_->CopyToDevice(sample_params_.data(), s.rows.data(),
                                         n * sizeof(kernels::SampleRowParams)));
  const bool any_top = std::any_of(s.rows.begin(), s.rows.end(),
                                   [](const auto& r) { return r.num_top_logprobs > 0; });
  // One device buffer, one copy out: [n SampledRow][n x 20 ids][n x 20 logprobs], the
  // alternatives only when some row asked for them.
  constexpr int64_t kTop = kernels::kMaxSampleTopLogprobs;
  char* base = sample_out_.as<char>();
  const int64_t rows_bytes = n * static_cast<int64_t>(sizeof(kernels::SampledRow));
  int32_t* top_ids = reinterpret_cast<int32_t*>(base + rows_bytes);
  float* top_lp = reinterpret_cast<float*>(base + rows_bytes + n * kTop * 4);
  RETURN_IF_ERROR(backend_->Sample({.logits = logits_.as<float>(),
                                    .work = sample_work_.as<float>(),
                                    .row_params = sample_params_.as<kernels::SampleRowParams>(),
                                    .penalty_ids = penalties_.as<int32_t>(),
                                    .penalty_counts = penalties_.as<int32_t>() + entries,
                                    .bias_ids = penalties_.as<int32_t>() + 2 * entries,
                                    .bias_values = reinterpret_cast<const float*>(
                                        penalties_.as<int32_t>() + 2 * entries + bias_entries),
                                    .out = reinterpret_cast<kernels::SampledRow*>(base),
                                    .top_ids = any_top ? top_ids : nullptr,
                                    .top_logprobs = any_top ? top_lp : nullptr,
                                    .rows = n,
                                    .vocab = config_.vocab_size}));
  const int64_t bytes = rows_bytes + (any_top ? 2 * n * kTop * 4 : 0);
  const char* host = sample_host_.as<char>();
  RETURN_IF_ERROR(backend_->CopyToHost(sample_host_.data(), base, bytes));
  out->rows.resize(n);
  std::memcpy(out->rows.data(), host, rows_bytes);
  out->top_ids.assign(any_top ? n * kTop : 0, -1);
  out->top_logprobs.assign(any_top ? n * kTop : 0, 0.0f);
  if (any_top) {
    std::memcpy(out->top_ids.data(), host + rows_bytes, n * kTop * 4);
    std::memcpy(out->top_logprobs.data(), host + rows_bytes + n * kTop * 4, n * kTop * 4);
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::RunToLogits(const Batch& b, ForwardExtras* extras) {
  routing_to_take_ = false;
  xlora_back_.clear();  // a failed step's are never taken
  if (IsGraphableDecode(b)) {
    if (extras != nullptr) {  // routing comes with the step's results (TakeRouting)
      extras->routing.assign(b.sample_rows.size(), {});
      extras->xlora_scalings.assign(b.sample_rows.size(), {});
      for (int32_t s = 0; s < b.num_seqs() && !b.seq_frozen_scalings.empty(); ++s) {
        if (b.seq_frozen_scalings[s] != nullptr) {
          extras->xlora_scalings[s] = *b.seq_frozen_scalings[s];  // row s is sequence s
        }
      }
    }
    ASSIGN_OR_RETURN(bool done, DecodeWithGraph(b, extras != nullptr));
    if (done) {
      routing_to_take_ = extras != nullptr;
      return adapters_.IssueResultCopies();
    }
  }
  const int64_t t = b.num_tokens();
  const bool mole = !b.seq_adapter.empty();
  auto seq_slot = [&](int32_t s) { return mole ? b.seq_adapter[s] : -1; };
  auto xlora_of = [&](int32_t s) -> const XloraSpec* {
    const int32_t slot = seq_slot(s);
    if (slot < 0) return nullptr;
    const Adapter* a = adapters_.adapter(slot);
    return a != nullptr && a->xlora ? &*a->xlora : nullptr;
  };

  // X-LoRA scaling pass: the X-LoRA sequences without frozen scalings run once more over their
  // own KV (aux block tables) with scaling_pass_value scalings; the classifier turns the final-norm
  // hidden state of every token into that token's scalings for the real pass.
  std::vector<std::vector<float>> token_scalings(t);
  if (ScalingPass sp = BuildScalingPass(b); !sp.sub.tokens.empty()) {
    const int64_t n = sp.sub.num_tokens();
    RETURN_IF_ERROR(RunDecoder(sp.sub, std::move(sp.pass), PassRole::kScaling));
    RETURN_IF_ERROR(RmsNormRows(x_, final_norm_, h_, n));
    // Tokens of one adapter are classified together, on the backend (h_ holds the final-norm
    // hidden states of the scaling pass).
    std::map<int32_t, std::vector<int32_t>> by_slot;
    for (int64_t i = 0; i < n; ++i) {
      by_slot[seq_slot(b.token_seq[sp.sub_of_token[i]])].push_back(static_cast<int32_t>(i));
    }
    for (const auto& [slot, rows] : by_slot) {
      std::vector<float> out;
      RETURN_IF_ERROR(adapters_.XloraScalings(slot, h_.data(), rows, &out));
      const int64_t cols = static_cast<int64_t>(out.size() / rows.size());
      for (size_t r = 0; r < rows.size(); ++r) {
        token_scalings[sp.sub_of_token[rows[r]]].assign(out.begin() + r * cols,
                                                        out.begin() + (r + 1) * cols);
      }
    }
    // Device-routed groups of the scaling pass report undefined router logits now: the real
    // pass starts counting afresh.
    RETURN_IF_ERROR(adapters_.CheckRouting());
  }

  // The real pass.
  PassTokens pass;
  pass.slot.resize(t, -1);
  pass.override_index.resize(t, -1);
  pass.record.resize(t, -1);
  pass.scalings.resize(t, nullptr);
  pass.overrides = b.overrides;
  for (int32_t i = 0; i < t; ++i) {
    const int32_t s = b.token_seq[i];
    pass.slot[i] = seq_slot(s);
    if (!b.seq_override.empty()) pass.override_index[i] = b.seq_override[s];
    if (xlora_of(s) != nullptr) {
      pass.scalings[i] = !b.seq_frozen_scalings.empty() && b.seq_frozen_scalings[s] != nullptr
                             ? b.seq_frozen_scalings[s]->data()
                             : token_scalings[i].data();
    }
  }
  if (extras != nullptr) {
    extras->routing.assign(b.sample_rows.size(), {});
    extras->xlora_scalings.assign(b.sample_rows.size(), {});
    for (size_t r = 0; r < b.sample_rows.size(); ++r) {
      const int32_t row = b.sample_rows[r];
      const int32_t s = b.token_seq[row];
      if (!b.seq_return_routing.empty() && b.seq_return_routing[s]) {
        pass.record[row] = pass.num_records++;
      }
      if (xlora_of(s) != nullptr) {
        const float* sc = pass.scalings[row];
        const XloraSpec& xs = *xlora_of(s);
        const int64_t cols = xs.classifier.back().out;
        extras->xlora_scalings[r].assign(sc, sc + cols);
      }
    }
  }
  RETURN_IF_ERROR(RunDecoder(b, std::move(pass)));
  routing_to_take_ = extras != nullptr;  // TakeRouting, once the step's copies are done

  adapters_.EndPass();
  const int64_t n = static_cast<int64_t>(b.sample_rows.size());
  if (n > 0) {
    RETURN_IF_ERROR(backend_->CopyToDevice(sample_rows_.data(), b.sample_rows.data(),
                                           b.sample_rows.size() * sizeof(int32_t)));
    RETURN_IF_ERROR(Head(n));
  }
  return adapters_.IssueResultCopies();
}

LlamaModel::ScalingPass LlamaModel::BuildScalingPass(const Batch& b) const {
  ScalingPass sp;
  if (b.seq_adapter.empty()) return sp;
  std::vector<int32_t> sub_seq_of(b.num_seqs(), -1);
  for (int32_t i = 0; i < b.num_tokens(); ++i) {
    const int32_t s = b.token_seq[i];
    const int32_t slot = b.seq_adapter[s];
    const Adapter* a = slot >= 0 ? adapters_.adapter(slot) : nullptr;
    if (a == nullptr || !a->xlora ||
        (!b.seq_frozen_scalings.empty() && b.seq_frozen_scalings[s] != nullptr)) {
      continue;
    }
    if (sub_seq_of[s] < 0) {
      sub_seq_of[s] = sp.sub.num_seqs();
      sp.sub.block_tables.insert(sp.sub.block_tables.end(),
                                 b.aux_block_tables.begin() + b.aux_block_table_offsets[s],
                                 b.aux_block_tables.begin() + b.aux_block_table_offsets[s + 1]);
      sp.sub.block_table_offsets.push_back(static_cast<int32_t>(sp.sub.block_tables.size()));
    }
    sp.sub.tokens.push_back(b.tokens[i]);
    sp.sub.positions.push_back(b.positions[i]);
    sp.sub.token_seq.push_back(sub_seq_of[s]);
    sp.sub_of_token.push_back(i);
    sp.pass.slot.push_back(slot);
  }
  sp.pass.scaling_pass = true;
  return sp;
}

absl::Status LlamaModel::TakeRouting(const Batch& b, ForwardExtras* extras) {
  // Scalings classified in a graph (row = token in a decode step), whatever else the step says.
  std::vector<XloraBack> xlora_back = std::move(xlora_back_);
  xlora_back_.clear();
  for (const XloraBack& x : xlora_back) {
    if (extras == nullptr || static_cast<size_t>(x.row) >= extras->xlora_scalings.size()) break;
    const float* src = xlora_host_.as<float>() + x.at;
    extras->xlora_scalings[x.row].assign(src, src + x.cols);
  }
  RETURN_IF_ERROR(adapters_.CollectResults());
  if (!routing_to_take_ || extras == nullptr) return absl::OkStatus();
  routing_to_take_ = false;
  std::vector<std::vector<RoutingRecord>>& records = adapters_.records();
  size_t next = 0;  // records were numbered in sample-row order
  for (size_t r = 0; r < b.sample_rows.size(); ++r) {
    const int32_t s = b.token_seq[b.sample_rows[r]];
    if (!b.seq_return_routing.empty() && b.seq_return_routing[s]) {
      extras->routing[r] = std::move(records[next++]);
    }
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Head(int64_t n) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size;
  const ScalarType dt = dt_;
  // Gather the sampled rows (an embedding lookup into the hidden states), final norm, lm_head.
  RETURN_IF_ERROR(backend_->Embedding({.ids = sample_rows_.as<int32_t>(),
                                       .table = x_.data(),
                                       .out = h_.data(),
                                       .num_tokens = n,
                                       .hidden = h,
                                       .dtype = dt}));
  RETURN_IF_ERROR(RmsNormRows(h_, final_norm_, h_, n));
  RETURN_IF_ERROR(backend_->Gemm({.x = h_.data(),
                                  .w = (c.tie_word_embeddings ? embed_ : lm_head_).data(),
                                  .y = logits_.data(),
                                  .m = n,
                                  .n = c.vocab_size,
                                  .k = h,
                                  .dtype = dt,
                                  .y_f32 = true}));
  return absl::OkStatus();
}

absl::Status LlamaModel::LogitsToHost(std::vector<float>* logits) {
  return backend_->CopyToHost(logits->data(), logits_.data(), logits->size() * sizeof(float));
}

bool LlamaModel::IsGraphableDecode(const Batch& b) const {
  if (!options_.decode_graphs || graphs_unavailable_) return false;
  const int32_t n = b.num_tokens();
  if (n != b.num_seqs() || n > kMaxGraphBatch || b.sample_rows.size() != static_cast<size_t>(n)) {
    return false;
  }
  for (int32_t i = 0; i < n; ++i) {
    if (b.token_seq[i] != i || b.sample_rows[i] != i) return false;
  }
  return true;
}

void LlamaModel::DetachAdapter(int32_t slot) {
  adapters_.Detach(slot);
  // Graphs whose launches read the adapter's routers can never be replayed (slots are not
  // reused): free them.
  DropGraphs([&](const GraphEntry& g) {
    return std::find(g.slots.begin(), g.slots.end(), slot) != g.slots.end();
  });
}

void LlamaModel::DropGraphs(const std::function<bool(const GraphEntry&)>& stale) {
  for (auto it = decode_graphs_.begin(); it != decode_graphs_.end();) {
    if (stale(it->second)) {
      backend_->DestroyGraph(it->second.graph);
      it = decode_graphs_.erase(it);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<bool> LlamaModel::DecodeWithGraph(const Batch& b, bool records) {
  const int32_t n = b.num_tokens();
  xlora_back_.clear();
  // X-LoRA sequences without frozen scalings: their scaling pass, over their own KV, and the
  // classifier run inside the graph, before the main pass; the classifier writes their rows of
  // the main plan's scalings tables. Frozen scalings are uploaded with the main plan.
  ScalingPass sp = BuildScalingPass(b);
  const bool scaling = !sp.sub.tokens.empty();
  std::vector<int32_t> classified;  // the X-LoRA adapters classified in the graph
  std::vector<int32_t> host_rows;   // ids, then masks
  if (!sp.sub_of_token.empty()) host_rows.assign((1 + kMaxGraphXlora) * int64_t{n}, 0);
  for (size_t j = 0; j < sp.sub_of_token.size(); ++j) {
    const int32_t tok = sp.sub_of_token[j], slot = sp.pass.slot[j];
    auto at = std::find(classified.begin(), classified.end(), slot);
    if (at == classified.end()) {
      if (classified.size() == kMaxGraphXlora) return false;
      at = classified.insert(classified.end(), slot);
    }
    host_rows[tok] = static_cast<int32_t>(j);  // the token's row in the scaling pass
    host_rows[(1 + (at - classified.begin())) * int64_t{n} + tok] = 1;
  }
  std::vector<int64_t> key = {n};
  GraphEntry entry;
  if (!planned_passes_ && !b.seq_adapter.empty() &&
      std::any_of(b.seq_adapter.begin(), b.seq_adapter.end(), [](int32_t s) { return s >= 0; })) {
    return false;
  }
  if (scaling) {
    RETURN_IF_ERROR(adapters_.BeginPass(std::move(sp.pass), PassRole::kScaling));
    ASSIGN_OR_RETURN(bool planned, adapters_.PlanPass());
    if (!planned) return false;
    key.push_back(-2);  // the scaling pass: its size, plan, adapters and classifier buffers
    key.push_back(sp.sub.num_tokens());
    key.insert(key.end(), adapters_.plan_key().begin(), adapters_.plan_key().end());
    key.insert(key.end(), classified.begin(), classified.end());
    for (int32_t slot : classified) RETURN_IF_ERROR(adapters_.ReserveXlora(slot, n));
    key.push_back(adapters_.xlora_epoch());
    entry.slots = classified;
  }
  PassTokens pass;
  pass.slot.assign(n, -1);
  pass.record.assign(n, -1);
  if (!b.seq_adapter.empty()) pass.slot.assign(b.seq_adapter.begin(), b.seq_adapter.end());
  if (!b.seq_override.empty()) {
    pass.override_index.assign(b.seq_override.begin(), b.seq_override.end());
    pass.overrides = b.overrides;
  }
  for (int32_t i = 0; records && i < n && !b.seq_return_routing.empty(); ++i) {
    if (b.seq_return_routing[i]) pass.record[i] = pass.num_records++;  // token i = row i
  }
  pass.scalings.assign(n, nullptr);
  for (int32_t i = 0; i < n && !b.seq_frozen_scalings.empty(); ++i) {
    if (b.seq_frozen_scalings[i] != nullptr) pass.scalings[i] = b.seq_frozen_scalings[i]->data();
  }
  RETURN_IF_ERROR(adapters_.BeginPass(std::move(pass), PassRole::kMain));
  // Adapter steps are graphed when their tables can be laid out before the launch
  // (AdapterExecutor::PlanPass: plain LoRAs, module-scope routed groups, rank-wise groups,
  // X-LoRA, block FFNs, with or without routing overrides); others run eagerly.
  if (adapters_.active()) {
    ASSIGN_OR_RETURN(bool planned, adapters_.PlanPass());
    if (!planned) return false;
    key.insert(key.end(), adapters_.plan_key().begin(), adapters_.plan_key().end());
    entry.epoch = adapters_.buffers_epoch();
    for (int32_t slot : adapters_.plan_routed_slots()) {
      if (std::find(entry.slots.begin(), entry.slots.end(), slot) == entry.slots.end()) {
        entry.slots.push_back(slot);
      }
    }
    DropGraphs([&](const GraphEntry& g) { return g.epoch >= 0 && g.epoch < entry.epoch; });
  }
  RETURN_IF_ERROR(UploadBatch(b, step_arrays_));
  RETURN_IF_ERROR(backend_->CopyToDevice(sample_rows_.data(), b.sample_rows.data(),
                                         b.sample_rows.size() * sizeof(int32_t)));
  if (scaling) {
    RETURN_IF_ERROR(UploadBatch(sp.sub, scaling_arrays_));
    RETURN_IF_ERROR(backend_->CopyToDevice(xlora_rows_.data(), host_rows.data(),
                                           (1 + classified.size()) * n * sizeof(int32_t)));
  }
  // The scaling pass, then each classified adapter's classifier over the step's rows (its own
  // under its mask) into the main plan's scalings table.
  auto scaling_ops = [&]() -> absl::Status {
    adapters_.UsePass(PassRole::kScaling);
    RETURN_IF_ERROR(DecoderLayers(sp.sub, scaling_arrays_));
    RETURN_IF_ERROR(RmsNormRows(x_, final_norm_, h_, sp.sub.num_tokens()));
    for (size_t k = 0; k < classified.size(); ++k) {
      const int32_t slot = classified[k];
      RETURN_IF_ERROR(
          adapters_.XloraScalingsOnDevice(slot, h_.data(), xlora_rows_.as<int32_t>(), n,
                                          xlora_rows_.as<int32_t>() + (1 + k) * int64_t{n},
                                          adapters_.xlora_table(slot), XloraColumns(slot)));
    }
    adapters_.UsePass(PassRole::kMain);
    return absl::OkStatus();
  };
  auto it = decode_graphs_.find(key);
  if (it == decode_graphs_.end()) {
    // Everything between the uploads and the logits copy: the same ops as the eager path, with
    // host scalars that depend only on the key (a pure decode batch of n sequences, and the
    // plan's shape when adapters take part).
    absl::StatusOr<int64_t> graph = backend_->CaptureGraph([&]() -> absl::Status {
      if (scaling) RETURN_IF_ERROR(scaling_ops());
      RETURN_IF_ERROR(DecoderLayers(b, step_arrays_));
      return Head(n);
    });
    if (!graph.ok()) {
      // No graphs on this backend (CPU without them, or a capture the driver refused): run
      // eagerly from now on, with the reason kept for graph_status().
      graphs_unavailable_ = true;
      graph_status_ = graph.status();
      return false;
    }
    entry.graph = *graph;
    if (entry.epoch >= 0) {
      // Adapter graphs are bounded: the least recently launched goes first.
      int64_t adapter_graphs = 0;
      for (const auto& [k, g] : decode_graphs_) adapter_graphs += g.epoch >= 0 ? 1 : 0;
      if (adapter_graphs >= kMaxAdapterGraphs) {
        auto oldest = decode_graphs_.end();
        for (auto g = decode_graphs_.begin(); g != decode_graphs_.end(); ++g) {
          if (g->second.epoch >= 0 &&
              (oldest == decode_graphs_.end() || g->second.last_used < oldest->second.last_used)) {
            oldest = g;
          }
        }
        backend_->DestroyGraph(oldest->second.graph);
        decode_graphs_.erase(oldest);
      }
    }
    it = decode_graphs_.emplace(std::move(key), std::move(entry)).first;
  }
  it->second.last_used = ++graph_clock_;
  RETURN_IF_ERROR(backend_->LaunchGraph(it->second.graph));
  // The classified scalings come back with the step's results (TakeRouting).
  int64_t floats = 0;
  for (int32_t slot : classified) floats += int64_t{n} * XloraColumns(slot);
  if (xlora_host_.bytes() < static_cast<size_t>(floats * 4)) {
    ASSIGN_OR_RETURN(xlora_host_, backend_->AllocateHost(floats * 4 * 2));
  }
  int64_t at = 0;
  for (size_t k = 0; k < classified.size(); ++k) {
    const int64_t cols = XloraColumns(classified[k]);
    RETURN_IF_ERROR(backend_->CopyToHostAsync(xlora_host_.as<float>() + at,
                                              adapters_.xlora_table(classified[k]),
                                              n * cols * sizeof(float)));
    for (int32_t tok = 0; tok < n; ++tok) {
      if (host_rows[(1 + k) * int64_t{n} + tok])
        xlora_back_.push_back({tok, at + tok * cols, cols});
    }
    at += n * cols;
  }
  adapters_.EndPass();
  return true;
}

int64_t LlamaModel::XloraColumns(int32_t slot) const {
  return adapters_.adapter(slot)->xlora->classifier.back().out;
}

}  // namespace moleserve::engine
