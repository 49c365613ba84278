#pragma once

// What the benchmarks that drive an Engine share: a steady clock in seconds, a fatal status
// check, and a sink that counts a request's tokens and signals its end.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "engine/engine.h"

namespace moleserve::bench {

inline double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Ends the benchmark with a message naming `what` when s is not OK.
inline void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// Counts one request's tokens; `done` is notified at its end (error holds a failure).
struct Done : engine::GenerationSink {
  int64_t tokens = 0;
  absl::Status error;
  absl::Notification done;
  void OnChunk(engine::GenerationChunk chunk) override {
    tokens += static_cast<int64_t>(chunk.tokens.size());
  }
  void OnFinish(engine::GenerationChunk last, engine::FinishInfo) override {
    OnChunk(std::move(last));
    done.Notify();
  }
  void OnError(absl::Status s) override {
    error = std::move(s);
    done.Notify();
  }
};

}  // namespace moleserve::bench
