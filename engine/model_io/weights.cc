#include "engine/model_io/weights.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status_macros.h"
#include "engine/model_io/safetensors.h"

namespace moleserve::engine {
namespace {

int64_t Numel(absl::Span<const int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// SplitMix64: tiny, portable, and identical on every platform (unlike std distributions).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1).
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53; }
  // Standard normal (Box-Muller).
  double Normal() {
    const double u1 = Uniform();
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }

 private:
  uint64_t state_;
};

}  // namespace

std::vector<TensorSpec> LlamaTensorSpecs(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  const int64_t q = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t kv = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t inter = c.intermediate_size;
  std::vector<TensorSpec> specs;
  specs.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    specs.push_back({p + "input_layernorm.weight", {h}});
    specs.push_back({p + "self_attn.q_proj.weight", {q, h}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv, h}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv, h}});
    specs.push_back({p + "self_attn.o_proj.weight", {h, q}});
    if (c.qkv_bias) {
      specs.push_back({p + "self_attn.q_proj.bias", {q}});
      specs.push_back({p + "self_attn.k_proj.bias", {kv}});
      specs.push_back({p + "self_attn.v_proj.bias", {kv}});
    }
    if (c.o_bias) specs.push_back({p + "self_attn.o_proj.bias", {h}});
    specs.push_back({p + "post_attention_layernorm.weight", {h}});
    specs.push_back({p + "mlp.gate_proj.weight", {inter, h}});
    specs.push_back({p + "mlp.up_proj.weight", {inter, h}});
    specs.push_back({p + "mlp.down_proj.weight", {h, inter}});
  }
  specs.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, h}});
  return specs;
}

absl::Status HostWeights::ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                                  float* out) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    return absl::InvalidArgumentError(absl::StrCat("missing tensor '", name, "'"));
  if (!std::equal(it->second.shape.begin(), it->second.shape.end(), shape.begin(), shape.end())) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "' has shape [", absl::StrJoin(it->second.shape, ", "),
                     "], expected [", absl::StrJoin(shape, ", "), "]"));
  }
  std::memcpy(out, it->second.data.data(), sizeof(float) * it->second.data.size());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> HostWeights::Shape(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    return absl::InvalidArgumentError(absl::StrCat("missing tensor '", name, "'"));
  return it->second.shape;
}

absl::StatusOr<std::vector<int64_t>> SafetensorsWeightSource::Shape(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing tensor '", name, "' in the checkpoint"));
  }
  return it->second->Find(name)->shape;
}

absl::StatusOr<std::unique_ptr<SafetensorsWeightSource>> SafetensorsWeightSource::Open(
    const std::vector<std::string>& paths) {
  auto source = std::unique_ptr<SafetensorsWeightSource>(new SafetensorsWeightSource());
  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    for (const SafetensorsTensor& t : file->tensors()) {
      auto [it, inserted] = source->index_.emplace(t.name, file.get());
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' appears in both ",
                                                       it->second->path(), " and ", path));
      }
    }
    source->files_.push_back(std::move(file));
  }
  return source;
}

SafetensorsWeightSource::~SafetensorsWeightSource() = default;

absl::Status SafetensorsWeightSource::ReadF32(const std::string& name,
                                              absl::Span<const int64_t> shape, float* out) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing tensor '", name, "' in the checkpoint"));
  }
  return it->second->ReadF32(name, shape, out);
}

HostWeights RandomLlamaWeights(const ModelConfig& config, uint64_t seed) {
  HostWeights weights;
  Rng rng(seed);
  for (const TensorSpec& spec : LlamaTensorSpecs(config)) {
    HostWeights::Tensor t;
    t.shape = spec.shape;
    t.data.resize(Numel(spec.shape));
    const bool is_bias = spec.name.ends_with(".bias");
    const bool is_norm = spec.shape.size() == 1 && !is_bias;
    const bool is_embedding = spec.name == "model.embed_tokens.weight";
    const double stddev = is_norm || is_bias ? 0.1
                          : is_embedding     ? 1.0
                                             : 1.0 / std::sqrt(spec.shape[1]);
    for (float& v : t.data) v = static_cast<float>((is_norm ? 1.0 : 0.0) + stddev * rng.Normal());
    weights.tensors().emplace(spec.name, std::move(t));
  }
  return weights;
}

}  // namespace moleserve::engine
