// The adapter loaders (engine/adapters): mole/1 and PEFT LoRA directories written here with
// known values, and every kind of bad adapter rejected with a message that names the problem.

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/model_io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/common/adapter_dir.h"

namespace moleserve::engine {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;
using ::moleserve::test_util::AdapterDir;

ModelConfig TinyConfig() { return test_util::TinyModelConfig(); }

Json MoleConfig() {
  return Json{{"format", "mole"},
              {"format_version", 1},
              {"name", "test"},
              {"source_family", "mixlora"},
              {"base_model", {{"num_layers", 2}, {"hidden_size", 32}}}};
}

// A MixLoRA-shaped mole/1 adapter: static q/v LoRAs + a block FFN with E=4 experts of rank 4.
void WriteMixLora(AdapterDir& d, Json* cfg) {
  *cfg = MoleConfig();
  (*cfg)["static_loras"] =
      Json::array({{{"id", "attn"},
                    {"targets", {{"layers", "all"}, {"modules", {"q_proj", "v_proj"}}}},
                    {"rank", 2},
                    {"scale", 2.0}}});
  (*cfg)["routed_groups"] = Json::array(
      {{{"id", "ffn"},
        {"scope", "block_ffn"},
        {"targets", {{"layers", "all"}, {"modules", {"gate_proj", "up_proj", "down_proj"}}}},
        {"granularity", "lora"},
        {"num_experts", 4},
        {"rank", 4},
        {"scale", 0.5},
        {"router", {{"type", "linear"}}},
        {"routing", {{"algorithm", "topk"}, {"k", 2}}}}});
  for (int l = 0; l < 2; ++l) {
    const std::string s = "static.attn.layers." + std::to_string(l);
    d.Tensor(s + ".q_proj.A", {2, 32});
    d.Tensor(s + ".q_proj.B", {32, 2});
    d.Tensor(s + ".v_proj.A", {2, 32});
    d.Tensor(s + ".v_proj.B", {16, 2});
    const std::string g = "groups.ffn.layers." + std::to_string(l);
    d.Tensor(g + ".router.weight", {4, 32});
    d.Tensor(g + ".gate_proj.A", {4, 4, 32});
    d.Tensor(g + ".gate_proj.B", {4, 48, 4});
    d.Tensor(g + ".up_proj.A", {4, 4, 32});
    d.Tensor(g + ".up_proj.B", {4, 48, 4});
    d.Tensor(g + ".down_proj.A", {4, 4, 48});
    d.Tensor(g + ".down_proj.B", {4, 32, 4});
  }
}

absl::StatusOr<std::shared_ptr<const Adapter>> Load(const AdapterDir& d,
                                                    AdapterLimits limits = {}) {
  return LoadAdapter(d.path(), "a", TinyConfig(), limits);
}

TEST(MoleLoaderTest, LoadsMixLoraShape) {
  AdapterDir d("mixlora");
  Json cfg;
  WriteMixLora(d, &cfg);
  d.Write("mole_config.json", cfg);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d);
  ASSERT_TRUE(a.ok()) << a.status();
  const Adapter& ad = **a;
  EXPECT_EQ(ad.name, "a");
  EXPECT_EQ(ad.source_family, "mixlora");
  ASSERT_EQ(ad.layers.size(), 2u);
  const AdapterLayer& l1 = ad.layers[1];
  ASSERT_EQ(l1.statics[static_cast<int>(LinearModule::kQ)].size(), 1u);
  EXPECT_FLOAT_EQ(l1.statics[static_cast<int>(LinearModule::kQ)][0].scale[0], 2.0f);
  ASSERT_TRUE(l1.block_ffn.has_value());
  EXPECT_EQ(l1.block_ffn->num_experts, 4);
  EXPECT_EQ(l1.block_ffn->routing.k, 2);
  ASSERT_TRUE(l1.block_ffn->lora[2].has_value());
  // B is stored [E, out, r]; the loader keeps it rank-major: bt[e][i][o] = B[e][o][i].
  const LoraStack& down = *l1.block_ffn->lora[2];
  const std::vector<float>& b = d.data("groups.ffn.layers.1.down_proj.B");
  EXPECT_EQ(down.bt[(2 * 4 + 3) * 32 + 5], b[(2 * 32 + 5) * 4 + 3]);
  EXPECT_EQ(ad.num_experts(), 2 * 2 + 2 * 4);
  const int64_t lora_floats =
      2 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2) + 2 * (4 * 32 + 3 * 4 * 4 * (32 + 48));
  EXPECT_EQ(ad.bytes, (lora_floats + 2 * (2 + 3 * 4)) * 4);  // + scales
  ASSERT_EQ(ad.groups.size(), 2u);
  EXPECT_EQ(ad.groups[1].algorithm, "topk");
  EXPECT_EQ(ad.groups[1].max_experts, 4);
}

