#pragma once

// AtBackgroundPriority: runs fn on a thread of its own at a raised nice value (Linux, per
// thread) and returns its result, so that CPU-heavy work done on behalf of an admin call (reading
// and checking an adapter's files) takes only the CPU that serving leaves. The caller waits. The
// calling thread's own priority is never changed (an unprivileged thread could not lower it
// back). fn must not throw.
//
//   absl::StatusOr<Adapter> a = AtBackgroundPriority(10, [&] { return Read(dir); });

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <optional>
#include <thread>
#include <utility>

namespace moleserve::engine {

// nice <= 0: fn runs on the calling thread.
template <typename Fn>
auto AtBackgroundPriority(int nice, Fn&& fn) -> decltype(fn()) {
  if (nice <= 0) return fn();
  std::optional<decltype(fn())> result;
  std::thread worker([&] {
    // Failure (a seccomp profile that forbids it) leaves the thread at the caller's priority.
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
    result.emplace(fn());
  });
  worker.join();
  return *std::move(result);
}

}  // namespace moleserve::engine
