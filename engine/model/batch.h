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
//
// MoLE fields (all empty = every sequence runs the base model):
//   seq_adapter[S]: the model's adapter slot of each sequence (-1 = base model).
//   seq_override[S]: index into overrides (a per-request routing override), -1 = none.
//   seq_return_routing[S]: record the routing of the sequence's sample rows.
//   X-LoRA sequences also have a second KV block table for the scaling pass (same layout:
//   aux_block_tables[aux_block_table_offsets[s] .. [s+1]), empty for other sequences), unless
//   seq_frozen_scalings[s] holds their frozen scalings (then no scaling pass runs for them).

#include <cstdint>
#include <vector>

#include "engine/routing/routing.h"

namespace moleserve::engine {

struct Batch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> token_seq;
  std::vector<int32_t> block_tables;
  std::vector<int32_t> block_table_offsets{0};
  std::vector<int32_t> sample_rows;

  std::vector<int32_t> seq_adapter;
  std::vector<int32_t> seq_override;
  std::vector<RoutingOverride> overrides;
  std::vector<uint8_t> seq_return_routing;
  std::vector<int32_t> aux_block_tables;
  std::vector<int32_t> aux_block_table_offsets{0};
  std::vector<const std::vector<float>*> seq_frozen_scalings;

  int32_t num_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(block_table_offsets.size()) - 1; }
  void Clear() {
    tokens.clear();
    positions.clear();
    token_seq.clear();
    block_tables.clear();
    block_table_offsets.assign(1, 0);
    sample_rows.clear();
    seq_adapter.clear();
    seq_override.clear();
    overrides.clear();
    seq_return_routing.clear();
    aux_block_tables.clear();
    aux_block_table_offsets.assign(1, 0);
    seq_frozen_scalings.clear();
  }
};

}  // namespace moleserve::engine
