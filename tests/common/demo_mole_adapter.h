#pragma once

// Random adapters for the built-in demo model, for server tests and benchmarks (no gtest here):
// WriteDemoMoleAdapter (a top-2 routed mole/1 group), WriteDemoRankAdapter (FlyLoRA / SMoRA rank
// routing), WriteDemoPeftLora (a PEFT LoRA), WriteDemoXloraAdapter (an X-LoRA model),
// WriteDemoMixloraAdapter (MixLoRA's block-routed FFN), WriteDemoOutputGateAdapter (an
// output-gated MoLE). Each returns the directory, or "" when the
// weights cannot be written.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model_io/safetensors.h"

namespace moleserve::test_util {

// Normal random fp32 tensors (stddev, seeded: drawn in the order they are added) for an adapter
// written into `dir` (emptied first).
class RandomTensors {
 public:
  RandomTensors(const std::string& dir, uint32_t seed, float stddev)
      : dir_(dir), rng_(seed), dist_(0.0f, stddev) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  void Add(const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(n);
    for (float& x : v) x = dist_(rng_);
    tensors_[name] = {std::move(shape), std::move(v)};
  }
  // The tensors as dir/file (safetensors); false when they cannot be written.
  bool Write(const std::string& file) const {
    std::vector<engine::SafetensorsWriteTensor> out;
    for (const auto& [name, v] : tensors_) out.push_back({name, v.first, v.second.data()});
    return engine::WriteSafetensors(dir_ + "/" + file, out, {}).ok();
  }

 private:
  std::string dir_;
  std::mt19937 rng_;
  std::normal_distribution<float> dist_;
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors_;
};

// A mole/1 adapter for the demo model (4 layers, hidden 256, 8 q heads / 4 kv heads of 32):
// a top-2 routed group of `num_experts` experts of rank `rank` (default 4 and 4) on q_proj and
// o_proj of every layer, strong enough to change greedy output.
inline std::string WriteDemoMoleAdapter(const std::string& dir, uint32_t seed = 7,
                                        int32_t num_experts = 4, int32_t rank = 4,
                                        float stddev = 0.3f) {
  RandomTensors t(dir, seed, stddev);
  for (int l = 0; l < 4; ++l) {
    for (const std::string m : {"q_proj", "o_proj"}) {
      const std::string p = absl::StrCat("groups.g.layers.", l, ".", m);
      t.Add(p + ".A", {num_experts, rank, 256});
      t.Add(p + ".B", {num_experts, 256, rank});
      t.Add(p + ".router.weight", {num_experts, 256});
    }
  }
  if (!t.Write("model.safetensors")) return "";
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "demo-mola", "source_family": "mola",
    "routed_groups": [{"id": "g", "scope": "module",
      "targets": {"layers": "all", "modules": ["q_proj", "o_proj"]},
      "num_experts": )"
      << num_experts << R"(, "rank": )" << rank << R"(, "scale": 2.0,
      "routing": {"algorithm": "topk", "k": 2}}]})";
  return dir;
}

// An output-gated mole/1 adapter for the demo model (Wu, Huang, Wei 2024; MOLE_FORMAT 3.8):
// `num_experts` LoRAs of rank 4 on q_proj and o_proj of every layer, weighed per token by a soft
// gate (temperature 0.5) over their L2-normalised concatenated outputs.
inline std::string WriteDemoOutputGateAdapter(const std::string& dir, uint32_t seed = 23,
                                              int32_t num_experts = 3) {
  RandomTensors t(dir, seed, 0.3f);
  for (int l = 0; l < 4; ++l) {
    for (const std::string m : {"q_proj", "o_proj"}) {
      const std::string p = absl::StrCat("groups.g.layers.", l, ".", m);
      t.Add(p + ".A", {num_experts, 4, 256});
      t.Add(p + ".B", {num_experts, 256, 4});
      t.Add(p + ".router.weight", {num_experts, num_experts * 256});
    }
  }
  if (!t.Write("model.safetensors")) return "";
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "demo-output-gate",
    "source_family": "output_gate",
    "routed_groups": [{"id": "g", "scope": "module",
      "targets": {"layers": "all", "modules": ["q_proj", "o_proj"]},
      "num_experts": )"
      << num_experts << R"(, "rank": 4, "scale": 2.0, "router": {"type": "output_gate"},
      "routing": {"algorithm": "soft", "temperature": 0.5}}]})";
  return dir;
}

