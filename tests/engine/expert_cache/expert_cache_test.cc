#include "engine/expert_cache/expert_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "kernels/common/bf16.h"
#include "tests/common/bf16_cpu_backend.h"
#include "tests/common/counting_backend.h"

namespace moleserve::engine {
namespace {

// Row r of expert e of stack id: every element encodes (id, e, r, column), so a row read through
// the cache's row pointers proves which expert and row it came from.
float Value(int32_t id, int32_t e, int32_t r, int64_t c, bool b) {
  return static_cast<float>(id * 100000 + e * 1000 + r * 10 + (b ? 5 : 0)) +
         static_cast<float>(c % 7) * 0.125f;
}

std::unique_ptr<LoraStack> MakeStack(int32_t id, int32_t experts, int32_t rank, int64_t in,
                                     int64_t out) {
  auto s = std::make_unique<LoraStack>();
  s->num_experts = experts;
  s->rank = rank;
  s->in = in;
  s->out = out;
  s->a.resize(int64_t{experts} * rank * in);
  s->bt.resize(int64_t{experts} * rank * out);
  for (int32_t e = 0; e < experts; ++e) {
    for (int32_t r = 0; r < rank; ++r) {
      for (int64_t c = 0; c < in; ++c)
        s->a[(int64_t{e} * rank + r) * in + c] = Value(id, e, r, c, false);
      for (int64_t c = 0; c < out; ++c) {
        s->bt[(int64_t{e} * rank + r) * out + c] = Value(id, e, r, c, true);
      }
    }
  }
  s->scale.assign(experts, 1.0f);
  s->true_rank.assign(experts, rank);
  return s;
}

int64_t ExpertBytes(const LoraStack& s) { return int64_t{s.rank} * (s.in + s.out) * 4; }

class ExpertCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = CreateCpuBackend({.num_threads = 1});
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(*backend);
  }

  // Checks that rows (as returned by one Acquire) hold expert e of stack `id`.
  void ExpectRows(const LoraStack& s, int32_t id, int32_t e, const std::vector<const void*>& a,
                  const std::vector<const void*>& b) {
    ASSERT_EQ(a.size(), static_cast<size_t>(s.rank));
    ASSERT_EQ(b.size(), static_cast<size_t>(s.rank));
    std::vector<float> row(std::max(s.in, s.out));
    for (int32_t r = 0; r < s.rank; ++r) {
      ASSERT_TRUE(backend_->CopyToHost(row.data(), a[r], s.in * 4).ok());
      for (int64_t c = 0; c < s.in; ++c) ASSERT_EQ(row[c], Value(id, e, r, c, false));
      ASSERT_TRUE(backend_->CopyToHost(row.data(), b[r], s.out * 4).ok());
      for (int64_t c = 0; c < s.out; ++c) ASSERT_EQ(row[c], Value(id, e, r, c, true));
    }
  }

  std::unique_ptr<Backend> backend_;
};

TEST_F(ExpertCacheTest, UnboundedHoldsEverythingAndCountsHitsAndMisses) {
  ExpertCache cache(backend_.get(), {});
  auto s = MakeStack(1, 4, 3, 16, 8);
  ASSERT_TRUE(cache.AddOwner(0, {s.get()}).ok());
  std::vector<const void*> a, b;
  for (int round = 0; round < 2; ++round) {
    for (int32_t e = 0; e < 4; ++e) {
      a.clear();
      b.clear();
      ASSERT_TRUE(cache.Acquire(s.get(), e, &a, &b).ok());
      ExpectRows(*s, 1, e, a, b);
      cache.Release(s.get(), e);
    }
  }
  ExpertCacheStats st = cache.stats();
  EXPECT_EQ(st.misses, 4);
  EXPECT_EQ(st.hits, 4);
  EXPECT_EQ(st.evicted_lru, 0);
  EXPECT_EQ(st.bytes_to_device, 4 * ExpertBytes(*s));
  EXPECT_EQ(cache.ResidentBytes(0), 4 * ExpertBytes(*s));
  EXPECT_EQ(st.resident_experts, 4);
  // Pools: width 16 holds the A rows, width 8 the Bt rows, all of them.
  ASSERT_EQ(st.pools.size(), 2u);
  EXPECT_EQ(st.pools[0].width, 8);
  EXPECT_EQ(st.pools[0].pages, 12);
  EXPECT_EQ(st.pools[1].width, 16);
  EXPECT_EQ(st.pools[1].pages, 12);
  cache.RemoveOwner(0);
  st = cache.stats();
  EXPECT_EQ(st.evicted_unload, 4);
  EXPECT_EQ(st.resident_experts, 0);
  EXPECT_EQ(st.capacity_bytes, 0);  // pools of widths nobody uses are freed
  EXPECT_EQ(cache.ResidentBytes(0), 0);
}

