// Scheduler policy tests on a simulated engine (no model).
//
// SimEngine drives a real Scheduler and BlockManager with a fake clock (one step = 10 ms) and a
// fake model whose next token is a hash of what the KV cache holds, read back through the
// sequence's block table. As a real one, the KV of a position depends on the position before it
// (read back through the table) and on what the sequence runs under (its adapter and version):
// a scheduler that loses, wrongly shares or forgets to recompute a block changes the tokens. The
// device expert pool is simulated too (FakePool: whole adapters, LRU), so the tests can count the
// bytes a policy makes it copy.

#include "engine/scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/kv_cache/block_manager.h"
#include "gtest/gtest.h"

namespace moleserve::engine {
namespace {

constexpr absl::Duration kStep = absl::Milliseconds(10);

class NullSink final : public GenerationSink {
 public:
  void OnChunk(GenerationChunk) override {}
  void OnFinish(GenerationChunk, FinishInfo) override {}
  void OnError(absl::Status) override {}
};

// A device pool of `capacity` bytes holding whole adapters (each kAdapterBytes), LRU.
class FakePool final : public ExpertView {
 public:
  static constexpr int64_t kAdapterBytes = 1000;
  explicit FakePool(int64_t capacity) : capacity_(capacity) {}
  int64_t capacity_bytes() const override { return capacity_; }
  int64_t AdapterBytes(int32_t slot) const override { return slot < 0 ? 0 : kAdapterBytes; }
  int64_t ResidentBytes(int32_t slot) const override {
    return std::find(lru_.begin(), lru_.end(), slot) != lru_.end() ? kAdapterBytes : 0;
  }
  int64_t FreeBytes() const override {
    return std::max<int64_t>(0, capacity_ - static_cast<int64_t>(lru_.size()) * kAdapterBytes);
  }
  // A step reads the experts of `slots`: misses are copied in, evicting the least recently used
  // adapters not in the step.
  void Use(const std::vector<int32_t>& slots) {
    for (int32_t s : slots) {
      if (s < 0) continue;
      auto it = std::find(lru_.begin(), lru_.end(), s);
      if (it != lru_.end()) {
        lru_.erase(it);
      } else {
        bytes_copied_ += kAdapterBytes;
      }
      lru_.insert(lru_.begin(), s);
    }
    while (static_cast<int64_t>(lru_.size()) * kAdapterBytes > capacity_ &&
           std::find(slots.begin(), slots.end(), lru_.back()) == slots.end()) {
      lru_.pop_back();
    }
  }
  int64_t bytes_copied() const { return bytes_copied_; }

 private:
  int64_t capacity_;
  std::vector<int32_t> lru_;  // front = most recent
  int64_t bytes_copied_ = 0;
};

struct Finished {
  std::vector<int32_t> output;
  absl::Duration queue_time;
  int32_t adapter = -1;
};

class SimEngine {
 public:
  SimEngine(SchedulerOptions options, int32_t num_blocks, int32_t block_size, FakePool* pool)
      : blocks_(num_blocks, block_size),
        pool_(pool),
        scheduler_(options, &blocks_, pool),
        kv_(static_cast<size_t>(num_blocks) * block_size, 0) {}

  // Queues a request of `prompt_len` tokens (derived from `id`) that generates `output_len`.
  void Submit(uint64_t id, int32_t adapter, int32_t prompt_len, int32_t output_len,
              int32_t priority = 0, bool prompt_logprobs = false) {
    std::vector<int32_t> prompt(prompt_len);
    for (int32_t i = 0; i < prompt_len; ++i) prompt[i] = static_cast<int32_t>((id * 31 + i) % 97);
    SubmitPrompt(id, adapter, std::move(prompt), output_len, /*kv_key=*/adapter + 1000, priority,
                 prompt_logprobs);
  }
  // A request with its own prompt; `kv_key` is what its KV depends on besides its tokens (the
  // adapter and its version). The scheduler sees it as the prefix key (0: not cached).
  Sequence* SubmitPrompt(uint64_t id, int32_t adapter, std::vector<int32_t> prompt,
                         int32_t output_len, uint64_t kv_key, int32_t priority = 0,
                         bool prompt_logprobs = false, bool cacheable = true) {
    GenerateRequest req;
    req.stopping.max_new_tokens = output_len;
    req.priority = priority;
    req.prompt_logprobs = prompt_logprobs;
    auto seq = std::make_unique<Sequence>(id, std::move(req), std::move(prompt), 0,
                                          std::make_shared<NullSink>());
    seq->adapter_slot = adapter;
    seq->arrival = now_;
    seq->prefix_key = cacheable && !prompt_logprobs ? kv_key : 0;
    kv_key_[id] = kv_key;
    Sequence* out = seq.get();
    scheduler_.Enqueue(std::move(seq));
    return out;
  }
  // Cancels a request (waiting or running), as the executor does.
  void Cancel(Sequence* seq) { scheduler_.Remove(seq); }

