// Hugging Face checkpoint directories of every supported architecture (Llama with llama3 and
// linear rope scaling, Mistral with sliding-window attention, Qwen2 with q/k/v biases and tied
// embeddings; bf16 sharded, fp16 and fp32 files), written by tests/reference/
// make_tiny_checkpoints.py, against the independent PyTorch reference
// (tests/reference/llama_reference.py, Debian's python3-torch, float64).
//
// Tolerance: max |logit - reference| <= 1e-4 * max(1, max |reference logit|) over every position
// of every prompt (the engine computes in fp32 on the same, already rounded, weights). Greedy
// generation of 64 tokens through the engine (chunked prefill + paged-KV decode) must equal the
// reference's greedy tokens exactly.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "engine/backend/backend.h"
#include "engine/engine.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "tests/common/run_command.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

const std::vector<std::vector<int32_t>> kPrompts = {
    {256, 72, 105, 33, 10},
    {256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110},
    {256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77}};
constexpr int kGreedyTokens = 64;

using ::moleserve::test_util::RunCommand;

// Writes the checkpoints once per test binary run.
class HfCheckpointsTest : public ::testing::TestWithParam<std::string> {
 public:
  static void SetUpTestSuite() {
    root_ = new std::string(
        (fs::path(::testing::TempDir()) / absl::StrCat("moleserve_tiny_ckpt_", getpid())).string());
    int rc = 0;
    const std::string out =
        RunCommand(absl::StrCat(MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR,
                                "/tests/reference/make_tiny_checkpoints.py ", *root_, " 2>&1"),
                   &rc);
    ASSERT_EQ(rc, 0) << "make_tiny_checkpoints.py failed (is python3-torch installed?):\n" << out;
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  std::string dir() const { return *root_ + "/" + GetParam(); }

  // logits[prompt][position][vocab] and greedy[prompt][token] from the reference.
  struct Reference {
    std::vector<std::vector<std::vector<double>>> logits;
    std::vector<std::vector<int32_t>> greedy;
  };
  Reference RunReference() const {
    std::string cmd =
        absl::StrCat(MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR,
                     "/tests/reference/llama_reference.py ", dir(), " --greedy ", kGreedyTokens);
    for (const auto& p : kPrompts) absl::StrAppend(&cmd, " --prompt ", absl::StrJoin(p, ","));
    int rc = 0;
    const std::string out = RunCommand(cmd, &rc);
    EXPECT_EQ(rc, 0) << cmd;
    nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
    Reference r;
    if (j.is_discarded()) {
      ADD_FAILURE() << "reference printed no JSON";
      return r;
    }
    r.logits = j["logits"].get<std::vector<std::vector<std::vector<double>>>>();
    r.greedy = j["greedy"].get<std::vector<std::vector<int32_t>>>();
    EXPECT_EQ(r.logits.size(), kPrompts.size());
    EXPECT_EQ(r.greedy.size(), kPrompts.size());
    for (size_t p = 0; p < std::min(r.logits.size(), kPrompts.size()); ++p) {
      EXPECT_EQ(r.logits[p].size(), kPrompts[p].size());
      for (const auto& row : r.logits[p]) EXPECT_EQ(row.size(), 512u);
      EXPECT_EQ(r.greedy[p].size(), static_cast<size_t>(kGreedyTokens));
    }
    return r;
  }

 private:
  static std::string* root_;
};
std::string* HfCheckpointsTest::root_ = nullptr;

TEST_P(HfCheckpointsTest, LogitsOfEveryPositionMatchTheReference) {
  const Reference ref = RunReference();
  ASSERT_FALSE(HasFailure());
  auto md = OpenModelDirectory(dir());
  ASSERT_TRUE(md.ok()) << md.status();
  auto backend = *CreateCpuBackend({.num_threads = 2});
  auto model = LlamaModel::Create(
      backend.get(), md->config, *md->weights,
      {.num_kv_blocks = 32, .kv_block_size = 16, .max_batch_tokens = 128, .max_seqs = 64});
  ASSERT_TRUE(model.ok()) << model.status();
  // All prompts in one mixed batch, every position sampled.
  Batch b;
  int32_t next_block = 0;
  for (size_t s = 0; s < kPrompts.size(); ++s) {
    for (size_t i = 0; i < kPrompts[s].size(); ++i) {
      b.tokens.push_back(kPrompts[s][i]);
      b.positions.push_back(static_cast<int32_t>(i));
      b.token_seq.push_back(static_cast<int32_t>(s));
      b.sample_rows.push_back(b.num_tokens() - 1);
    }
    for (size_t k = 0; k < (kPrompts[s].size() + 15) / 16; ++k)
      b.block_tables.push_back(next_block++);
    b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
  }
  std::vector<float> logits;
  ASSERT_TRUE((*model)->Forward(b, &logits).ok());
  double worst = 0, scale = 1;
  int row = 0;
  for (size_t s = 0; s < kPrompts.size(); ++s) {
    for (size_t pos = 0; pos < kPrompts[s].size(); ++pos, ++row) {
      for (int v = 0; v < 512; ++v) {
        worst = std::max(worst, std::fabs(logits[row * 512 + v] - ref.logits[s][pos][v]));
        scale = std::max(scale, std::fabs(ref.logits[s][pos][v]));
      }
    }
  }
  EXPECT_LE(worst, 1e-4 * scale) << "scale " << scale;
  std::printf("%s: max |logit - torch| %.3g (max |logit| %.3g)\n", GetParam().c_str(), worst,
              scale);
}

TEST_P(HfCheckpointsTest, GreedyGenerationMatchesTheReference) {
  const Reference ref = RunReference();
  ASSERT_FALSE(HasFailure());
  // Small steps so prefill is chunked and decode runs through the paged cache.
  auto engine = Engine::Create({.model = dir(),
                                .num_threads = 2,
                                .max_batch_tokens = 8,
                                .max_num_seqs = 4,
                                .kv_cache_bytes = 8 << 20});
  ASSERT_TRUE(engine.ok()) << engine.status();
  struct Sink : GenerationSink {
    std::vector<int32_t> ids;
    absl::Status status;
    absl::Notification done;
    void OnChunk(GenerationChunk c) override {
      for (auto& t : c.tokens) ids.push_back(t.id);
    }
    void OnFinish(GenerationChunk c, FinishInfo) override {
      for (auto& t : c.tokens) ids.push_back(t.id);
      done.Notify();
    }
    void OnError(absl::Status s) override {
      status = s;
      done.Notify();
    }
  };
  std::vector<std::shared_ptr<Sink>> sinks;
  for (const auto& p : kPrompts) {
    GenerateRequest r;
    r.token_ids = p;
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = kGreedyTokens;
    r.stopping.ignore_eos = true;
    sinks.push_back(std::make_shared<Sink>());
    ASSERT_TRUE((*engine)->Submit(r, sinks.back()).ok());
  }
  for (size_t i = 0; i < sinks.size(); ++i) {
    ASSERT_TRUE(sinks[i]->done.WaitForNotificationWithTimeout(absl::Seconds(120)));
    ASSERT_TRUE(sinks[i]->status.ok()) << sinks[i]->status;
    EXPECT_EQ(sinks[i]->ids, ref.greedy[i]) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, HfCheckpointsTest,
                         ::testing::Values("llama_rope_llama3_bf16_sharded",
                                           "llama_rope_linear_fp32", "mistral_sliding_window_fp32",
                                           "qwen2_bias_tied_fp16"));

}  // namespace
}  // namespace moleserve::engine
