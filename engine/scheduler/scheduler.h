#pragma once

// Scheduler: iteration-level continuous batching (one decision per Step), with a pluggable queue
// policy that groups requests by the experts they use.
//
// A step takes, within the token budget (max_batch_tokens) and the sequence limit (max_num_seqs):
//   1. one decode token of every running sequence and the next prefill chunk of running sequences
//      still prefilling (chunked prefill: a long prompt spans several steps);
//   2. then waiting sequences (new or preempted), in the order the policy picks them, while the
//      limits, the KV blocks and (expert-aware policy) the device expert pool allow.
//
// KV blocks are allocated as positions advance. Admission needs the blocks of the sequence's known
// tokens plus a watermark of free blocks. When a running sequence cannot get the block its next
// tokens need, the latest-arrived running sequence (lowest priority first) is preempted by
// recompute: its blocks are freed, its num_computed drops to 0 and it goes back to waiting with
// its tokens (prompt + generated so far) and sampler state kept, so when it is admitted again its
// next prefill recomputes the KV and samples the token it would have sampled next: the output is
// the one an uninterrupted run gives (greedy, or seeded sampling). X-LoRA sequences are never
// preempted (their scaling-pass KV cannot be recomputed to the same values once scalings are
// frozen): they reserve their whole life's blocks at admission, as before.
//
// Policies (SchedulerOptions::policy):
// - kFcfs: arrival order (higher priority first); the head of the queue waits for KV blocks and
//   nobody overtakes it. Adapters are ignored (the expert cache splits calls that do not fit).
// - kExpertAware: among waiting sequences the policy prefers adapters whose experts need no copy:
//   the score of an adapter is 1 when the step already reads it, for the base model, or when its
//   missing experts fit the pool's free pages (nothing is evicted), else the resident fraction of
//   its experts (ExpertView::ResidentBytes / AdapterBytes); a preempted
//   sequence adds the overlap of the routed expert set observed at its prefill with the running
//   sequences' sets. Equal scores go by arrival, so when everything is resident the order is
//   FCFS's. An adapter is admitted only while the step's distinct adapters' experts fit the pool.
//   Two bounds keep it fair:
//     * fair share (S-LoRA's virtual token counter): every adapter (the base model is one) counts
//       the tokens served to it (prefill 1, decode 2 per token); an adapter becoming active is
//       lifted to the least active count (or, when none is active, to the count of the last one
//       to go idle), and only adapters within fair_share_tokens of the least
//       counted waiting adapter may be picked, so a flooding adapter cannot hold another back by
//       more than that many weighted tokens of its own service;
//     * aging: a sequence waiting longer than max_queue_delay since it arrived is overdue;
//       overdue sequences go first, oldest first, ignoring the expert pool, and nobody overtakes
//       the oldest overdue one for KV blocks;
//     * bounded bypass: a sequence overtaken by max_bypass later arrivals goes next;
//     * relative aging: a sequence (the first of its adapter) that has waited queue_delay_slack
//       times the mean queue delay of recent admissions (what arrival order gives everyone, by
//       Little's law) goes ahead of grouping, oldest first, within the fair share, as soon as
//       its experts fit the pool or after max_held_steps (8) steps of waiting for that room
//       (then whatever the pool); meanwhile only adapters the step already reads are admitted.
//       Like an overdue one it then waits at the head for KV blocks (nobody overtakes it;
//       preempted sequences keep their arrival time, so they are often late). Grouping thus
//       reorders only within a slack of arrival order plus a few steps, and the tail stays near
//       FCFS's.
//   After a step is decided, prefetch_hint() lists the adapters the policy would take next, for
//   the executor to prefetch their experts.
// Both policies put preempted sequences back with their original arrival time and priority.
//
// Prefix cache (options.prefix_caching; BlockManager): at admission a sequence with a
// prefix_key takes the registered blocks of its longest cached prefix of full blocks (always
// leaving its last known token to compute, whose logits it samples) by reference, starts at
// num_computed = their tokens, and needs blocks only for the rest; at the start of each step the
// full blocks running sequences computed are registered. Shared blocks are released, not freed:
// the last sequence to release one leaves it cached (evictable) for later admissions, which is
// how a preempted sequence recomputes only what was evicted. Keys differ by adapter, version and
// routing override, so nothing computed under another is ever matched. A sequence whose next
// uncached block another sequence computes in the step being built waits one step and then
// shares it (n samples of one prompt, requests that arrive together with one system prompt).
//
// State machine of a sequence:
//   waiting --admit--> running --preempt--> waiting (num_computed = 0, blocks freed; a step
//   that preempts admits nobody)
//   running/waiting --Remove--> gone (blocks and reservation freed)
// Thread safety: not thread-safe; the engine loop owns it.

#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string_view>
#include <vector>

