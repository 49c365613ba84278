#include "engine/tokenizer/bpe.h"

#include <algorithm>
#include <queue>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "engine/tokenizer/utf8.h"

namespace moleserve::engine {
namespace {

absl::string_view AsAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// One symbol of a word being merged (HF `Symbol`): a token id and its neighbours in a doubly
// linked list over the initial positions; len == 0 marks a symbol merged into its left neighbour.
struct Symbol {
  int32_t id;
  int prev;
  int next;
  size_t len;
};

// A candidate merge of the symbol at `pos` with its right neighbour.
struct Candidate {
  int32_t rank;
  int pos;
  int32_t new_id;
};

// Lowest rank first, then leftmost (HF's `Merge` ordering on a max-heap).
struct CandidateAfter {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(
    std::vector<std::pair<std::string, int32_t>> vocab,
    const std::vector<std::pair<std::string, std::string>>& merges, Options options) {
  auto model = std::unique_ptr<BpeModel>(new BpeModel());
  std::sort(vocab.begin(), vocab.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });
  model->piece_to_id_.reserve(vocab.size());
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (i > 0 && vocab[i].second == vocab[i - 1].second) {
      return absl::InvalidArgumentError(absl::StrCat("model.vocab gives id ", vocab[i].second,
                                                     " to both '", vocab[i - 1].first, "' and '",
                                                     vocab[i].first, "'"));
    }
    if (!model->piece_to_id_.emplace(vocab[i].first, vocab[i].second).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("model.vocab has '", vocab[i].first, "' twice"));
    }
  }
  model->merges_.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& [left, right] = merges[rank];
    const auto l = model->piece_to_id_.find(left);
    const auto r = model->piece_to_id_.find(right);
    const auto m = model->piece_to_id_.find(absl::StrCat(left, right));
    if (l == model->piece_to_id_.end() || r == model->piece_to_id_.end() ||
        m == model->piece_to_id_.end()) {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", rank, "] '", left, " ", right,
                                                     "' uses a token that is not in model.vocab"));
    }
    model->merges_.insert_or_assign(PairKey(l->second, r->second),
                                    MergeTarget{static_cast<int32_t>(rank), m->second});
  }
  model->byte_tokens_.assign(256, -1);
  if (options.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      const auto it = model->piece_to_id_.find(absl::StrFormat("<0x%02X>", b));
      if (it != model->piece_to_id_.end()) model->byte_tokens_[b] = it->second;
    }
  }
  model->vocab_ = std::move(vocab);
  model->options_ = std::move(options);
  return model;
}

std::optional<int32_t> BpeModel::PieceToId(std::string_view piece) const {
  const auto it = piece_to_id_.find(AsAbsl(piece));
  if (it == piece_to_id_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::pair<int32_t, int32_t>> BpeModel::MergesByRank() const {
  std::vector<std::pair<int32_t, std::pair<int32_t, int32_t>>> ranked;
  ranked.reserve(merges_.size());
  for (const auto& [key, target] : merges_) {
    ranked.push_back(
        {target.rank, {static_cast<int32_t>(key >> 32), static_cast<int32_t>(key & 0xFFFFFFFF)}});
  }
  std::sort(ranked.begin(), ranked.end());
  std::vector<std::pair<int32_t, int32_t>> out;
  out.reserve(ranked.size());
  for (const auto& [rank, pair] : ranked) out.push_back(pair);
  return out;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    MutexLock lock(&cache_mu_);
    const auto it = cache_.find(AsAbsl(word));
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out->size();
  TokenizeUncached(word, out);
  if (cacheable) {
    MutexLock lock(&cache_mu_);
    if (cache_.size() < kMaxCacheEntries) {
      cache_.emplace(std::string(word), std::vector<int32_t>(out->begin() + first, out->end()));
    }
  }
}

void BpeModel::TokenizeUncached(std::string_view word, std::vector<int32_t>* out) const {
  if (options_.ignore_merges) {
    if (const auto it = piece_to_id_.find(AsAbsl(word)); it != piece_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }

  // Initial symbols: one per character (HF `merge_word`).
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto add = [&](int32_t id, size_t len) {
    const int index = static_cast<int>(symbols.size());
    if (index > 0) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, len});
  };
  // Byte length of the run of unknown characters waiting to be emitted as unk (0: none).
  size_t pending_unk_len = 0;
  size_t i = 0;
  while (i < word.size()) {
    char32_t cp;
    size_t len = DecodeCodePoint(word, i, &cp);
    if (len == 0) len = 1;  // Not reached for valid UTF-8; keeps the loop total.
    const std::string_view ch = word.substr(i, len);
    i += len;
    if (const auto it = piece_to_id_.find(AsAbsl(ch)); it != piece_to_id_.end()) {
      if (pending_unk_len > 0) {
        add(*options_.unk_id, pending_unk_len);
        pending_unk_len = 0;
      }
      add(it->second, len);
      continue;
    }
    if (options_.byte_fallback) {
      const bool all_bytes = std::all_of(
          ch.begin(), ch.end(), [&](char c) { return byte_tokens_[static_cast<uint8_t>(c)] >= 0; });
      if (all_bytes) {
        // NOTE: like HF, a pending unk is not flushed here; it is emitted after these bytes.
        for (char c : ch) add(byte_tokens_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (options_.unk_id.has_value()) {
      if (pending_unk_len > 0 && options_.fuse_unk) {
        pending_unk_len += len;
      } else {
        if (pending_unk_len > 0) add(*options_.unk_id, pending_unk_len);
        pending_unk_len = len;
      }
    }
    // Without an unk token the character is dropped, as in HF.
  }
  if (pending_unk_len > 0) add(*options_.unk_id, pending_unk_len);

  // HF `Word::merge_all`.
  std::priority_queue<Candidate, std::vector<Candidate>, CandidateAfter> queue;
  for (size_t k = 0; k + 1 < symbols.size(); ++k) {
    const auto it = merges_.find(PairKey(symbols[k].id, symbols[k + 1].id));
    if (it != merges_.end()) {
      queue.push({it->second.rank, static_cast<int>(k), it->second.new_id});
    }
  }
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& current = symbols[top.pos];
    if (current.len == 0 || current.next == -1) continue;
    const int next_pos = current.next;
    const Symbol right = symbols[next_pos];
    // Skip expired entries: the pair at `pos` must still merge into the same token.
    const auto it = merges_.find(PairKey(current.id, right.id));
    if (it == merges_.end() || it->second.new_id != top.new_id) continue;

    current.id = top.new_id;
    current.len += right.len;
    current.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = top.pos;

    if (current.prev >= 0) {
      const auto left = merges_.find(PairKey(symbols[current.prev].id, current.id));
      if (left != merges_.end()) {
        queue.push({left->second.rank, current.prev, left->second.new_id});
      }
    }
    if (current.next >= 0) {
      const auto after = merges_.find(PairKey(current.id, symbols[current.next].id));
      if (after != merges_.end()) queue.push({after->second.rank, top.pos, after->second.new_id});
    }
  }
  for (const Symbol& s : symbols) {
    if (s.len != 0) out->push_back(s.id);
  }
}

}  // namespace moleserve::engine
