// The prefix cache through the engine: outputs with it equal outputs without it, token for token
// and logprob for logprob, for the base model and every kind of adapter, in multi-turn chats
// (later turns repeat earlier prompts and answers), under preemption, with routing overrides and
// across an adapter replace; and the cache is really used (the engine's hit counter moves).
//
// Tolerance: logprobs within 1e-3 absolute. A cached block's KV was computed in another step
// (another batch, or decoded rather than prefilled), so its sums may run in another order; in
// fp32 that moves a logprob by ~1e-6. Tokens must be equal.

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/engine.h"
#include "engine/model/demo_model.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

class Collector final : public GenerationSink {
 public:
  void OnChunk(GenerationChunk chunk) override {
    std::lock_guard<std::mutex> l(mu_);
    for (const GeneratedToken& t : chunk.tokens) tokens_.push_back({t.id, t.logprob});
  }
  void OnFinish(GenerationChunk last, FinishInfo) override {
    OnChunk(std::move(last));
    std::lock_guard<std::mutex> l(mu_);
    done_ = true;
    cv_.notify_all();
  }
  void OnError(absl::Status status) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  std::vector<std::pair<int32_t, float>> Wait() {
    std::unique_lock<std::mutex> l(mu_);
    EXPECT_TRUE(cv_.wait_for(l, std::chrono::seconds(120), [&] { return done_; }));
    EXPECT_TRUE(status_.ok()) << status_;
    return tokens_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  std::vector<std::pair<int32_t, float>> tokens_;
};

class CountPreemptions final : public MetricsSink {
 public:
  void OnRequestRejected(absl::StatusCode, ClientProtocol) override {}
  void OnFirstToken(double) override {}
  void OnInterTokenLatency(double) override {}
  void OnRequestFinished(const FinishedRequestMetrics&) override {}
  void OnStep(const StepMetrics&) override {}
  void OnQueueState(int64_t, int64_t, double) override {}
  void OnPreempted(int64_t n) override { preempted += n; }
  std::atomic<int64_t> preempted{0};
};

// Writes one adapter of each kind under `root`.
struct Adapters {
  fs::path root;
  Adapters() {
    root = fs::temp_directory_path() / absl::StrCat("moleserve_prefix_cache_", getpid());
    fs::remove_all(root);
    EXPECT_FALSE(test_util::WriteDemoPeftLora((root / "lora").string()).empty());
    EXPECT_FALSE(test_util::WriteDemoMoleAdapter((root / "mole").string()).empty());
    EXPECT_FALSE(test_util::WriteDemoMoleAdapter((root / "mole2").string(), 99).empty());
    EXPECT_FALSE(test_util::WriteDemoMixloraAdapter((root / "mixlora").string()).empty());
    EXPECT_FALSE(test_util::WriteDemoRankAdapter((root / "flylora").string(), false).empty());
    EXPECT_FALSE(test_util::WriteDemoXloraAdapter((root / "xlora").string()).empty());
    EXPECT_FALSE(test_util::WriteDemoOutputGateAdapter((root / "gate").string()).empty());
  }
  ~Adapters() { fs::remove_all(root); }
};

std::unique_ptr<Engine> MakeEngine(bool caching, const Adapters& a, int64_t kv_bytes = 64 << 20,
                                   MetricsSink* metrics = nullptr) {
  EngineOptions o{.num_threads = 2,
                  .max_num_seqs = 8,
                  .prefix_caching = caching,
                  .kv_cache_bytes = kv_bytes,
                  .metrics = metrics,
                  .adapter_root = a.root.string()};
  for (const char* name : {"lora", "mole", "mixlora", "flylora", "xlora", "gate"}) {
    o.adapters.push_back({name, (a.root / name).string()});
  }
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? *std::move(e) : nullptr;
}

GenerateRequest Greedy(const std::string& adapter, std::vector<int32_t> prompt, int32_t n) {
  GenerateRequest r;
  r.adapter = adapter;
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.stopping.max_new_tokens = n;
  r.stopping.ignore_eos = true;
  r.logprobs = true;
  return r;
}

std::vector<std::pair<int32_t, float>> Generate(Engine& e, GenerateRequest r) {
  auto c = std::make_shared<Collector>();
  EXPECT_TRUE(e.Submit(std::move(r), c).ok());
  return c->Wait();
}

std::vector<int32_t> Tokens(int n, int salt) {
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back((i * 37 + salt * 11 + 5) % 256);
  return p;
}

void ExpectSame(const std::vector<std::pair<int32_t, float>>& got,
                const std::vector<std::pair<int32_t, float>>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first) << what << ", token " << i;
    EXPECT_NEAR(got[i].second, want[i].second, 1e-3) << what << ", token " << i;
  }
}