  // One step: schedule, check the budgets, "run" the fake model, finish what is done.
  void Step() {
    std::vector<Sequence*> preempted;
    std::vector<ScheduledChunk> step = scheduler_.Schedule(now_, &preempted);
    const SchedulerOptions& o = scheduler_.options();
    int32_t tokens = 0, rows = 0;
    std::vector<int32_t> adapters;
    for (const ScheduledChunk& c : step) {
      EXPECT_GT(c.num_tokens, 0);
      tokens += c.num_tokens;
      rows += (c.sample ? 1 : 0) + c.seq->ScoringRows(c.seq->num_computed, c.num_tokens);
      if (std::find(adapters.begin(), adapters.end(), c.seq->adapter_slot) == adapters.end()) {
        adapters.push_back(c.seq->adapter_slot);
      }
    }
    EXPECT_LE(tokens, o.max_batch_tokens);
    EXPECT_LE(rows, o.max_num_seqs);  // the model's logits rows
    EXPECT_LE(scheduler_.num_running(), o.max_num_seqs);
    EXPECT_LE(blocks_.num_allocated() + blocks_.num_reserved(), blocks_.num_blocks());
    max_step_adapters_ = std::max(max_step_adapters_, static_cast<int32_t>(adapters.size()));
    if (pool_ != nullptr) pool_->Use(adapters);
    for (const ScheduledChunk& c : step) Run(c);
    now_ += kStep;
    ++steps_;
  }

  void RunUntilIdle(int32_t max_steps = 100000) {
    while ((scheduler_.num_running() > 0 || scheduler_.num_waiting() > 0) && max_steps-- > 0) {
      Step();
    }
    ASSERT_EQ(scheduler_.num_running() + scheduler_.num_waiting(), 0) << "did not drain";
  }

  Scheduler& scheduler() { return scheduler_; }
  const BlockManager& blocks() const { return blocks_; }
  absl::Time now() const { return now_; }
  int64_t steps() const { return steps_; }
  int32_t max_step_adapters() const { return max_step_adapters_; }
  std::map<uint64_t, Finished>& finished() { return finished_; }
  // Prompt positions scored per request (prompt logprobs), in the order they were.
  std::map<uint64_t, std::vector<int32_t>>& scored() { return scored_; }

 private:
  void Run(const ScheduledChunk& c) {
    Sequence* seq = c.seq;
    const int32_t bs = blocks_.block_size();
    // As the executor does: the chunk's scored positions, then the sampled one.
    const int32_t first = seq->FirstScored(seq->num_computed);
    const int32_t scoring = seq->ScoringRows(seq->num_computed, c.num_tokens);
    for (int32_t i = 0; i < scoring; ++i) scored_[seq->handle].push_back(first + i);
    seq->scored += scoring;
    auto slot = [&](int32_t p) { return static_cast<size_t>(seq->blocks[p / bs]) * bs + p % bs; };
    for (int32_t p = seq->num_computed; p < seq->num_computed + c.num_tokens; ++p) {
      ASSERT_LT(p / bs, static_cast<int32_t>(seq->blocks.size())) << "block table too short";
      // A block being written is the sequence's own: never shared, never registered yet.
      ASSERT_EQ(blocks_.refs(seq->blocks[p / bs]), 1) << "a write into a shared block";
      ASSERT_FALSE(blocks_.registered(seq->blocks[p / bs])) << "a write into a cached block";
      // The position before, read back through the table (or the key, at position 0).
      const uint64_t before = p == 0 ? kv_key_.at(seq->handle) : kv_[slot(p - 1)];
      kv_[slot(p)] = (before ^ static_cast<uint64_t>(seq->tokens[p] + 1)) * 1099511628211ull;
    }
    seq->num_computed += c.num_tokens;
    if (!c.sample) return;
    // The fake model: a hash of the KV cache's contents for positions [0, num_computed).
    uint64_t h = 1469598103934665603ull;
    for (int32_t p = 0; p < seq->num_computed; ++p) h = (h ^ (kv_[slot(p)] + 1)) * 1099511628211ull;
    seq->tokens.push_back(static_cast<int32_t>(h % 1000));
    if (seq->generated() < seq->request.stopping.max_new_tokens) return;
    if (seq->request.prompt_logprobs) {
      EXPECT_EQ(seq->scored, seq->prompt_len - 1);
    }
    Finished f{
        .output = std::vector<int32_t>(seq->tokens.begin() + seq->prompt_len, seq->tokens.end()),
        .queue_time = *seq->admitted - seq->arrival,
        .adapter = seq->adapter_slot};
    finished_[seq->handle] = std::move(f);
    scheduler_.Remove(seq, /*cache_computed=*/true);
  }

