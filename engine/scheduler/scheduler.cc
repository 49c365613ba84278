#include "engine/scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "engine/core/check.h"

namespace moleserve::engine {
namespace {

// S-LoRA's virtual token counter weights: an output token costs twice an input token.
constexpr int64_t kPrefillWeight = 1;
constexpr int64_t kDecodeWeight = 2;
constexpr size_t kMaxPrefetchHint = 4;

// Higher priority first, then earlier arrival, then submission order.
bool Before(const Sequence& a, const Sequence& b) {
  if (a.request.priority != b.request.priority) return a.request.priority > b.request.priority;
  if (a.arrival != b.arrival) return a.arrival < b.arrival;
  return a.handle < b.handle;
}

// |a ∩ b| / |a| of two sorted key sets (0 when a is empty).
double Overlap(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  if (a.empty()) return 0;
  size_t i = 0, j = 0, common = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] == b[j]) {
      ++common, ++i, ++j;
    } else if (a[i] < b[j]) {
      ++i;
    } else {
      ++j;
    }
  }
  return static_cast<double>(common) / static_cast<double>(a.size());
}

}  // namespace

const char* SchedulingPolicyName(SchedulingPolicy p) {
  return p == SchedulingPolicy::kFcfs ? "fcfs" : "expert_aware";
}

bool ParseSchedulingPolicy(std::string_view name, SchedulingPolicy* out) {
  if (name == "fcfs") {
    *out = SchedulingPolicy::kFcfs;
    return true;
  }
  if (name == "expert_aware" || name == "expert-aware") {
    *out = SchedulingPolicy::kExpertAware;
    return true;
  }
  return false;
}

Scheduler::Scheduler(const SchedulerOptions& options, BlockManager* blocks,
                     const ExpertView* experts)
    : options_(options), blocks_(blocks), experts_(experts) {
  MOLE_CHECK(options.max_num_seqs > 0 && options.max_batch_tokens >= options.max_num_seqs);
  if (options_.fair_share_tokens <= 0) options_.fair_share_tokens = options_.max_batch_tokens;
  half_life_ = options_.fair_share_half_life > absl::ZeroDuration() ? options_.fair_share_half_life
                                                                    : absl::Seconds(1);
  max_bypass_ =
      options_.max_bypass > 0 ? options_.max_bypass : std::max(1, options_.max_num_seqs / 2);
  watermark_ = options.watermark_blocks >= 0 ? options.watermark_blocks
                                             : std::max(1, blocks->num_blocks() / 100);
}

Scheduler::~Scheduler() {
  while (!running_.empty()) Remove(running_.back().get());
  while (!waiting_.empty()) Remove(waiting_.back().get());
}

int32_t Scheduler::BlocksNeeded(const Sequence& seq) const {
  const int32_t n =
      blocks_->BlocksFor(int64_t{seq.prompt_len} + seq.request.stopping.max_new_tokens);
  return seq.xlora ? 2 * n : n;  // X-LoRA: the scaling pass has its own KV
}

double Scheduler::Served(int32_t slot) const {
  auto it = served_.find(slot);
  if (it == served_.end()) return 0;
  // Decayed with a half-life: what counts is recent service, so a popular adapter's lead over
  // the others stays bounded (it is held back only when it takes far more than its share).
  const double half_lives =
      absl::ToDoubleSeconds(now_ - it->second.at) / absl::ToDoubleSeconds(half_life_);
  return it->second.value * std::exp2(-std::max(0.0, half_lives));
}

int64_t Scheduler::ServedTokens(int32_t slot) const {
  return static_cast<int64_t>(std::llround(Served(slot)));
}

void Scheduler::SetServed(int32_t slot, double value) { served_[slot] = {value, now_}; }

bool Scheduler::AdapterActive(int32_t slot) const {
  auto it = active_.find(slot);
  return it != active_.end() && it->second > 0;
}