// Three turns of one chat: a shared 48-token system prompt, then each turn repeats the
// conversation so far (the earlier answers included) and adds a question.
void ExpectChatMatches(Engine& cached, Engine& plain, const std::string& adapter,
                       bool expect_hits) {
  SCOPED_TRACE(adapter.empty() ? "base model" : adapter);
  std::vector<int32_t> conversation = {256};
  const std::vector<int32_t> system = Tokens(48, 1);
  conversation.insert(conversation.end(), system.begin(), system.end());
  const int64_t hits_before = cached.Stats().prefix_hit_tokens;
  for (int turn = 0; turn < 3; ++turn) {
    const std::vector<int32_t> question = Tokens(9 + turn * 5, 10 + turn);
    conversation.insert(conversation.end(), question.begin(), question.end());
    const auto want = Generate(plain, Greedy(adapter, conversation, 12));
    const auto got = Generate(cached, Greedy(adapter, conversation, 12));
    ExpectSame(got, want, absl::StrCat("turn ", turn));
    for (const auto& [id, lp] : want) conversation.push_back(id);
  }
  const int64_t hits = cached.Stats().prefix_hit_tokens - hits_before;
  if (expect_hits) {
    // Turns 2 and 3 find at least the earlier turns' full blocks.
    EXPECT_GE(hits, 2 * 48) << "the cache was not used";
  } else {
    EXPECT_EQ(hits, 0) << "X-LoRA's two KV caches are not shared";
  }
}

TEST(PrefixCacheTest, MultiTurnChatsGiveTheSameOutputsWithAndWithoutTheCache) {
  Adapters a;
  auto cached = MakeEngine(true, a);
  auto plain = MakeEngine(false, a);
  ASSERT_TRUE(cached && plain);
  for (const char* adapter : {"", "lora", "mole", "mixlora", "flylora", "gate"}) {
    ExpectChatMatches(*cached, *plain, adapter, /*expect_hits=*/true);
  }
  ExpectChatMatches(*cached, *plain, "xlora", /*expect_hits=*/false);
  EXPECT_EQ(plain->Stats().prefix_hit_tokens, 0);
  EXPECT_GT(cached->Stats().cached_kv_blocks, 0);
}

// The same prompt under another adapter, another routing override or a replaced version finds
// nothing computed under the first: were any of them left out of the key, these outputs would
// be the first one's.
TEST(PrefixCacheTest, AdapterVersionAndOverrideAreInTheKey) {
  Adapters a;
  auto cached = MakeEngine(true, a);
  auto plain = MakeEngine(false, a);
  ASSERT_TRUE(cached && plain);
  std::vector<int32_t> prompt = {256};
  const std::vector<int32_t> body = Tokens(80, 3);
  prompt.insert(prompt.end(), body.begin(), body.end());
  // Each request's outputs equal the uncached engine's; `hits` says whether the cached engine
  // should have found the prompt (computed before under the same key) or nothing of it.
  auto both = [&](GenerateRequest r, const std::string& what, bool hits) {
    const auto want = Generate(*plain, r);
    const int64_t before = cached->Stats().prefix_hit_tokens;
    const auto got = Generate(*cached, r);
    ExpectSame(got, want, what);
    const int64_t found = cached->Stats().prefix_hit_tokens - before;
    if (hits) {
      EXPECT_EQ(found, 80) << what << ": the prompt's 5 full blocks";
    } else {
      EXPECT_EQ(found, 0) << what << ": computed under another key, yet found in the cache";
    }
    return got;
  };
  const auto on_mole = both(Greedy("mole", prompt, 10), "mole", false);
  // The same prompt on the base model and on another adapter.
  both(Greedy("", prompt, 10), "base after mole", false);
  both(Greedy("lora", prompt, 10), "lora after mole", false);
  // A routing override: top-1 instead of the adapter's top-2.
  GenerateRequest top1 = Greedy("mole", prompt, 10);
  top1.routing_override.k = 1;
  const auto overridden = both(top1, "mole with k=1 after mole", false);
  EXPECT_NE(overridden, on_mole)
      << "the override changes nothing: the test would not see a bad key";
  both(top1, "mole with k=1 again", true);
  both(Greedy("mole", prompt, 10), "mole again", true);
  // An output gate's disabled experts.
  const auto gated = both(Greedy("gate", prompt, 10), "gate", false);
  GenerateRequest off = Greedy("gate", prompt, 10);
  off.routing_override.disabled_experts = {0};
  const auto masked = both(off, "gate without expert 0 after gate", false);
  EXPECT_NE(masked, gated) << "the mask changes nothing: the test would not see a bad key";
  off.routing_override.disabled_experts = {1};
  both(off, "gate without expert 1 after expert 0", false);
  off.routing_override.disabled_experts = {0};
  both(off, "gate without expert 0 again", true);
  off.routing_override.disabled_experts = {0, 0};  // the same set
  both(off, "gate without experts {0, 0}", true);
  // A replace: the same name, other weights.
  for (Engine* e : {cached.get(), plain.get()}) {
    ASSERT_TRUE(e->LoadAdapter("mole", "mole2", /*replace=*/true).ok());
  }
  const auto replaced = both(Greedy("mole", prompt, 10), "mole v2 after v1", false);
  EXPECT_NE(replaced, on_mole) << "v2 gives v1's tokens: the test would not see a bad key";
  EXPECT_GT(cached->Stats().prefix_hit_tokens, 0);
}