  BlockManager blocks_;
  FakePool* pool_;
  Scheduler scheduler_;
  std::vector<uint64_t> kv_;             // what a slot's K/V holds (see Run)
  std::map<uint64_t, uint64_t> kv_key_;  // by request id
  absl::Time now_ = absl::UnixEpoch();
  int64_t steps_ = 0;
  int32_t max_step_adapters_ = 0;
  std::map<uint64_t, Finished> finished_;
  std::map<uint64_t, std::vector<int32_t>> scored_;
};

SchedulerOptions Options(SchedulingPolicy policy, int32_t max_batch_tokens = 64,
                         int32_t max_num_seqs = 8) {
  SchedulerOptions o;
  o.policy = policy;
  o.max_batch_tokens = max_batch_tokens;
  o.max_num_seqs = max_num_seqs;
  o.watermark_blocks = 0;
  o.queue_delay_slack = 0;  // relative aging off: each test turns on the rules it is about
  return o;
}

absl::Duration Percentile(std::vector<absl::Duration> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(q * static_cast<double>(v.size() - 1))];
}

// Prompt logprobs take a logits row per scored prompt position: steps never hold more rows than
// the model has (max_num_seqs), every prompt position is scored exactly once and in order (also
// through preemption and recompute), and the requests still give the tokens of a run without
// them.
TEST(SchedulerTest, PromptLogprobRowsFitTheStepAndEveryPositionIsScoredOnce) {
  for (SchedulingPolicy policy : {SchedulingPolicy::kFcfs, SchedulingPolicy::kExpertAware}) {
    std::map<uint64_t, Finished> plain;
    for (bool with_scores : {false, true}) {
      SimEngine sim(Options(policy, 32, 4), 24, 4, nullptr);  // small KV cache: preemption
      std::mt19937 rng(7);
      for (uint64_t id = 0; id < 60; ++id) {
        const int32_t prompt_len = 1 + static_cast<int32_t>(rng() % 30);
        const bool coin = rng() % 2 == 0;  // drawn in both runs: the same requests
        const bool scores = with_scores && coin;
        sim.Submit(id, -1, prompt_len, 1 + static_cast<int32_t>(rng() % 12), 0, scores);
        if (id % 2 == 0) sim.Step();
      }
      sim.RunUntilIdle();
      ASSERT_EQ(sim.finished().size(), 60u);
      if (!with_scores) {
        plain = sim.finished();
        EXPECT_TRUE(sim.scored().empty());
        continue;
      }
      EXPECT_GT(sim.scheduler().num_preemptions(), 0) << "the test meant to preempt";
      EXPECT_GT(sim.scored().size(), 10u);
      for (const auto& [id, positions] : sim.scored()) {
        std::vector<int32_t> want(positions.size());
        std::iota(want.begin(), want.end(), 0);
        EXPECT_EQ(positions, want) << "request " << id;
      }
      for (const auto& [id, f] : sim.finished()) EXPECT_EQ(f.output, plain[id].output) << id;
    }
  }
}

// A long prompt scored row by row neither blocks admission nor starves the sequences after it:
// requests that arrive while it prefills are admitted at once and decode every step, while it
// keeps scoring at least one position a step.
TEST(SchedulerTest, AScoredPromptDoesNotStarveOthers) {
  for (SchedulingPolicy policy : {SchedulingPolicy::kFcfs, SchedulingPolicy::kExpertAware}) {
    SimEngine sim(Options(policy, 64, 4), 256, 4, nullptr);
    sim.Submit(0, -1, 200, 2, 0, /*prompt_logprobs=*/true);
    sim.Step();
    sim.Submit(1, -1, 2, 20);
    sim.Submit(2, -1, 2, 20);
    for (int i = 0; i < 20; ++i) sim.Step();
    EXPECT_TRUE(sim.finished().contains(1)) << "request 1 starved";
    EXPECT_TRUE(sim.finished().contains(2)) << "request 2 starved";
    EXPECT_FALSE(sim.finished().contains(0));
    // 21 steps: at least one scored position each.
    EXPECT_GE(sim.scored()[0].size(), 21u);
    sim.RunUntilIdle();
    EXPECT_EQ(sim.scored()[0].size(), 199u);
  }
}

TEST(SchedulerTest, BudgetsAndExpertPoolAreRespectedUnderARandomMix) {
  for (SchedulingPolicy policy : {SchedulingPolicy::kFcfs, SchedulingPolicy::kExpertAware}) {
    SchedulerOptions o = Options(policy, 48, 6);
    o.max_queue_delay = absl::Hours(1);  // no overdue admissions: the pool rule always holds
    o.max_bypass = 1 << 20;              // nor bypassed ones (both go first whatever the pool)
    FakePool pool(3 * FakePool::kAdapterBytes);
    SimEngine sim(o, 64, 4, &pool);
    std::mt19937 rng(1);
    for (uint64_t id = 0; id < 200; ++id) {
      sim.Submit(id, static_cast<int32_t>(rng() % 10) - 1, 1 + static_cast<int32_t>(rng() % 40),
                 1 + static_cast<int32_t>(rng() % 20));
      if (id % 3 == 0) sim.Step();
    }
    sim.RunUntilIdle();
    EXPECT_EQ(sim.finished().size(), 200u);
    if (policy == SchedulingPolicy::kExpertAware) {
      // At most 3 adapters' experts fit, plus the base model (no experts).
      EXPECT_LE(sim.max_step_adapters(), 4);
    } else {
      EXPECT_GT(sim.max_step_adapters(), 4);  // FCFS ignores the pool (the cache splits calls)
    }
  }
}

TEST(SchedulerTest, FcfsAdmitsInArrivalOrder) {
  SimEngine sim(Options(SchedulingPolicy::kFcfs, 64, 2), 256, 4, nullptr);
  for (uint64_t id = 0; id < 10; ++id) sim.Submit(id, static_cast<int32_t>(id % 3), 5, 3);
  sim.RunUntilIdle();
  // Two run at a time: queue times never decrease with arrival, and pairs start together.
  ASSERT_EQ(sim.finished().size(), 10u);
  for (uint64_t id = 1; id < 10; ++id) {
    EXPECT_LE(sim.finished()[id - 1].queue_time, sim.finished()[id].queue_time) << id;
  }
  EXPECT_GT(sim.finished()[9].queue_time, sim.finished()[0].queue_time);
}

// The same requests through a KV cache so small that sequences are preempted and recomputed give
// the tokens each gives alone with room to spare.
TEST(SchedulerTest, PreemptionAndResumptionGiveTheUninterruptedTokens) {
  for (SchedulingPolicy policy : {SchedulingPolicy::kFcfs, SchedulingPolicy::kExpertAware}) {
    std::map<uint64_t, std::vector<int32_t>> alone;
    for (uint64_t id = 0; id < 12; ++id) {
      SimEngine big(Options(policy), 512, 4, nullptr);
      big.Submit(id, static_cast<int32_t>(id % 3), 6 + static_cast<int32_t>(id % 5), 30);
      big.RunUntilIdle();
      alone[id] = big.finished()[id].output;
    }
    // 24 blocks of 4 positions: 12 sequences of up to 40 positions cannot all stay resident.
    SimEngine small(Options(policy), 24, 4, nullptr);
    for (uint64_t id = 0; id < 12; ++id) {
      small.Submit(id, static_cast<int32_t>(id % 3), 6 + static_cast<int32_t>(id % 5), 30);
    }
    small.RunUntilIdle();
    EXPECT_GT(small.scheduler().num_preemptions(), 0) << SchedulingPolicyName(policy);
    ASSERT_EQ(small.finished().size(), 12u);
    for (uint64_t id = 0; id < 12; ++id) {
      EXPECT_EQ(small.finished()[id].output, alone[id]) << "request " << id;
    }
    EXPECT_EQ(small.blocks().num_free(), 24);
    EXPECT_EQ(small.blocks().num_reserved(), 0);
  }
}

TEST(SchedulerTest, PreemptsTheLatestArrivedLowestPriorityFirst) {
  SimEngine sim(Options(SchedulingPolicy::kFcfs, 64, 8), 6, 4, nullptr);
  sim.Submit(1, -1, 4, 12, /*priority=*/0);
  sim.Step();
  sim.Submit(2, -1, 4, 12, /*priority=*/5);
  sim.Step();
  sim.Submit(3, -1, 4, 12, /*priority=*/0);
  sim.Step();
  std::vector<uint64_t> victims;
  for (int i = 0; i < 40 && victims.empty(); ++i) {
    const int64_t before = sim.scheduler().num_preemptions();
    sim.Step();
    if (sim.scheduler().num_preemptions() > before) {
      for (const auto& s : sim.scheduler().waiting()) {
        if (s->preemptions > 0) victims.push_back(s->handle);
      }
    }
  }
  // 3 arrived last among the priority-0 ones; 2 outranks both.
  ASSERT_FALSE(victims.empty());
  EXPECT_EQ(victims.front(), 3u);
  sim.RunUntilIdle();
  EXPECT_EQ(sim.finished().size(), 3u);
}

TEST(SchedulerTest, HigherPriorityIsAdmittedFirst) {
  for (SchedulingPolicy policy : {SchedulingPolicy::kFcfs, SchedulingPolicy::kExpertAware}) {
    SimEngine sim(Options(policy, 64, 1), 256, 4, nullptr);
    sim.Submit(1, 0, 4, 4, 0);
    sim.Submit(2, 1, 4, 4, 0);
    sim.Submit(3, 2, 4, 4, 7);
    sim.RunUntilIdle();
    EXPECT_LT(sim.finished()[3].queue_time, sim.finished()[1].queue_time);
    EXPECT_LT(sim.finished()[3].queue_time, sim.finished()[2].queue_time);
  }
}

// Adversarial mix: a hot adapter keeps arriving and is always the better group (its experts are
// in the step), the fair share is off, and the pool holds one adapter. The cold adapter's request
// still starts within the aging bound plus one step (sequence slots and KV blocks are free: the
// bound is on waiting because of grouping).
TEST(SchedulerTest, NoRequestWaitsBeyondTheAgingBound) {
  SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 8);
  o.max_queue_delay = absl::Milliseconds(200);  // 20 steps
  o.fair_share_tokens = int64_t{1} << 40;       // fair share cannot rescue it
  o.max_bypass = 1 << 20;                       // nor the bypass bound: the aging bound alone
  FakePool pool(FakePool::kAdapterBytes);
  SimEngine sim(o, 512, 4, &pool);
  for (uint64_t id = 0; id < 3; ++id) sim.Submit(id, 0, 4, 10);
  sim.Step();
  sim.Submit(1000, 1, 4, 4);  // the cold adapter
  for (uint64_t id = 3; id < 400; ++id) {
    // A hot request every 4 steps (about 3 running at once): never an idle moment for the cold
    // adapter, whose experts do not fit next to the hot ones.
    sim.Submit(id, 0, 4, 10);
    for (int s = 0; s < 4; ++s) sim.Step();
  }
  sim.RunUntilIdle();
  ASSERT_TRUE(sim.finished().count(1000));
  EXPECT_LE(sim.finished()[1000].queue_time, o.max_queue_delay + kStep);
  // Without the aging bound it would wait for the whole hot backlog.
  EXPECT_GE(sim.finished()[1000].queue_time, o.max_queue_delay);
  for (const auto& [id, f] : sim.finished()) {
    EXPECT_LE(f.queue_time, o.max_queue_delay + kStep) << "request " << id;
  }
}