void Scheduler::ActivateAdapter(int32_t slot) {
  if (!AdapterActive(slot)) {
    // S-LoRA's lift: an adapter that was idle starts level with the least served active one, so
    // idleness is not banked as credit.
    double least = std::numeric_limits<double>::infinity();
    for (const auto& [s, n] : active_) {
      if (n > 0) least = std::min(least, Served(s));
    }
    if (std::isinf(least)) least = Served(kLastIdle);  // none active
    SetServed(slot, std::max(Served(slot), least));
  }
  ++active_[slot];
}

void Scheduler::Enqueue(std::unique_ptr<Sequence> seq) {
  ActivateAdapter(seq->adapter_slot);
  waiting_.push_back(std::move(seq));
}

void Scheduler::Account(const Sequence& seq, int32_t tokens) {
  SetServed(
      seq.adapter_slot,
      Served(seq.adapter_slot) + tokens * (seq.uncomputed() == 1 ? kDecodeWeight : kPrefillWeight));
}

double Scheduler::AdapterScore(int32_t slot) const {
  // How little the adapter's experts would push out of the pool: 1 for the base model, an adapter
  // the step already reads, or one whose missing experts fit the free pages; else the resident
  // fraction. Adapters that evict nothing tie, and ties go by arrival: grouping reorders requests
  // only where it saves evictions.
  if (slot < 0) return 1;
  if (std::find(step_adapters_.begin(), step_adapters_.end(), slot) != step_adapters_.end()) {
    return 1;
  }
  if (experts_ == nullptr) return 1;
  const int64_t bytes = experts_->AdapterBytes(slot);
  const int64_t resident = experts_->ResidentBytes(slot);
  if (bytes <= 0 || bytes - resident <= experts_->FreeBytes()) return 1;
  return std::min(1.0, static_cast<double>(resident) / static_cast<double>(bytes));
}

bool Scheduler::FitsExpertPool(int32_t slot) const {
  if (slot < 0 || experts_ == nullptr || experts_->capacity_bytes() <= 0) return true;
  if (std::find(step_adapters_.begin(), step_adapters_.end(), slot) != step_adapters_.end()) {
    return true;
  }
  const bool any_adapter =
      std::any_of(step_adapters_.begin(), step_adapters_.end(), [](int32_t s) { return s >= 0; });
  // The first adapter of a step always fits: the expert cache splits what does not fit at once.
  return !any_adapter ||
         step_expert_bytes_ + experts_->AdapterBytes(slot) <= experts_->capacity_bytes();
}

