#pragma once

// The built-in demo model: a small Llama-architecture model with deterministic random weights
// (fixed seed) and a byte-level tokenizer, so the whole pipeline runs with nothing to download.
// WriteModelDirectory() writes it (or any model) as a Hugging Face-style directory that
// `moleserve --model DIR` loads back through the real safetensors loader.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/model_io/model_config.h"
#include "engine/model_io/weights.h"

namespace moleserve::engine {

inline constexpr uint64_t kDemoModelSeed = 20261122;

// 4 layers, hidden 256, 8 query heads over 4 KV heads (GQA), head_dim 32, SwiGLU 688, vocab 260
// (256 bytes + BOS 256, EOS 257, PAD 258, UNK 259), context 2048. About 3.3M parameters.
ModelConfig DemoModelConfig();

// A larger shape for CPU benchmarks (~200M parameters, Llama-style, vocab 32000).
ModelConfig BenchModelConfig();

// Writes config.json, generation_config.json, model.safetensors (fp32) and tokenizer.json.
// `tokenizer_json` is written verbatim. Creates `dir` if needed.
absl::Status WriteModelDirectory(const std::string& dir, const ModelConfig& config,
                                 const HostWeights& weights, const std::string& tokenizer_json);

}  // namespace moleserve::engine