TEST_F(ExpertCacheTest, MixedRanksNeverFragmentAndRowsStayCorrect) {
  // Four adapters of ranks 1, 4, 8 and 16 over two widths; a pool of 40 rank rows per width
  // (the largest expert needs 32 in the square width).
  const int64_t w = 32;
  std::vector<std::unique_ptr<LoraStack>> stacks;
  stacks.push_back(MakeStack(1, 6, 1, w, w));
  stacks.push_back(MakeStack(2, 6, 4, w, w));
  stacks.push_back(MakeStack(3, 6, 8, w, w));
  stacks.push_back(MakeStack(4, 6, 16, w, w));
  ExpertCache cache(backend_.get(), {.capacity_bytes = 80 * w * 4});
  for (int32_t i = 0; i < 4; ++i) ASSERT_TRUE(cache.AddOwner(i, {stacks[i].get()}).ok());
  ExpertCacheStats st = cache.stats();
  ASSERT_EQ(st.pools.size(), 1u);
  const int64_t pages = st.pools[0].pages;
  EXPECT_LE(st.capacity_bytes, 80 * w * 4);
  EXPECT_GE(pages, 32);

  std::mt19937 rng(7);
  std::vector<const void*> a, b;
  for (int iter = 0; iter < 2000; ++iter) {
    const int32_t i = static_cast<int32_t>(rng() % 4);
    const int32_t e = static_cast<int32_t>(rng() % 6);
    a.clear();
    b.clear();
    // Nothing else is pinned, so every acquire must succeed whatever mix of ranks came before:
    // free pages are never stranded.
    ASSERT_TRUE(cache.Acquire(stacks[i].get(), e, &a, &b).ok()) << "iteration " << iter;
    ExpectRows(*stacks[i], i + 1, e, a, b);
    cache.Release(stacks[i].get(), e);
    st = cache.stats();
    int64_t used = 0;
    for (int32_t j = 0; j < 4; ++j) used += cache.ResidentBytes(j) / (w * 4);
    ASSERT_EQ(used + st.pools[0].free_pages, pages) << "iteration " << iter;
  }
  st = cache.stats();
  EXPECT_GT(st.evicted_lru, 0);
  for (int32_t i = 0; i < 4; ++i) cache.RemoveOwner(i);
  EXPECT_EQ(cache.stats().resident_experts, 0);
}

TEST_F(ExpertCacheTest, PinnedExpertsAreNeverEvicted) {
  // Room for exactly two rank-4 experts (16 rows of the square width).
  auto s = MakeStack(1, 4, 4, 8, 8);
  ExpertCache cache(backend_.get(), {.capacity_bytes = 16 * 8 * 4});
  ASSERT_TRUE(cache.AddOwner(0, {s.get()}).ok());
  std::vector<const void*> a0, b0, a1, b1, a2, b2;
  ASSERT_TRUE(cache.Acquire(s.get(), 0, &a0, &b0).ok());
  ASSERT_TRUE(cache.Acquire(s.get(), 1, &a1, &b1).ok());
  // Both pinned: no room for a third.
  absl::Status full = cache.Acquire(s.get(), 2, &a2, &b2);
  EXPECT_TRUE(absl::IsResourceExhausted(full)) << full;
  EXPECT_TRUE(a2.empty());
  // Release 1: the third evicts it, never 0.
  cache.Release(s.get(), 1);
  ASSERT_TRUE(cache.Acquire(s.get(), 2, &a2, &b2).ok());
  ExpectRows(*s, 1, 0, a0, b0);
  ExpectRows(*s, 1, 2, a2, b2);
  EXPECT_EQ(cache.stats().evicted_lru, 1);
  EXPECT_EQ(cache.stats().pinned_experts, 2);
  cache.Release(s.get(), 0);
  cache.Release(s.get(), 2);
  EXPECT_EQ(cache.stats().pinned_experts, 0);
}

