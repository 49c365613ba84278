// The engine facade on the demo model: continuous batching, chunked prefill, KV paging, stops,
// cancellation, deadlines, admission limits and drain.

#include "engine/engine.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/model/demo_model.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::engine {
namespace {

// Collects one request's output; Wait() blocks until OnFinish or OnError.
class Collector final : public GenerationSink {
 public:
  void OnChunk(GenerationChunk chunk) override {
    std::lock_guard<std::mutex> l(mu_);
    Take(chunk);
    ++chunks_;
    cv_.notify_all();
  }
  void OnFinish(GenerationChunk last, FinishInfo info) override {
    std::lock_guard<std::mutex> l(mu_);
    Take(last);
    info_ = info;
    done_ = true;
    cv_.notify_all();
  }
  void OnError(absl::Status status) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  bool Wait(absl::Duration timeout = absl::Seconds(60)) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, absl::ToChronoSeconds(timeout), [&] { return done_; });
  }
  bool WaitChunks(int n) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(60), [&] { return chunks_ >= n || done_; });
  }
  std::vector<int32_t> ids() {
    std::lock_guard<std::mutex> l(mu_);
    return ids_;
  }
  std::string text() {
    std::lock_guard<std::mutex> l(mu_);
    return text_;
  }
  absl::Status status() {
    std::lock_guard<std::mutex> l(mu_);
    return status_;
  }
  FinishInfo info() {
    std::lock_guard<std::mutex> l(mu_);
    return info_;
  }

 private:
  void Take(const GenerationChunk& c) {
    for (const auto& t : c.tokens) ids_.push_back(t.id);
    text_ += c.text;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> ids_;
  std::string text_;
  int chunks_ = 0;
  bool done_ = false;
  absl::Status status_;
  FinishInfo info_;
};

std::unique_ptr<Engine> MakeEngine(EngineOptions o = {}) {
  if (o.num_threads == 0) o.num_threads = 2;
  if (o.kv_cache_bytes == EngineOptions{}.kv_cache_bytes) o.kv_cache_bytes = int64_t{64} << 20;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return *std::move(e);
}

GenerateRequest Greedy(std::vector<int32_t> prompt, int32_t n) {
  GenerateRequest r;
  r.token_ids = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.stopping.max_new_tokens = n;
  r.stopping.ignore_eos = true;
  return r;
}

std::vector<int32_t> Prompt(int len, int salt) {
  std::vector<int32_t> p = {256};
  for (int i = 1; i < len; ++i) p.push_back((i * 37 + salt * 11) % 256);
  return p;
}

std::vector<int32_t> RunAlone(Engine& e, GenerateRequest r) {
  auto c = std::make_shared<Collector>();
  EXPECT_TRUE(e.Submit(std::move(r), c).ok());
  EXPECT_TRUE(c->Wait());
  EXPECT_TRUE(c->status().ok()) << c->status();
  return c->ids();
}

void ExpectAllBlocksFree(Engine& e) {
  for (int i = 0; i < 500; ++i) {
    EngineStats s = e.Stats();
    if (s.free_kv_blocks == s.total_kv_blocks && s.running == 0 && s.waiting == 0) return;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EngineStats s = e.Stats();
  FAIL() << "KV blocks not freed: " << s.free_kv_blocks << "/" << s.total_kv_blocks;
}

TEST(EngineTest, ConcurrentRequestsDecodeTogetherAndAllComplete) {
  auto e = MakeEngine({.max_batch_tokens = 512, .max_num_seqs = 8});
  std::vector<std::shared_ptr<Collector>> cs;
  int total = 0;
  for (int i = 0; i < 24; ++i) {
    auto c = std::make_shared<Collector>();
    const int n = 5 + i;
    total += n;
    ASSERT_TRUE(e->Submit(Greedy(Prompt(3 + i, i), n), c).ok());
    cs.push_back(c);
  }
  for (int i = 0; i < 24; ++i) {
    ASSERT_TRUE(cs[i]->Wait());
    ASSERT_TRUE(cs[i]->status().ok()) << cs[i]->status();
    EXPECT_EQ(static_cast<int>(cs[i]->ids().size()), 5 + i);
    EXPECT_EQ(cs[i]->info().reason, FinishReason::kLength);
    EXPECT_EQ(cs[i]->info().prompt_tokens, 3 + i);
  }
  // Decoding together: far fewer steps than generated tokens.
  EXPECT_LT(e->Stats().steps, total / 3);
  ExpectAllBlocksFree(*e);
}

TEST(EngineTest, GreedyOutputDoesNotDependOnBatchmates) {
  auto e = MakeEngine({.max_num_seqs = 8});
  const std::vector<int32_t> alone = RunAlone(*e, Greedy(Prompt(20, 1), 24));
  std::vector<std::shared_ptr<Collector>> cs;
  for (int i = 0; i < 6; ++i) {
    auto c = std::make_shared<Collector>();
    ASSERT_TRUE(
        e->Submit(Greedy(Prompt(20 + 7 * i, i == 3 ? 1 : i + 5), i == 3 ? 24 : 30), c).ok());
    cs.push_back(c);
  }
  // cs[3] has prompt length 41, not the same; submit the real twin too.
  auto twin = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(Greedy(Prompt(20, 1), 24), twin).ok());
  for (auto& c : cs) ASSERT_TRUE(c->Wait());
  ASSERT_TRUE(twin->Wait());
  EXPECT_EQ(twin->ids(), alone);
}