TEST(MoleLoaderTest, PerLayerExpertsAndK) {
  AdapterDir d("mola");
  Json cfg = MoleConfig();
  cfg["routed_groups"] = Json::array({{{"id", "mola"},
                                       {"scope", "module"},
                                       {"targets", {{"layers", "all"}, {"modules", {"o_proj"}}}},
                                       {"num_experts", {2, 3}},
                                       {"rank", 2},
                                       {"scale", 1.0},
                                       {"routing", {{"algorithm", "topk"}, {"k", {1, 2}}}}}});
  for (int l = 0; l < 2; ++l) {
    const int e = l + 2;
    const std::string g = "groups.mola.layers." + std::to_string(l) + ".o_proj";
    d.Tensor(g + ".A", {e, 2, 32});
    d.Tensor(g + ".B", {e, 32, 2});
    d.Tensor(g + ".router.weight", {e, 32});
  }
  d.Write("mole_config.json", cfg);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d);
  ASSERT_TRUE(a.ok()) << a.status();
  const auto& r0 = (*a)->layers[0].routed[static_cast<int>(LinearModule::kO)];
  const auto& r1 = (*a)->layers[1].routed[static_cast<int>(LinearModule::kO)];
  ASSERT_TRUE(r0 && r1);
  EXPECT_EQ(r0->experts.num_experts, 2);
  EXPECT_EQ(r0->routing.k, 1);
  EXPECT_EQ(r1->experts.num_experts, 3);
  EXPECT_EQ(r1->routing.k, 2);
}

// Turns the MixLoRA adapter's block-FFN routers into mixtures of 2 sub-routers (MoR).
void UseMixtureRouter(AdapterDir& d, Json& c) {
  c["routed_groups"][0]["router"] = {{"type", "mixture"}, {"num_routers", 2}};
  for (int l = 0; l < 2; ++l) {
    const std::string r = "groups.ffn.layers." + std::to_string(l) + ".router";
    d.Erase(r + ".weight");
    d.Tensor(r + ".sub.0.weight", {4, 32});
    d.Tensor(r + ".sub.1.weight", {4, 32});
    d.Tensor(r + ".main.weight", {2, 32});
  }
}

// Writes the MixLoRA adapter after `mutate` changed its config or tensors; expects a rejection
// whose message contains `want`.
template <typename Mutate>
void ExpectRejected(const std::string& want, Mutate mutate, AdapterLimits limits = {}) {
  AdapterDir d("bad");
  Json cfg;
  WriteMixLora(d, &cfg);
  mutate(d, cfg);
  d.Write("mole_config.json", cfg);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d, limits);
  ASSERT_FALSE(a.ok()) << "accepted an adapter that should fail with: " << want;
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
  EXPECT_THAT(std::string(a.status().message()), HasSubstr(want));
}