// Device routing pins a whole stack, but never by evicting other experts.
TEST_F(ExpertCacheTest, AcquireAllIfRoomPinsAWholeStackWithoutEvicting) {
  // Room for eight rank-2 experts (32 rows of the square width): a stack of 3 and one of 6.
  auto small = MakeStack(1, 3, 2, 8, 8);
  auto big = MakeStack(2, 6, 2, 8, 8);
  ExpertCache cache(backend_.get(), {.capacity_bytes = 16 * 2 * 8 * 4});
  ASSERT_TRUE(cache.AddOwner(0, {small.get(), big.get()}).ok());
  std::vector<const void*> a, b;
  absl::StatusOr<bool> all = cache.AcquireAllIfRoom(small.get(), &a, &b);
  ASSERT_TRUE(all.ok() && *all);
  ASSERT_EQ(a.size(), 3u * 2);  // every expert's rows, in expert order
  for (int32_t e = 0; e < 3; ++e) {
    ExpectRows(*small, 1, e, std::vector<const void*>(a.begin() + 2 * e, a.begin() + 2 * e + 2),
               std::vector<const void*>(b.begin() + 2 * e, b.begin() + 2 * e + 2));
  }
  EXPECT_EQ(cache.stats().pinned_experts, 3);
  EXPECT_EQ(cache.stats().misses, 3);
  for (int32_t e = 0; e < 3; ++e) cache.Release(small.get(), e);
  // The big stack needs 6 more experts; only 5 fit beside the small one's: refused, nothing
  // pinned or appended, nothing evicted.
  std::vector<const void*> a2, b2;
  all = cache.AcquireAllIfRoom(big.get(), &a2, &b2);
  ASSERT_TRUE(all.ok());
  EXPECT_FALSE(*all);
  EXPECT_TRUE(a2.empty() && b2.empty());
  EXPECT_EQ(cache.stats().pinned_experts, 0);
  EXPECT_EQ(cache.stats().evicted_lru, 0);
  // The small stack is still resident: all hits.
  a.clear();
  b.clear();
  all = cache.AcquireAllIfRoom(small.get(), &a, &b);
  ASSERT_TRUE(all.ok() && *all);
  EXPECT_EQ(cache.stats().hits, 3);
  for (int32_t e = 0; e < 3; ++e) cache.Release(small.get(), e);
  EXPECT_FALSE(cache.AcquireAllIfRoom(nullptr, &a, &b).ok());
}

TEST_F(ExpertCacheTest, EvictsLeastRecentlyUsed) {
  // Room for three rank-2 experts.
  auto s = MakeStack(1, 5, 2, 8, 8);
  ExpertCache cache(backend_.get(), {.capacity_bytes = 12 * 8 * 4});
  ASSERT_TRUE(cache.AddOwner(0, {s.get()}).ok());
  std::vector<const void*> a, b;
  auto touch = [&](int32_t e) {
    a.clear();
    b.clear();
    EXPECT_TRUE(cache.Acquire(s.get(), e, &a, &b).ok());
    cache.Release(s.get(), e);
  };
  touch(0);
  touch(1);
  touch(2);
  touch(0);  // order, most recent first: 0 2 1
  touch(3);  // evicts 1
  EXPECT_EQ(cache.stats().misses, 4);
  touch(0);
  touch(2);
  EXPECT_EQ(cache.stats().misses, 4);  // 0 and 2 stayed
  touch(1);                            // was evicted; evicts 3 (order was 2 0 3)
  EXPECT_EQ(cache.stats().misses, 5);
  touch(0);
  touch(2);
  EXPECT_EQ(cache.stats().misses, 5);
  touch(3);
  EXPECT_EQ(cache.stats().misses, 6);
  EXPECT_EQ(cache.stats().evicted_lru, 3);
}

TEST_F(ExpertCacheTest, RefusesAnAdapterWhoseExpertCannotFit) {
  auto small = MakeStack(1, 2, 2, 8, 8);
  auto big = MakeStack(2, 2, 16, 8, 8);
  ExpertCache cache(backend_.get(), {.capacity_bytes = 8 * 8 * 4});
  ASSERT_TRUE(cache.AddOwner(0, {small.get()}).ok());
  absl::Status st = cache.AddOwner(1, {big.get()});
  EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
  EXPECT_NE(st.message().find("--expert-cache-bytes"), std::string::npos) << st;
  // The refused owner left nothing behind; the first one still works.
  std::vector<const void*> a, b;
  EXPECT_TRUE(absl::IsNotFound(cache.Acquire(big.get(), 0, &a, &b)));
  ASSERT_TRUE(cache.Acquire(small.get(), 1, &a, &b).ok());
  ExpectRows(*small, 1, 1, a, b);
  cache.Release(small.get(), 1);
  EXPECT_TRUE(absl::IsAlreadyExists(cache.AddOwner(0, {small.get()})));
}

