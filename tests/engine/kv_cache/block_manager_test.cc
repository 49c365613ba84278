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

}  // namespace
}  // namespace moleserve::engine
