#include "engine/model/synthetic.h"

#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moleserve::engine {
namespace {

struct Preset {
  const char* name;
  ModelConfig config;
};

ModelConfig Shape(const char* name, const char* arch, int32_t vocab, int32_t hidden, int32_t inter,
                  int32_t layers, int32_t heads, int32_t kv_heads, int32_t head_dim, float theta,
                  int32_t max_pos, bool tie) {
  ModelConfig c;
  c.name = absl::StrCat(kSyntheticPrefix, name);
  c.architecture = arch;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.rope_theta = theta;
  c.max_position_embeddings = max_pos;
  c.tie_word_embeddings = tie;
  c.rms_norm_eps = 1e-5f;
  c.qkv_bias = std::string(arch) == "Qwen2ForCausalLM";
  // The byte-level tokenizer's specials.
  c.bos_token_id = 256;
  c.eos_token_ids = {257};
  return c;
}

RopeScaling Llama3Rope(double factor) {
  return {.type = RopeScalingType::kLlama3,
          .factor = factor,
          .low_freq_factor = 1.0,
          .high_freq_factor = 4.0,
          .original_max_position_embeddings = 8192};
}

// Shapes from the public config.json files of these models.
const std::vector<Preset>& Presets() {
  static const std::vector<Preset>* presets = [] {
    auto* p = new std::vector<Preset>;
    const char* L = "LlamaForCausalLM";
    const char* M = "MistralForCausalLM";
    const char* Q = "Qwen2ForCausalLM";
    p->push_back({"smollm-135m",
                  Shape("smollm-135m", L, 49152, 576, 1536, 30, 9, 3, 64, 10000, 2048, true)});
    p->push_back({"qwen2.5-0.5b", Shape("qwen2.5-0.5b", Q, 151936, 896, 4864, 24, 14, 2, 64,
                                        1000000, 32768, true)});
    p->push_back({"tinyllama-1.1b", Shape("tinyllama-1.1b", L, 32000, 2048, 5632, 22, 32, 4, 64,
                                          10000, 2048, false)});
    ModelConfig l32_1b =
        Shape("llama3.2-1b", L, 128256, 2048, 8192, 16, 32, 8, 64, 500000, 131072, true);
    l32_1b.rope_scaling = Llama3Rope(32);
    p->push_back({"llama3.2-1b", l32_1b});
    ModelConfig l32_3b =
        Shape("llama3.2-3b", L, 128256, 3072, 8192, 28, 24, 8, 128, 500000, 131072, true);
    l32_3b.rope_scaling = Llama3Rope(32);
    p->push_back({"llama3.2-3b", l32_3b});
    p->push_back({"llama-7b",
                  Shape("llama-7b", L, 32000, 4096, 11008, 32, 32, 32, 128, 10000, 4096, false)});
    p->push_back({"mistral-7b", Shape("mistral-7b", M, 32000, 4096, 14336, 32, 32, 8, 128, 1000000,
                                      32768, false)});
    p->push_back({"qwen2-7b", Shape("qwen2-7b", Q, 152064, 3584, 18944, 28, 28, 4, 128, 1000000,
                                    32768, false)});
    p->push_back({"llama3-8b",
                  Shape("llama3-8b", L, 128256, 4096, 14336, 32, 32, 8, 128, 500000, 8192, false)});
    ModelConfig l31_8b =
        Shape("llama3.1-8b", L, 128256, 4096, 14336, 32, 32, 8, 128, 500000, 131072, false);
    l31_8b.rope_scaling = Llama3Rope(8);
    p->push_back({"llama3.1-8b", l31_8b});
    return p;
  }();
  return *presets;
}

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

std::vector<std::string> SyntheticPresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : Presets()) names.push_back(p.name);
  return names;
}

absl::StatusOr<ModelConfig> SyntheticModelConfig(absl::string_view preset) {
  for (const Preset& p : Presets()) {
    if (preset == p.name) return p.config;
  }
  return absl::NotFoundError(absl::StrCat("unknown synthetic model '", preset, "'; presets: ",
                                          absl::StrJoin(SyntheticPresetNames(), ", ")));
}

RandomWeightSource::RandomWeightSource(const ModelConfig& config, uint64_t seed)
    : specs_(LlamaTensorSpecs(config)), seed_(seed) {}

absl::StatusOr<std::vector<int64_t>> RandomWeightSource::Shape(const std::string& name) const {
  for (const TensorSpec& s : specs_) {
    if (s.name == name) return s.shape;
  }
  return absl::InvalidArgumentError(absl::StrCat("missing tensor '", name, "'"));
}

absl::Status RandomWeightSource::ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                                         float* out) const {
  absl::StatusOr<std::vector<int64_t>> stored = Shape(name);
  if (!stored.ok()) return stored.status();
  if (!std::equal(stored->begin(), stored->end(), shape.begin(), shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' shape mismatch"));
  }
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  const bool bias = name.ends_with(".bias");
  const bool norm = shape.size() == 1 && !bias;
  const double sd = norm || bias                          ? 0.1
                    : name == "model.embed_tokens.weight" ? 1.0
                                                          : 1.0 / std::sqrt(shape[1]);
  // Uniform on [-a, a] has variance a^2 / 3.
  const double a = sd * std::sqrt(3.0);
  uint64_t state = Mix(seed_ ^ std::hash<std::string>{}(name));
  for (int64_t i = 0; i < n; ++i) {
    state = Mix(state + 0x9e3779b97f4a7c15ull);
    const double u = static_cast<double>(state >> 11) * 0x1.0p-53;  // [0, 1)
    out[i] = static_cast<float>((norm ? 1.0 : 0.0) + a * (2.0 * u - 1.0));
  }
  return absl::OkStatus();
}

}  // namespace moleserve::engine