// A rank-wise mole/1 adapter for the demo model: one group of total rank `rank` on q_proj and
// o_proj of every layer keeping the top `k` ranks per token, with a selection bias. FlyLoRA
// (implicit router: selection on A x) by default; SMoRA (a linear gate over the ranks) when
// `smora`.
inline std::string WriteDemoRankAdapter(const std::string& dir, bool smora, uint32_t seed = 13,
                                        int32_t rank = 8, int32_t k = 3, float stddev = 0.3f) {
  RandomTensors t(dir, seed, stddev);
  for (int l = 0; l < 4; ++l) {
    for (const std::string m : {"q_proj", "o_proj"}) {
      const std::string p = absl::StrCat("groups.r.layers.", l, ".", m);
      t.Add(p + ".A", {1, rank, 256});
      t.Add(p + ".B", {1, 256, rank});
      t.Add(p + ".router.select_bias", {rank});
      if (smora) t.Add(p + ".router.weight", {rank, 256});
    }
  }
  if (!t.Write("model.safetensors")) return "";
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "demo-rank", "source_family": ")"
      << (smora ? "smora" : "flylora") << R"(",
    "routed_groups": [{"id": "r", "scope": "module", "granularity": "rank",
      "targets": {"layers": "all", "modules": ["q_proj", "o_proj"]},
      "num_experts": 1, "rank": )"
      << rank << R"(, "scale": 2.0,
      "router": {"type": ")"
      << (smora ? "linear" : "implicit_A") << R"(", "select_bias": true},
      "routing": {"algorithm": "rank_topk", "k": )"
      << k << R"(}}]})";
  return dir;
}

// A PEFT LoRA for the demo model: one static LoRA of rank `rank` on q_proj, v_proj and down_proj
// of every layer (lora_alpha = 2 * rank), strong enough to change greedy output; with
// `every_module`, on all seven linear modules instead.
inline std::string WriteDemoPeftLora(const std::string& dir, uint32_t seed = 11, int32_t rank = 8,
                                     float stddev = 0.2f, bool every_module = false) {
  RandomTensors t(dir, seed, stddev);
  struct Module {
    const char* path;
    int64_t in, out;
    bool always;
  };
  // Demo shapes: hidden 256, 4 KV heads of 32 (k_proj, v_proj 128 wide), intermediate 688.
  for (int l = 0; l < 4; ++l) {
    for (const Module& m :
         {Module{"self_attn.q_proj", 256, 256, true}, Module{"self_attn.k_proj", 256, 128, false},
          Module{"self_attn.v_proj", 256, 128, true}, Module{"self_attn.o_proj", 256, 256, false},
          Module{"mlp.gate_proj", 256, 688, false}, Module{"mlp.up_proj", 256, 688, false},
          Module{"mlp.down_proj", 688, 256, true}}) {
      if (!m.always && !every_module) continue;
      const std::string p = absl::StrCat("base_model.model.model.layers.", l, ".", m.path);
      t.Add(p + ".lora_A.weight", {rank, m.in});
      t.Add(p + ".lora_B.weight", {m.out, rank});
    }
  }
  if (!t.Write("adapter_model.safetensors")) return "";
  std::ofstream(dir + "/adapter_config.json")
      << R"({"peft_type": "LORA", "r": )" << rank << R"(, "lora_alpha": )" << 2 * rank
      << R"(, "target_modules": )"
      << (every_module ? R"(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", )"
                         R"("down_proj"]})"
                       : R"(["q_proj", "v_proj", "down_proj"]})");
  return dir;
}

