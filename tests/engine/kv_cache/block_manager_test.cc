#include "engine/kv_cache/block_manager.h"

#include <gtest/gtest.h>

#include <set>

namespace moleserve::engine {
namespace {

TEST(BlockManagerTest, ReserveAllocateFreeCycle) {
  BlockManager m(8, 16);
  EXPECT_EQ(m.BlocksFor(0), 0);
  EXPECT_EQ(m.BlocksFor(16), 1);
  EXPECT_EQ(m.BlocksFor(17), 2);
  ASSERT_TRUE(m.Reserve(5));
  EXPECT_FALSE(m.Reserve(4));  // only 3 unpromised
  ASSERT_TRUE(m.Reserve(3));
  std::set<int32_t> got;
  for (int i = 0; i < 5; ++i) got.insert(m.AllocateReserved());
  EXPECT_EQ(got.size(), 5u);  // distinct
  EXPECT_EQ(m.num_free(), 3);
  EXPECT_DOUBLE_EQ(m.Usage(), 5.0 / 8);
  std::vector<int32_t> blocks(got.begin(), got.end());
  m.Release(blocks);
  m.Unreserve(3);
  EXPECT_EQ(m.num_free(), 8);
  EXPECT_EQ(m.num_reserved(), 0);
  EXPECT_TRUE(m.Reserve(8));
}

TEST(BlockManagerTest, AllocateWithoutReservationIsAProgrammerError) {
  BlockManager m(2, 16);
  EXPECT_DEATH(m.AllocateReserved(), "reservation");
}

// A registered block is shared by reference, survives its last user as evictable (still
// available to reservations), and is evicted least recently released first, only when no free
// block is left.
TEST(BlockManagerTest, PrefixCacheSharesRegisteredBlocksAndEvictsThemLruOnlyWhenNeeded) {
  BlockManager m(4, 2);
  const std::vector<int32_t> tokens = {1, 2, 3, 4};
  const uint64_t h0 = BlockManager::ChainHash(0, absl::MakeConstSpan(tokens).first(2), 7);
  const uint64_t h1 = BlockManager::ChainHash(h0, absl::MakeConstSpan(tokens).subspan(2, 2), 7);
  EXPECT_NE(h0, BlockManager::ChainHash(0, absl::MakeConstSpan(tokens).first(2), 8))
      << "the key is part of the hash";
  EXPECT_NE(h1, BlockManager::ChainHash(h0 + 1, absl::MakeConstSpan(tokens).subspan(2, 2), 7))
      << "the parent is part of the hash";
  ASSERT_TRUE(m.Reserve(2));
  const int32_t a = m.AllocateReserved(), b = m.AllocateReserved();
  const auto t0 = absl::MakeConstSpan(tokens).first(2), t1 = absl::MakeConstSpan(tokens).subspan(2);
  EXPECT_TRUE(m.Register(a, h0, 0, t0, 7));
  EXPECT_TRUE(m.Register(b, h1, h0, t1, 7));
  EXPECT_FALSE(m.Register(b, h1 + 1, h0, t1, 7)) << "a block has one registration";
  EXPECT_EQ(m.num_cached(), 2);
  // A second user of the same prefix takes both by reference.
  std::vector<int32_t> six = tokens;
  six.insert(six.end(), {9, 9});
  std::vector<int32_t> shared = m.Match({h0, h1, 12345}, six, 7);
  EXPECT_EQ(shared, (std::vector<int32_t>{a, b}));
  EXPECT_EQ(m.num_free(), 2);
  m.Release({a, b});  // the first user leaves: still in use by the second
  EXPECT_EQ(m.num_evictable(), 0);
  m.Release(shared);  // the last user leaves: cached, evictable, available
  EXPECT_EQ(m.num_evictable(), 2);
  EXPECT_EQ(m.num_free(), 4);
  EXPECT_EQ(m.Match({h0}, tokens, 7), (std::vector<int32_t>{a}));  // back from the evictable set
  EXPECT_EQ(m.num_evictable(), 1);
  m.Release({a});  // now b was released before a: b goes first
  // (A table releases last to first: its later blocks are evicted before its first ones.)
  // Four blocks wanted: the two free ones, then b, then a.
  ASSERT_TRUE(m.Reserve(4));
  std::vector<int32_t> got;
  for (int i = 0; i < 4; ++i) got.push_back(m.AllocateReserved());
  EXPECT_EQ(got[2], b);
  EXPECT_EQ(got[3], a);
  EXPECT_EQ(m.evictions(), 2);
  EXPECT_EQ(m.num_cached(), 0);
  EXPECT_TRUE(m.Match({h0}, tokens, 7).empty()) << "an evicted block is not matched";
  m.Release(got);
  EXPECT_EQ(m.num_free(), 4);
}

// Match never takes an evictable block a reservation is counting on.
TEST(BlockManagerTest, MatchLeavesReservationsTheirBlocks) {
  BlockManager m(2, 1);
  ASSERT_TRUE(m.Reserve(1));
  const int32_t a = m.AllocateReserved();
  const std::vector<int32_t> five = {5};
  const uint64_t h = BlockManager::ChainHash(0, five, 1);
  ASSERT_TRUE(m.Register(a, h, 0, five, 1));
  m.Release({a});             // evictable; 2 available
  ASSERT_TRUE(m.Reserve(2));  // both promised
  EXPECT_TRUE(m.Match({h}, five, 1).empty());
  m.Unreserve(1);
  EXPECT_EQ(m.Match({h}, five, 1), (std::vector<int32_t>{a}));
  EXPECT_EQ(m.AllocateReserved(), 1 - a);
  EXPECT_EQ(m.num_free(), 0);
}

// A hash alone never matches: were two prefixes to collide (forced here by registering one's
// block under the other's hash), the other's tokens, parent or key tell them apart.
TEST(BlockManagerTest, AHashCollisionIsAMiss) {
  BlockManager m(4, 2);
  ASSERT_TRUE(m.Reserve(1));
  const int32_t a = m.AllocateReserved();
  const std::vector<int32_t> mine = {1, 2}, theirs = {3, 4};
  const uint64_t h = BlockManager::ChainHash(0, theirs, 7);
  ASSERT_TRUE(m.Register(a, h, 0, mine, 7));  // registered under the colliding hash
  EXPECT_TRUE(m.Match({h}, theirs, 7).empty()) << "other tokens";
  EXPECT_TRUE(m.Match({h}, mine, 8).empty()) << "another key";
  EXPECT_EQ(m.Match({h}, mine, 7), (std::vector<int32_t>{a}));
  m.Release({a, a});
  // Releasing a table frees its blocks last to first.
  ASSERT_TRUE(m.Reserve(2));
  const int32_t x = m.AllocateReserved(), y = m.AllocateReserved();
  const uint64_t hx = BlockManager::ChainHash(0, mine, 7),
                 hy = BlockManager::ChainHash(hx, theirs, 7);
  ASSERT_TRUE(m.Register(x, hx, 0, mine, 7));
  ASSERT_TRUE(m.Register(y, hy, hx, theirs, 7));
  m.Release({x, y});
  ASSERT_TRUE(m.Reserve(3));  // the free block, then the chain's last block, then its first
  m.AllocateReserved();
  EXPECT_EQ(m.AllocateReserved(), a) << "the evictable colliding block went before the chain";
  EXPECT_EQ(m.AllocateReserved(), y);
  std::vector<int32_t> both = mine;
  both.insert(both.end(), theirs.begin(), theirs.end());
  EXPECT_EQ(m.Match({hx, hy}, both, 7), (std::vector<int32_t>{x})) << "the first block survives";
}

}  // namespace
}  // namespace moleserve::engine