TEST(MoleLoaderTest, RejectsBadAdapters) {
  ExpectRejected("NaN or Inf", [](AdapterDir& d, Json&) {
    d.data("groups.ffn.layers.0.up_proj.B")[7] = std::numeric_limits<float>::quiet_NaN();
  });
  ExpectRejected("NaN or Inf", [](AdapterDir& d, Json&) {
    d.data("static.attn.layers.1.q_proj.A")[0] = std::numeric_limits<float>::infinity();
  });
  ExpectRejected("unknown routing algorithm 'topq'", [](AdapterDir&, Json& c) {
    c["routed_groups"][0]["routing"]["algorithm"] = "topq";
  });
  ExpectRejected("missing tensor 'groups.ffn.layers.1.router.weight'",
                 [](AdapterDir& d, Json&) { d.Erase("groups.ffn.layers.1.router.weight"); });
  ExpectRejected("the base module needs A [4, 4, 32]", [](AdapterDir& d, Json&) {
    d.Tensor("groups.ffn.layers.0.gate_proj.A", {4, 4, 33});  // wrong input width
  });
  ExpectRejected("rank 0 outside 1..256", [](AdapterDir& d, Json&) {
    d.Tensor("static.attn.layers.0.q_proj.A", {0, 32});
    d.Tensor("static.attn.layers.0.q_proj.B", {32, 0});
  });
  ExpectRejected(
      "rank 4 outside 1..3", [](AdapterDir&, Json&) {}, AdapterLimits{.max_rank = 3});
  ExpectRejected("k = 5 exceeds",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["routing"]["k"] = 5; });
  ExpectRejected("hidden_size = 64",
                 [](AdapterDir&, Json& c) { c["base_model"]["hidden_size"] = 64; });
  ExpectRejected("config does not describe",
                 [](AdapterDir& d, Json&) { d.Tensor("groups.ffn.layers.0.extra", {3}); });
  ExpectRejected("unsupported target module 'lm_head'", [](AdapterDir&, Json& c) {
    c["static_loras"][0]["targets"]["modules"] = {"lm_head"};
  });
  ExpectRejected("is not mole/1", [](AdapterDir&, Json& c) { c["format_version"] = 2; });
  ExpectRejected("'num_experts' must be",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["num_experts"] = "four"; });
  ExpectRejected("scale = 1e+300 is not a finite float",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["scale"] = 1e300; });
  ExpectRejected("static_loras[0].scale = -1e+39 is not a finite float",
                 [](AdapterDir&, Json& c) { c["static_loras"][0]["scale"] = -1e39; });
  ExpectRejected("temperature = 1e+40 is not a finite float", [](AdapterDir&, Json& c) {
    c["routed_groups"][0]["routing"]["temperature"] = 1e40;
  });
  ExpectRejected("'router' must be an object",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["router"] = "bogus"; });
  ExpectRejected("select_bias applies to rank-granular groups", [](AdapterDir&, Json& c) {
    c["routed_groups"][0]["router"] = {{"type", "linear"}, {"select_bias", true}};
  });
  ExpectRejected("id 'attn' is used twice",
                 [](AdapterDir&, Json& c) { c["static_loras"].push_back(c["static_loras"][0]); });
  ExpectRejected("rank 8 at layer 0 but tensor 'groups.ffn.layers.0.gate_proj.A' has rank 4",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["rank"] = 8; });
  ExpectRejected("p_mode 'maybe'", [](AdapterDir&, Json& c) {
    c["routed_groups"][0]["routing"]["p_mode"] = "maybe";
  });
  // Mixture of Routers: its sub-routers and main router, and what it cannot be combined with.
  ExpectRejected("missing tensor 'groups.ffn.layers.1.router.sub.1.weight'",
                 [&](AdapterDir& d, Json& c) {
                   UseMixtureRouter(d, c);
                   d.Erase("groups.ffn.layers.1.router.sub.1.weight");
                 });
  ExpectRejected("router.main.weight' has shape [3, 32]", [&](AdapterDir& d, Json& c) {
    UseMixtureRouter(d, c);
    d.Tensor("groups.ffn.layers.0.router.main.weight", {3, 32});
  });
  ExpectRejected("num_routers must be an integer in 1..16", [&](AdapterDir& d, Json& c) {
    UseMixtureRouter(d, c);
    c["routed_groups"][0]["router"]["num_routers"] = 17;
  });
  ExpectRejected("a mixture router needs granularity lora and routing temperature 1",
                 [&](AdapterDir& d, Json& c) {
                   UseMixtureRouter(d, c);
                   c["routed_groups"][0]["routing"]["temperature"] = 0.5;
                 });
  ExpectRejected("router.bias needs a linear router", [&](AdapterDir& d, Json& c) {
    UseMixtureRouter(d, c);
    c["routed_groups"][0]["router"]["bias"] = true;
  });
  ExpectRejected("num_routers applies to router type mixture only",
                 [](AdapterDir&, Json& c) { c["routed_groups"][0]["router"]["num_routers"] = 2; });
  ExpectRejected("a mixture router routes at most 128 experts, not 200",
                 [&](AdapterDir& d, Json& c) {
                   UseMixtureRouter(d, c);
                   c["routed_groups"][0]["num_experts"] = 200;
                 });
  ExpectRejected("an output_gate router needs scope module", [](AdapterDir&, Json& c) {
    c["routed_groups"][0]["router"]["type"] = "output_gate";  // on a block FFN
  });
  ExpectRejected(
      "router type 'mlp' is not supported (linear, mixture, output_gate, implicit_A, "
      "xlora_ref)",
      [](AdapterDir&, Json& c) { c["routed_groups"][0]["router"]["type"] = "mlp"; });
}

