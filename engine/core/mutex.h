#pragma once

// Mutex / MutexLock / CondVar: std::mutex and std::condition_variable_any with Abseil's
// thread-safety annotations, so ABSL_GUARDED_BY works on members and ThreadSanitizer sees every
// lock. (Debian's Abseil is not built with TSan, so absl::Mutex is opaque to it and TSan would
// report every access it guards.)
//
//   Mutex mu_;
//   int count_ ABSL_GUARDED_BY(mu_);
//   { MutexLock lock(&mu_); ++count_; cv_.NotifyAll(); }
//   { MutexLock lock(&mu_); cv_.WaitFor(&mu_, absl::Seconds(1), [&] { return count_ > 0; }); }

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "absl/base/thread_annotations.h"
#include "absl/time/time.h"

namespace moleserve::engine {

class ABSL_LOCKABLE Mutex {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() { mu_.lock(); }
  void Unlock() ABSL_UNLOCK_FUNCTION() { mu_.unlock(); }
  // For CondVar only.
  std::mutex& native() { return mu_; }

 private:
  std::mutex mu_;
};

class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* mu_;
};

class CondVar {
 public:
  void NotifyOne() { cv_.notify_one(); }
  void NotifyAll() { cv_.notify_all(); }
  // Waits until pred() holds or timeout passes; returns pred(). `mu` must be held.
  template <typename Pred>
  bool WaitFor(Mutex* mu, absl::Duration timeout, Pred pred) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    std::unique_lock<std::mutex> lock(mu->native(), std::adopt_lock);
    bool ok = true;
    if (timeout >= absl::Hours(24 * 365)) {  // "forever": wait_for would overflow the clock
      cv_.wait(lock, pred);
    } else {
      ok = cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), pred);
    }
    lock.release();  // still held by the caller's MutexLock
    return ok;
  }

 private:
  std::condition_variable cv_;
};

}  // namespace moleserve::engine
