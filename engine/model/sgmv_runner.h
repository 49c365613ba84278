#pragma once

// SgmvRunner: applies LoRA experts to (x row, y row, weight) pairs grouped by expert into
// segments, with one segmented shrink and one row-owned expand (Backend::SgmvShrink /
// SgmvExpandRows): y[y_row] += weight * B_e (A_e x[x_row]). The experts' rows come from the
// expert cache, pinned for the call (misses are copied in); when the pinned experts fill the
// cache, the call is split into parts that fit (splits()). A y row's pairs are summed before they
// are added (by Pair::order, then segment order), so a row is rounded once per call.
//
//   SgmvRunner sgmv(backend, &cache);
//   sgmv.Run(segments, x, in, y, out);          // the whole call, in parts when it must
//   // or, to transform v between the halves (rank routing):
//   Call c = *sgmv.Upload(segments, &next);  sgmv.Shrink(c, x, in);  ... v() ...
//   sgmv.Expand(c, y, out, /*y_stride=*/0, u);  sgmv.ReleasePins();
//
// Thread safety: none; the engine loop drives it. Device memory: owns its tables and v, grown on
// demand and kept.

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/expert_cache/expert_cache.h"

namespace moleserve::engine {

class SgmvRunner {
 public:
  struct Pair {
    int32_t x_row;
    int32_t y_row;
    float weight;
    // Pairs adding into one y row are summed in this order (then in segment order): a routed
    // pair's decision index, so a token's experts add up as on the device-routed paths.
    int32_t order = 0;
  };
  // One segment: an expert of a LoRA stack and its pairs.
  struct Segment {
    const LoraStack* lora;
    int32_t expert;
    std::vector<Pair> pairs;
  };
  // One call's shape after Upload put its tables on the device.
  struct Call {
    int32_t num_segments = 0;
    int64_t num_pairs = 0;
    int32_t v_stride = 0;
    int64_t num_rows = 0;     // distinct y rows, each with its pairs
    int32_t pair_stride = 0;  // the most pairs one y row has
  };

  SgmvRunner(Backend* backend, ExpertCache* cache)
      : backend_(backend), cache_(cache), dt_(backend->compute_dtype()) {}

  // Shrink + expand of `segments`: y[y_row] += w * B (A x[x_row]); x [*, in], y [*, y_stride]
  // (0: out).
  absl::Status Run(const std::vector<Segment>& segments, const void* x, int64_t in, void* y,
                   int64_t out, int64_t y_stride = 0);
  // Pins the experts of segments[*next...] (as many as fit; at least one) and uploads their pair
  // and row tables; advances *next past them. ReleasePins unpins them after the kernels.
  absl::StatusOr<Call> Upload(const std::vector<Segment>& segments, size_t* next);
  void ReleasePins();
  absl::Status Shrink(const Call& call, const void* x, int64_t in);  // v = A x[x_row]
  // y[y_row] += w B v over the uploaded per-row tables; v defaults to v().
  absl::Status Expand(const Call& call, void* y, int64_t out, int64_t y_stride = 0,
                      const float* v = nullptr);
  // The shrink's output [num_pairs, v_stride] (fp32).
  float* v() { return v_.as<float>(); }
  // Calls split because their experts did not fit the cache at once.
  int64_t splits() const { return splits_; }

 private:
  absl::Status Grow(DeviceBuffer* buf, size_t bytes);

  Backend* backend_;
  ExpertCache* cache_;
  ScalarType dt_;
  std::vector<std::pair<const LoraStack*, int32_t>> pins_;  // experts pinned by the current call
  int64_t splits_ = 0;
  DeviceBuffer v_, pair_x_, pair_w_, row_y_, row_pair_, row_count_, seg_start_, seg_rank_, seg_off_,
      a_rows_, b_rows_;
};

}  // namespace moleserve::engine