// The pools' sizes and the per-width minimum are kept as running totals (AddOwner / RemoveOwner
// cost the owner's own stacks, not every registered one): they must follow owners coming and
// going, including two owners sharing the largest expert size.
TEST_F(ExpertCacheTest, PoolSizesAndMinimumsFollowOwnersAsTheyComeAndGo) {
  auto pages = [](const ExpertCache& cache) {
    std::map<int64_t, int64_t> out;
    for (const auto& p : cache.stats().pools) out[p.width] = p.pages;
    return out;
  };
  {  // unbounded: every width's pool holds every registered expert's rows
    ExpertCache cache(backend_.get(), {});
    auto s1 = MakeStack(1, 2, 2, 8, 8);    // 4 rows of 8, twice (A and B^T)
    auto s2 = MakeStack(2, 3, 4, 8, 16);   // 12 rows of 8, 12 of 16
    auto s3 = MakeStack(3, 1, 8, 16, 32);  // 8 of 16, 8 of 32
    ASSERT_TRUE(cache.AddOwner(0, {s1.get()}).ok());
    ASSERT_TRUE(cache.AddOwner(1, {s2.get(), s3.get()}).ok());
    EXPECT_EQ(pages(cache), (std::map<int64_t, int64_t>{{8, 20}, {16, 20}, {32, 8}}));
    cache.RemoveOwner(0);
    EXPECT_EQ(pages(cache), (std::map<int64_t, int64_t>{{8, 12}, {16, 20}, {32, 8}}));
    cache.RemoveOwner(1);
    EXPECT_TRUE(pages(cache).empty());
  }
  // Bounded at 2048 bytes: one rank-16 expert of width 8 (in == out: 32 rows, 1024 bytes) and
  // one of width 16 (2048 bytes) do not fit together.
  ExpertCache cache(backend_.get(), {.capacity_bytes = 2048});
  auto big1 = MakeStack(1, 1, 16, 8, 8);
  auto big2 = MakeStack(2, 1, 16, 8, 8);
  auto wide = MakeStack(3, 1, 16, 16, 16);
  ASSERT_TRUE(cache.AddOwner(0, {big1.get()}).ok());
  ASSERT_TRUE(cache.AddOwner(1, {big2.get()}).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(cache.AddOwner(2, {wide.get()})));
  cache.RemoveOwner(0);  // big2 still needs its 32 rows of width 8
  EXPECT_TRUE(absl::IsResourceExhausted(cache.AddOwner(2, {wide.get()})));
  cache.RemoveOwner(1);  // now nothing of width 8 is registered
  ASSERT_TRUE(cache.AddOwner(2, {wide.get()}).ok());
  EXPECT_EQ(pages(cache), (std::map<int64_t, int64_t>{{16, 32}}));
  std::vector<const void*> a, b;
  ASSERT_TRUE(cache.Acquire(wide.get(), 0, &a, &b).ok());
  ExpectRows(*wide, 3, 0, a, b);
  cache.Release(wide.get(), 0);
}

