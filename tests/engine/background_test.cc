#include "engine/core/background.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <string>

namespace moleserve::engine {
namespace {

long ThreadId() { return syscall(SYS_gettid); }
int ThreadNice() { return getpriority(PRIO_PROCESS, static_cast<id_t>(ThreadId())); }

TEST(BackgroundTest, RunsOnAThreadOfItsOwnAtTheNiceValueAndReturnsTheResult) {
  const long caller = ThreadId();
  const int caller_nice = ThreadNice();
  if (caller_nice >= 10) GTEST_SKIP() << "this test already runs at nice " << caller_nice;
  long worker = 0;
  int worker_nice = -100;
  const std::string got = AtBackgroundPriority(10, [&] {
    worker = ThreadId();
    worker_nice = ThreadNice();
    return std::string("read");
  });
  EXPECT_EQ(got, "read");
  EXPECT_NE(worker, caller);
  EXPECT_EQ(worker_nice, 10);
  EXPECT_EQ(ThreadNice(), caller_nice);  // the caller's own priority never changes
}

TEST(BackgroundTest, NiceZeroRunsOnTheCallingThread) {
  const long caller = ThreadId();
  long worker = 0;
  EXPECT_EQ(AtBackgroundPriority(0,
                                 [&] {
                                   worker = ThreadId();
                                   return 7;
                                 }),
            7);
  EXPECT_EQ(worker, caller);
}

}  // namespace
}  // namespace moleserve::engine