// A flooding adapter (400 requests at once) against a light one (a request every 20 steps, each
// holding a slot for 17 steps: less than its half of the 4 slots):
// with the aging bound out of the way, the fair share alone keeps the light adapter's p99 queue
// time within the bound below, while under FCFS it waits behind the whole flood.
//
// Bound: a light request waits for (a) a free sequence slot: one flood sequence finishing, at
// most prompt chunks + output = 1 + 16 steps after it arrives, and (b) the flood being picked
// while within fair_share_tokens (64) of the light adapter: every admitted flood request adds at
// least its 8 prompt tokens, so after 64 / 8 = 8 more admissions (at most 8 more slot waits of
// 17 steps, far fewer in practice because 4 slots free in parallel) the light one is picked.
// Stated bound: 40 steps (400 ms) at p99.
TEST(SchedulerTest, AFloodingAdapterCannotStarveAnother) {
  auto run = [](SchedulingPolicy policy) {
    SchedulerOptions o = Options(policy, 64, 4);
    o.max_queue_delay = absl::Hours(1);
    o.fair_share_tokens = 64;
    // The pool holds one adapter: the two contend for it, and the fair share binds.
    FakePool pool(FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    for (uint64_t id = 0; id < 400; ++id) sim.Submit(id, 0, 8, 16);
    for (uint64_t i = 0; i < 60; ++i) {
      sim.Submit(10000 + i, 1, 8, 16);
      for (int s = 0; s < 20; ++s) sim.Step();
    }
    sim.RunUntilIdle();
    std::vector<absl::Duration> light;
    for (const auto& [id, f] : sim.finished()) {
      if (f.adapter == 1) light.push_back(f.queue_time);
    }
    EXPECT_EQ(light.size(), 60u);
    return Percentile(light, 0.99);
  };
  const absl::Duration fair = run(SchedulingPolicy::kExpertAware);
  const absl::Duration fcfs = run(SchedulingPolicy::kFcfs);
  EXPECT_LE(fair, 40 * kStep) << "p99 queue time of the light adapter: " << fair;
  EXPECT_GT(fcfs, 40 * kStep) << "FCFS should leave it behind the flood: " << fcfs;
}

// With a pool of a quarter of the adapters and Zipf popularity, grouping by resident experts
// copies at least a quarter fewer adapter bytes than FCFS for the same requests.
TEST(SchedulerTest, ExpertAwareGroupingSwapsLessThanFcfs) {
  auto run = [](SchedulingPolicy policy) {
    SchedulerOptions o = Options(policy, 64, 8);
    FakePool pool(5 * FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    std::mt19937 rng(3);
    std::vector<double> w(20);
    for (size_t i = 0; i < w.size(); ++i) w[i] = 1.0 / static_cast<double>(i + 1);
    std::discrete_distribution<int32_t> zipf(w.begin(), w.end());
    for (uint64_t id = 0; id < 600; ++id) {
      sim.Submit(id, zipf(rng), 6, 8);
      if (id % 2 == 0) sim.Step();
    }
    sim.RunUntilIdle();
    EXPECT_EQ(sim.finished().size(), 600u);
    return pool.bytes_copied();
  };
  const int64_t fcfs = run(SchedulingPolicy::kFcfs);
  const int64_t aware = run(SchedulingPolicy::kExpertAware);
  EXPECT_LT(aware * 4, fcfs * 3) << "expert-aware copied " << aware << " bytes, FCFS " << fcfs;
}

TEST(SchedulerTest, PrefetchHintNamesTheAdaptersNextInLine) {
  SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 1);
  FakePool pool(2 * FakePool::kAdapterBytes);
  SimEngine sim(o, 256, 4, &pool);
  sim.Submit(1, 5, 4, 8);
  sim.Submit(2, 6, 4, 8);
  sim.Submit(3, 7, 4, 8);
  sim.Step();  // admits one (the sequence limit is 1)
  const std::vector<int32_t>& hint = sim.scheduler().prefetch_hint();
  ASSERT_EQ(hint.size(), 2u);
  EXPECT_EQ(sim.scheduler().running().front()->adapter_slot, 5);
  EXPECT_EQ(hint, (std::vector<int32_t>{6, 7}));
}

TEST(SchedulerTest, ParsesPolicyNames) {
  SchedulingPolicy p;
  EXPECT_TRUE(ParseSchedulingPolicy("fcfs", &p));
  EXPECT_EQ(p, SchedulingPolicy::kFcfs);
  EXPECT_TRUE(ParseSchedulingPolicy("expert-aware", &p));
  EXPECT_EQ(p, SchedulingPolicy::kExpertAware);
  EXPECT_FALSE(ParseSchedulingPolicy("lifo", &p));
}

// Prefix caching on a small pool (preemption all the time) with cancellations and adapter
// replaces over 10,000 requests: every request gives the tokens it gives without the cache (the
// fake model reads each position's KV through the block table, so a wrongly shared, stale or
// evicted-and-reused block changes them), prompts that share prefixes hit the cache, and every
// block comes back.
TEST(SchedulerTest, PrefixCacheGivesTheSameTokensUnderChurnAndLeaksNoBlock) {
  constexpr int kRequests = 10000;
  constexpr int32_t kBlocks = 24;
  auto run = [&](bool caching, int64_t* hit_tokens, int64_t* preemptions) {
    SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 8);
    o.prefix_caching = caching;
    SimEngine sim(o, kBlocks, /*block_size=*/4, nullptr);
    std::mt19937 rng(1234);                      // the workload: the same in both runs
    std::vector<std::vector<int32_t>> prefixes;  // shared system prompts
    for (int i = 0; i < 6; ++i) {
      std::vector<int32_t> p(4 + rng() % 20);
      for (int32_t& t : p) t = static_cast<int32_t>(rng() % 50);
      prefixes.push_back(p);
    }
    std::map<int32_t, uint64_t> version = {{-1, 1}, {0, 1}, {1, 1}, {2, 1}};
    std::map<uint64_t, Sequence*> to_cancel;  // id -> sequence, cancelled two steps later
    for (int i = 0; i < kRequests; ++i) {
      const int32_t adapter = static_cast<int32_t>(rng() % 4) - 1;
      std::vector<int32_t> prompt = prefixes[rng() % prefixes.size()];
      for (uint32_t n = rng() % 7; n > 0; --n) prompt.push_back(static_cast<int32_t>(rng() % 50));
      const int32_t output = 1 + static_cast<int32_t>(rng() % 12);
      const bool cacheable = rng() % 10 != 0;
      if (i % 500 == 499) ++version[static_cast<int32_t>(rng() % 3)];  // a replace
      const uint64_t key = static_cast<uint64_t>(adapter + 2) * 1000 + version[adapter];
      Sequence* seq =
          sim.SubmitPrompt(i, adapter, std::move(prompt), output, key, 0, false, cacheable);
      if (i % 13 == 0) to_cancel[i] = seq;
      if (i % 3 != 0) sim.Step();  // arrivals outpace the steps: the pool fills
      for (auto it = to_cancel.begin(); it != to_cancel.end();) {
        if (static_cast<int64_t>(it->first) > i - 2) break;
        if (sim.finished().count(it->first) == 0) sim.Cancel(it->second);
        it = to_cancel.erase(it);
      }
    }
    sim.RunUntilIdle();
    EXPECT_EQ(sim.blocks().num_free(), kBlocks) << "a block leaked";
    EXPECT_EQ(sim.blocks().num_reserved(), 0);
    *hit_tokens = sim.scheduler().prefix_hit_tokens();
    *preemptions = sim.scheduler().num_preemptions();
    std::map<uint64_t, std::vector<int32_t>> out;
    for (const auto& [id, f] : sim.finished()) {
      if (id % 13 != 0) out[id] = f.output;
    }
    return out;
  };
  int64_t hits_off = 0, hits_on = 0, preempt_off = 0, preempt_on = 0;
  const auto without = run(false, &hits_off, &preempt_off);
  const auto with = run(true, &hits_on, &preempt_on);
  EXPECT_EQ(hits_off, 0);
  EXPECT_GT(hits_on, 0) << "shared prompt prefixes never hit the cache";
  EXPECT_GT(preempt_on, 0) << "the pool is meant to force preemption";
  ASSERT_EQ(without.size(), with.size());
  int64_t differ = 0;
  for (const auto& [id, tokens] : without) differ += with.at(id) != tokens ? 1 : 0;
  EXPECT_EQ(differ, 0) << "requests whose tokens changed with the cache";
}

