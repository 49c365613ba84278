#pragma once

// BlockManager: the paged KV cache's physical blocks (vLLM-style, block_size tokens each), with
// an optional prefix cache.
//
// A block is free, reserved (promised to a sequence that has not used it yet), in use (holds K/V
// rows that `refs` sequences read) or evictable (no sequence uses it, but it holds the computed
// KV of a registered prefix). The scheduler reserves and takes blocks as positions advance (and
// reserves an X-LoRA sequence's whole life at admission), and releases them when the sequence
// leaves or is preempted.
//
//   free --Reserve, AllocateReserved--> in use (refs 1) --Release, refs 0--> free
//   in use --Register(hash)--> in use, registered --Release, refs 0--> evictable
//   evictable --Match--> in use (refs + 1)      in use, registered --Match--> refs + 1
//   evictable --AllocateReserved when no block is free (least recently released first)-->
//     in use by its new owner, its registration dropped (an eviction)
//
// Prefix cache (vLLM's automatic prefix caching): a full block whose KV is computed is
// registered under a chain hash, ChainHash(parent's hash, its tokens, key), where `key` names
// everything else the KV depends on (the adapter and its version, the routing override; see
// Scheduler). A sequence admitted later with the same tokens and key takes the registered blocks
// by reference (Match) instead of computing them. Evictable blocks count as available: a
// reservation can always be met, by evicting. Match never takes an evictable block that a
// reservation already counts on.
// Thread safety: not thread-safe; owned and used by the engine loop only.

#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "absl/types/span.h"

namespace moleserve::engine {

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return num_blocks_; }
  // Blocks a reservation may take: free ones and evictable ones.
  int32_t num_free() const { return static_cast<int32_t>(free_.size() + lru_.size()); }
  int32_t num_reserved() const { return reserved_; }
  int32_t num_allocated() const { return num_blocks_ - num_free(); }
  // Registered blocks (in use or evictable), and of those the evictable ones.
  int32_t num_cached() const { return static_cast<int32_t>(registered_.size()); }
  int32_t num_evictable() const { return static_cast<int32_t>(lru_.size()); }
  // Registered blocks evicted so far (their KV overwritten by a new owner).
  int64_t evictions() const { return evictions_; }
  // Allocated fraction, 0..1 (the `kv_cache_usage` gauge).
  double Usage() const { return static_cast<double>(num_allocated()) / num_blocks_; }

  // Blocks needed to hold `tokens` positions.
  int32_t BlocksFor(int64_t tokens) const {
    return static_cast<int32_t>((tokens + block_size_ - 1) / block_size_);
  }

  // Promises n blocks; false (and no change) when fewer than n are available and unpromised.
  [[nodiscard]] bool Reserve(int32_t n);
  // Returns n unused promised blocks.
  void Unreserve(int32_t n);
  // Takes one promised block (a free one, else the least recently released evictable one).
  // Requires a reservation (checked).
  int32_t AllocateReserved();
  // Drops one reference to each block: at 0 a registered block becomes evictable, any other
  // free. Blocks are released last to first (a sequence's table), so a chain's later blocks are
  // evicted before its first ones, which every later match needs.
  void Release(absl::Span<const int32_t> blocks);

  // The hash of a full block of `tokens` after the prefix hashed `parent` (0 for the first
  // block), under `key` (nonzero).
  static uint64_t ChainHash(uint64_t parent, absl::Span<const int32_t> tokens, uint64_t key);
  // The registered blocks of the longest prefix of `hashes` (hashes[i] = the chain hash of full
  // block i of `tokens` under `key`), each with one more reference; an evictable one is taken
  // only while an unpromised block remains beside it. A hash alone never matches: the block's
  // parent, tokens and key must equal the registration's, so a hash collision is a miss.
  std::vector<int32_t> Match(absl::Span<const uint64_t> hashes, absl::Span<const int32_t> tokens,
                             uint64_t key);
  // Registers `block` (in use, full, its KV computed) under `hash` = ChainHash(parent, tokens,
  // key). False when the hash already has a block (this one stays private) or `block` is
  // registered already.
  bool Register(int32_t block, uint64_t hash, uint64_t parent, absl::Span<const int32_t> tokens,
                uint64_t key);
  // For tests: a block's references, and whether it is registered.
  int32_t refs(int32_t block) const { return refs_[block]; }
  bool registered(int32_t block) const { return hash_of_[block] != 0; }

 private:
  int32_t num_blocks_;
  int32_t block_size_;
  int32_t reserved_ = 0;
  std::vector<int32_t> free_;  // stack; the lowest ids are handed out first
  std::vector<int32_t> refs_;  // per block
  // Registration: hash -> block, and per block its hash (0 = not registered) and what the hash
  // was made of (checked by Match).
  std::unordered_map<uint64_t, int32_t> registered_;
  std::vector<uint64_t> hash_of_;
  struct Content {
    uint64_t parent = 0;
    uint64_t key = 0;
    std::vector<int32_t> tokens;
  };
  std::vector<Content> content_;
  // Evictable blocks, least recently released first, and each one's place in the list.
  std::list<int32_t> lru_;
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<uint8_t> in_lru_;
  int64_t evictions_ = 0;
};

}  // namespace moleserve::engine
