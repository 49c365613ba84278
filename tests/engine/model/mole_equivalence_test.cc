// The equivalences every MoLE implementation must satisfy (MOLE_FORMAT.md test vectors 5), on a
// tiny random Llama with adapters written here:
//  - a routed group with E = 1 (module scope, top-1) equals the same LoRA as a static LoRA;
//  - MixLoRA's block-routed FFN with E = 1 equals static LoRAs on gate/up/down (the serving
//    rewrite of section 1.3 reduces to the plain adapted FFN);
//  - all-zero B equals the base model: block FFN with renormalised top-k (weights sum to 1),
//    module-scope soft routing, and a rank-granular group;
//  - several adapters and the base model in one batch give each sequence the logits it gets alone.
// Tolerance: 2e-5 absolute on logits of magnitude ~1-10 (fp32, different summation orders).

#include <cmath>
#include <memory>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/model/llama_model.h"
#include "engine/model_io/weights.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/common/adapter_dir.h"

namespace moleserve::engine {
namespace {

using Json = nlohmann::json;
using ::moleserve::test_util::AdapterDir;

constexpr float kTol = 2e-5f;
const std::vector<int32_t> kPrompt = {1, 7, 3, 9, 60, 2, 33, 5, 17};

ModelConfig TinyConfig() { return test_util::TinyModelConfig(); }

Json Mole() { return Json{{"format", "mole"}, {"format_version", 1}}; }

Json Group(const std::string& id, const std::string& scope, std::vector<std::string> modules,
           int experts, int rank, const Json& routing) {
  return Json{{"id", id},
              {"scope", scope},
              {"targets", {{"layers", "all"}, {"modules", modules}}},
              {"num_experts", experts},
              {"rank", rank},
              {"scale", 1.5},
              {"routing", routing}};
}

class MoleEquivalenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = TinyConfig();
    weights_ = RandomLlamaWeights(config_, 11);
    auto backend = CreateCpuBackend({.num_threads = 2});
    ASSERT_TRUE(backend.ok());
    backend_ = *std::move(backend);
    auto model = LlamaModel::Create(
        backend_.get(), config_, weights_,
        {.num_kv_blocks = 16, .kv_block_size = 16, .max_batch_tokens = 64, .max_seqs = 64});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
  }

  int32_t Attach(const AdapterDir& dir) {
    absl::StatusOr<std::shared_ptr<const Adapter>> a = LoadAdapter(dir.path(), "a", config_, {});
    EXPECT_TRUE(a.ok()) << a.status();
    if (!a.ok()) return -2;
    absl::StatusOr<int32_t> slot = model_->AttachAdapter(*a);
    EXPECT_TRUE(slot.ok()) << slot.status();
    return slot.ok() ? *slot : -2;
  }

  // Logits of every position of kPrompt for each sequence's slot, all in one batch (each
  // sequence its own KV block).
  std::vector<std::vector<float>> Logits(const std::vector<int32_t>& slots) {
    Batch b;
    const int32_t n = static_cast<int32_t>(kPrompt.size());
    for (int32_t s = 0; s < static_cast<int32_t>(slots.size()); ++s) {
      for (int32_t i = 0; i < n; ++i) {
        b.tokens.push_back(kPrompt[i]);
        b.positions.push_back(i);
        b.token_seq.push_back(s);
        b.sample_rows.push_back(s * n + i);
      }
      b.block_tables.push_back(s);
      b.block_table_offsets.push_back(s + 1);
      b.seq_adapter.push_back(slots[s]);
      b.aux_block_table_offsets.push_back(0);
    }
    std::vector<float> logits;
    absl::Status st = model_->Forward(b, &logits);
    EXPECT_TRUE(st.ok()) << st;
    std::vector<std::vector<float>> out(slots.size());
    const size_t per_seq = static_cast<size_t>(n) * config_.vocab_size;
    for (size_t s = 0; s < slots.size() && logits.size() >= (s + 1) * per_seq; ++s) {
      out[s].assign(logits.begin() + s * per_seq, logits.begin() + (s + 1) * per_seq);
    }
    return out;
  }

  static float MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    float m = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
  }

  ModelConfig config_;
  HostWeights weights_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
};

