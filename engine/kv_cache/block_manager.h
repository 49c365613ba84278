#pragma once

// BlockManager: the paged KV cache's physical blocks (vLLM-style, block_size tokens each).
//
// A block is free, reserved (promised to a sequence that has not used it yet) or allocated (holds
// K/V rows of one sequence). The scheduler reserves and takes blocks as positions advance (and
// reserves an X-LoRA sequence's whole life at admission); all return to the free list when the
// sequence leaves or is preempted.
//   free --Reserve--> reserved --AllocateReserved--> allocated --Free--> free
//   reserved --Unreserve--> free
// Thread safety: not thread-safe; owned and used by the engine loop only.

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace moleserve::engine {

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return num_blocks_; }
  int32_t num_free() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_reserved() const { return reserved_; }
  int32_t num_allocated() const { return num_blocks_ - num_free(); }
  // Allocated fraction, 0..1 (the `kv_cache_usage` gauge).
  double Usage() const { return static_cast<double>(num_allocated()) / num_blocks_; }

  // Blocks needed to hold `tokens` positions.
  int32_t BlocksFor(int64_t tokens) const {
    return static_cast<int32_t>((tokens + block_size_ - 1) / block_size_);
  }

  // Promises n blocks; false (and no change) when fewer than n are free and unpromised.
  [[nodiscard]] bool Reserve(int32_t n);
  // Returns n unused promised blocks.
  void Unreserve(int32_t n);
  // Takes one promised block. Requires a reservation (checked).
  int32_t AllocateReserved();
  // Returns allocated blocks to the free list.
  void Free(absl::Span<const int32_t> blocks);

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int32_t reserved_ = 0;
  std::vector<int32_t> free_;  // stack; the lowest ids are handed out first
};

}  // namespace moleserve::engine
