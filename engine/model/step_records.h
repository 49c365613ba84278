#pragma once

// StepRecords: what a forward pass reports to the host besides the sampled tokens: the routing
// decisions of the tokens that asked for them (a RoutingRecord per routed site, in the order the
// pass visits the sites), and how many token-sites had undefined router logits.
//
// Decisions made on the host are recorded at once (Record). Decisions made on the device stay
// there: Keep copies them (an op) into this pass's record buffer and Defer leaves a placeholder;
// a planned pass writes them into a buffer of its own instead (UseDeviceWords). They come back
// with the step's results: IssueCopies queues the copies without waiting, and after the caller's
// synchronising copy, Collect fills the placeholders and reports undefined logits. Check does the
// same for the counter alone, with its own synchronising read.
//
//   records.Begin(record_index_per_token, num_records, /*may_route=*/true);
//   ... Record / Keep + Defer / MarkDeviceRouted while the pass runs ...
//   records.IssueCopies();  ... the step's synchronising copy ...  records.Collect();
//
// Thread safety: none; the engine loop drives it. Memory: owns its device and pinned buffers.

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/routing/routing.h"

namespace moleserve::engine {

class StepRecords {
 public:
  explicit StepRecords(Backend* backend) : backend_(backend) {}

  // Starts a pass: record[t] is token t's index into records(), -1 when it records nothing.
  // Zeroes the device's undefined-logits counter when the pass may route (some adapter token).
  absl::Status Begin(std::vector<int32_t> record, int32_t num_records, bool may_route);
  bool wants(int32_t token) const { return record_[token] >= 0; }

  // A decision made on the host: n experts and weights of `token` at (layer, module).
  void Record(int32_t token, int32_t layer, const char* module, const int32_t* experts,
              const float* weights, int32_t n);
  // Copies `words` 4-byte words of device memory (an op, in stream order) into the pass's record
  // buffer; returns their offset in words.
  absl::StatusOr<int64_t> Keep(const void* src, int64_t words);
  // A placeholder for `token`'s decision at (layer, module), filled by Collect from the words at
  // experts_at (ids), weights_at (-1: every weight 1) and count_at (-1: fixed_count of them).
  void Defer(int32_t token, int32_t layer, const char* module, int64_t experts_at,
             int64_t weights_at, int64_t count_at, int32_t fixed_count);
  // The pass's deferred words are the first `words` of `buf` (a planned pass's own buffer), not
  // Keep's buffer. `buf` must stay allocated until Collect.
  void UseDeviceWords(const DeviceBuffer* buf, int64_t words);

  // The device counter that routing kernels add undefined token-sites to, and the mark that some
  // group of this pass routes on the device (so IssueCopies brings the counter back).
  int32_t* undefined_counter() { return undefined_.as<int32_t>(); }
  void MarkDeviceRouted() { device_routed_ = true; }

  absl::Status IssueCopies();
  absl::Status Collect();
  absl::Status Check();

  std::vector<std::vector<RoutingRecord>>& records() { return records_; }

 private:
  struct Pending {
    int32_t record;      // index into records_
    size_t index;        // the placeholder's position in records_[record]
    int64_t experts_at;  // words: expert (or rank) ids
    int64_t weights_at;  // weights, or -1: every weight is 1
    int64_t count_at;    // the count, or -1: fixed_count
    int32_t fixed_count;
  };
  absl::Status UndefinedError(int32_t undefined) const;

  Backend* backend_;
  std::vector<int32_t> record_;
  std::vector<std::vector<RoutingRecord>> records_;
  std::vector<Pending> pending_;
  DeviceBuffer words_;     // Keep's buffer
  int64_t num_words_ = 0;  // used words (of words_, or of *source_)
  const DeviceBuffer* source_ = nullptr;
  DeviceBuffer undefined_, words_host_, undefined_host_;
  bool issued_ = false;
  bool device_routed_ = false;
};

}  // namespace moleserve::engine