TEST_F(MoleEquivalenceTest, RoutedSingleExpertEqualsStaticLora) {
  AdapterDir routed("routed_e1"), plain("static");
  Json rc = Mole(), sc = Mole();
  rc["routed_groups"] = {
      Group("g", "module", {"q_proj", "down_proj"}, 1, 4, {{"algorithm", "topk"}, {"k", 1}})};
  sc["static_loras"] = {{{"id", "s"},
                         {"targets", {{"layers", "all"}, {"modules", {"q_proj", "down_proj"}}}},
                         {"rank", 4},
                         {"scale", 1.5}}};
  for (int l = 0; l < 2; ++l) {
    for (auto [m, in, out] : {std::tuple{"q_proj", 32, 32}, std::tuple{"down_proj", 48, 32}}) {
      const std::string g = "groups.g.layers." + std::to_string(l) + "." + m;
      const std::string s = "static.s.layers." + std::to_string(l) + "." + m;
      routed.Tensor(g + ".A", {1, 4, in});
      routed.Tensor(g + ".B", {1, out, 4});
      routed.Tensor(g + ".router.weight", {1, in});
      plain.Set(s + ".A", {4, in}, routed.data(g + ".A"));
      plain.Set(s + ".B", {out, 4}, routed.data(g + ".B"));
    }
  }
  routed.Write("mole_config.json", rc);
  plain.Write("mole_config.json", sc);
  const int32_t a = Attach(routed), b = Attach(plain);
  std::vector<std::vector<float>> l = Logits({a, b, -1});
  EXPECT_LE(MaxDiff(l[0], l[1]), kTol);
  EXPECT_GT(MaxDiff(l[0], l[2]), 1e-2f) << "the adapter does not change the logits";
}

TEST_F(MoleEquivalenceTest, BlockFfnSingleExpertEqualsStaticFfnLoras) {
  AdapterDir block("block_e1"), plain("static_ffn");
  Json bc = Mole(), sc = Mole();
  bc["routed_groups"] = {Group("ffn", "block_ffn", {"gate_proj", "up_proj", "down_proj"}, 1, 4,
                               {{"algorithm", "topk"}, {"k", 1}})};
  sc["static_loras"] = {
      {{"id", "s"},
       {"targets", {{"layers", "all"}, {"modules", {"gate_proj", "up_proj", "down_proj"}}}},
       {"rank", 4},
       {"scale", 1.5}}};
  for (int l = 0; l < 2; ++l) {
    const std::string g = "groups.ffn.layers." + std::to_string(l);
    block.Tensor(g + ".router.weight", {1, 32});
    for (auto [m, in, out] : {std::tuple{"gate_proj", 32, 48}, std::tuple{"up_proj", 32, 48},
                              std::tuple{"down_proj", 48, 32}}) {
      const std::string s = "static.s.layers." + std::to_string(l) + "." + m;
      block.Tensor(g + "." + m + ".A", {1, 4, in});
      block.Tensor(g + "." + m + ".B", {1, out, 4});
      plain.Set(s + ".A", {4, in}, block.data(g + "." + m + ".A"));
      plain.Set(s + ".B", {out, 4}, block.data(g + "." + m + ".B"));
    }
  }
  block.Write("mole_config.json", bc);
  plain.Write("mole_config.json", sc);
  const int32_t a = Attach(block), b = Attach(plain);
  std::vector<std::vector<float>> l = Logits({a, b, -1});
  EXPECT_LE(MaxDiff(l[0], l[1]), kTol);
  EXPECT_GT(MaxDiff(l[0], l[2]), 1e-2f) << "the adapter does not change the logits";
}