TEST(EngineTest, ChunkedPrefillAcrossBlocksGivesTheSameTokens) {
  auto whole = MakeEngine({.max_batch_tokens = 2048, .max_num_seqs = 4});
  auto chunked = MakeEngine({.max_batch_tokens = 16, .max_num_seqs = 4});
  const auto prompt = Prompt(150, 9);  // ~10 KV blocks, 10 prefill chunks of 16
  EXPECT_EQ(RunAlone(*whole, Greedy(prompt, 20)), RunAlone(*chunked, Greedy(prompt, 20)));
}

TEST(EngineTest, SeededSamplingIsReproducible) {
  auto e = MakeEngine();
  GenerateRequest r = Greedy(Prompt(5, 2), 40);
  r.sampling = {.temperature = 0.9f, .top_p = 0.95f, .top_k = 50, .seed = 1234};
  const auto a = RunAlone(*e, r);
  const auto b = RunAlone(*e, r);
  EXPECT_EQ(a, b);
  r.sampling.seed = 1235;
  EXPECT_NE(RunAlone(*e, r), a);
}

TEST(EngineTest, StopTokenIdAndEos) {
  auto e = MakeEngine();
  const auto ids = RunAlone(*e, Greedy(Prompt(6, 3), 12));
  GenerateRequest r = Greedy(Prompt(6, 3), 12);
  r.stopping.stop_token_ids = {ids[4]};
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(r, c).ok());
  ASSERT_TRUE(c->Wait());
  const auto first = std::find(ids.begin(), ids.end(), ids[4]) - ids.begin();
  EXPECT_EQ(c->info().reason, FinishReason::kStopToken);
  EXPECT_EQ(static_cast<long>(c->ids().size()), first + 1);
  // EOS (257 on the demo model): with this seed the sampled sequence reaches it well before 2000
  // tokens; the same request with ignore_eos runs on past it.
  GenerateRequest eos = Greedy({256, 65}, 2000);
  eos.stopping.ignore_eos = false;
  eos.sampling = {.temperature = 1.0f, .seed = 3};
  auto ce = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(eos, ce).ok());
  ASSERT_TRUE(ce->Wait());
  ASSERT_EQ(ce->info().reason, FinishReason::kEos);
  const std::vector<int32_t> eos_ids = ce->ids();
  EXPECT_EQ(eos_ids.back(), 257);
  EXPECT_EQ(std::count(eos_ids.begin(), eos_ids.end(), 257), 1);
  eos.stopping.ignore_eos = true;
  eos.stopping.max_new_tokens = static_cast<int32_t>(ce->ids().size()) + 5;
  auto past = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(eos, past).ok());
  ASSERT_TRUE(past->Wait());
  EXPECT_EQ(past->info().reason, FinishReason::kLength);
  EXPECT_EQ(past->ids().size(), ce->ids().size() + 5);
}

