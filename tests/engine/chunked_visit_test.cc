#include "engine/core/chunked_visit.h"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace moleserve::engine {
namespace {

TEST(ChunkedVisitTest, VisitsEveryEntryOnceInKeyOrderWhateverTheChunk) {
  for (int size : {0, 1, 2, 5, 7, 256, 1000}) {
    std::map<int, std::string> m;
    for (int i = 0; i < size; ++i) m[3 * i] = std::to_string(i);
    Mutex mu;
    for (size_t chunk : {size_t{1}, size_t{2}, size_t{3}, size_t{256}, size_t{5000}}) {
      std::vector<int> seen;
      VisitInChunks(&mu, m, chunk, [&](int key, const std::string& value) {
        EXPECT_EQ(value, std::to_string(key / 3));
        seen.push_back(key);
      });
      ASSERT_EQ(seen.size(), m.size()) << size << " " << chunk;
      for (int i = 0; i < size; ++i) ASSERT_EQ(seen[i], 3 * i);
    }
  }
}

// A writer that takes the lock for one insert or erase at a time changes the map while listings
// run: every listing sees each entry that was there from start to end exactly once, in order.
TEST(ChunkedVisitTest, StableEntriesAreSeenOnceWhileAWriterChangesTheMap) {
  Mutex mu;
  std::map<int, int> m;
  for (int i = 0; i < 2000; i += 2) m[i] = i;  // stable: even keys
  std::atomic<bool> stop{false};
  std::atomic<int64_t> writes{0};
  std::thread writer([&] {
    for (int k = 1; !stop.load(); k = (k + 2) % 2000) {  // odd keys come and go
      MutexLock lock(&mu);
      if (m.count(k)) {
        m.erase(k);
      } else {
        m[k] = k;
      }
      ++writes;
    }
  });
  while (writes.load() == 0) std::this_thread::yield();  // the writer is running
  for (int round = 0; round < 20; ++round) {
    std::vector<int> even;
    VisitInChunks(&mu, m, 16, [&](int key, int value) {
      ASSERT_EQ(key, value);
      if (key % 2 == 0) even.push_back(key);
    });
    ASSERT_EQ(even.size(), 1000u);
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(even[i], 2 * i);
  }
  stop = true;
  writer.join();
}

}  // namespace
}  // namespace moleserve::engine