// On a host backend computing in fp32 with no bound, the pages are the stacks' own rows: nothing
// is copied, no pool exists, and an adapter's experts take their raw bytes once.
TEST_F(ExpertCacheTest, HostBackendUnboundedReadsTheStacksInPlace) {
  auto s1 = MakeStack(1, 3, 4, 8, 16);
  auto s2 = MakeStack(2, 2, 2, 8, 8);
  ExpertCache cache(backend_.get(), {.host_backend = true});
  ASSERT_TRUE(cache.zero_copy());
  ASSERT_TRUE(cache.AddOwner(0, {s1.get(), s2.get()}).ok());
  EXPECT_EQ(cache.ResidentBytes(0), cache.OwnerBytes(0));
  std::vector<const void*> a, b;
  ASSERT_TRUE(cache.Acquire(s1.get(), 2, &a, &b).ok());
  ExpectRows(*s1, 1, 2, a, b);
  EXPECT_EQ(a[0], s1->a.data() + 2 * 4 * 8);  // the stack's row itself
  EXPECT_EQ(b[3], s1->bt.data() + (2 * 4 + 3) * 16);
  cache.Release(s1.get(), 2);
  a.clear();
  b.clear();
  absl::StatusOr<bool> all = cache.AcquireAllIfRoom(s2.get(), &a, &b);
  ASSERT_TRUE(all.ok() && *all);
  ASSERT_EQ(a.size(), 4u);
  for (int32_t e = 0; e < 2; ++e) {
    ExpectRows(*s2, 2, e, {a.begin() + 2 * e, a.begin() + 2 * e + 2},
               {b.begin() + 2 * e, b.begin() + 2 * e + 2});
    cache.Release(s2.get(), e);
  }
  ExpertCacheStats st = cache.stats();
  EXPECT_EQ(st.misses, 0);
  EXPECT_EQ(st.hits, 3);
  EXPECT_EQ(st.bytes_to_device, 0);
  EXPECT_EQ(st.capacity_bytes, 0);
  EXPECT_TRUE(st.pools.empty());
  EXPECT_EQ(st.resident_experts, 5);
  EXPECT_EQ(cache.Prefetch(0, 1 << 20), 0);
  cache.RemoveOwner(0);
  EXPECT_EQ(cache.stats().resident_experts, 0);
  EXPECT_EQ(cache.ResidentBytes(0), 0);
  EXPECT_TRUE(absl::IsNotFound(cache.Acquire(s1.get(), 0, &a, &b)));

  // Bounded, the host backend still copies into its pools (what --expert-cache-bytes limits).
  ExpertCache bounded(backend_.get(), {.capacity_bytes = 1 << 20, .host_backend = true});
  EXPECT_FALSE(bounded.zero_copy());
  ASSERT_TRUE(bounded.AddOwner(0, {s1.get()}).ok());
  a.clear();
  b.clear();
  ASSERT_TRUE(bounded.Acquire(s1.get(), 1, &a, &b).ok());
  ExpectRows(*s1, 1, 1, a, b);
  EXPECT_NE(a[0], s1->a.data() + 1 * 4 * 8);
  EXPECT_EQ(bounded.stats().misses, 1);
  bounded.Release(s1.get(), 1);
}

TEST_F(ExpertCacheTest, PrefetchFillsFreePagesButSparesTheRunningSet) {
  auto running = MakeStack(1, 2, 2, 8, 8);
  auto queued = MakeStack(2, 4, 2, 8, 8);
  // Room for four rank-2 experts.
  ExpertCache cache(backend_.get(), {.capacity_bytes = 16 * 8 * 4});
  ASSERT_TRUE(cache.AddOwner(0, {running.get()}).ok());
  ASSERT_TRUE(cache.AddOwner(1, {queued.get()}).ok());
  std::vector<const void*> a, b;
  cache.BeginStep();
  for (int32_t e = 0; e < 2; ++e) {
    ASSERT_TRUE(cache.Acquire(running.get(), e, &a, &b).ok());
    cache.Release(running.get(), e);
  }
  // Two free experts' worth: prefetch takes them and does not evict the running experts, which
  // were used in this step.
  EXPECT_EQ(cache.Prefetch(1, int64_t{1} << 20), 2 * ExpertBytes(*queued));
  EXPECT_EQ(cache.ResidentBytes(0), 2 * ExpertBytes(*running));
  cache.BeginStep();  // still used in the previous step: spared
  EXPECT_EQ(cache.Prefetch(1, int64_t{1} << 20), 0);
  cache.BeginStep();  // now cold: prefetch may take their pages, within its byte budget
  EXPECT_EQ(cache.Prefetch(1, ExpertBytes(*queued)), ExpertBytes(*queued));
  EXPECT_EQ(cache.stats().prefetched, 3);
  // The prefetched experts are hits.
  const int64_t misses = cache.stats().misses;
  for (int32_t e = 0; e < 3; ++e) {
    a.clear();
    b.clear();
    ASSERT_TRUE(cache.Acquire(queued.get(), e, &a, &b).ok());
    ExpectRows(*queued, 2, e, a, b);
    cache.Release(queued.get(), e);
  }
  EXPECT_EQ(cache.stats().misses, misses);
}