int64_t Scheduler::PickNext(absl::Time now, const std::vector<uint8_t>& skip, bool* overdue) const {
  *overdue = false;
  const int64_t n = static_cast<int64_t>(waiting_.size());
  if (options_.policy == SchedulingPolicy::kFcfs) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (!skip[i] && (best < 0 || Before(*waiting_[i], *waiting_[best]))) best = i;
    }
    return best;
  }
  // Aging: the oldest overdue sequence (waiting longer than max_queue_delay) goes first,
  // whatever its adapter or priority.
  int64_t oldest = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (skip[i] || now - waiting_[i]->arrival < options_.max_queue_delay) continue;
    if (oldest < 0 || waiting_[i]->arrival < waiting_[oldest]->arrival) oldest = i;
  }
  if (oldest >= 0) {
    *overdue = true;
    return oldest;
  }
  // Bounded bypass: a sequence overtaken by max_bypass later arrivals that grouping (not fair
  // share or priority) put first goes next, the oldest such first, whatever the pool (like
  // aging; the expert cache splits a call whose experts do not fit at once), but it holds
  // nobody back for KV blocks.
  for (int64_t i = 0; i < n; ++i) {
    const Sequence& w = *waiting_[i];
    if (skip[i] || w.overtaken < max_bypass_) continue;
    if (oldest < 0 || w.arrival < waiting_[oldest]->arrival) oldest = i;
  }
  if (oldest >= 0) return oldest;
  int32_t priority = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    if (!skip[i]) priority = std::max(priority, waiting_[i]->request.priority);
  }
  // Per adapter: its first waiting sequence (by Before) of the top priority.
  std::map<int32_t, int64_t> head;
  for (int64_t i = 0; i < n; ++i) {
    const Sequence& s = *waiting_[i];
    if (skip[i] || s.request.priority != priority) continue;
    auto [it, inserted] = head.emplace(s.adapter_slot, i);
    if (!inserted && Before(s, *waiting_[it->second])) it->second = i;
  }
  if (head.empty()) return -1;
  double least = std::numeric_limits<double>::infinity();
  for (const auto& [slot, i] : head) least = std::min(least, Served(slot));
  // Fair share binds only while adapters contend for the pool; without contention grouping
  // saves nothing and arrival order is the fair one.
  auto within_share = [&](int32_t slot) {
    return !contended_ || Served(slot) <= least + static_cast<double>(options_.fair_share_tokens);
  };
  // Relative aging: among adapters within their share, the oldest head that has waited well
  // beyond the recent mean delay goes first, before grouping, as soon as its experts fit the
  // pool, or after max_held_steps steps of waiting for that room (then whatever the pool: the
  // expert cache splits the call). Meanwhile no other adapter takes pool room ahead of it (only
  // adapters the step already reads, and the base model, are admitted), so it is not
  // thrashing the pool within a step for a room that is about to appear.
  const absl::Duration late = LateAfter();
  for (const auto& [slot, i] : head) {
    if (!within_share(slot) || now - waiting_[i]->arrival < late) continue;
    if (oldest < 0 || Before(*waiting_[i], *waiting_[oldest])) oldest = i;
  }
  if (oldest >= 0 && (FitsExpertPool(waiting_[oldest]->adapter_slot) ||
                      waiting_[oldest]->held_steps >= options_.max_held_steps)) {
    *overdue = true;
    return oldest;
  }
  if (oldest >= 0) held_ = waiting_[oldest].get();
  const bool pool_held = oldest >= 0;
  int64_t best = -1;
  double best_score = -1;
  for (const auto& [slot, i] : head) {
    if (!within_share(slot)) continue;
    if (pool_held && slot >= 0 &&
        std::find(step_adapters_.begin(), step_adapters_.end(), slot) == step_adapters_.end()) {
      continue;
    }
    if (!FitsExpertPool(slot)) continue;
    const Sequence& s = *waiting_[i];
    double score = AdapterScore(slot);
    // A preempted sequence knows the experts its prefill routed to.
    if (!s.routed_experts.empty()) score += Overlap(s.routed_experts, step_experts_);
    const bool better =
        best < 0 || score > best_score || (score == best_score && Before(s, *waiting_[best]));
    if (better) {
      best = i;
      best_score = score;
    }
  }
  return best;
}

