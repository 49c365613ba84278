#include "engine/kv_cache/block_manager.h"

#include "engine/core/check.h"

namespace moleserve::engine {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  MOLE_CHECK(num_blocks > 0 && block_size > 0);
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

bool BlockManager::Reserve(int32_t n) {
  MOLE_CHECK(n >= 0);
  if (num_free() - reserved_ < n) return false;
  reserved_ += n;
  return true;
}

void BlockManager::Unreserve(int32_t n) {
  MOLE_CHECK(n >= 0 && n <= reserved_);
  reserved_ -= n;
}

int32_t BlockManager::AllocateReserved() {
  MOLE_CHECK_MSG(reserved_ > 0 && !free_.empty(), "AllocateReserved without a reservation");
  --reserved_;
  const int32_t b = free_.back();
  free_.pop_back();
  return b;
}

void BlockManager::Free(absl::Span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    MOLE_DCHECK(b >= 0 && b < num_blocks_);
    free_.push_back(b);
  }
  MOLE_CHECK(static_cast<int32_t>(free_.size()) <= num_blocks_);
}

}  // namespace moleserve::engine