TEST_F(ExpertCacheTest, ConcurrentAcquireAndRelease) {
  // Four threads pin random experts of mixed ranks and widths, check their rows while pinned and
  // release them; the pool holds a fraction of them, so evictions race with reads (run under
  // ThreadSanitizer in the cpu-tsan preset).
  std::vector<std::unique_ptr<LoraStack>> stacks;
  stacks.push_back(MakeStack(1, 8, 2, 16, 8));
  stacks.push_back(MakeStack(2, 8, 4, 16, 16));
  stacks.push_back(MakeStack(3, 8, 3, 8, 16));
  ExpertCache cache(backend_.get(), {.capacity_bytes = 40 * 16 * 4});
  for (int32_t i = 0; i < 3; ++i) ASSERT_TRUE(cache.AddOwner(i, {stacks[i].get()}).ok());
  std::atomic<int64_t> bad_rows{0}, refusals{0}, done{0};
  auto worker = [&](uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<const void*> a, b;
    for (int iter = 0; iter < 400; ++iter) {
      const int32_t i = static_cast<int32_t>(rng() % 3);
      const int32_t e = static_cast<int32_t>(rng() % 8);
      a.clear();
      b.clear();
      absl::Status st = cache.Acquire(stacks[i].get(), e, &a, &b);
      if (!st.ok()) {  // every page pinned by the other threads: try again
        ++refusals;
        continue;
      }
      const LoraStack& s = *stacks[i];
      for (int32_t r = 0; r < s.rank; ++r) {
        const float* ra = static_cast<const float*>(a[r]);
        const float* rb = static_cast<const float*>(b[r]);
        if (ra[0] != Value(i + 1, e, r, 0, false) ||
            rb[s.out - 1] != Value(i + 1, e, r, s.out - 1, true)) {
          ++bad_rows;
        }
      }
      cache.Release(stacks[i].get(), e);
      ++done;
    }
  };
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) threads.emplace_back(worker, 100 + t);
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bad_rows.load(), 0);
  EXPECT_EQ(done.load() + refusals.load(), 1600);
  EXPECT_GT(done.load(), 1000);
  ExpertCacheStats st = cache.stats();
  EXPECT_EQ(st.pinned_experts, 0);
  EXPECT_EQ(st.hits + st.misses, done.load());
  EXPECT_GT(st.evicted_lru, 0);
}

// Under a bf16 compute dtype (as on CUDA) each stack is converted once, when its owner is added,
// into an image in AllocateHost memory; a miss copies from it with no conversion, one copy per
// contiguous run of pages: two per expert (A rows, B^T rows) as long as pages come back in order.
TEST(ExpertCacheBf16Test, MissesCopyTheConvertedImageInTwoPinnedRunsPerExpert) {
  auto counting =
      std::make_unique<test_util::CountingBackend>(test_util::Bf16CpuBackend::Create(1));
  test_util::CountingBackend* backend = counting.get();
  auto s = MakeStack(1, 5, 3, 16, 8);
  const int64_t expert_bytes = int64_t{3} * (16 + 8) * 2;
  // Room for three experts: misses after the first three evict, and the freed pages are reused.
  ExpertCache cache(backend, {.capacity_bytes = 3 * expert_bytes});
  ASSERT_TRUE(cache.AddOwner(0, {s.get()}).ok());
  ExpertCacheStats st = cache.stats();
  EXPECT_EQ(st.host_image_bytes, 5 * expert_bytes);
  EXPECT_EQ(st.host_pinned_bytes, 5 * expert_bytes);
  // What a miss copies no longer depends on the fp32 stack.
  auto original = MakeStack(1, 5, 3, 16, 8);
  std::fill(s->a.begin(), s->a.end(), -1.0f);
  std::fill(s->bt.begin(), s->bt.end(), -1.0f);
  backend->Reset();
  int64_t misses = 0;
  for (int32_t e : {0, 1, 2, 3, 4, 0, 2, 1}) {
    const int64_t before = cache.stats().misses;
    const test_util::BackendCounts c0 = backend->counts();
    std::vector<const void*> a, b;
    ASSERT_TRUE(cache.Acquire(s.get(), e, &a, &b).ok());
    const test_util::BackendCounts c1 = backend->counts();
    if (cache.stats().misses > before) {
      ++misses;
      EXPECT_EQ(c1.bulk_calls - c0.bulk_calls, 1) << "expert " << e;
      EXPECT_EQ(c1.page_copies - c0.page_copies, 2) << "expert " << e;
      EXPECT_EQ(c1.pinned_page_copies - c0.pinned_page_copies, 2) << "expert " << e;
      EXPECT_EQ(c1.page_bytes - c0.page_bytes, expert_bytes);
    } else {
      EXPECT_EQ(c1.bulk_calls, c0.bulk_calls);
    }
    // The rows are the fp32 values rounded once to bf16.
    std::vector<uint16_t> row(16);
    for (int32_t r = 0; r < 3; ++r) {
      ASSERT_TRUE(backend->CopyToHost(row.data(), a[r], 16 * 2).ok());
      for (int64_t c = 0; c < 16; ++c) {
        ASSERT_EQ(row[c], kernels::F32ToBf16(original->a[(int64_t{e} * 3 + r) * 16 + c]));
      }
      ASSERT_TRUE(backend->CopyToHost(row.data(), b[r], 8 * 2).ok());
      for (int64_t c = 0; c < 8; ++c) {
        ASSERT_EQ(row[c], kernels::F32ToBf16(original->bt[(int64_t{e} * 3 + r) * 8 + c]));
      }
    }
    cache.Release(s.get(), e);
  }
  st = cache.stats();
  EXPECT_EQ(st.misses, misses);
  EXPECT_GT(st.evicted_lru, 0);
  EXPECT_EQ(st.copies_to_device, 2 * misses);
  cache.RemoveOwner(0);
  EXPECT_EQ(cache.stats().host_image_bytes, 0);
  EXPECT_EQ(cache.stats().host_pinned_bytes, 0);
}