// An X-LoRA mole/1 adapter for the demo model: 3 LoRAs of rank 4 on q_proj and o_proj of every
// layer (8 modules), a depth-2 classifier (hidden 16, ReLU) with layerwise scalings, top-2 with
// a softmax over the kept two, scaling_pass_value 1/3 (so the scaling pass runs the adapters)
// and global_scaling_weight 1.5; its scalings freeze after `freeze_after` tokens (-1: never).
inline std::string WriteDemoXloraAdapter(const std::string& dir, uint32_t seed = 17,
                                         int32_t freeze_after = -1, float stddev = 0.3f) {
  constexpr int32_t kAdapters = 3, kRank = 4, kModules = 8, kHidden = 16;
  RandomTensors t(dir, seed, stddev);
  std::string module_index;
  for (int l = 0; l < 4; ++l) {
    for (const std::string m : {"q_proj", "o_proj"}) {
      const std::string p = absl::StrCat("groups.x.layers.", l, ".", m);
      t.Add(p + ".A", {kAdapters, kRank, 256});
      t.Add(p + ".B", {kAdapters, 256, kRank});
      absl::StrAppend(&module_index, module_index.empty() ? "" : ", ", "\"layers.", l, ".", m,
                      "\": ", 2 * l + (m == "q_proj" ? 0 : 1));
    }
  }
  t.Add("xlora.classifier.0.weight", {kHidden, 256});
  t.Add("xlora.classifier.0.bias", {kHidden});
  t.Add("xlora.classifier.1.weight", {kAdapters * kModules, kHidden});
  t.Add("xlora.classifier.1.bias", {kAdapters * kModules});
  if (!t.Write("model.safetensors")) return "";
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "demo-xlora", "source_family": "xlora",
    "routed_groups": [{"id": "x", "scope": "model_scalings", "granularity": "lora",
      "targets": {"layers": "all", "modules": ["q_proj", "o_proj"]},
      "num_experts": 3, "rank": 4, "scale": 2.0, "router": {"type": "xlora_ref"},
      "routing": {"algorithm": "soft"}}],
    "xlora": {"adapters": ["a0", "a1", "a2"],
      "classifier": {"depth": 2, "hidden": 16, "bias": true, "relu": true},
      "layerwise_scalings": true, "enable_softmax": true, "softmax_temperature": 1.0,
      "top_k": 2, "softmax_topk": true, "scaling_pass_value": 0.3333333,
      "global_scaling_weight": 1.5, "module_index": {)"
      << module_index << R"(}},
    "inference": {"freeze_scalings_after": )"
      << (freeze_after < 0 ? std::string("null") : std::to_string(freeze_after)) << "}}";
  return dir;
}

// A MixLoRA-style mole/1 adapter for the demo model: a block-routed FFN of 4 experts of rank 4
// on gate_proj, up_proj and down_proj of every layer (hidden 256, intermediate 688), routed by
// `routing` (a mole/1 routing object, top-2 by default), strong enough to change greedy output.
inline std::string WriteDemoMixloraAdapter(
    const std::string& dir, uint32_t seed = 19,
    const std::string& routing = R"({"algorithm": "topk", "k": 2})", float stddev = 0.3f) {
  RandomTensors t(dir, seed, stddev);
  struct Module {
    const char* name;
    int64_t in, out;
  };
  for (int l = 0; l < 4; ++l) {
    const std::string p = absl::StrCat("groups.ffn.layers.", l);
    t.Add(p + ".router.weight", {4, 256});
    for (const Module& m : {Module{"gate_proj", 256, 688}, Module{"up_proj", 256, 688},
                            Module{"down_proj", 688, 256}}) {
      t.Add(absl::StrCat(p, ".", m.name, ".A"), {4, 4, m.in});
      t.Add(absl::StrCat(p, ".", m.name, ".B"), {4, m.out, 4});
    }
  }
  if (!t.Write("model.safetensors")) return "";
  std::ofstream(dir + "/mole_config.json")
      << R"({"format": "mole", "format_version": 1, "name": "demo-mixlora",
    "source_family": "mixlora",
    "routed_groups": [{"id": "ffn", "scope": "block_ffn",
      "targets": {"layers": "all", "modules": ["gate_proj", "up_proj", "down_proj"]},
      "num_experts": 4, "rank": 4, "scale": 2.0, "routing": )"
      << routing << "}]}";
  return dir;
}

}  // namespace moleserve::test_util