TEST(EngineTest, StopStringSpanningTokens) {
  auto e = MakeEngine();
  GenerateRequest r;
  r.token_ids = Prompt(4, 4);
  r.sampling.temperature = 0.0f;
  r.stopping.max_new_tokens = 40;
  r.stopping.ignore_eos = true;
  auto full = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(r, full).ok());
  ASSERT_TRUE(full->Wait());
  // Build the stop string from the bytes of tokens 10..12 (the byte-level demo vocabulary maps
  // ids < 256 to bytes), so it spans three tokens.
  const auto ids = full->ids();
  std::string stop;
  for (int i = 10; i < 13; ++i) stop += e->DecodeToken(ids[i]);
  std::string raw;
  for (int32_t id : ids) raw += e->DecodeToken(id);
  const size_t at = raw.find(stop);
  ASSERT_NE(at, std::string::npos);
  r.stopping.stop = {stop};
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(r, c).ok());
  ASSERT_TRUE(c->Wait());
  EXPECT_EQ(c->info().reason, FinishReason::kStopSequence);
  EXPECT_EQ(c->info().matched_stop, stop);
  // Generation stops at the token that completes the stop string: count the tokens whose bytes
  // reach the end of the first match.
  size_t bytes = 0, expected_tokens = 0;
  while (bytes < at + stop.size()) bytes += e->DecodeToken(ids[expected_tokens++]).size();
  EXPECT_EQ(c->ids().size(), expected_tokens);
  EXPECT_EQ(c->text().find(stop), std::string::npos);  // the stop string is not returned
  // The text is the bytes before the match (sanitised: invalid bytes become U+FFFD, 3 bytes).
  std::string printable_prefix;
  for (char ch : raw.substr(0, at)) {
    if (ch >= 0x20 && ch < 0x7f) printable_prefix += ch;
  }
  std::string printable_text;
  for (char ch : c->text()) {
    if (ch >= 0x20 && ch < 0x7f) printable_text += ch;
  }
  EXPECT_EQ(printable_text, printable_prefix);
}

TEST(EngineTest, TinyTemperatureIsGreedy) {
  auto e = MakeEngine();
  const auto greedy = RunAlone(*e, Greedy(Prompt(8, 2), 20));
  GenerateRequest r = Greedy(Prompt(8, 2), 20);
  r.sampling.temperature = 1e-30f;
  r.sampling.top_p = 0.5f;
  EXPECT_EQ(RunAlone(*e, r), greedy);
}

TEST(EngineTest, CancelMidStreamFreesBlocks) {
  auto e = MakeEngine();
  auto c = std::make_shared<Collector>();
  auto h = e->Submit(Greedy(Prompt(40, 5), 1800), c);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(c->WaitChunks(3));
  EXPECT_LT(e->Stats().free_kv_blocks, e->Stats().total_kv_blocks);
  e->Cancel(*h);
  ASSERT_TRUE(c->Wait());
  EXPECT_EQ(c->status().code(), absl::StatusCode::kCancelled);
  ExpectAllBlocksFree(*e);
}

TEST(EngineTest, DeadlineStopsTheSequence) {
  auto e = MakeEngine();
  GenerateRequest r = Greedy(Prompt(10, 6), 1800);
  r.deadline = absl::Now() + absl::Milliseconds(100);
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(r, c).ok());
  ASSERT_TRUE(c->Wait());
  EXPECT_EQ(c->status().code(), absl::StatusCode::kDeadlineExceeded);
  ExpectAllBlocksFree(*e);
}

TEST(EngineTest, ContextRule) {
  auto e = MakeEngine({.max_model_len = 256});
  ASSERT_EQ(e->model_info().context_length, 256);
  const int ctx = e->model_info().context_length;
  auto c = std::make_shared<Collector>();
  auto s = e->Submit(Greedy(Prompt(100, 1), ctx - 99), c);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("context"), std::string::npos);
  EXPECT_FALSE(e->Submit(Greedy(Prompt(ctx, 1), 1), c).ok());
  // Unset max_new_tokens: the default, capped to the room left (here 8 tokens).
  GenerateRequest r = Greedy(Prompt(ctx - 8, 1), 0);
  auto d = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(r, d).ok());
  ASSERT_TRUE(d->Wait());
  EXPECT_EQ(d->ids().size(), 8u);
  EXPECT_EQ(d->info().reason, FinishReason::kLength);
}

