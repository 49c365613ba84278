#pragma once

// Scheduler: iteration-level continuous batching (one decision per Step).
//
// Queue discipline (this version): first come, first served. A step takes, within the token
// budget, one decode token of every running sequence and the next prefill chunk of sequences
// still prefilling (chunked prefill: a long prompt spans several steps), then admits waiting
// sequences in arrival order while the sequence limit, the budget and the KV blocks allow.
// Admission reserves the KV blocks of prompt + max_new_tokens, so a running sequence never
// runs out of blocks (no preemption needed).
//
// State machine of a sequence: waiting --admit--> running --Remove--> gone (blocks freed).
// Thread safety: not thread-safe; the engine loop owns it.

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "engine/kv_cache/block_manager.h"
#include "engine/scheduler/sequence.h"

namespace moleserve::engine {

struct SchedulerOptions {
  int32_t max_batch_tokens = 2048;  // tokens per step (>= max_num_seqs)
  int32_t max_num_seqs = 64;        // running sequences at once
};

// Part of a step: `num_tokens` uncomputed tokens of `seq`, starting at seq->num_computed.
// `sample` is true when the chunk reaches the end of the sequence's known tokens.
struct ScheduledChunk {
  Sequence* seq;
  int32_t num_tokens;
  bool sample;
};

class Scheduler {
 public:
  Scheduler(const SchedulerOptions& options, BlockManager* blocks);
  ~Scheduler();

  // Blocks `seq` needs reserved for its whole life (prompt + max_new_tokens; twice that for
  // X-LoRA, whose scaling pass keeps its own KV).
  int32_t BlocksNeeded(const Sequence& seq) const;

  void Enqueue(std::unique_ptr<Sequence> seq);
  // Decides the next step; empty when there is nothing to run. Newly admitted sequences get
  // their `admitted` time set to `now`.
  std::vector<ScheduledChunk> Schedule(absl::Time now);
  // Takes blocks from the reservation so seq's table covers `positions` positions.
  void EnsureBlocks(Sequence* seq, int32_t positions);
  // X-LoRA sequence whose scalings were just frozen: frees its scaling-pass KV blocks and the
  // part of its reservation they had not taken yet.
  void ReleaseAuxBlocks(Sequence* seq);
  // Removes a sequence (waiting or running), returning its blocks; returns ownership.
  std::unique_ptr<Sequence> Remove(Sequence* seq);

  const std::deque<std::unique_ptr<Sequence>>& waiting() const { return waiting_; }
  const std::vector<std::unique_ptr<Sequence>>& running() const { return running_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }

 private:
  SchedulerOptions options_;
  BlockManager* blocks_;  // not owned
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order
};

}  // namespace moleserve::engine
