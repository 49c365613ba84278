#pragma once

// BpeModel: the "model" of a tokenizer.json of type BPE. It turns one word (a pre-token, already
// normalized and pre-tokenized, e.g. "Ġhello" for ByteLevel or "▁hello" for Metaspace) into token
// ids exactly as Hugging Face tokenizers' `BPE::tokenize` does:
//
//   1. ignore_merges: a word that is itself in the vocabulary is that one token (Llama 3).
//   2. Every character becomes its vocabulary token. A character that has none becomes its
//      UTF-8 bytes as <0xXX> tokens when byte_fallback is set and all of them exist (Llama 2,
//      Mistral), else the unk token (consecutive unknowns fused into one when fuse_unk is set),
//      else it is dropped.
//   3. Merges are applied lowest rank first, leftmost first among equal ranks, until none
//      applies (HF's priority-queue algorithm, replicated step by step including how it skips
//      stale queue entries).
//
// Words up to kMaxCachedWordBytes are cached (HF caches too); the cache never changes results.
//
// Thread safety: immutable after Create() except for the internal cache, which is guarded by a
// mutex; Tokenize may be called concurrently.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/core/mutex.h"

namespace moleserve::engine {

class BpeModel {
 public:
  struct Options {
    // The unk token's name (as in tokenizer.json) and id; without an id unknown characters that
    // byte fallback cannot cover are dropped.
    std::optional<std::string> unk_token;
    std::optional<int32_t> unk_id;
    bool fuse_unk = false;
    bool byte_fallback = false;
    bool ignore_merges = false;
  };

  static constexpr size_t kMaxCachedWordBytes = 256;
  static constexpr size_t kMaxCacheEntries = 1 << 16;

  // `vocab`: (piece, id) pairs with distinct pieces and ids. `merges`: (left, right) pairs in
  // rank order (rank = index); a later duplicate of a pair replaces the earlier rank, as in HF.
  // Errors: kInvalidArgument for duplicate pieces or ids, or a merge whose parts or result are
  // not in the vocabulary.
  static absl::StatusOr<std::unique_ptr<BpeModel>> Create(
      std::vector<std::pair<std::string, int32_t>> vocab,
      const std::vector<std::pair<std::string, std::string>>& merges, Options options);

  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of `word` (valid UTF-8) to `out`.
  void Tokenize(std::string_view word, std::vector<int32_t>* out) const;

  // The id of vocabulary piece `piece`, if any.
  [[nodiscard]] std::optional<int32_t> PieceToId(std::string_view piece) const;

  // Model vocabulary sorted by id.
  const std::vector<std::pair<std::string, int32_t>>& vocab() const { return vocab_; }
  // Merges as (left id, right id), in rank order.
  [[nodiscard]] std::vector<std::pair<int32_t, int32_t>> MergesByRank() const;
  const Options& options() const { return options_; }

 private:
  struct MergeTarget {
    int32_t rank;
    int32_t new_id;
  };

  BpeModel() = default;

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  // The uncached algorithm.
  void TokenizeUncached(std::string_view word, std::vector<int32_t>* out) const;

  Options options_;
  std::vector<std::pair<std::string, int32_t>> vocab_;
  absl::flat_hash_map<std::string, int32_t> piece_to_id_;
  absl::flat_hash_map<uint64_t, MergeTarget> merges_;
  // Id of "<0xXX>" for each byte, -1 where the vocabulary lacks it.
  std::vector<int32_t> byte_tokens_;

  mutable Mutex cache_mu_;
  // word -> ids, for words of at most kMaxCachedWordBytes; stops growing at kMaxCacheEntries.
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_ ABSL_GUARDED_BY(cache_mu_);
};

}  // namespace moleserve::engine