bool Scheduler::Admit(std::deque<std::unique_ptr<Sequence>>::iterator it, absl::Time now,
                      bool* waits_for_share) {
  *waits_for_share = false;
  Sequence* seq = it->get();
  if (seq->xlora) {
    const int32_t need = BlocksNeeded(*seq);
    if (!blocks_->Reserve(need)) return false;
    seq->reserved_blocks = need;
  } else {
    const int32_t known = static_cast<int32_t>(seq->tokens.size());
    std::vector<int32_t> matched;
    if (options_.prefix_caching && seq->prefix_key != 0) {
      // Full blocks only, and the last known token is always computed (its logits are sampled).
      const int32_t full = (known - 1) / blocks_->block_size();
      HashBlocks(seq, full);
      matched = blocks_->Match(absl::MakeConstSpan(seq->block_hashes).first(full),
                               absl::MakeConstSpan(seq->tokens), seq->prefix_key);
      // Its next block is being computed this step by another sequence (n samples of one
      // prompt, a shared system prompt arriving together): wait a step and share it instead.
      if (static_cast<int32_t>(matched.size()) < full &&
          step_pending_.count(seq->block_hashes[matched.size()]) > 0) {
        blocks_->Release(matched);
        *waits_for_share = true;
        return false;
      }
    }
    const int32_t need = blocks_->BlocksFor(known) - static_cast<int32_t>(matched.size());
    // The watermark keeps room for running sequences to grow (none to keep when none runs).
    const int32_t keep = running_.empty() ? 0 : watermark_;
    if (blocks_->num_free() - blocks_->num_reserved() - need < keep) {
      blocks_->Release(matched);
      return false;
    }
    MOLE_CHECK(blocks_->Reserve(need));
    seq->blocks = std::move(matched);
    seq->num_computed = static_cast<int32_t>(seq->blocks.size()) * blocks_->block_size();
    seq->registered_blocks = static_cast<int32_t>(seq->blocks.size());
    if (seq->prefix_key != 0 && options_.prefix_caching && seq->preemptions == 0) {
      // Prompt tokens at first admission (a readmission after preemption is not a new query).
      prefix_query_tokens_ += seq->prompt_len;
      prefix_hit_tokens_ += std::min(seq->num_computed, seq->prompt_len);
    }
    for (int32_t i = 0; i < need; ++i) seq->blocks.push_back(blocks_->AllocateReserved());
  }
  if (!seq->admitted) {
    seq->admitted = now;
    const double delay = absl::ToDoubleSeconds(now - seq->arrival);
    const double alpha = 1.0 / options_.max_num_seqs;
    mean_queue_delay_ =
        mean_queue_delay_ < 0 ? delay : mean_queue_delay_ + alpha * (delay - mean_queue_delay_);
  }
  running_.push_back(std::move(*it));
  waiting_.erase(it);
  return true;
}

void Scheduler::Preempt(Sequence* seq, std::vector<Sequence*>* preempted) {
  auto it =
      std::find_if(running_.begin(), running_.end(), [&](const auto& s) { return s.get() == seq; });
  MOLE_CHECK_MSG(it != running_.end(), "Preempt of a sequence that is not running");
  MOLE_CHECK_MSG(!seq->xlora, "X-LoRA sequences are never preempted");
  blocks_->Release(seq->blocks);  // registered blocks stay cached for its readmission
  seq->blocks.clear();
  seq->registered_blocks = 0;
  seq->num_computed = 0;  // recompute: prompt + generated tokens are prefilled again
  ++seq->preemptions;
  ++num_preemptions_;
  std::unique_ptr<Sequence> owned = std::move(*it);
  running_.erase(it);
  // Back among the waiting in arrival order (it keeps its arrival time).
  auto pos =
      std::upper_bound(waiting_.begin(), waiting_.end(), owned, [](const auto& a, const auto& b) {
        return std::pair(a->arrival, a->handle) < std::pair(b->arrival, b->handle);
      });
  waiting_.insert(pos, std::move(owned));
  if (preempted != nullptr) preempted->push_back(seq);
}

bool Scheduler::GrowBlocks(Sequence* seq, int32_t positions, std::vector<Sequence*>* preempted) {
  const int32_t need = blocks_->BlocksFor(positions);
  if (seq->xlora) {  // whole life reserved at admission
    while (static_cast<int32_t>(seq->blocks.size()) < need) {
      MOLE_CHECK_MSG(seq->reserved_blocks > 0, "sequence outgrew its KV reservation");
      seq->blocks.push_back(blocks_->AllocateReserved());
      --seq->reserved_blocks;
    }
    while (!seq->frozen_scalings && static_cast<int32_t>(seq->aux_blocks.size()) < need) {
      MOLE_CHECK_MSG(seq->reserved_blocks > 0, "sequence outgrew its KV reservation");
      seq->aux_blocks.push_back(blocks_->AllocateReserved());
      --seq->reserved_blocks;
    }
    return true;
  }
  while (static_cast<int32_t>(seq->blocks.size()) < need) {
    if (blocks_->Reserve(1)) {
      seq->blocks.push_back(blocks_->AllocateReserved());
      continue;
    }
    // Out of blocks: preempt the last preemptible running sequence (running_ is kept in Before
    // order, so that is the lowest-priority, latest-arrived one); seq itself when it is last.
    Sequence* victim = seq;
    for (auto it = running_.rbegin(); it != running_.rend() && it->get() != seq; ++it) {
      if (!(*it)->xlora) {
        victim = it->get();
        break;
      }
    }
    Preempt(victim, preempted);
    if (victim == seq) return false;
  }
  return true;
}