// A KV cache of a few blocks and eight concurrent chats that share a prefix: sequences are
// preempted and recomputed (from the cache where their blocks survived), and every output is
// the uncached one.
TEST(PrefixCacheTest, PreemptedSequencesRecomputeFromTheCacheWithTheSameOutputs) {
  Adapters a;
  CountPreemptions preemptions;
  // Room for 18 blocks of 16 tokens: eight sequences of ~90 tokens do not fit at once.
  const ModelConfig c = DemoModelConfig();
  const int64_t kv_bytes = int64_t{18} * 16 * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4;
  auto cached = MakeEngine(true, a, kv_bytes, &preemptions);
  auto plain = MakeEngine(false, a, int64_t{64} << 20);
  ASSERT_TRUE(cached && plain);
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> prompt = {256};
    const std::vector<int32_t> shared = Tokens(40, 7), own = Tokens(10 + i, 20 + i);
    prompt.insert(prompt.end(), shared.begin(), shared.end());
    prompt.insert(prompt.end(), own.begin(), own.end());
    requests.push_back(Greedy(i % 2 == 0 ? "mole" : "", prompt, 40));
  }
  std::vector<std::vector<std::pair<int32_t, float>>> want;
  for (const GenerateRequest& r : requests) want.push_back(Generate(*plain, r));
  std::vector<std::shared_ptr<Collector>> sinks;
  for (const GenerateRequest& r : requests) {
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(cached->Submit(r, sinks.back()).ok());
  }
  for (size_t i = 0; i < sinks.size(); ++i) ExpectSame(sinks[i]->Wait(), want[i], "request");
  EXPECT_GT(preemptions.preempted.load(), 0) << "the KV cache is meant to be too small";
  EXPECT_GT(cached->Stats().prefix_hit_tokens, 0);
  for (int i = 0; i < 500; ++i) {
    const EngineStats s = cached->Stats();
    if (s.free_kv_blocks == s.total_kv_blocks && s.running == 0) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  const EngineStats s = cached->Stats();
  EXPECT_EQ(s.free_kv_blocks, s.total_kv_blocks) << "cached blocks count as free";
}

// n samples of one prompt submitted together (what the HTTP API's `n` does): the first computes
// the prompt, the others wait one step and share its blocks, and each sample is the uncached one.
TEST(PrefixCacheTest, SamplesOfOnePromptShareItsBlocks) {
  Adapters a;
  auto cached = MakeEngine(true, a);
  auto plain = MakeEngine(false, a);
  ASSERT_TRUE(cached && plain);
  std::vector<int32_t> prompt = {256};
  const std::vector<int32_t> body = Tokens(99, 5);  // 100 tokens: 6 full blocks to share
  prompt.insert(prompt.end(), body.begin(), body.end());
  constexpr int kSamples = 4;
  auto sample = [&](int i) {
    GenerateRequest r = Greedy("mole", prompt, 8);
    r.sampling.temperature = 0.8f;
    r.sampling.seed = 100 + i;
    return r;
  };
  std::vector<std::vector<std::pair<int32_t, float>>> want;
  for (int i = 0; i < kSamples; ++i) want.push_back(Generate(*plain, sample(i)));
  std::vector<std::shared_ptr<Collector>> sinks;
  for (int i = 0; i < kSamples; ++i) {
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(cached->Submit(sample(i), sinks.back()).ok());
  }
  for (int i = 0; i < kSamples; ++i) ExpectSame(sinks[i]->Wait(), want[i], "sample");
  EXPECT_EQ(cached->Stats().prefix_hit_tokens, (kSamples - 1) * 96)
      << "the samples after the first take the prompt's 6 full blocks";
}

}  // namespace
}  // namespace moleserve::engine
