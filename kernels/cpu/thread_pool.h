#pragma once

// A fixed pool of worker threads for the CPU kernels' data parallelism.
//
// Lifecycle: constructed with N threads (N - 1 workers plus the caller), destroyed when the owner
// (the CPU backend) goes away. ParallelFor blocks until every chunk ran.
// Thread safety: ParallelFor may be called from one thread at a time (the engine loop); calls
// from several threads at once are serialized by an internal mutex.

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moleserve::kernels::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end) over [0, n) split into contiguous chunks, one per thread at most.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void WorkerLoop(int index);

  std::mutex call_mu_;  // serializes ParallelFor callers
  std::mutex mu_;       // guards everything below
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// Runs fn over [0, n) on pool, or inline when pool is null.
inline void ParallelFor(ThreadPool* pool, int64_t n,
                        const std::function<void(int64_t, int64_t)>& fn) {
  if (pool == nullptr || n <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  pool->ParallelFor(n, fn);
}

}  // namespace moleserve::kernels::cpu