void Scheduler::ReleaseAuxBlocks(Sequence* seq) {
  // Half of the reservation was for the scaling pass's KV: give back what it did not take.
  const int32_t aux_total = BlocksNeeded(*seq) / 2;
  const int32_t untaken = aux_total - static_cast<int32_t>(seq->aux_blocks.size());
  MOLE_CHECK_MSG(untaken >= 0 && untaken <= seq->reserved_blocks, "aux KV accounting broken");
  blocks_->Release(seq->aux_blocks);
  seq->aux_blocks.clear();
  blocks_->Unreserve(untaken);
  seq->reserved_blocks -= untaken;
}

void Scheduler::HashBlocks(Sequence* seq, int32_t n) const {
  const int32_t bs = blocks_->block_size();
  for (int32_t i = static_cast<int32_t>(seq->block_hashes.size()); i < n; ++i) {
    const uint64_t parent = i == 0 ? 0 : seq->block_hashes[i - 1];
    seq->block_hashes.push_back(BlockManager::ChainHash(
        parent, absl::MakeConstSpan(seq->tokens).subspan(int64_t{i} * bs, bs), seq->prefix_key));
  }
}

void Scheduler::RegisterComputed(Sequence* seq) {
  if (!options_.prefix_caching || seq->prefix_key == 0) return;
  const int32_t full = seq->num_computed / blocks_->block_size();
  if (full <= seq->registered_blocks) return;
  HashBlocks(seq, full);
  const int32_t bs = blocks_->block_size();
  for (int32_t b = seq->registered_blocks; b < full; ++b) {
    // False: another copy is cached; this one stays private.
    blocks_->Register(seq->blocks[b], seq->block_hashes[b], b == 0 ? 0 : seq->block_hashes[b - 1],
                      absl::MakeConstSpan(seq->tokens).subspan(int64_t{b} * bs, bs),
                      seq->prefix_key);
  }
  seq->registered_blocks = full;
}

absl::Duration Scheduler::LateAfter() const {
  if (options_.queue_delay_slack <= 0 || mean_queue_delay_ < 0) return options_.max_queue_delay;
  return std::clamp(absl::Seconds(options_.queue_delay_slack * mean_queue_delay_),
                    std::min(options_.queue_delay_floor, options_.max_queue_delay),
                    options_.max_queue_delay);
}

bool Scheduler::Contended() const {
  if (experts_ == nullptr || experts_->capacity_bytes() <= 0) return false;
  int64_t bytes = 0;  // active_: the slots of every running and waiting sequence
  for (const auto& [slot, n] : active_) bytes += slot < 0 ? 0 : experts_->AdapterBytes(slot);
  return bytes > experts_->capacity_bytes();
}

void Scheduler::CountOvertaken(const Sequence& admitted) {
  for (const auto& w : waiting_) {
    // Overtaken by grouping: it should have gone first (priority, then arrival), and the
    // admitted one's adapter is not owed service by fair share.
    if (Before(*w, admitted) &&
        (!contended_ || Served(admitted.adapter_slot) >= Served(w->adapter_slot))) {
      ++w->overtaken;
    }
  }
}