// Fair share charges output tokens (twice a prompt token), so an adapter whose requests are
// one-token prompts with long outputs counts what it really takes. Against an adapter of the
// opposite shape (long prompts, one output token), both flooding two sequence slots, the
// weighted service evens out: the cheap-per-request adapter completes more requests. Were output
// tokens free, the long-output adapter would look idle to the counter and take every slot.
TEST(SchedulerTest, FairShareChargesOutputTokensAgainstUnevenShapes) {
  SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 2);
  o.max_queue_delay = absl::Hours(1);
  o.fair_share_tokens = 16;
  FakePool pool(FakePool::kAdapterBytes);  // one adapter: the two contend, the fair share binds
  SimEngine sim(o, 1024, 4, &pool);
  for (uint64_t i = 0; i < 200; ++i) {
    sim.Submit(2 * i, /*adapter=*/0, /*prompt_len=*/1, /*output_len=*/32);
    sim.Submit(2 * i + 1, /*adapter=*/1, /*prompt_len=*/32, /*output_len=*/1);
  }
  for (int s = 0; s < 400; ++s) sim.Step();
  int64_t long_output = 0, long_prompt = 0;
  for (const auto& [id, f] : sim.finished()) (f.adapter == 0 ? long_output : long_prompt) += 1;
  // Weighted cost per request: 1 + 2 * 32 = 65 against 32 + 2 = 34, so the cheap ones get
  // through more often (measured 31 against 23; with output tokens free, 1 against 24), and the
  // weighted service stays within 40% (measured 1472 against 992: one adapter holds the pool at
  // a time here, and requests are whole).
  EXPECT_GT(long_output, 0);
  EXPECT_GE(long_prompt, long_output)
      << long_prompt << " long-prompt requests against " << long_output << " long-output ones";
  const double a = static_cast<double>(sim.scheduler().ServedTokens(0));
  const double b = static_cast<double>(sim.scheduler().ServedTokens(1));
  EXPECT_LT(std::abs(a - b) / std::max(a, b), 0.4) << "weighted service " << a << " vs " << b;
}