TEST_F(MoleEquivalenceTest, AllZeroBEqualsBaseModel) {
  AdapterDir block("zero_block"), soft("zero_soft"), rank("zero_rank");
  Json bc = Mole(), fc = Mole(), rc = Mole();
  bc["routed_groups"] = {Group("ffn", "block_ffn", {"gate_proj", "up_proj", "down_proj"}, 4, 4,
                               {{"algorithm", "topk"}, {"k", 2}})};
  fc["routed_groups"] = {Group("g", "module", {"q_proj", "v_proj", "o_proj", "up_proj"}, 3, 2,
                               {{"algorithm", "soft"}})};
  Json rank_group =
      Group("r", "module", {"k_proj", "down_proj"}, 1, 8, {{"algorithm", "rank_topk"}, {"k", 3}});
  rank_group["granularity"] = "rank";
  rank_group["router"] = {{"type", "implicit_A"}};
  rc["routed_groups"] = {rank_group};
  for (int l = 0; l < 2; ++l) {
    const std::string L = std::to_string(l);
    block.Tensor("groups.ffn.layers." + L + ".router.weight", {4, 32});
    for (auto [m, in, out] : {std::tuple{"gate_proj", 32, 48}, std::tuple{"up_proj", 32, 48},
                              std::tuple{"down_proj", 48, 32}}) {
      block.Tensor("groups.ffn.layers." + L + "." + m + ".A", {4, 4, in});
      block.Tensor("groups.ffn.layers." + L + "." + m + ".B", {4, out, 4}, 0.0f);
    }
    for (auto [m, in, out] : {std::tuple{"q_proj", 32, 32}, std::tuple{"v_proj", 32, 16},
                              std::tuple{"o_proj", 32, 32}, std::tuple{"up_proj", 32, 48}}) {
      const std::string g = "groups.g.layers." + L + "." + m;
      soft.Tensor(g + ".A", {3, 2, in});
      soft.Tensor(g + ".B", {3, out, 2}, 0.0f);
      soft.Tensor(g + ".router.weight", {3, in});
    }
    for (auto [m, in, out] : {std::tuple{"k_proj", 32, 16}, std::tuple{"down_proj", 48, 32}}) {
      const std::string g = "groups.r.layers." + L + "." + m;
      rank.Tensor(g + ".A", {1, 8, in});
      rank.Tensor(g + ".B", {1, out, 8}, 0.0f);
    }
  }
  block.Write("mole_config.json", bc);
  soft.Write("mole_config.json", fc);
  rank.Write("mole_config.json", rc);
  const int32_t a = Attach(block), b = Attach(soft), c = Attach(rank);
  std::vector<std::vector<float>> l = Logits({a, b, c, -1});
  EXPECT_LE(MaxDiff(l[0], l[3]), kTol) << "block FFN, top-2 renormalised";
  EXPECT_LE(MaxDiff(l[1], l[3]), kTol) << "module scope, soft";
  EXPECT_LE(MaxDiff(l[2], l[3]), kTol) << "rank-granular";
}

TEST_F(MoleEquivalenceTest, MixedBatchEqualsEachSequenceAlone) {
  AdapterDir block("mixed_block"), soft("mixed_soft");
  Json bc = Mole(), fc = Mole();
  bc["routed_groups"] = {Group("ffn", "block_ffn", {"gate_proj", "down_proj"}, 4, 4,
                               {{"algorithm", "top_p"}, {"p", 0.6}})};
  fc["routed_groups"] = {Group("g", "module", {"q_proj", "o_proj"}, 3, 2, {{"algorithm", "soft"}})};
  for (int l = 0; l < 2; ++l) {
    const std::string L = std::to_string(l);
    block.Tensor("groups.ffn.layers." + L + ".router.weight", {4, 32});
    block.Tensor("groups.ffn.layers." + L + ".gate_proj.A", {4, 4, 32});
    block.Tensor("groups.ffn.layers." + L + ".gate_proj.B", {4, 48, 4});
    block.Tensor("groups.ffn.layers." + L + ".down_proj.A", {4, 4, 48});
    block.Tensor("groups.ffn.layers." + L + ".down_proj.B", {4, 32, 4});
    for (const std::string m : {"q_proj", "o_proj"}) {
      const std::string g = "groups.g.layers." + L + "." + m;
      soft.Tensor(g + ".A", {3, 2, 32});
      soft.Tensor(g + ".B", {3, 32, 2});
      soft.Tensor(g + ".router.weight", {3, 32});
    }
  }
  block.Write("mole_config.json", bc);
  soft.Write("mole_config.json", fc);
  const int32_t a = Attach(block), b = Attach(soft);
  std::vector<std::vector<float>> mixed = Logits({a, -1, b, a, -1});
  const std::vector<int32_t> slots = {a, -1, b, a, -1};
  for (size_t s = 0; s < slots.size(); ++s) {
    std::vector<std::vector<float>> alone = Logits({slots[s]});
    EXPECT_LE(MaxDiff(mixed[s], alone[0]), kTol) << "sequence " << s;
  }
  EXPECT_GT(MaxDiff(mixed[0], mixed[1]), 1e-2f);
  EXPECT_GT(MaxDiff(mixed[2], mixed[1]), 1e-2f);
}

}  // namespace
}  // namespace moleserve::engine