std::vector<ScheduledChunk> Scheduler::Schedule(absl::Time now, std::vector<Sequence*>* preempted) {
  now_ = std::max(now_, now);
  // The previous step's computed full blocks become matchable.
  for (const auto& seq : running_) RegisterComputed(seq.get());
  contended_ = options_.policy == SchedulingPolicy::kExpertAware && Contended();
  std::vector<ScheduledChunk> step;
  step_adapters_.clear();
  step_expert_bytes_ = 0;
  step_experts_.clear();
  step_pending_.clear();
  auto join_step = [&](Sequence& seq, int32_t n) {
    Account(seq, n);
    if (options_.prefix_caching && seq.prefix_key != 0) {
      // The full blocks this chunk completes: registered at the next step, matchable then.
      const int32_t bs = blocks_->block_size();
      const int32_t done = (seq.num_computed + n) / bs;
      HashBlocks(&seq, done);
      for (int32_t b = seq.num_computed / bs; b < done; ++b)
        step_pending_.insert(seq.block_hashes[b]);
    }
    const int32_t slot = seq.adapter_slot;
    if (std::find(step_adapters_.begin(), step_adapters_.end(), slot) == step_adapters_.end()) {
      step_adapters_.push_back(slot);
      if (slot >= 0 && experts_ != nullptr) step_expert_bytes_ += experts_->AdapterBytes(slot);
    }
    if (!seq.routed_experts.empty()) {
      std::vector<uint32_t> merged;
      std::set_union(step_experts_.begin(), step_experts_.end(), seq.routed_experts.begin(),
                     seq.routed_experts.end(), std::back_inserter(merged));
      step_experts_.swap(merged);
    }
  };

  int32_t budget = options_.max_batch_tokens;
  std::stable_sort(running_.begin(), running_.end(),
                   [](const auto& a, const auto& b) { return Before(*a, *b); });
  std::vector<Sequence*> local_preempted;
  if (preempted == nullptr) preempted = &local_preempted;
  const size_t preempted_before = preempted->size();
  // Logits rows: the model has max_num_seqs a step. Every sequence of the step may take one
  // (its sampled token); a sequence that wants prompt logprobs takes one more per scored prompt
  // position beyond that (extra_rows), out of the rows that neither a running sequence nor a
  // waiting one that could be admitted holds (so scoring never starves or blocks anyone; it
  // always has its own row). Chunks are cut to fit before their blocks and budget are taken,
  // and admission needs a free row.
  int32_t extra_rows = 0;
  auto fit_rows = [&](const Sequence& seq, int32_t n) {
    const int32_t free_slots = options_.max_num_seqs - static_cast<int32_t>(running_.size());
    const int32_t spare = free_slots - extra_rows -
                          static_cast<int32_t>(std::min<int64_t>(num_waiting(), free_slots));
    const int32_t cut = FitScoredChunk(seq, n, std::max(spare, 0));
    extra_rows += std::max(0, RowsOf(seq, cut) - 1);
    return cut;
  };
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence* seq = running_[i].get();
    const int32_t remaining = seq->uncomputed();
    if (remaining == 0) {
      ++i;
      continue;
    }
    const int32_t n = fit_rows(*seq, std::min(remaining, budget));
    // seq preempted itself: it left running_, so index i now names the next sequence (X-LoRA).
    if (!GrowBlocks(seq, seq->num_computed + n, preempted)) continue;
    step.push_back({seq, n, n == remaining});
    budget -= n;
    join_step(*seq, n);
    ++i;
  }

  std::vector<uint8_t> skip(waiting_.size(), 0);
  // A step that had to preempt admits nobody: the blocks just freed go to the running sequences
  // (and nobody overtakes the preempted ones into them).
  const bool admit = preempted->size() == preempted_before;
  held_ = nullptr;
  while (admit && budget > 0 &&
         static_cast<int32_t>(running_.size()) + extra_rows < options_.max_num_seqs) {
    bool overdue = false;
    const int64_t i = PickNext(now, skip, &overdue);
    if (i < 0) break;
    Sequence* seq = waiting_[i].get();
    bool waits_for_share = false;
    if (!Admit(waiting_.begin() + i, now, &waits_for_share)) {
      // FCFS and overdue sequences: the head waits for blocks and nobody overtakes it. One that
      // waits a step to share a block being computed holds nobody back.
      if (!waits_for_share && (options_.policy == SchedulingPolicy::kFcfs || overdue)) break;
      skip[i] = 1;
      continue;
    }
    skip.erase(skip.begin() + i);
    if (options_.policy == SchedulingPolicy::kExpertAware) CountOvertaken(*seq);
    const int32_t n = fit_rows(*seq, std::min(seq->uncomputed(), budget));
    if (seq->xlora) GrowBlocks(seq, seq->num_computed + n, preempted);
    step.push_back({seq, n, n == seq->uncomputed()});
    budget -= n;
    join_step(*seq, n);
  }
  // A late sequence that waited this step for pool room counts it (PickNext's bound).
  if (held_ != nullptr && std::any_of(waiting_.begin(), waiting_.end(),
                                      [&](const auto& w) { return w.get() == held_; })) {
    ++held_->held_steps;
  }
  held_ = nullptr;
  ComputePrefetchHint(now);
  return step;
}

