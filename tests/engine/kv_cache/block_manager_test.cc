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
  m.Free(blocks);
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
  EXPECT_TRUE(m.Register(a, h0));
  EXPECT_TRUE(m.Register(b, h1));
  EXPECT_FALSE(m.Register(b, h1 + 1)) << "a block has one registration";
  EXPECT_EQ(m.num_cached(), 2);
  // A second user of the same prefix takes both by reference.
  std::vector<int32_t> shared = m.Match({h0, h1, 12345});
  EXPECT_EQ(shared, (std::vector<int32_t>{a, b}));
  EXPECT_EQ(m.num_free(), 2);
  m.Release({a, b});  // the first user leaves: still in use by the second
  EXPECT_EQ(m.num_evictable(), 0);
  m.Release(shared);  // the last user leaves: cached, evictable, available
  EXPECT_EQ(m.num_evictable(), 2);
  EXPECT_EQ(m.num_free(), 4);
  EXPECT_EQ(m.Match({h0}), (std::vector<int32_t>{a}));  // taken back from the evictable set
  EXPECT_EQ(m.num_evictable(), 1);
  m.Release({a});  // now b was released before a: b goes first
  // Four blocks wanted: the two free ones, then b, then a.
  ASSERT_TRUE(m.Reserve(4));
  std::vector<int32_t> got;
  for (int i = 0; i < 4; ++i) got.push_back(m.AllocateReserved());
  EXPECT_EQ(got[2], b);
  EXPECT_EQ(got[3], a);
  EXPECT_EQ(m.evictions(), 2);
  EXPECT_EQ(m.num_cached(), 0);
  EXPECT_TRUE(m.Match({h0}).empty()) << "an evicted block is not matched";
  m.Release(got);
  EXPECT_EQ(m.num_free(), 4);
}

// Match never takes an evictable block a reservation is counting on.
TEST(BlockManagerTest, MatchLeavesReservationsTheirBlocks) {
  BlockManager m(2, 1);
  ASSERT_TRUE(m.Reserve(1));
  const int32_t a = m.AllocateReserved();
  const uint64_t h = BlockManager::ChainHash(0, std::vector<int32_t>{5}, 1);
  ASSERT_TRUE(m.Register(a, h));
  m.Release({a});             // evictable; 2 available
  ASSERT_TRUE(m.Reserve(2));  // both promised
  EXPECT_TRUE(m.Match({h}).empty());
  m.Unreserve(1);
  EXPECT_EQ(m.Match({h}), (std::vector<int32_t>{a}));
  EXPECT_EQ(m.AllocateReserved(), 1 - a);
  EXPECT_EQ(m.num_free(), 0);
}

}  // namespace
}  // namespace moleserve::engine