// A mixture router loads as one stacked GEMM: sub-routers' rows, then the main router's.
TEST(MoleLoaderTest, MixtureRouterStacksItsRouters) {
  AdapterDir d("mixture");
  Json cfg;
  WriteMixLora(d, &cfg);
  UseMixtureRouter(d, cfg);
  d.data("groups.ffn.layers.1.router.sub.1.weight")[5] = 1.5f;
  d.data("groups.ffn.layers.1.router.main.weight")[33] = -2.5f;
  d.Write("mole_config.json", cfg);
  auto a = Load(d);
  ASSERT_TRUE(a.ok()) << a.status();
  const RouterWeights& r = (*a)->layers[1].block_ffn->router;
  EXPECT_EQ(r.mixture, 2);
  EXPECT_EQ(r.rows, 4);
  EXPECT_EQ(r.gemm_rows(), 2 * 4 + 2);
  ASSERT_EQ(r.weight.size(), 10u * 32);
  EXPECT_EQ(r.weight[4 * 32 + 5], 1.5f);    // sub-router 1, row 0
  EXPECT_EQ(r.weight[8 * 32 + 33], -2.5f);  // main router, row 1, column 1
}

TEST(MoleLoaderTest, RejectsCorruptSafetensors) {
  AdapterDir d("corrupt");
  Json cfg;
  WriteMixLora(d, &cfg);
  d.Write("mole_config.json", cfg);
  const std::string file = d.path() + "/model.safetensors";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) / 2);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDataLoss) << a.status();  // truncated
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("model.safetensors"));
  // Garbage header.
  std::ofstream(file, std::ios::trunc) << "\xff\xff\xff\xff\xff\xff\xff\x7f{not json";
  a = Load(d);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
}

TEST(MoleLoaderTest, MissingDirectoryOrConfig) {
  absl::StatusOr<std::shared_ptr<const Adapter>> a =
      LoadAdapter("/nonexistent/adapter", "x", TinyConfig(), {});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  AdapterDir d("empty");
  a = Load(d);
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("mole_config.json"));
}

// --- PEFT LoRA ---

Json PeftConfig() {
  return Json{{"peft_type", "LORA"},
              {"r", 4},
              {"lora_alpha", 8},
              {"target_modules", {"q_proj", "down_proj"}},
              {"use_rslora", false},
              {"bias", "none"},
              {"modules_to_save", nullptr},
              {"use_dora", false}};
}

void WritePeft(AdapterDir& d) {
  for (int l = 0; l < 2; ++l) {
    const std::string p = "base_model.model.model.layers." + std::to_string(l);
    d.Tensor(p + ".self_attn.q_proj.lora_A.weight", {4, 32});
    d.Tensor(p + ".self_attn.q_proj.lora_B.weight", {32, 4});
    d.Tensor(p + ".mlp.down_proj.lora_A.weight", {l == 1 ? 8 : 4, 48});
    d.Tensor(p + ".mlp.down_proj.lora_B.weight", {32, l == 1 ? 8 : 4});
  }
  d.set_file("adapter_model.safetensors");
}

TEST(PeftLoaderTest, ScalesFromRankAndAlphaPatterns) {
  AdapterDir d("peft");
  WritePeft(d);
  Json cfg = PeftConfig();
  cfg["rank_pattern"] = {{"model.layers.1.mlp.down_proj", 8}};
  cfg["alpha_pattern"] = {{"q_proj", 2}};
  cfg["use_rslora"] = true;
  d.Write("adapter_config.json", cfg);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d);
  ASSERT_TRUE(a.ok()) << a.status();
  const auto& q = (*a)->layers[0].statics[static_cast<int>(LinearModule::kQ)];
  const auto& down1 = (*a)->layers[1].statics[static_cast<int>(LinearModule::kDown)];
  const auto& down0 = (*a)->layers[0].statics[static_cast<int>(LinearModule::kDown)];
  ASSERT_EQ(q.size(), 1u);
  EXPECT_FLOAT_EQ(q[0].scale[0], 2.0f / 2.0f);  // alpha_pattern 2 / sqrt(4)
  EXPECT_EQ(down1[0].rank, 8);
  EXPECT_FLOAT_EQ(down1[0].scale[0], 8.0f / std::sqrt(8.0f));
  EXPECT_FLOAT_EQ(down0[0].scale[0], 8.0f / 2.0f);
  EXPECT_EQ((*a)->format, "peft");
  EXPECT_EQ((*a)->source_family, "lora");
}