int32_t Scheduler::RowsOf(const Sequence& seq, int32_t n) {
  const int32_t begin = seq.num_computed;
  return seq.ScoringRows(begin, n) + (n == seq.uncomputed() ? 1 : 0);
}

int32_t Scheduler::FitScoredChunk(const Sequence& seq, int32_t n, int32_t spare) {
  // At most 1 + spare rows: the sequence's own and the spare ones.
  if (RowsOf(seq, n) <= 1 + spare) return n;
  const int32_t begin = seq.num_computed;
  // Up to 1 + spare scored positions (a chunk cut short of the end samples nothing)...
  int32_t cut = std::min(n, seq.FirstScored(begin) - begin + 1 + spare);
  // ...one fewer if that still reaches the end and samples too. A one-token chunk fits always:
  // its token is the last one (not scored) or a single scored position.
  if (RowsOf(seq, cut) > 1 + spare) --cut;
  return cut;
}

void Scheduler::ComputePrefetchHint(absl::Time now) {
  prefetch_hint_.clear();
  std::vector<uint8_t> skip(waiting_.size(), 0);
  // What the policy would pick next if room appeared: its picks, one adapter at a time. The pool
  // constraint of this step is left out (the hint is for the steps after it).
  const std::vector<int32_t> step_adapters = step_adapters_;
  const int64_t step_bytes = step_expert_bytes_;
  step_adapters_.clear();
  step_expert_bytes_ = 0;
  while (prefetch_hint_.size() < kMaxPrefetchHint) {
    bool overdue = false;
    const int64_t i = PickNext(now, skip, &overdue);
    if (i < 0) break;
    const int32_t slot = waiting_[i]->adapter_slot;
    for (size_t j = 0; j < waiting_.size(); ++j) {
      if (waiting_[j]->adapter_slot == slot) skip[j] = 1;
    }
    if (slot >= 0) prefetch_hint_.push_back(slot);
  }
  step_adapters_ = step_adapters;
  step_expert_bytes_ = step_bytes;
}

std::unique_ptr<Sequence> Scheduler::Remove(Sequence* seq, bool cache_computed) {
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
  if (cache_computed) RegisterComputed(out.get());
  blocks_->Release(out->blocks);
  out->blocks.clear();
  out->registered_blocks = 0;
  blocks_->Release(out->aux_blocks);
  out->aux_blocks.clear();
  blocks_->Unreserve(out->reserved_blocks);
  out->reserved_blocks = 0;
  if (--active_[out->adapter_slot] == 0) {
    active_.erase(out->adapter_slot);
    SetServed(kLastIdle, Served(out->adapter_slot));
  }
  return out;
}

}  // namespace moleserve::engine
