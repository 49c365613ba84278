// Prompt logprobs (GenerateRequest::prompt_logprobs) against an independent PyTorch reference
// (tests/reference/llama_reference.py, Debian's python3-torch, float64) on the demo model written
// to disk: the logprob of every prompt token after the first under the tokens before it, and its
// top alternatives, with long prompts prefilled in chunks and the scored positions squeezed into
// the logits rows that concurrent decoding leaves (max_num_seqs = 4).
//
// Tolerance: |logprob - reference| <= 1e-4 (fp32 logits within 1e-4 of the reference, as
// llama_model_test measures, and log-softmax in double on both sides). The top alternatives' ids
// equal the reference's order wherever neighbouring reference logprobs differ by more than that.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/engine.h"
#include "engine/model/demo_model.h"
#include "engine/model/model_directory.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/common/run_command.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr double kTolerance = 1e-4;

class Collector final : public GenerationSink {
 public:
  void OnChunk(GenerationChunk chunk) override {
    std::lock_guard<std::mutex> l(mu_);
    Take(std::move(chunk));
  }
  void OnFinish(GenerationChunk last, FinishInfo) override {
    std::lock_guard<std::mutex> l(mu_);
    Take(std::move(last));
    done_ = true;
    cv_.notify_all();
  }
  void OnError(absl::Status status) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> l(mu_);
    ASSERT_TRUE(cv_.wait_for(l, std::chrono::seconds(120), [&] { return done_; }));
    ASSERT_TRUE(status_.ok()) << status_;
  }
  std::vector<int32_t> ids, prompt_ids;
  std::vector<float> logprobs;
  std::vector<GeneratedToken> prompt_logprobs;
  int chunks_with_prompt = 0;

 private:
  void Take(GenerationChunk c) {
    for (const GeneratedToken& t : c.tokens) {
      ids.push_back(t.id);
      logprobs.push_back(t.logprob);
    }
    if (!c.prompt_ids.empty()) {
      ++chunks_with_prompt;
      prompt_ids = std::move(c.prompt_ids);
      prompt_logprobs = std::move(c.prompt_logprobs);
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
};

std::string WriteDemoModel() {
  const fs::path dir = fs::path(::testing::TempDir()) / absl::StrCat("prompt_lp_", getpid());
  fs::remove_all(dir);
  const ModelConfig config = DemoModelConfig();
  EXPECT_TRUE(WriteModelDirectory(dir.string(), config, RandomLlamaWeights(config, kDemoModelSeed),
                                  Tokenizer::ByteLevelDemo()->ToJson())
                  .ok());
  return dir.string();
}

// log-softmax of every position's reference logits: [prompt][position][vocab].
std::vector<std::vector<std::vector<double>>> ReferenceLogprobs(
    const std::string& dir, const std::vector<std::vector<int32_t>>& prompts) {
  std::string cmd = absl::StrCat(MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR,
                                 "/tests/reference/llama_reference.py ", dir);
  for (const auto& p : prompts) absl::StrAppend(&cmd, " --prompt ", absl::StrJoin(p, ","));
  int rc = 0;
  const std::string out = test_util::RunCommand(cmd, &rc);
  EXPECT_EQ(rc, 0) << "reference failed (is python3-torch installed?): " << cmd;
  nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  if (j.is_discarded() || !j.contains("logits")) {
    ADD_FAILURE() << "reference printed no logits";
    return {};
  }
  auto logits = j["logits"].get<std::vector<std::vector<std::vector<double>>>>();
  for (auto& prompt : logits) {
    for (auto& row : prompt) {
      double m = -INFINITY, s = 0;
      for (double v : row) m = std::max(m, v);
      for (double v : row) s += std::exp(v - m);
      for (double& v : row) v -= m + std::log(s);
    }
  }
  return logits;
}

std::vector<int32_t> Prompt(int len, int salt) {
  std::vector<int32_t> p = {256};  // BOS
  for (int i = 1; i < len; ++i) p.push_back((i * 53 + salt * 29) % 256);
  return p;
}

GenerateRequest Request(std::vector<int32_t> prompt, bool prompt_logprobs) {
  GenerateRequest r;
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.stopping.max_new_tokens = 6;
  r.stopping.ignore_eos = true;
  r.prompt_logprobs = prompt_logprobs;
  r.top_logprobs = prompt_logprobs ? 5 : 0;
  return r;
}

TEST(PromptLogprobsTest, MatchTheTorchReferenceUnderChunkingAndConcurrentDecoding) {
  const std::string dir = WriteDemoModel();
  auto engine = Engine::Create({.model = dir,
                                .num_threads = 2,
                                .max_batch_tokens = 16,
                                .max_num_seqs = 4,
                                .kv_cache_bytes = int64_t{32} << 20});
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  const std::vector<std::vector<int32_t>> prompts = {Prompt(45, 1), Prompt(7, 2), Prompt(2, 3),
                                                     Prompt(1, 4)};
  // Plain requests first: the tokens prompt logprobs must not change.
  std::vector<std::vector<int32_t>> plain;
  for (const auto& p : prompts) {
    auto c = std::make_shared<Collector>();
    ASSERT_TRUE(e.Submit(Request(p, false), c).ok());
    c->Wait();
    plain.push_back(c->ids);
  }
  // Then all at once, with two long decodes competing for the logits rows.
  std::vector<std::shared_ptr<Collector>> background, scored;
  for (int i = 0; i < 2; ++i) {
    GenerateRequest r = Request(Prompt(3, 10 + i), false);
    r.stopping.max_new_tokens = 40;
    background.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(e.Submit(std::move(r), background.back()).ok());
  }
  for (const auto& p : prompts) {
    scored.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(e.Submit(Request(p, true), scored.back()).ok());
  }
  for (auto& c : background) c->Wait();
  for (auto& c : scored) c->Wait();

  const auto ref = ReferenceLogprobs(dir, prompts);
  ASSERT_EQ(ref.size(), prompts.size());
  int64_t compared = 0;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const Collector& c = *scored[p];
    EXPECT_EQ(c.ids, plain[p]) << "prompt " << p;
    EXPECT_EQ(c.chunks_with_prompt, 1) << "prompt " << p;
    EXPECT_EQ(c.prompt_ids, prompts[p]);
    ASSERT_EQ(c.prompt_logprobs.size(), prompts[p].size() - 1) << "prompt " << p;
    for (size_t i = 0; i + 1 < prompts[p].size(); ++i) {
      const GeneratedToken& t = c.prompt_logprobs[i];
      const std::vector<double>& want = ref[p][i];  // logits at i score token i + 1
      EXPECT_EQ(t.id, prompts[p][i + 1]);
      EXPECT_NEAR(t.logprob, want[prompts[p][i + 1]], kTolerance) << "prompt " << p << " pos " << i;
      ASSERT_EQ(t.top.size(), 5u);
      for (size_t k = 0; k < t.top.size(); ++k) {
        const auto [id, lp] = t.top[k];
        EXPECT_NEAR(lp, want[id], kTolerance);
        if (k > 0) {
          EXPECT_LE(lp, t.top[k - 1].second);
        }
      }
      // Nothing outside the list is more likely than its last entry.
      for (size_t v = 0; v < want.size(); ++v) {
        const bool listed = std::any_of(t.top.begin(), t.top.end(), [&](const auto& x) {
          return x.first == static_cast<int32_t>(v);
        });
        if (!listed) {
          EXPECT_LE(want[v], t.top.back().second + kTolerance);
        }
      }
      ++compared;
    }
  }
  EXPECT_EQ(compared, 44 + 6 + 1);
  fs::remove_all(dir);
}

