#include "engine/model/demo_model.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"
#include "engine/model_io/safetensors.h"

namespace moleserve::engine {
namespace {

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

}  // namespace

ModelConfig DemoModelConfig() {
  ModelConfig c;
  c.name = "moleserve-demo";
  c.vocab_size = 260;
  c.hidden_size = 256;
  c.intermediate_size = 688;
  c.num_layers = 4;
  c.num_heads = 8;
  c.num_kv_heads = 4;
  c.head_dim = 32;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.max_position_embeddings = 2048;
  c.tie_word_embeddings = false;
  c.bos_token_id = 256;
  c.eos_token_ids = {257};
  return c;
}

ModelConfig BenchModelConfig() {
  ModelConfig c;
  c.name = "moleserve-bench-200m";
  c.vocab_size = 32000;
  c.hidden_size = 1024;
  c.intermediate_size = 2816;
  c.num_layers = 12;
  c.num_heads = 16;
  c.num_kv_heads = 8;
  c.head_dim = 64;
  c.max_position_embeddings = 4096;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

absl::Status WriteModelDirectory(const std::string& dir, const ModelConfig& config,
                                 const HostWeights& weights, const std::string& tokenizer_json) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  const std::filesystem::path root(dir);
  RETURN_IF_ERROR(WriteText(root / "config.json", ToHfConfigJson(config)));
  nlohmann::json gen;
  if (config.bos_token_id) gen["bos_token_id"] = *config.bos_token_id;
  gen["eos_token_id"] = config.eos_token_ids;
  RETURN_IF_ERROR(WriteText(root / "generation_config.json", gen.dump(2)));
  RETURN_IF_ERROR(WriteText(root / "tokenizer.json", tokenizer_json));
  std::vector<SafetensorsWriteTensor> tensors;
  for (const TensorSpec& spec : LlamaTensorSpecs(config)) {
    auto it = weights.tensors().find(spec.name);
    if (it == weights.tensors().end()) {
      return absl::InvalidArgumentError(absl::StrCat("missing tensor '", spec.name, "'"));
    }
    tensors.push_back({spec.name, it->second.shape, it->second.data.data()});
  }
  return WriteSafetensors((root / "model.safetensors").string(), tensors, {{"format", "pt"}});
}

}  // namespace moleserve::engine
