#include "engine/model/sgmv_runner.h"

#include <algorithm>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {

absl::Status SgmvRunner::Grow(DeviceBuffer* buf, size_t bytes) {
  if (buf->bytes() >= bytes) return absl::OkStatus();
  ASSIGN_OR_RETURN(*buf, backend_->Allocate(std::max(bytes, buf->bytes() * 2)));
  return absl::OkStatus();
}

void SgmvRunner::ReleasePins() {
  for (const auto& [stack, expert] : pins_) cache_->Release(stack, expert);
  pins_.clear();
}

absl::StatusOr<SgmvRunner::Call> SgmvRunner::Upload(const std::vector<Segment>& segments,
                                                    size_t* next) {
  std::vector<int32_t> x_rows, y_rows, orders, seg_start{0}, seg_rank;
  std::vector<float> weights;
  std::vector<int64_t> seg_off;
  std::vector<const void*> a_rows, b_rows;
  Call call;
  // Pin the segments' experts in order; stop at the first that does not fit next to the pinned
  // ones (the caller runs this part and comes back for the rest).
  for (; *next < segments.size(); ++*next) {
    const Segment& s = segments[*next];
    if (s.pairs.empty()) continue;
    const int32_t rank = s.lora->rank;
    const size_t rows_before = a_rows.size();
    absl::Status pinned = cache_->Acquire(s.lora, s.expert, &a_rows, &b_rows);
    if (absl::IsResourceExhausted(pinned) && !pins_.empty()) {
      ++splits_;
      break;
    }
    RETURN_IF_ERROR(pinned);
    pins_.push_back({s.lora, s.expert});
    seg_off.push_back(static_cast<int64_t>(rows_before));
    for (const Pair& p : s.pairs) {
      x_rows.push_back(p.x_row);
      y_rows.push_back(p.y_row);
      orders.push_back(p.order);
      weights.push_back(p.weight);
    }
    seg_start.push_back(static_cast<int32_t>(x_rows.size()));
    seg_rank.push_back(rank);
    call.v_stride = std::max(call.v_stride, rank);
  }
  call.num_segments = static_cast<int32_t>(seg_rank.size());
  call.num_pairs = static_cast<int64_t>(x_rows.size());
  if (call.num_segments == 0) return call;
  // The expand is owned by output rows: each distinct y row (in first-use order) lists its
  // pairs, ordered by Pair::order (then pair order), and sums them before adding once.
  std::vector<int32_t> row_y, row_count, row_of(call.num_pairs);
  {
    absl::flat_hash_map<int32_t, int32_t> index;
    for (int64_t q = 0; q < call.num_pairs; ++q) {
      auto [it, fresh] = index.try_emplace(y_rows[q], static_cast<int32_t>(row_y.size()));
      if (fresh) {
        row_y.push_back(y_rows[q]);
        row_count.push_back(0);
      }
      row_of[q] = it->second;
      ++row_count[it->second];
    }
  }
  call.num_rows = static_cast<int64_t>(row_y.size());
  call.pair_stride = *std::max_element(row_count.begin(), row_count.end());
  std::vector<int32_t> row_pair(call.num_rows * call.pair_stride, 0);
  std::fill(row_count.begin(), row_count.end(), 0);
  for (int64_t q = 0; q < call.num_pairs; ++q) {
    const int32_t r = row_of[q];
    row_pair[int64_t{r} * call.pair_stride + row_count[r]++] = static_cast<int32_t>(q);
  }
  for (int64_t r = 0; r < call.num_rows; ++r) {
    int32_t* list = row_pair.data() + r * call.pair_stride;
    std::stable_sort(list, list + row_count[r],
                     [&](int32_t a, int32_t b) { return orders[a] < orders[b]; });
  }
  struct Upload {
    DeviceBuffer* buf;
    const void* src;
    size_t bytes;
  };
  for (const Upload& u : {Upload{&pair_x_, x_rows.data(), x_rows.size() * 4},
                          Upload{&row_y_, row_y.data(), row_y.size() * 4},
                          Upload{&row_pair_, row_pair.data(), row_pair.size() * 4},
                          Upload{&row_count_, row_count.data(), row_count.size() * 4},
                          Upload{&pair_w_, weights.data(), weights.size() * 4},
                          Upload{&seg_start_, seg_start.data(), seg_start.size() * 4},
                          Upload{&seg_rank_, seg_rank.data(), seg_rank.size() * 4},
                          Upload{&seg_off_, seg_off.data(), seg_off.size() * 8},
                          Upload{&a_rows_, a_rows.data(), a_rows.size() * sizeof(void*)},
                          Upload{&b_rows_, b_rows.data(), b_rows.size() * sizeof(void*)}}) {
    RETURN_IF_ERROR(Grow(u.buf, u.bytes));
    RETURN_IF_ERROR(backend_->CopyToDevice(u.buf->data(), u.src, u.bytes));
  }
  RETURN_IF_ERROR(Grow(&v_, call.num_pairs * call.v_stride * sizeof(float)));
  return call;
}

absl::Status SgmvRunner::Shrink(const Call& call, const void* x, int64_t in) {
  return backend_->SgmvShrink({.x = x,
                               .v = v_.as<float>(),
                               .x_row = pair_x_.as<int32_t>(),
                               .seg_start = seg_start_.as<int32_t>(),
                               .seg_rank = seg_rank_.as<int32_t>(),
                               .seg_row_offset = seg_off_.as<int64_t>(),
                               .a_rows = a_rows_.as<const void*>(),
                               .num_segments = call.num_segments,
                               .in = in,
                               .v_stride = call.v_stride,
                               .dtype = dt_,
                               .max_pairs = kernels::PairsThatFit(v_.bytes(), call.v_stride)});
}

absl::Status SgmvRunner::Expand(const Call& call, void* y, int64_t out, int64_t y_stride,
                                const float* v) {
  return backend_->SgmvExpandRows({.v = v != nullptr ? v : v_.as<float>(),
                                   .y = y,
                                   .y_row = row_y_.as<int32_t>(),
                                   .token_pair = row_pair_.as<int32_t>(),
                                   .count = row_count_.as<int32_t>(),
                                   .weight = pair_w_.as<float>(),
                                   .seg_start = seg_start_.as<int32_t>(),
                                   .seg_rank = seg_rank_.as<int32_t>(),
                                   .seg_row_offset = seg_off_.as<int64_t>(),
                                   .b_rows = b_rows_.as<const void*>(),
                                   .num_tokens = call.num_rows,
                                   .pair_stride = call.pair_stride,
                                   .num_segments = call.num_segments,
                                   .out = out,
                                   .v_stride = call.v_stride,
                                   .dtype = dt_,
                                   .y_stride = y_stride});
}

absl::Status SgmvRunner::Run(const std::vector<Segment>& segments, const void* x, int64_t in,
                             void* y, int64_t out, int64_t y_stride) {
  // y accumulates, so a call split into parts (when the pinned experts fill the cache) adds up
  // to the same result.
  size_t next = 0;
  while (next < segments.size()) {
    absl::Cleanup unpin = [this] { ReleasePins(); };
    ASSIGN_OR_RETURN(Call call, Upload(segments, &next));
    if (call.num_segments == 0) continue;
    RETURN_IF_ERROR(Shrink(call, x, in));
    RETURN_IF_ERROR(Expand(call, y, out, y_stride));
  }
  return absl::OkStatus();
}

}  // namespace moleserve::engine
