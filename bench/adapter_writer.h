#pragma once

// Random LoRA adapters of any model shape, written for benchmarks: PEFT LoRA and mole/1 top-k
// directories with every linear module targeted, bf16 safetensors. The values are uniform and
// small; they do not matter for timing.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model_io/model_config.h"
#include "engine/model_io/safetensors.h"

namespace moleserve::bench {

// Uniform values in [-scale, scale) from a fast LCG.
inline std::vector<float> Fill(int64_t n, uint32_t seed, float scale) {
  std::vector<float> v(n);
  uint32_t state = seed * 2654435761u + 1;
  for (float& x : v) {
    state = state * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(state >> 8) * 0x1p-23f - 1.0f);
  }
  return v;
}

struct ModuleShape {
  const char* name;
  const char* block;  // self_attn / mlp
  int64_t in, out;
};
inline std::vector<ModuleShape> Modules(const engine::ModelConfig& c) {
  const int64_t q = int64_t{c.num_heads} * c.head_dim, kv = int64_t{c.num_kv_heads} * c.head_dim;
  return {{"q_proj", "self_attn", c.hidden_size, q},
          {"k_proj", "self_attn", c.hidden_size, kv},
          {"v_proj", "self_attn", c.hidden_size, kv},
          {"o_proj", "self_attn", q, c.hidden_size},
          {"gate_proj", "mlp", c.hidden_size, c.intermediate_size},
          {"up_proj", "mlp", c.hidden_size, c.intermediate_size},
          {"down_proj", "mlp", c.intermediate_size, c.hidden_size}};
}

using NamedTensors =
    std::vector<std::pair<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>>;

inline void WriteTensors(const std::string& path, NamedTensors& t) {
  std::vector<engine::SafetensorsWriteTensor> out;
  for (auto& [name, v] : t) out.push_back({name, v.first, v.second.data()});
  if (absl::Status s = engine::WriteSafetensors(path, out, {}, "BF16"); !s.ok()) {
    std::fprintf(stderr, "write %s: %s\n", path.c_str(), s.ToString().c_str());
    std::exit(1);
  }
}

// Values of a rank-r LoRA on every linear module of every layer (A and B of each).
inline int64_t PeftLoraValues(const engine::ModelConfig& c, int r) {
  int64_t n = 0;
  for (const ModuleShape& m : Modules(c)) n += int64_t{r} * (m.in + m.out);
  return n * c.num_layers;
}

// PEFT LoRA, rank r on every linear module of every layer.
inline std::string WritePeftLora(const std::string& dir, const engine::ModelConfig& c, int r,
                                 uint32_t seed) {
  std::filesystem::create_directories(dir);
  NamedTensors t;
  for (int l = 0; l < c.num_layers; ++l) {
    for (const ModuleShape& m : Modules(c)) {
      const std::string p =
          absl::StrCat("base_model.model.model.layers.", l, ".", m.block, ".", m.name);
      t.push_back({p + ".lora_A.weight", {{r, m.in}, Fill(r * m.in, seed++, 0.01f)}});
      t.push_back({p + ".lora_B.weight", {{m.out, r}, Fill(m.out * r, seed++, 0.01f)}});
    }
  }
  WriteTensors(dir + "/adapter_model.safetensors", t);
  std::ofstream(dir + "/adapter_config.json")
      << R"({"peft_type": "LORA", "r": )" << r << R"(, "lora_alpha": )" << 2 * r
      << R"(, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj"]})";
  return dir;
}

// mole/1, top-k of E experts of rank r on every linear module of every layer.
inline std::string WriteMole(const std::string& dir, const engine::ModelConfig& c, int experts,
                             int k, int r) {
  std::filesystem::create_directories(dir);
  NamedTensors t;
  uint32_t seed = 99;
  for (int l = 0; l < c.num_layers; ++l) {
    for (const ModuleShape& m : Modules(c)) {
      const std::string p = absl::StrCat("groups.g.layers.", l, ".", m.name);
      t.push_back({p + ".A", {{experts, r, m.in}, Fill(experts * r * m.in, seed++, 0.01f)}});
      t.push_back({p + ".B", {{experts, m.out, r}, Fill(experts * m.out * r, seed++, 0.01f)}});
      t.push_back({p + ".router.weight", {{experts, m.in}, Fill(experts * m.in, seed++, 0.05f)}});
    }
  }
  WriteTensors(dir + "/model.safetensors", t);
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "bench-mole", "source_family": "mola",
    "routed_groups": [{"id": "g", "scope": "module",
      "targets": {"layers": "all", "modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj"]},
      "num_experts": )"
      << experts << R"(, "rank": )" << r << R"(, "scale": 2.0,
      "routing": {"algorithm": "topk", "k": )"
      << k << "}}]}";
  return dir;
}

}  // namespace moleserve::bench