#include "absl/time/time.h"
#include "engine/kv_cache/block_manager.h"
#include "engine/scheduler/sequence.h"

namespace moleserve::engine {

enum class SchedulingPolicy { kFcfs, kExpertAware };
const char* SchedulingPolicyName(SchedulingPolicy p);  // "fcfs", "expert_aware"
// Parses "fcfs" or "expert_aware" (also "expert-aware"); false for anything else.
bool ParseSchedulingPolicy(std::string_view name, SchedulingPolicy* out);

// What the expert-aware policy needs to know of the device expert pool (the executor implements
// it over ExpertCache; policy tests implement it with a table).
class ExpertView {
 public:
  virtual ~ExpertView() = default;
  // Bytes of the device expert pool; 0 = unbounded (every adapter's experts fit).
  virtual int64_t capacity_bytes() const = 0;
  // Device bytes of all of the adapter's experts, and of those resident now.
  virtual int64_t AdapterBytes(int32_t slot) const = 0;
  virtual int64_t ResidentBytes(int32_t slot) const = 0;
  // Bytes of free pages (an adapter whose missing experts fit there evicts nothing).
  virtual int64_t FreeBytes() const = 0;
};

struct SchedulerOptions {
  int32_t max_batch_tokens = 2048;  // tokens per step (>= max_num_seqs)
  int32_t max_num_seqs = 64;        // running sequences at once
  SchedulingPolicy policy = SchedulingPolicy::kExpertAware;
  // Expert-aware: no sequence waits longer than this because of grouping or fair share.
  absl::Duration max_queue_delay = absl::Seconds(2);
  // Expert-aware: a sequence is also overdue once it has waited this many times the mean queue
  // delay of recent admissions (what arrival order would give everyone, by Little's law), so
  // grouping delays nobody much beyond FCFS (within the fair share); 0 = off.
  double queue_delay_slack = 1.25;
  // ... but never below this: under light load (delays near zero) grouping still reorders.
  absl::Duration queue_delay_floor = absl::Milliseconds(100);
  // Steps a late sequence waits for room in the expert pool before it goes in whatever the pool.
  int32_t max_held_steps = 8;
  // Expert-aware: weighted tokens an adapter may be ahead of the least served waiting adapter and
  // still be picked, while adapters contend for the pool; 0 = max_batch_tokens.
  int64_t fair_share_tokens = 0;
  // Expert-aware: later arrivals grouping may admit ahead of a sequence before it goes first;
  // 0 = max_num_seqs / 2.
  int32_t max_bypass = 0;
  // Expert-aware: the fair-share counters halve over this long (recent service counts), so a
  // popular adapter is held back only while it takes far more than its share; 0 = 1 s.
  absl::Duration fair_share_half_life = absl::ZeroDuration();
  // Free KV blocks admission leaves for running sequences to grow into; -1 = 1% of the blocks.
  int32_t watermark_blocks = -1;
  // Prefix cache: admission takes the registered full blocks of a sequence's known tokens
  // (under its prefix_key) instead of computing them, and computed full blocks are registered.
  bool prefix_caching = false;
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
  // `experts` may be null (treated as an unbounded pool with nothing resident).
  Scheduler(const SchedulerOptions& options, BlockManager* blocks,
            const ExpertView* experts = nullptr);
  ~Scheduler();

  const SchedulerOptions& options() const { return options_; }

  // Blocks `seq` needs for its whole life (prompt + max_new_tokens; twice that for X-LoRA, whose
  // scaling pass keeps its own KV).
  int32_t BlocksNeeded(const Sequence& seq) const;

  void Enqueue(std::unique_ptr<Sequence> seq);
  // Decides the next step and allocates the KV blocks it writes; empty when there is nothing to
  // run. Newly admitted sequences get their `admitted` time set to `now` (first admission only).
  // Sequences preempted to make room are appended to `preempted` (when given).
  std::vector<ScheduledChunk> Schedule(absl::Time now, std::vector<Sequence*>* preempted = nullptr);
  // X-LoRA sequence whose scalings were just frozen: frees its scaling-pass KV blocks and the
  // part of its reservation they had not taken yet.
  void ReleaseAuxBlocks(Sequence* seq);
  // Removes a sequence (waiting or running), returning its blocks; returns ownership. With
  // `cache_computed` (a sequence that finished normally) the full blocks it computed in its last
  // step are registered first; a failed or cancelled one registers nothing more.
  std::unique_ptr<Sequence> Remove(Sequence* seq, bool cache_computed = false);

  // Adapter slots whose waiting sequences the policy would admit next, best first (at most 4).
  const std::vector<int32_t>& prefetch_hint() const { return prefetch_hint_; }

