#pragma once

// Batch: the flat input of one forward pass (one Step). Tokens of all sequences of the step,
// prefill chunks and decode tokens mixed, are concatenated; each token knows its sequence and its
// position. Layout (T tokens, S sequences):
//   tokens[T], positions[T], token_seq[T] (0..S-1)
//   block_tables: the KV block ids of sequence s are
//                 block_tables[block_table_offsets[s] .. block_table_offsets[s+1])
//   sample_rows[N]: indices into tokens whose next-token logits are wanted (the last token of each
//                   sequence that finishes its known tokens this step).
// Invariant: for every token t, the block table of token_seq[t] covers positions[t].

#include <cstdint>
#include <vector>

namespace moleserve::engine {

struct Batch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> token_seq;
  std::vector<int32_t> block_tables;
  std::vector<int32_t> block_table_offsets{0};
  std::vector<int32_t> sample_rows;

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(block_table_offsets.size()) - 1; }
  void Clear() {
    tokens.clear();
    positions.clear();
    token_seq.clear();
    block_tables.clear();
    block_table_offsets.assign(1, 0);
    sample_rows.clear();
  }
};

}  // namespace moleserve::engine