TEST(ExpertCacheBf16Test, ImagesBeyondThePinnedBudgetStayInOrdinaryMemory) {
  auto counting =
      std::make_unique<test_util::CountingBackend>(test_util::Bf16CpuBackend::Create(1));
  test_util::CountingBackend* backend = counting.get();
  auto first = MakeStack(1, 2, 2, 8, 8);
  auto second = MakeStack(2, 2, 2, 8, 8);
  const int64_t image_bytes = 2 * int64_t{2} * (8 + 8) * 2;
  // Room for the first owner's image only.
  ExpertCache cache(backend, {.pinned_host_bytes = image_bytes + image_bytes / 2});
  ASSERT_TRUE(cache.AddOwner(0, {first.get()}).ok());
  ASSERT_TRUE(cache.AddOwner(1, {second.get()}).ok());
  EXPECT_EQ(cache.stats().host_image_bytes, 2 * image_bytes);
  EXPECT_EQ(cache.stats().host_pinned_bytes, image_bytes);
  std::vector<const void*> a, b;
  backend->Reset();
  ASSERT_TRUE(cache.Acquire(second.get(), 1, &a, &b).ok());
  EXPECT_EQ(backend->counts().page_copies, 2);
  EXPECT_EQ(backend->counts().pinned_page_copies, 0);
  cache.Release(second.get(), 1);
  a.clear();
  b.clear();
  ASSERT_TRUE(cache.Acquire(first.get(), 0, &a, &b).ok());
  EXPECT_EQ(backend->counts().pinned_page_copies, 2);
  cache.Release(first.get(), 0);
  // The budget freed by the first owner is there for the next one.
  cache.RemoveOwner(0);
  EXPECT_EQ(cache.stats().host_pinned_bytes, 0);
  auto third = MakeStack(3, 2, 2, 8, 8);
  ASSERT_TRUE(cache.AddOwner(2, {third.get()}).ok());
  EXPECT_EQ(cache.stats().host_pinned_bytes, image_bytes);
  // A refused owner returns what it reserved.
  EXPECT_TRUE(absl::IsAlreadyExists(cache.AddOwner(2, {third.get()})));
  EXPECT_EQ(cache.stats().host_pinned_bytes, image_bytes);
}

TEST_F(ExpertCacheTest, Fp32PagesCopyStraightFromTheStacks) {
  ExpertCache cache(backend_.get(), {});
  auto s = MakeStack(1, 2, 4, 8, 8);
  ASSERT_TRUE(cache.AddOwner(0, {s.get()}).ok());
  EXPECT_EQ(cache.stats().host_image_bytes, 0);  // no second copy of an fp32 adapter
  std::vector<const void*> a, b;
  ASSERT_TRUE(cache.Acquire(s.get(), 1, &a, &b).ok());
  ExpectRows(*s, 1, 1, a, b);
  cache.Release(s.get(), 1);
  EXPECT_EQ(cache.stats().copies_to_device, 2);
}

}  // namespace
}  // namespace moleserve::engine
