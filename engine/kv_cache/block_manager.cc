#include "engine/kv_cache/block_manager.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "engine/core/check.h"

namespace moleserve::engine {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      refs_(num_blocks, 0),
      hash_of_(num_blocks, 0),
      content_(num_blocks),
      lru_pos_(num_blocks),
      in_lru_(num_blocks, 0) {
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
  MOLE_CHECK_MSG(reserved_ > 0 && num_free() > 0, "AllocateReserved without a reservation");
  --reserved_;
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {
    // Evict the least recently released cached block: its KV is about to be overwritten.
    b = lru_.front();
    lru_.pop_front();
    in_lru_[b] = 0;
    registered_.erase(hash_of_[b]);
    hash_of_[b] = 0;
    ++evictions_;
  }
  MOLE_DCHECK(refs_[b] == 0);
  refs_[b] = 1;
  return b;
}

void BlockManager::Release(absl::Span<const int32_t> blocks) {
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t b = *it;
    MOLE_CHECK(b >= 0 && b < num_blocks_ && refs_[b] > 0);
    if (--refs_[b] > 0) continue;
    if (hash_of_[b] != 0) {
      lru_pos_[b] = lru_.insert(lru_.end(), b);
      in_lru_[b] = 1;
    } else {
      free_.push_back(b);
    }
  }
  MOLE_CHECK(num_free() <= num_blocks_);
}

uint64_t BlockManager::ChainHash(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t key) {
  const uint64_t h = absl::Hash<std::tuple<uint64_t, absl::Span<const int32_t>, uint64_t>>{}(
      std::make_tuple(parent, tokens, key));
  return h == 0 ? 1 : h;  // 0 means "not registered"
}

std::vector<int32_t> BlockManager::Match(absl::Span<const uint64_t> hashes,
                                         absl::Span<const int32_t> tokens, uint64_t key) {
  std::vector<int32_t> out;
  for (size_t i = 0; i < hashes.size(); ++i) {
    auto it = registered_.find(hashes[i]);
    if (it == registered_.end()) break;
    const int32_t b = it->second;
    const Content& c = content_[b];
    const absl::Span<const int32_t> own = tokens.subspan(i * block_size_, block_size_);
    if (c.key != key || c.parent != (i == 0 ? 0 : hashes[i - 1]) ||
        !std::equal(c.tokens.begin(), c.tokens.end(), own.begin(), own.end())) {
      break;  // a hash collision: another prefix's block
    }
    if (in_lru_[b]) {
      // Taking it out of the evictable set must leave every reservation an available block.
      if (num_free() - 1 < reserved_) break;
      lru_.erase(lru_pos_[b]);
      in_lru_[b] = 0;
    }
    ++refs_[b];
    out.push_back(b);
  }
  return out;
}

bool BlockManager::Register(int32_t block, uint64_t hash, uint64_t parent,
                            absl::Span<const int32_t> tokens, uint64_t key) {
  MOLE_CHECK(block >= 0 && block < num_blocks_ && refs_[block] > 0 && hash != 0 &&
             static_cast<int32_t>(tokens.size()) == block_size_);
  if (hash_of_[block] != 0 || registered_.count(hash) > 0) return false;
  registered_.emplace(hash, block);
  hash_of_[block] = hash;
  content_[block] = {.parent = parent, .key = key, .tokens = {tokens.begin(), tokens.end()}};
  return true;
}

}  // namespace moleserve::engine
