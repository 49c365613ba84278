#pragma once

// Executor: the engine loop. One thread runs, per Step:
//   ingest submissions and cancellations -> expire deadlines -> Scheduler::Schedule ->
//   build the Batch (allocating KV blocks from reservations) -> LlamaModel::Forward ->
//   sample, check stops, stream chunks to sinks -> remove finished sequences (freeing blocks).
// New requests join between steps; finished and cancelled ones leave between steps.
//
// The executor keeps the KV block accounting (BlockManager) and is handed the expert cache the
// model's adapters use (owned by the engine), for admission and prefetching.
//
// Lifecycle: Start() spawns the loop; Stop() fails every sequence still in flight with
// kUnavailable and joins. Thread safety: Submit, Cancel, Stop and the counters may be called from
// any thread; everything else runs on the loop thread.

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "engine/core/mutex.h"
#include "engine/expert_cache/expert_cache.h"
#include "engine/kv_cache/block_manager.h"
#include "engine/metrics_sink.h"
#include "engine/model/llama_model.h"
#include "engine/scheduler/scheduler.h"
#include "engine/tokenizer/tokenizer.h"

namespace moleserve::engine {

class Executor {
 public:
  Executor(LlamaModel* model, ExpertCache* expert_cache, const Tokenizer* tokenizer,
           const SchedulerOptions& options, MetricsSink* metrics);
  // A key for (layer, module, expert) in Sequence::routed_experts.
  static uint32_t RoutedExpertKey(int32_t layer, std::string_view module, int32_t expert);
  ~Executor();

  void Start();
  void Stop();

  // Hands a validated sequence to the loop.
  void Submit(std::unique_ptr<Sequence> seq);
  // Cancels a request by handle (no-op when it already finished).
  void Cancel(uint64_t handle);

  // MoLE adapters, for hot loading (the model is touched only by the loop thread):
  // Attaches `adapter` on the loop thread between steps and returns its slot.
  absl::StatusOr<int32_t> AttachAdapter(std::shared_ptr<const Adapter> adapter);
  // Detaches `slot` once `version` is no longer referenced (by the registry or any request):
  // a replaced or unloaded version keeps serving the requests that resolved it.
  void RetireAdapter(int32_t slot, std::weak_ptr<const AdapterVersion> version);
  // Fails every request (waiting or running) that uses `adapter` with `status`; returns how many.
  int64_t CancelAdapterRequests(const Adapter* adapter, absl::Status status);

  // Blocks a request needs for its whole life, and the cache's total.
  int32_t BlocksNeeded(int64_t tokens) const { return blocks_.BlocksFor(tokens); }
  int32_t total_blocks() const { return blocks_.num_blocks(); }

  struct Counters {
    int64_t waiting = 0;  // submitted, not admitted
    int64_t running = 0;  // admitted, not finished
    int64_t free_blocks = 0;
    int64_t steps = 0;
    int64_t cached_blocks = 0;
    int64_t prefix_query_tokens = 0;
    int64_t prefix_hit_tokens = 0;
    int64_t prefix_evictions = 0;
  };
  Counters counters() const;