// An adapter coming back after a long idle spell starts level with the least served active one
// (S-LoRA's lift), so its idleness is no credit: while it sends a burst, the adapter that kept
// flooding still gets its share. Without the lift the returning adapter would take every slot
// until its counter caught up.
TEST(SchedulerTest, AnAdapterReturningFromIdleGetsNoCreditForIt) {
  SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 2);
  o.max_queue_delay = absl::Hours(1);
  o.fair_share_tokens = 32;
  FakePool pool(FakePool::kAdapterBytes);  // one adapter: the two contend, the fair share binds
  SimEngine sim(o, 1024, 4, &pool);
  uint64_t id = 0;
  // The returning adapter runs a little first, then goes idle while the other floods for long.
  for (int i = 0; i < 4; ++i) sim.Submit(id++, /*adapter=*/1, 8, 8);
  sim.RunUntilIdle();
  for (int i = 0; i < 400; ++i) sim.Submit(id++, /*adapter=*/0, 8, 8);
  for (int s = 0; s < 600; ++s) sim.Step();
  std::set<uint64_t> before;
  for (const auto& [rid, f] : sim.finished()) before.insert(rid);
  // The burst.
  for (int i = 0; i < 60; ++i) sim.Submit(id++, /*adapter=*/1, 8, 8);
  for (int s = 0; s < 150; ++s) sim.Step();
  int64_t flood = 0, burst = 0;
  for (const auto& [rid, f] : sim.finished()) {
    if (before.count(rid) == 0) (f.adapter == 0 ? flood : burst) += 1;
  }
  EXPECT_GT(burst, 0);
  EXPECT_GE(flood, burst / 2) << "the flooding adapter got " << flood
                              << " requests through while the returning one got " << burst;
}