template <typename Mutate>
void ExpectPeftRejected(const std::string& want, Mutate mutate) {
  AdapterDir d("badpeft");
  WritePeft(d);
  Json cfg = PeftConfig();
  cfg["rank_pattern"] = {{"model.layers.1.mlp.down_proj", 8}};
  mutate(d, cfg);
  d.Write("adapter_config.json", cfg);
  absl::StatusOr<std::shared_ptr<const Adapter>> a = Load(d);
  ASSERT_FALSE(a.ok()) << "accepted a PEFT adapter that should fail with: " << want;
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument) << a.status();
  EXPECT_THAT(std::string(a.status().message()), HasSubstr(want));
}

TEST(PeftLoaderTest, RejectsUnsupported) {
  ExpectPeftRejected("use_dora", [](AdapterDir&, Json& c) { c["use_dora"] = true; });
  ExpectPeftRejected("modules_to_save",
                     [](AdapterDir&, Json& c) { c["modules_to_save"] = {"lm_head"}; });
  ExpectPeftRejected("embedding LoRAs", [](AdapterDir& d, Json&) {
    d.Tensor("base_model.model.model.embed_tokens.lora_embedding_A", {4, 64});
  });
  ExpectPeftRejected("DoRA", [](AdapterDir& d, Json&) {
    d.Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", {32});
  });
  ExpectPeftRejected("peft_type 'IA3'", [](AdapterDir&, Json& c) { c["peft_type"] = "IA3"; });
  ExpectPeftRejected("convert it with tools/mole_convert.py --family nola",
                     [](AdapterDir&, Json& c) { c["use_nola"] = true; });
  ExpectPeftRejected("rank 8 but adapter_config.json says r = 4",
                     [](AdapterDir&, Json& c) { c.erase("rank_pattern"); });
  ExpectPeftRejected("layer 5 does not exist", [](AdapterDir& d, Json&) {
    d.Tensor("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", {4, 32});
  });
  ExpectPeftRejected("outside layers_to_transform",
                     [](AdapterDir&, Json& c) { c["layers_to_transform"] = {0}; });
  ExpectPeftRejected("target module 'lm_head' is not supported", [](AdapterDir&, Json& c) {
    c["target_modules"] = {"q_proj", "lm_head"};
  });
  ExpectPeftRejected("not a valid regular expression", [](AdapterDir&, Json& c) {
    c["alpha_pattern"] = {{"q_proj([", 4}};
  });
  ExpectPeftRejected("too expensive to match", [](AdapterDir&, Json& c) {
    c["alpha_pattern"] = {{"(.*)*(.*)*(.*)*(.*)*(.*)*(.*)*attn_q", 4}};
  });
  ExpectPeftRejected("non-finite scale", [](AdapterDir&, Json& c) { c["lora_alpha"] = 1e300; });
  ExpectPeftRejected("layer indices in 0..1",
                     [](AdapterDir&, Json& c) { c["layers_to_transform"] = {4294967296}; });
  ExpectPeftRejected("does not describe", [](AdapterDir& d, Json&) {
    // An alias of layer 1 that a lenient integer parse would silently drop.
    d.Tensor("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", {4, 32});
  });
  ExpectPeftRejected("NaN or Inf", [](AdapterDir& d, Json&) {
    d.data("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")[3] =
        -std::numeric_limits<float>::infinity();
  });
  ExpectPeftRejected("the base module needs", [](AdapterDir& d, Json&) {
    d.Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", {16, 4});
  });
  ExpectPeftRejected("missing tensor", [](AdapterDir& d, Json&) {
    d.Tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", {4, 32});
  });
}

}  // namespace
}  // namespace moleserve::engine