 private:
  void Loop();
  // Sleeps until a submission, a cancellation or Stop arrives, or `timeout` passes; returns
  // whether Stop was called.
  bool WaitForInput(absl::Duration timeout) ABSL_LOCKS_EXCLUDED(mu_);
  void Ingest(absl::Time now) ABSL_LOCKS_EXCLUDED(mu_);
  // One step: BuildBatch, ForwardStep (the model's pass with device sampling), ProcessSamples.
  void RunStep(const std::vector<ScheduledChunk>& step);
  struct StepTokens {
    int64_t prefill = 0;
    int64_t decode = 0;
    int64_t adapter = 0;  // tokens of sequences with an adapter
  };
  // Fills batch_ (tokens, positions, block tables, sample rows, adapter slots, routing asks) and
  // sampling_ (each sampled row's parameters and this step's random draw) from the step.
  StepTokens BuildBatch(const std::vector<ScheduledChunk>& step, bool mole);
  // The forward pass over batch_ with sampling on the backend; the step's distinct experts.
  absl::StatusOr<int64_t> ForwardStep(const std::vector<ScheduledChunk>& step, bool mole);
  // Takes each chunk's scored and sampled rows: prompt logprobs, non-finite logits, the token.
  void ProcessSamples(const std::vector<ScheduledChunk>& step, bool mole);
  // One sampled token of `seq`: latencies, routing and X-LoRA state, stops, the chunk streamed.
  void EmitToken(Sequence* seq, int32_t sample_row, bool mole, absl::Time now);
  void Alternatives(int32_t sample_row, GeneratedToken* token) const;
  // Removes seq from the scheduler and reports the outcome to its sink.
  void Finish(Sequence* seq, FinishReason reason, std::string matched, GenerationChunk last);
  void Fail(Sequence* seq, absl::Status status);
  void PublishCounters() ABSL_LOCKS_EXCLUDED(mu_);
  // Runs `task` on the loop thread between steps and waits for it (immediately when the loop is
  // not running).
  void RunOnLoop(std::function<void()> task) ABSL_LOCKS_EXCLUDED(mu_);
  // Detaches retired adapter slots whose versions nobody references any more.
  void DetachRetired();
  // Prefetches experts of the adapters the scheduler would admit next; publishes the expert
  // cache's metrics.
  void PrefetchForQueue();

  // The scheduler's view of the device expert pool.
  class CacheView final : public ExpertView {
   public:
    explicit CacheView(const ExpertCache* cache) : cache_(cache) {}
    int64_t capacity_bytes() const override;
    int64_t AdapterBytes(int32_t slot) const override { return cache_->OwnerBytes(slot); }
    int64_t ResidentBytes(int32_t slot) const override { return cache_->ResidentBytes(slot); }
    int64_t FreeBytes() const override;

   private:
    const ExpertCache* cache_;  // not owned
  };

  LlamaModel* model_;           // not owned
  ExpertCache* expert_cache_;   // not owned: the model's adapters use it too
  const Tokenizer* tokenizer_;  // not owned
  MetricsSink* metrics_;        // not owned, may be null
  BlockManager blocks_;         // loop thread only
  CacheView cache_view_;
  Scheduler scheduler_;                                // loop thread only
  std::unordered_map<uint64_t, Sequence*> by_handle_;  // loop thread only
  Batch batch_;                                        // reused across steps
  StepSampling sampling_;                              // the step's rows for the device sampler
  StepSamples samples_;                                // what it returned
  ForwardExtras extras_;
  int64_t published_cache_events_ = 0;  // lookups + prefetches at the last OnExpertCache
  // The adapter names at the last OnAdapterQueue (engine loop only).
  std::vector<std::string> published_running_, published_waiting_;
  // Per adapter: tokens of the steps since the last OnAdapterActivity, and whether it was in
  // the last report (so that it is reported once more, with zeros, when it goes idle).
  struct AdapterTokens {
    int64_t prompt = 0, generated = 0;
  };
  std::map<std::string, AdapterTokens> adapter_tokens_;
  std::set<std::string> adapters_reported_;
  bool adapters_published_ = false;  // the first call publishes (empty lists included)

  mutable Mutex mu_;  // guards the inbox, cancellations, stop flag and counters
  CondVar input_cv_;  // signalled on submission, cancellation and Stop
  std::vector<std::unique_ptr<Sequence>> inbox_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancels_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool loop_running_ ABSL_GUARDED_BY(mu_) = false;
  // Retired adapter slots waiting for their last request (loop thread only).
  std::vector<std::pair<int32_t, std::weak_ptr<const AdapterVersion>>> retired_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  Counters counters_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace moleserve::engine
