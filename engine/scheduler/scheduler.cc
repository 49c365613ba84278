#include "engine/scheduler/scheduler.h"

#include <algorithm>

#include "engine/core/check.h"

namespace moleserve::engine {

Scheduler::Scheduler(const SchedulerOptions& options, BlockManager* blocks)
    : options_(options), blocks_(blocks) {
  MOLE_CHECK(options.max_num_seqs > 0 && options.max_batch_tokens >= options.max_num_seqs);
}

Scheduler::~Scheduler() {
  while (!running_.empty()) Remove(running_.back().get());
}

int32_t Scheduler::BlocksNeeded(const Sequence& seq) const {
  const int32_t n =
      blocks_->BlocksFor(int64_t{seq.prompt_len} + seq.request.stopping.max_new_tokens);
  return seq.xlora ? 2 * n : n;  // X-LoRA: the scaling pass has its own KV
}

void Scheduler::Enqueue(std::unique_ptr<Sequence> seq) { waiting_.push_back(std::move(seq)); }

std::vector<ScheduledChunk> Scheduler::Schedule(absl::Time now) {
  std::vector<ScheduledChunk> step;
  int32_t budget = options_.max_batch_tokens;
  for (const auto& seq : running_) {
    if (budget == 0) break;
    const int32_t remaining = seq->uncomputed();
    if (remaining == 0) continue;
    const int32_t n = std::min(remaining, budget);
    step.push_back({seq.get(), n, n == remaining});
    budget -= n;
  }
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_num_seqs) {
    Sequence* seq = waiting_.front().get();
    const int32_t need = BlocksNeeded(*seq);
    if (!blocks_->Reserve(need)) break;  // FCFS: the head waits for blocks
    seq->reserved_blocks = need;
    seq->admitted = now;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
    const int32_t n = std::min(seq->uncomputed(), budget);
    step.push_back({seq, n, n == seq->uncomputed()});
    budget -= n;
  }
  return step;
}

void Scheduler::EnsureBlocks(Sequence* seq, int32_t positions) {
  const int32_t need = blocks_->BlocksFor(positions);
  while (static_cast<int32_t>(seq->blocks.size()) < need) {
    MOLE_CHECK_MSG(seq->reserved_blocks > 0, "sequence outgrew its KV reservation");
    seq->blocks.push_back(blocks_->AllocateReserved());
    --seq->reserved_blocks;
  }
  while (seq->xlora && !seq->frozen_scalings &&
         static_cast<int32_t>(seq->aux_blocks.size()) < need) {
    MOLE_CHECK_MSG(seq->reserved_blocks > 0, "sequence outgrew its KV reservation");
    seq->aux_blocks.push_back(blocks_->AllocateReserved());
    --seq->reserved_blocks;
  }
}

void Scheduler::ReleaseAuxBlocks(Sequence* seq) {
  // Half of the reservation was for the scaling pass's KV: give back what it did not take.
  const int32_t aux_total = BlocksNeeded(*seq) / 2;
  const int32_t untaken = aux_total - static_cast<int32_t>(seq->aux_blocks.size());
  MOLE_CHECK_MSG(untaken >= 0 && untaken <= seq->reserved_blocks, "aux KV accounting broken");
  blocks_->Free(seq->aux_blocks);
  seq->aux_blocks.clear();
  blocks_->Unreserve(untaken);
  seq->reserved_blocks -= untaken;
}

std::unique_ptr<Sequence> Scheduler::Remove(Sequence* seq) {
  std::unique_ptr<Sequence> out;
  auto rit =
      std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s.get() == seq; });
  if (rit != running_.end()) {
    out = std::move(*rit);
    running_.erase(rit);
  } else {
    auto wit = std::find_if(waiting_.begin(), waiting_.end(),
                            [&](const auto& s) { return s.get() == seq; });
    MOLE_CHECK_MSG(wit != waiting_.end(), "Remove of an unknown sequence");
    out = std::move(*wit);
    waiting_.erase(wit);
  }
  blocks_->Free(out->blocks);
  out->blocks.clear();
  blocks_->Free(out->aux_blocks);
  out->aux_blocks.clear();
  blocks_->Unreserve(out->reserved_blocks);
  out->reserved_blocks = 0;
  return out;
}

}  // namespace moleserve::engine