TEST(EngineTest, BadInputsAreRejectedBeforeQueueing) {
  auto e = MakeEngine();
  auto c = std::make_shared<Collector>();
  GenerateRequest empty;
  EXPECT_EQ(e->Submit(empty, c).status().code(), absl::StatusCode::kInvalidArgument);
  GenerateRequest empty_text;
  empty_text.text = "";
  EXPECT_EQ(e->Submit(empty_text, c).status().code(), absl::StatusCode::kInvalidArgument);
  GenerateRequest both = Greedy({1}, 1);
  both.text = "x";
  EXPECT_EQ(e->Submit(both, c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Submit(Greedy({1, 999}, 1), c).status().code(), absl::StatusCode::kInvalidArgument);
  GenerateRequest adapter = Greedy({1}, 1);
  adapter.adapter = "nope";
  EXPECT_EQ(e->Submit(adapter, c).status().code(), absl::StatusCode::kNotFound);
  GenerateRequest temp = Greedy({1}, 1);
  temp.sampling.temperature = -0.5f;
  EXPECT_EQ(e->Submit(temp, c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(e->Stats().in_flight, 0);
}

TEST(EngineTest, QueueFullIsResourceExhausted) {
  auto e = MakeEngine({.max_batch_tokens = 64, .max_num_seqs = 1, .max_queue = 1});
  auto running = std::make_shared<Collector>();
  auto h = e->Submit(Greedy(Prompt(5, 1), 1800), running);
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(running->WaitChunks(1));
  auto queued = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(Greedy(Prompt(5, 2), 3), queued).ok());
  auto third = e->Submit(Greedy(Prompt(5, 3), 3), std::make_shared<Collector>());
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(third.status().message().find("queue is full"), std::string::npos);
  e->Cancel(*h);
  ASSERT_TRUE(queued->Wait());
  EXPECT_TRUE(queued->status().ok());
}

TEST(EngineTest, KvPressureDelaysAdmissionButEverythingCompletes) {
  // Room for ~2 requests of 100 prompt + 60 new tokens at a time (demo: 64 KiB per block).
  auto e = MakeEngine({.max_num_seqs = 8, .kv_cache_bytes = 22 * 65536});
  ASSERT_EQ(e->Stats().total_kv_blocks, 22);
  std::vector<std::shared_ptr<Collector>> cs;
  for (int i = 0; i < 6; ++i) {
    auto c = std::make_shared<Collector>();
    ASSERT_TRUE(e->Submit(Greedy(Prompt(100, i), 60), c).ok());
    cs.push_back(c);
  }
  for (auto& c : cs) {
    ASSERT_TRUE(c->Wait());
    ASSERT_TRUE(c->status().ok()) << c->status();
    EXPECT_EQ(c->ids().size(), 60u);
  }
  // A request that can never fit is refused up front.
  auto s = e->Submit(Greedy(Prompt(100, 1), 1000), std::make_shared<Collector>());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kResourceExhausted);
  ExpectAllBlocksFree(*e);
}

// Counts preemptions and steps (the other reports are ignored).
class PreemptionCounter final : public MetricsSink {
 public:
  void OnRequestRejected(absl::StatusCode, ClientProtocol) override {}
  void OnFirstToken(double) override {}
  void OnInterTokenLatency(double) override {}
  void OnRequestFinished(const FinishedRequestMetrics&) override {}
  void OnStep(const StepMetrics& m) override {
    if (m.adapter_tokens > 0)
      max_distinct_experts = std::max<int64_t>(max_distinct_experts, m.distinct_experts);
  }
  void OnQueueState(int64_t, int64_t, double) override {}
  void OnPreempted(int64_t n) override { preempted += n; }
  std::atomic<int64_t> preempted{0};
  std::atomic<int64_t> max_distinct_experts{0};
};

// Six requests of 100 prompt + 60 new tokens in 22 KV blocks: admission takes the 7 blocks of a
// prompt, so three start, and as they grow the latest-arrived is preempted (its KV freed) and
// recomputed when blocks return. Each output equals the one the request gives alone, for the base
// model, a MoLE adapter (greedy) and seeded sampling, under both policies.
TEST(EngineTest, PreemptedRequestsResumeWithTheUninterruptedTokens) {
  const std::string dir = test_util::WriteDemoMoleAdapter(
      (std::filesystem::temp_directory_path() / absl::StrCat("preempt_mole_", getpid())).string());
  ASSERT_FALSE(dir.empty());
  for (const char* policy : {"expert_aware", "fcfs"}) {
    SCOPED_TRACE(policy);
    PreemptionCounter metrics;
    auto e = MakeEngine({.max_num_seqs = 8,
                         .scheduling_policy = policy,
                         .kv_cache_bytes = 22 * 65536,
                         .metrics = &metrics,
                         .adapters = {{"mole", dir}}});
    ASSERT_EQ(e->Stats().total_kv_blocks, 22);
    auto request = [](int i) {
      GenerateRequest r = Greedy(Prompt(100, i), 60);
      if (i % 2 == 1) r.adapter = "mole";
      if (i == 4) {
        r.sampling.temperature = 0.8f;
        r.sampling.seed = 5;
      }
      return r;
    };
    std::vector<std::vector<int32_t>> alone;
    for (int i = 0; i < 6; ++i) alone.push_back(RunAlone(*e, request(i)));
    ASSERT_EQ(metrics.preempted, 0);
    std::vector<std::shared_ptr<Collector>> cs;
    for (int i = 0; i < 6; ++i) {
      cs.push_back(std::make_shared<Collector>());
      ASSERT_TRUE(e->Submit(request(i), cs.back()).ok());
    }
    for (int i = 0; i < 6; ++i) {
      ASSERT_TRUE(cs[i]->Wait());
      ASSERT_TRUE(cs[i]->status().ok()) << cs[i]->status();
      EXPECT_EQ(cs[i]->ids(), alone[i]) << "request " << i;
    }
    EXPECT_GT(metrics.preempted, 0);
    // 4 layers x 2 sites x 4 experts of the demo adapter: at most 32 distinct experts per step.
    EXPECT_GT(metrics.max_distinct_experts, 0);
    EXPECT_LE(metrics.max_distinct_experts, 32);
    ExpectAllBlocksFree(*e);
  }
  std::filesystem::remove_all(dir);
}

// Records OnAdapterActivity reports (the other reports are ignored).
class ActivityRecorder final : public MetricsSink {
 public:
  void OnRequestRejected(absl::StatusCode, ClientProtocol) override {}
  void OnFirstToken(double) override {}
  void OnInterTokenLatency(double) override {}
  void OnRequestFinished(const FinishedRequestMetrics&) override {}
  void OnStep(const StepMetrics&) override {}
  void OnQueueState(int64_t, int64_t, double) override {}
  void OnAdapterActivity(const std::vector<AdapterActivity>& active) override {
    std::lock_guard<std::mutex> lock(mu);
    for (const AdapterActivity& a : active) {
      EXPECT_FALSE(a.adapter.empty());
      Totals& t = totals[a.adapter];
      t.prompt += a.prompt_tokens;
      t.generated += a.generated_tokens;
      t.max_running = std::max(t.max_running, a.running);
      t.last_running = a.running;
      t.last_waiting = a.waiting;
    }
  }
  struct Totals {
    int64_t prompt = 0, generated = 0, max_running = 0, last_running = -1, last_waiting = -1;
  };
  std::mutex mu;
  std::map<std::string, Totals> totals;
};

// Per-adapter activity: every prompt and generated token of an adapter's requests is reported
// once under its name, the base model's under none, and an adapter gone idle is reported with
// zeros.
TEST(EngineTest, AdapterActivityCountsEachAdaptersTokensOnce) {
  const std::string dir = test_util::WriteDemoMoleAdapter(
      (std::filesystem::temp_directory_path() / absl::StrCat("activity_mole_", getpid())).string());
  ASSERT_FALSE(dir.empty());
  ActivityRecorder metrics;
  auto e = MakeEngine({.metrics = &metrics, .adapters = {{"m1", dir}, {"m2", dir}}});
  std::vector<std::shared_ptr<Collector>> cs;
  const std::vector<std::string> adapters = {"m1", "m2", "m1", ""};
  for (size_t i = 0; i < adapters.size(); ++i) {
    GenerateRequest r = Greedy(Prompt(12 + static_cast<int>(i), static_cast<int>(i)), 9);
    r.adapter = adapters[i];
    cs.push_back(std::make_shared<Collector>());
    ASSERT_TRUE(e->Submit(r, cs.back()).ok());
  }
  for (auto& c : cs) {
    ASSERT_TRUE(c->Wait());
    ASSERT_TRUE(c->status().ok()) << c->status();
  }
  ASSERT_TRUE(e->WaitIdle(absl::Seconds(30)));
  // The reports after the last step: wait (bounded) for the zeros of both adapters.
  for (int i = 0; i < 3000; ++i) {
    {
      std::lock_guard<std::mutex> lock(metrics.mu);
      if (metrics.totals["m1"].last_running == 0 && metrics.totals["m2"].last_running == 0) break;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  std::lock_guard<std::mutex> lock(metrics.mu);
  EXPECT_EQ(metrics.totals.size(), 2u);  // no entry for the base model
  EXPECT_EQ(metrics.totals["m1"].prompt, 12 + 14);
  EXPECT_EQ(metrics.totals["m1"].generated, 9 + 9);
  EXPECT_EQ(metrics.totals["m2"].prompt, 13);
  EXPECT_EQ(metrics.totals["m2"].generated, 9);
  EXPECT_GT(metrics.totals["m1"].max_running, 0);
  EXPECT_EQ(metrics.totals["m1"].last_running, 0);
  EXPECT_EQ(metrics.totals["m1"].last_waiting, 0);
  EXPECT_EQ(metrics.totals["m2"].last_running, 0);
  std::filesystem::remove_all(dir);
}

TEST(EngineTest, UnknownSchedulingPolicyIsRefused) {
  auto e = Engine::Create({.scheduling_policy = "lifo"});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(e.status().message().find("fcfs, expert_aware"), std::string::npos);
}

TEST(EngineTest, DrainRefusesNewWorkAndFinishesInFlight) {
  auto e = MakeEngine();
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(Greedy(Prompt(5, 1), 100), c).ok());
  e->StopAccepting();
  EXPECT_EQ(e->Submit(Greedy({1}, 1), std::make_shared<Collector>()).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_TRUE(e->WaitIdle(absl::Seconds(60)));
  ASSERT_TRUE(c->Wait(absl::Seconds(1)));
  EXPECT_EQ(c->ids().size(), 100u);
}

TEST(EngineTest, ShutdownFailsWhatIsLeftWithUnavailable) {
  auto e = MakeEngine();
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(Greedy(Prompt(5, 1), 1800), c).ok());
  ASSERT_TRUE(c->WaitChunks(1));
  e->Shutdown();
  ASSERT_TRUE(c->Wait(absl::Seconds(5)));
  EXPECT_EQ(c->status().code(), absl::StatusCode::kUnavailable);
}

// A checkpoint whose weights are finite but overflow the logits: the request fails with
// INTERNAL instead of sampling garbage, and the engine keeps serving.
TEST(EngineTest, NonFiniteLogitsFailTheRequest) {
  const std::string dir = ::testing::TempDir() + "/moleserve_overflow_" + std::to_string(getpid());
  const ModelConfig config = DemoModelConfig();
  HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  for (float& w : weights.tensors().at("lm_head.weight").data) w = 3e38f;
  ASSERT_TRUE(WriteModelDirectory(dir, config, weights, Tokenizer::ByteLevelDemo()->ToJson()).ok());
  auto e = MakeEngine({.model = dir});
  auto c = std::make_shared<Collector>();
  ASSERT_TRUE(e->Submit(Greedy(Prompt(5, 1), 4), c).ok());
  ASSERT_TRUE(c->Wait());
  EXPECT_EQ(c->status().code(), absl::StatusCode::kInternal);
  EXPECT_NE(c->status().message().find("non-finite"), std::string::npos) << c->status();
  ExpectAllBlocksFree(*e);
}

// Like Qwen2: config.json names a bos_token_id but the tokenizer's post-processor adds none, so
// no BOS is prepended (HF add_special_tokens=True adds nothing either).
TEST(EngineTest, BosComesFromTheTokenizerNotTheConfig) {
  auto tokenizer = nlohmann::json::parse(Tokenizer::ByteLevelDemo()->ToJson());
  tokenizer["post_processor"] = nullptr;
  for (auto& t : tokenizer["added_tokens"]) {
    if (t["content"] == "<|begin_of_text|>") t["content"] = "<|im_start|>";
  }
  const std::string dir = ::testing::TempDir() + "/moleserve_nobos_" + std::to_string(getpid());
  const ModelConfig config = DemoModelConfig();  // bos_token_id 256
  ASSERT_TRUE(
      WriteModelDirectory(dir, config, RandomLlamaWeights(config, 1), tokenizer.dump()).ok());
  auto e = MakeEngine({.model = dir});
  EXPECT_EQ(e->Tokenize("Hi", std::nullopt, false)->ids, (std::vector<int32_t>{72, 105}));
  EXPECT_EQ(e->Tokenize("Hi", true, false)->ids, (std::vector<int32_t>{72, 105}));
}

TEST(EngineTest, TokenizeUsesBosByDefault) {
  auto e = MakeEngine();
  auto t = e->Tokenize("Hi", std::nullopt, true);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->ids, (std::vector<int32_t>{256, 72, 105}));
  EXPECT_EQ(t->pieces.size(), 3u);
  EXPECT_EQ(e->Tokenize("Hi", false, false)->ids, (std::vector<int32_t>{72, 105}));
}

// An adapter directory may carry its own chat template (chat_template.jinja or
// tokenizer_config.json's chat_template): chat prompts for that adapter use it, others the base
// model's; a hot replace brings the new version's template; a template that does not parse fails
// the load (the previous version keeps serving), naming the file.
TEST(EngineTest, AnAdapterCarriesItsOwnChatTemplate) {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(::testing::TempDir()) / absl::StrCat("chat_root_", getpid());
  fs::remove_all(root);
  for (const char* name : {"plain", "own", "config", "broken"}) {
    ASSERT_FALSE(test_util::WriteDemoMoleAdapter((root / name).string()).empty());
  }
  std::ofstream(root / "own" / "chat_template.jinja")
      << "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ eos_token }}";
  std::ofstream(root / "config" / "tokenizer_config.json")
      << R"({"chat_template": "{% for m in messages %}<{{ m.content }}>{% endfor %}{{ bos_token }}",
             "bos_token": "<B>"})";
  std::ofstream(root / "broken" / "chat_template.jinja") << "{% for m in messages %}";
  const std::string base_template = (root / "base.jinja").string();
  std::ofstream(base_template) << "{% for m in messages %}{{ m.content }};{% endfor %}";
  auto e = MakeEngine(
      {.adapters = {{"own", (root / "own").string()}, {"plain", (root / "plain").string()}},
       .adapter_root = root.string(),
       .chat_template_file = base_template});
  const nlohmann::ordered_json messages = {{{"role", "user"}, {"content", "hi"}}};
  auto render = [&](const std::string& adapter) {
    absl::StatusOr<std::string> r = e->ApplyChatTemplate(messages, nullptr, true, adapter);
    return r.ok() ? *r : std::string(r.status().message());
  };
  EXPECT_EQ(render(""), "hi;");
  EXPECT_EQ(render("plain"), "hi;");  // no template of its own: the base model's
  // Its eos_token: the base model's (the directory names none).
  EXPECT_EQ(render("own"), "[user|hi]<|end_of_text|>");
  // A hot replace with another directory brings its template (and its own special tokens).
  ASSERT_TRUE(e->LoadAdapter("own", "config", /*replace=*/true).ok());
  EXPECT_EQ(render("own"), "<hi><B>");
  absl::StatusOr<AdapterSummary> broken = e->LoadAdapter("own", "broken", /*replace=*/true);
  EXPECT_EQ(broken.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(broken.status().message().find("chat_template.jinja"), std::string::npos)
      << broken.status();
  EXPECT_EQ(render("own"), "<hi><B>");  // the previous version keeps serving
  fs::remove_all(root);
}

}  // namespace
}  // namespace moleserve::engine