// Grouping may put later requests of a resident adapter ahead of one whose adapter must be
// copied in, but at most max_bypass of them: then it goes next (its adapter fits the pool).
// Without the bound it waits for the whole backlog of the resident adapter.
TEST(SchedulerTest, GroupingOvertakesARequestAtMostMaxBypassTimes) {
  auto run = [](int32_t max_bypass) {
    SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 2);
    o.max_queue_delay = absl::Hours(1);
    o.fair_share_tokens = int64_t{1} << 40;
    o.max_bypass = max_bypass;
    FakePool pool(2 * FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    // Adapters 0 and 2 fill the pool.
    sim.Submit(0, 0, 4, 2);
    sim.Submit(1, 2, 4, 2);
    sim.RunUntilIdle();
    // The cold one first (same arrival time: the lower id goes first), then a backlog of the
    // resident adapter 0.
    sim.Submit(2, 1, 4, 2);
    for (uint64_t id = 3; id < 40; ++id) sim.Submit(id, 0, 4, 6);
    sim.RunUntilIdle();
    return sim.finished().at(2).queue_time;
  };
  const absl::Duration bounded = run(3);
  const absl::Duration unbounded = run(1 << 20);
  // Two slots, six decode steps per request: three overtakes pass within ~ 3 * 7 / 2 steps.
  EXPECT_LE(bounded, 15 * kStep) << bounded;
  EXPECT_GE(unbounded, 60 * kStep) << "without the bound it waits for the backlog: " << unbounded;
}