  const std::deque<std::unique_ptr<Sequence>>& waiting() const { return waiting_; }
  const std::vector<std::unique_ptr<Sequence>>& running() const { return running_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  // Prefix cache, since start: prompt positions looked up at admission, and those found.
  int64_t prefix_query_tokens() const { return prefix_query_tokens_; }
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }
  // Weighted tokens served to the adapter in `slot` (-1 = base model), for tests and metrics.
  int64_t ServedTokens(int32_t slot) const;

 private:
  // Logits rows a chunk of n tokens of seq takes (prompt logprobs: its scored positions, plus
  // one when it samples), and the longest prefix of it that takes at most 1 + spare.
  static int32_t RowsOf(const Sequence& seq, int32_t n);
  static int32_t FitScoredChunk(const Sequence& seq, int32_t n, int32_t spare);
  // Takes the blocks seq's table needs to cover `positions`, preempting running sequences that
  // arrived after it (latest first) when there are not enough free ones. False when seq itself
  // had to be preempted.
  bool GrowBlocks(Sequence* seq, int32_t positions, std::vector<Sequence*>* preempted);
  void Preempt(Sequence* seq, std::vector<Sequence*>* preempted);
  // Prefix cache: extends seq->block_hashes to its first `n` full blocks; registers the full
  // blocks a running sequence has computed since its last registration.
  void HashBlocks(Sequence* seq, int32_t n) const;
  void RegisterComputed(Sequence* seq);
  // Moves seq from waiting to running and allocates its blocks; false (nothing changed) when the
  // KV blocks do not allow it, or (`waits_for_share`) when its next block is being computed this
  // step by another sequence, to be shared from the next one.
  bool Admit(std::deque<std::unique_ptr<Sequence>>::iterator it, absl::Time now,
             bool* waits_for_share);
  // How long a sequence may wait before relative aging takes it ahead of grouping:
  // queue_delay_slack times the recent mean queue delay (at least queue_delay_floor, at most
  // max_queue_delay).
  absl::Duration LateAfter() const;
  // Index into waiting_ of the sequence the policy takes next among those not in `skip`; -1 when
  // none. `overdue` is set when the pick is overdue.
  int64_t PickNext(absl::Time now, const std::vector<uint8_t>& skip, bool* overdue) const;
  double AdapterScore(int32_t slot) const;
  // The decayed counter of `slot` now (`now_`), and its new value.
  double Served(int32_t slot) const;
  void SetServed(int32_t slot, double value);
  // Whether the experts of every adapter running or waiting exceed the pool.
  bool Contended() const;
  // After `admitted` was taken: every waiting sequence it overtook by grouping counts one more.
  void CountOvertaken(const Sequence& admitted);
  bool FitsExpertPool(int32_t slot) const;
  void Account(const Sequence& seq, int32_t tokens);
  void ActivateAdapter(int32_t slot);
  bool AdapterActive(int32_t slot) const;
  // Fills prefetch_hint_ from every waiting sequence.
  void ComputePrefetchHint(absl::Time now);

  SchedulerOptions options_;
  BlockManager* blocks_;       // not owned
  const ExpertView* experts_;  // not owned, may be null
  int32_t watermark_;
  std::deque<std::unique_ptr<Sequence>> waiting_;   // arrival order (preempted: re-inserted)
  std::vector<std::unique_ptr<Sequence>> running_;  // admission order
  // Virtual token counter per adapter slot, decayed with fair_share_half_life from `at`.
  struct Counter {
    double value = 0;
    absl::Time at;
  };
  std::map<int32_t, Counter> served_;
  // The counter of the last adapter to go idle (S-LoRA's lift), kept in served_ under this slot.
  static constexpr int32_t kLastIdle = std::numeric_limits<int32_t>::min();
  absl::Time now_ = absl::InfinitePast();  // of the last Schedule
  absl::Duration half_life_;
  std::map<int32_t, int32_t> active_;  // waiting + running sequences per adapter slot
  // The step being built: its adapters and the union of its sequences' observed expert sets.
  std::vector<int32_t> step_adapters_;
  int64_t step_expert_bytes_ = 0;
  std::vector<uint32_t> step_experts_;
  // Prefix cache: hashes of the full blocks the step being built computes (a sequence whose
  // next block is among them waits a step and shares it).
  std::set<uint64_t> step_pending_;
  std::vector<int32_t> prefetch_hint_;
  int64_t num_preemptions_ = 0;
  bool contended_ = false;  // this step: adapters contend for the expert pool (Contended)
  int32_t max_bypass_ = 1;
  // Relative aging: the late sequence PickNext held back this step for expert-pool room, and the
  // steps after which it goes in whatever the pool.
  mutable Sequence* held_ = nullptr;
  // Mean queue delay of recent first admissions (seconds; an exponential moving average over
  // about max_num_seqs admissions); negative until the first one.
  double mean_queue_delay_ = -1;
  int64_t prefix_query_tokens_ = 0;
  int64_t prefix_hit_tokens_ = 0;
};

}  // namespace moleserve::engine