TEST(PromptLogprobsTest, LogitBiasSteersGreedyTokensButNotTheirLogprobs) {
  auto engine = Engine::Create({.num_threads = 2, .kv_cache_bytes = int64_t{16} << 20});
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerateRequest r = Request(Prompt(5, 1), false);
  r.logprobs = true;
  auto base = std::make_shared<Collector>();
  ASSERT_TRUE((*engine)->Submit(r, base).ok());
  base->Wait();
  // Ban the first greedy token, boost another: the output follows the bias.
  r.sampling.logit_bias = {{base->ids[0], -100.0f}, {65, 100.0f}};
  auto biased = std::make_shared<Collector>();
  ASSERT_TRUE((*engine)->Submit(r, biased).ok());
  biased->Wait();
  EXPECT_EQ(biased->ids, std::vector<int32_t>(6, 65));
  // Logprobs are those of the raw logits (a +100 bias would make them ~0).
  for (float lp : biased->logprobs) EXPECT_LT(lp, -1.0f);
  // Bad bias values are refused before anything runs.
  r.sampling.logit_bias = {{300, 1.0f}};
  absl::StatusOr<uint64_t> refused = (*engine)->Submit(r, std::make_shared<Collector>());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("logit_bias"), std::string::npos);
}

}  // namespace
}  // namespace moleserve::engine