// Without contention for the expert pool (it holds every adapter in play) the expert-aware
// policy serves in arrival order: fair share does not hold back the busy adapter, so its
// requests wait no longer than under FCFS.
TEST(SchedulerTest, WithoutPoolContentionArrivalOrderHolds) {
  auto run = [](SchedulingPolicy policy) {
    SchedulerOptions o = Options(policy, 64, 4);
    o.fair_share_tokens = 16;
    FakePool pool(8 * FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    std::mt19937 rng(5);
    for (uint64_t id = 0; id < 200; ++id) {
      sim.Submit(id, id % 4 == 0 ? 1 + static_cast<int32_t>(rng() % 3) : 0, 6, 6);
      if (id % 2 == 0) sim.Step();
    }
    sim.RunUntilIdle();
    std::vector<absl::Duration> waits;
    for (const auto& [id, f] : sim.finished()) waits.push_back(f.queue_time);
    return Percentile(waits, 0.99);
  };
  const absl::Duration aware = run(SchedulingPolicy::kExpertAware);
  const absl::Duration fcfs = run(SchedulingPolicy::kFcfs);
  EXPECT_LE(aware, fcfs + kStep) << "expert-aware p99 queue time " << aware << ", FCFS " << fcfs;
}

// Relative aging: under a steady backlog, with a pool that holds 2 of 8 Zipf-popular adapters,
// grouping delays the unpopular adapters' requests far beyond what arrival order gives anyone.
// With queue_delay_slack a late request takes the next pool room: the tail drops well below
// grouping's while the expert copies stay near grouping's (forcing late requests in at once,
// whatever the pool, would thrash it). Fair share is left wide open here: it has its own tests,
// and relative aging never overrides it.
TEST(SchedulerTest, RelativeAgingCutsGroupingsTailAndKeepsItsSavings) {
  struct Result {
    absl::Duration p99;
    int64_t copied;
  };
  auto run = [](SchedulingPolicy policy, double slack) {
    SchedulerOptions o = Options(policy, 64, 4);
    o.queue_delay_slack = slack;
    o.queue_delay_floor = kStep;
    o.fair_share_tokens = int64_t{1} << 40;
    FakePool pool(2 * FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    std::mt19937 rng(11);
    std::discrete_distribution<int32_t> zipf(
        {1.0, 1 / 2.0, 1 / 3.0, 1 / 4.0, 1 / 5.0, 1 / 6.0, 1 / 7.0, 1 / 8.0});
    // Closed loop: 24 in flight for 4 running slots, so the policy always has a queue.
    uint64_t id = 0;
    for (; id < 24; ++id) sim.Submit(id, zipf(rng), 6, 4 + static_cast<int32_t>(rng() % 8));
    while (id < 600) {
      const size_t done = sim.finished().size();
      sim.Step();
      for (size_t k = done; k < sim.finished().size() && id < 600; ++k, ++id) {
        sim.Submit(id, zipf(rng), 6, 4 + static_cast<int32_t>(rng() % 8));
      }
    }
    sim.RunUntilIdle();
    std::vector<absl::Duration> waits;
    for (const auto& [rid, f] : sim.finished()) waits.push_back(f.queue_time);
    return Result{Percentile(waits, 0.99), pool.bytes_copied()};
  };
  const Result fcfs = run(SchedulingPolicy::kFcfs, 0);
  const Result grouping = run(SchedulingPolicy::kExpertAware, 0);
  const Result bounded = run(SchedulingPolicy::kExpertAware, 1.25);
  SCOPED_TRACE(absl::StrCat("p99 queue time: FCFS ", absl::FormatDuration(fcfs.p99), ", grouping ",
                            absl::FormatDuration(grouping.p99), ", with relative aging ",
                            absl::FormatDuration(bounded.p99), "; expert bytes copied ",
                            fcfs.copied, " / ", grouping.copied, " / ", bounded.copied));
  EXPECT_GT(grouping.p99, fcfs.p99 * 2) << "the workload does not show grouping's tail";
  EXPECT_LE(bounded.p99, grouping.p99 * 0.75);
  EXPECT_LE(bounded.copied, grouping.copied * 1.1) << "late requests thrash the pool";
  EXPECT_LT(bounded.copied, fcfs.copied * 0.7);
}

// A late request whose adapter does not fit the pool waits for room at most max_held_steps
// steps, then goes in whatever the pool: the adapters already running, with backlogs that keep
// them in every step, cannot hold it back until their backlogs drain.
TEST(SchedulerTest, ALateRequestWaitsForPoolRoomAtMostMaxHeldSteps) {
  auto run = [](int32_t max_held_steps) {
    SchedulerOptions o = Options(SchedulingPolicy::kExpertAware, 64, 4);
    o.max_queue_delay = absl::Hours(1);
    o.fair_share_tokens = int64_t{1} << 40;
    o.max_bypass = 1 << 20;
    o.queue_delay_slack = 1.25;
    o.queue_delay_floor = kStep;
    o.max_held_steps = max_held_steps;
    FakePool pool(2 * FakePool::kAdapterBytes);
    SimEngine sim(o, 1024, 4, &pool);
    // Adapters 0 and 2 fill the pool and keep it: a steady stream of each, two running at a
    // time, admitted soon after it arrives (the recent mean queue delay stays short).
    uint64_t id = 0;
    for (int s = 0; s < 300; ++s) {
      while (sim.scheduler().num_waiting() < 3) {  // staggered lengths: each always runs
        sim.Submit(id, id % 2 == 0 ? 0 : 2, 4, 5 + static_cast<int32_t>(id % 3));
        ++id;
      }
      if (s == 20) sim.Submit(1000, 1, 4, 2);  // the cold one
      sim.Step();
    }
    sim.RunUntilIdle();
    return sim.finished().at(1000).queue_time;
  };
  const absl::Duration held = run(8);
  const absl::Duration unbounded = run(1 << 20);
  SCOPED_TRACE(absl::StrCat("queue time with max_held_steps 8: ", absl::FormatDuration(held),
                            ", unbounded: ", absl::FormatDuration(unbounded)));
  EXPECT_GE(unbounded, 100 * kStep) << "the workload does not hold the cold request back";
  EXPECT_LE(held, unbounded / 3);
}

}  // namespace
}  // namespace moleserve::engine
