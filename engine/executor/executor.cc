#include "engine/executor/executor.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "absl/strings/str_cat.h"
#include "engine/core/check.h"

namespace moleserve::engine {
namespace {

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

}  // namespace

const char* ClientProtocolName(ClientProtocol p) {
  return p == ClientProtocol::kHttp ? "http" : "grpc";
}

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStopSequence:
      return "stop";
    case FinishReason::kStopToken:
      return "stop_token";
    case FinishReason::kEos:
      return "eos";
  }
  return "unknown";
}

Executor::Executor(LlamaModel* model, ExpertCache* expert_cache, const Tokenizer* tokenizer,
                   const SchedulerOptions& options, MetricsSink* metrics)
    : model_(model),
      expert_cache_(expert_cache),
      tokenizer_(tokenizer),
      metrics_(metrics),
      blocks_(model->options().num_kv_blocks, model->options().kv_block_size),
      cache_view_(expert_cache),
      scheduler_(options, &blocks_, &cache_view_) {
  counters_.free_blocks = blocks_.num_free();
}

Executor::~Executor() { Stop(); }

int64_t Executor::CacheView::capacity_bytes() const {
  // An unbounded pool grows to hold every registered expert: nothing to fit.
  return cache_->bounded() ? cache_->stats().capacity_bytes : 0;
}

int64_t Executor::CacheView::FreeBytes() const {
  return cache_->bounded() ? cache_->FreeBytes() : std::numeric_limits<int64_t>::max();
}

uint32_t Executor::RoutedExpertKey(int32_t layer, std::string_view module, int32_t expert) {
  uint32_t h = 2166136261u;  // FNV-1a
  auto mix = [&](uint32_t v) {
    for (int i = 0; i < 4; ++i) {
      h ^= (v >> (8 * i)) & 0xffu;
      h *= 16777619u;
    }
  };
  for (char c : module) mix(static_cast<unsigned char>(c));
  mix(static_cast<uint32_t>(layer));
  mix(static_cast<uint32_t>(expert));
  return h;
}

void Executor::Start() {
  MOLE_CHECK(!thread_.joinable());
  {
    MutexLock lock(&mu_);
    loop_running_ = true;
  }
  thread_ = std::thread([this] { Loop(); });
}

void Executor::Stop() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  input_cv_.NotifyAll();
  if (thread_.joinable()) thread_.join();
}

void Executor::Submit(std::unique_ptr<Sequence> seq) {
  {
    MutexLock lock(&mu_);
    if (!stop_) {
      inbox_.push_back(std::move(seq));
      ++counters_.waiting;
    }
  }
  // Lost the race with Stop(): the loop will never see it, so fail it here.
  if (seq) seq->sink->OnError(absl::UnavailableError("server is shutting down"));
  input_cv_.NotifyAll();
}

void Executor::RunOnLoop(std::function<void()> task) {
  Mutex done_mu;
  CondVar done_cv;
  bool finished = false;  // guarded by done_mu
  bool queued = false;
  {
    MutexLock lock(&mu_);
    if (loop_running_) {
      tasks_.push_back([&] {
        task();
        MutexLock l(&done_mu);
        finished = true;
        done_cv.NotifyAll();
      });
      queued = true;
    }
  }
  if (!queued) {
    task();  // no loop (before Start, after it ended): nobody else touches the model
    return;
  }
  input_cv_.NotifyAll();
  MutexLock lock(&done_mu);
  done_cv.WaitFor(&done_mu, absl::InfiniteDuration(),
                  [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return finished; });
}

absl::StatusOr<int32_t> Executor::AttachAdapter(std::shared_ptr<const Adapter> adapter) {
  absl::StatusOr<int32_t> slot = absl::InternalError("attach did not run");
  RunOnLoop([&] { slot = model_->AttachAdapter(std::move(adapter)); });
  return slot;
}

void Executor::RetireAdapter(int32_t slot, std::weak_ptr<const AdapterVersion> version) {
  RunOnLoop([&] {
    retired_.emplace_back(slot, std::move(version));
    DetachRetired();
  });
}

int64_t Executor::CancelAdapterRequests(const Adapter* adapter, absl::Status status) {
  int64_t n = 0;
  RunOnLoop([&] {
    std::vector<Sequence*> victims;
    for (const auto& [handle, seq] : by_handle_) {
      if (seq->adapter != nullptr && seq->adapter->adapter.get() == adapter) {
        victims.push_back(seq);
      }
    }
    for (Sequence* seq : victims) Fail(seq, status);
    n = static_cast<int64_t>(victims.size());
    DetachRetired();
  });
  return n;
}

void Executor::DetachRetired() {
  for (auto it = retired_.begin(); it != retired_.end();) {
    if (it->second.expired()) {
      model_->DetachAdapter(it->first);
      it = retired_.erase(it);
    } else {
      ++it;
    }
  }
}

void Executor::Cancel(uint64_t handle) {
  {
    MutexLock lock(&mu_);
    cancels_.push_back(handle);
  }
  input_cv_.NotifyAll();
}

Executor::Counters Executor::counters() const {
  MutexLock lock(&mu_);
  return counters_;
}

void Executor::PrefetchForQueue() {
  ExpertCache& cache = *expert_cache_;
  // The adapters the scheduler would admit next: copy their experts in ahead, a bounded amount
  // per step (an eighth of the pool), into free pages or pages the last two steps did not use.
  const int64_t capacity = cache.stats().capacity_bytes;
  int64_t budget = std::max<int64_t>(capacity / 8, 1);
  for (int32_t slot : scheduler_.prefetch_hint()) {
    budget -= cache.Prefetch(slot, budget);
    if (budget <= 0) break;
  }
  if (!metrics_) return;
  const ExpertCacheStats st = cache.stats();
  const int64_t events = st.hits + st.misses + st.prefetched + st.evicted_unload;
  if (events == published_cache_events_) return;
  published_cache_events_ = events;
  ExpertCacheMetrics m{.device_hits = st.hits,
                       .device_misses = st.misses,
                       .prefetched = st.prefetched,
                       .evicted_lru = st.evicted_lru,
                       .evicted_unload = st.evicted_unload,
                       .evicted_resize = st.evicted_resize,
                       .bytes_to_device = st.bytes_to_device,
                       .split_calls = model_->adapters().splits(),
                       .resident_experts = st.resident_experts,
                       .host_pinned_bytes = st.host_pinned_bytes,
                       .host_pageable_bytes = st.host_image_bytes - st.host_pinned_bytes};
  for (const auto& p : st.pools) m.pools.push_back({p.width, p.pages, p.free_pages});
  metrics_->OnExpertCache(m);
}

void Executor::PublishCounters() {
  int64_t inbox;
  {
    MutexLock lock(&mu_);
    inbox = static_cast<int64_t>(inbox_.size());
    counters_.waiting = inbox + scheduler_.num_waiting();
    counters_.running = scheduler_.num_running();
    counters_.free_blocks = blocks_.num_free();
    counters_.cached_blocks = blocks_.num_cached();
    counters_.prefix_query_tokens = scheduler_.prefix_query_tokens();
    counters_.prefix_hit_tokens = scheduler_.prefix_hit_tokens();
    counters_.prefix_evictions = blocks_.evictions();
  }
  if (!metrics_) return;
  metrics_->OnQueueState(inbox + scheduler_.num_waiting(), scheduler_.num_running(),
                         blocks_.Usage());
  metrics_->OnPrefixCache({.query_tokens = scheduler_.prefix_query_tokens(),
                           .hit_tokens = scheduler_.prefix_hit_tokens(),
                           .evictions = blocks_.evictions(),
                           .cached_blocks = blocks_.num_cached()});
  std::set<std::string> running, waiting;
  std::map<std::string, AdapterActivity> activity;  // O(requests), not O(loaded adapters)
  for (const auto& seq : scheduler_.running()) {
    if (seq->request.adapter.empty()) continue;
    running.insert(seq->request.adapter);
    ++activity[seq->request.adapter].running;
  }
  for (const auto& seq : scheduler_.waiting()) {
    if (seq->request.adapter.empty()) continue;
    waiting.insert(seq->request.adapter);
    ++activity[seq->request.adapter].waiting;
  }
  {
    MutexLock lock(&mu_);
    for (const auto& seq : inbox_) {
      if (seq->request.adapter.empty()) continue;
      waiting.insert(seq->request.adapter);
      ++activity[seq->request.adapter].waiting;
    }
  }
  for (const auto& [name, t] : adapter_tokens_) {
    AdapterActivity& a = activity[name];
    a.prompt_tokens = t.prompt;
    a.generated_tokens = t.generated;
  }
  adapter_tokens_.clear();
  for (const std::string& name : adapters_reported_) activity[name];  // idle now: zeros, once
  if (!activity.empty()) {
    std::vector<AdapterActivity> active;
    adapters_reported_.clear();
    for (auto& [name, a] : activity) {
      a.adapter = name;
      if (a.running > 0 || a.waiting > 0) adapters_reported_.insert(name);
      active.push_back(std::move(a));
    }
    metrics_->OnAdapterActivity(active);
  }
  std::vector<std::string> r(running.begin(), running.end()), w(waiting.begin(), waiting.end());
  // The series exists from the first step on, so a router reads "no adapters" rather than
  // nothing from a replica that has served only the base model.
  if (adapters_published_ && r == published_running_ && w == published_waiting_) return;
  adapters_published_ = true;
  published_running_ = r;
  published_waiting_ = w;
  // Every running sequence may use its own adapter: max_num_seqs bounds the adapters of a step.
  metrics_->OnAdapterQueue(r, w, scheduler_.options().max_num_seqs);
}

void Executor::Ingest(absl::Time now) {
  std::vector<std::unique_ptr<Sequence>> inbox;
  std::vector<uint64_t> cancels;
  std::vector<std::function<void()>> tasks;
  {
    MutexLock lock(&mu_);
    inbox.swap(inbox_);
    cancels.swap(cancels_);
    tasks.swap(tasks_);
  }
  // Submissions first, so that a task (e.g. cancelling an adapter's requests) sees them.
  for (auto& seq : inbox) {
    by_handle_[seq->handle] = seq.get();
    scheduler_.Enqueue(std::move(seq));
  }
  for (auto& task : tasks) task();
  // Deadlines first, so a gRPC deadline (which also cancels the call) is reported as one.
  // Checked every step for waiting and running sequences alike.
  std::vector<Sequence*> expired;
  for (const auto& [handle, seq] : by_handle_) {
    if (seq->request.deadline <= now) expired.push_back(seq);
  }
  for (Sequence* seq : expired) {
    Fail(seq, absl::DeadlineExceededError(
                  absl::StrCat("deadline exceeded after ", seq->generated(), " generated tokens")));
  }
  for (uint64_t handle : cancels) {
    auto it = by_handle_.find(handle);
    if (it != by_handle_.end()) {
      Fail(it->second, absl::CancelledError("request cancelled by the client"));
    }
  }
}

bool Executor::WaitForInput(absl::Duration timeout) {
  MutexLock lock(&mu_);
  input_cv_.WaitFor(&mu_, timeout, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return stop_ || !inbox_.empty() || !cancels_.empty() || !tasks_.empty();
  });
  return stop_;
}

void Executor::Loop() {
  for (;;) {
    {
      MutexLock lock(&mu_);
      if (stop_) break;
    }
    // Idle: sleep until there is input.
    if (by_handle_.empty() && WaitForInput(absl::Milliseconds(100))) break;
    const absl::Time now = absl::Now();
    Ingest(now);
    std::vector<Sequence*> preempted;
    std::vector<ScheduledChunk> step = scheduler_.Schedule(now, &preempted);
    if (metrics_ && !preempted.empty()) {
      metrics_->OnPreempted(static_cast<int64_t>(preempted.size()));
    }
    PublishCounters();
    if (step.empty()) {
      DetachRetired();
      // Waiting sequences that cannot be admitted yet (or none): wait for input, do not spin.
      if (WaitForInput(absl::Milliseconds(10))) break;
      continue;
    }
    RunStep(step);
    DetachRetired();
    PrefetchForQueue();
    PublishCounters();
  }
  // Shutdown: everything still in flight ends with UNAVAILABLE.
  Ingest(absl::Now());
  std::vector<Sequence*> left;
  for (const auto& [handle, seq] : by_handle_) left.push_back(seq);
  for (Sequence* seq : left) Fail(seq, absl::UnavailableError("server is shutting down"));
  PublishCounters();
  // Tasks queued while the loop was still marked running run here; later ones run inline.
  std::vector<std::function<void()>> tasks;
  {
    MutexLock lock(&mu_);
    loop_running_ = false;
    tasks.swap(tasks_);
  }
  for (auto& task : tasks) task();
}

void Executor::RunStep(const std::vector<ScheduledChunk>& step) {
  const absl::Time start = absl::Now();
  const bool mole = std::any_of(step.begin(), step.end(),
                                [](const ScheduledChunk& c) { return c.seq->adapter_slot >= 0; });
  const StepTokens tokens = BuildBatch(step, mole);
  absl::StatusOr<int64_t> distinct_experts = ForwardStep(step, mole);
  if (!distinct_experts.ok()) {
    // A model failure is an engine fault: fail the step's sequences, keep serving the rest.
    for (const ScheduledChunk& chunk : step) {
      Fail(chunk.seq, absl::InternalError(absl::StrCat("forward pass failed: ",
                                                       distinct_experts.status().message())));
    }
    return;
  }
  ProcessSamples(step, mole);
  {
    MutexLock lock(&mu_);
    ++counters_.steps;
  }
  if (metrics_) {
    metrics_->OnStep({.num_waiting = scheduler_.num_waiting(),
                      .num_running = scheduler_.num_running(),
                      .kv_cache_usage = blocks_.Usage(),
                      .batch_tokens = batch_.num_tokens(),
                      .prefill_tokens = tokens.prefill,
                      .decode_tokens = tokens.decode,
                      .step_seconds = Seconds(absl::Now() - start),
                      .adapter_tokens = tokens.adapter,
                      .distinct_experts = *distinct_experts});
  }
}

Executor::StepTokens Executor::BuildBatch(const std::vector<ScheduledChunk>& step, bool mole) {
  batch_.Clear();
  StepTokens counts;
  for (int32_t s = 0; s < static_cast<int32_t>(step.size()); ++s) {
    const ScheduledChunk& chunk = step[s];
    Sequence* seq = chunk.seq;
    const int32_t begin = seq->num_computed;
    MOLE_CHECK_MSG(
        static_cast<int64_t>(seq->blocks.size()) * blocks_.block_size() >= begin + chunk.num_tokens,
        "the scheduler did not allocate the step's KV blocks");
    for (int32_t i = 0; i < chunk.num_tokens; ++i) {
      batch_.tokens.push_back(seq->tokens[begin + i]);
      batch_.positions.push_back(begin + i);
      batch_.token_seq.push_back(s);
    }
    batch_.block_tables.insert(batch_.block_tables.end(), seq->blocks.begin(), seq->blocks.end());
    batch_.block_table_offsets.push_back(static_cast<int32_t>(batch_.block_tables.size()));
    // Prompt logprobs: a logits row for every scored position of the chunk, then the sampled
    // one (Scheduler::FitScoringRows made them fit).
    const int32_t first_scored = seq->FirstScored(begin);
    const int32_t chunk_base = batch_.num_tokens() - chunk.num_tokens;
    for (int32_t i = 0; i < seq->ScoringRows(begin, chunk.num_tokens); ++i) {
      batch_.sample_rows.push_back(chunk_base + first_scored - begin + i);
    }
    if (chunk.sample) batch_.sample_rows.push_back(batch_.num_tokens() - 1);
    if (metrics_ && !seq->request.adapter.empty()) {
      AdapterTokens& t = adapter_tokens_[seq->request.adapter];
      const int32_t prompt_len = seq->prompt_len;
      t.prompt += std::max(0, std::min(begin + chunk.num_tokens, prompt_len) - begin);
      t.generated += chunk.sample ? 1 : 0;
    }
    if (mole) {
      batch_.seq_adapter.push_back(seq->adapter_slot);
      // The expert-aware policy learns each sequence's routed experts from its prefill's last
      // token.
      const bool observe = chunk.sample && seq->adapter_slot >= 0 && !seq->routing_observed &&
                           scheduler_.options().policy == SchedulingPolicy::kExpertAware;
      batch_.seq_return_routing.push_back(seq->request.return_routing || observe ? 1 : 0);
      if (seq->request.routing_override.empty()) {
        batch_.seq_override.push_back(-1);
      } else {
        batch_.seq_override.push_back(static_cast<int32_t>(batch_.overrides.size()));
        batch_.overrides.push_back(seq->request.routing_override);
      }
      batch_.seq_frozen_scalings.push_back(seq->frozen_scalings ? &*seq->frozen_scalings : nullptr);
      batch_.aux_block_tables.insert(batch_.aux_block_tables.end(), seq->aux_blocks.begin(),
                                     seq->aux_blocks.end());
      batch_.aux_block_table_offsets.push_back(
          static_cast<int32_t>(batch_.aux_block_tables.size()));
    }
    (seq->uncomputed() == 1 ? counts.decode : counts.prefill) += chunk.num_tokens;
    if (seq->adapter_slot >= 0) counts.adapter += chunk.num_tokens;
  }
  // Each sampled sequence's row for the device sampler (its random draw for this step included).
  sampling_.Clear();
  for (const ScheduledChunk& chunk : step) {
    const Sequence& seq = *chunk.seq;
    const int32_t first_scored = seq.FirstScored(seq.num_computed);
    for (int32_t i = 0; i < seq.ScoringRows(seq.num_computed, chunk.num_tokens); ++i) {
      sampling_.rows.push_back({.num_top_logprobs = seq.request.top_logprobs,
                                .forced_id = seq.tokens[first_scored + i + 1]});
    }
    if (chunk.sample) {
      sampling_.rows.push_back(
          chunk.seq->sampler.NextRow(&sampling_.penalty_ids, &sampling_.penalty_counts,
                                     &sampling_.bias_ids, &sampling_.bias_values));
    }
  }
  return counts;
}

absl::StatusOr<int64_t> Executor::ForwardStep(const std::vector<ScheduledChunk>& step, bool mole) {
  ExpertCache& cache = *expert_cache_;
  const double copy_before = mole ? cache.stats().copy_seconds : 0;
  if (mole) cache.BeginStep();
  absl::Status status =
      model_->ForwardSample(batch_, sampling_, &samples_, mole ? &extras_ : nullptr);
  int64_t distinct_experts = 0;
  if (mole) {
    // Every sequence of the step waited for the experts copied in during it.
    const ExpertCacheStats after = cache.stats();
    distinct_experts = after.step_experts;
    const double waited = after.copy_seconds - copy_before;
    for (const ScheduledChunk& chunk : step) chunk.seq->expert_wait_seconds += waited;
  }
  if (!status.ok()) return status;
  return distinct_experts;
}

void Executor::Alternatives(int32_t sample_row, GeneratedToken* token) const {
  const kernels::SampledRow& sampled = samples_.rows[sample_row];
  for (int32_t j = 0; j < sampled.num_top; ++j) {
    const int64_t at = int64_t{sample_row} * kernels::kMaxSampleTopLogprobs + j;
    token->top.emplace_back(samples_.top_ids[at], samples_.top_logprobs[at]);
  }
}

void Executor::ProcessSamples(const std::vector<ScheduledChunk>& step, bool mole) {
  const absl::Time now = absl::Now();
  int32_t row = 0;
  for (const ScheduledChunk& chunk : step) {
    Sequence* seq = chunk.seq;
    const int32_t scoring = seq->ScoringRows(seq->num_computed, chunk.num_tokens);
    seq->num_computed += chunk.num_tokens;
    bool finite = true;
    for (int32_t i = 0; i < scoring; ++i) {
      const int32_t scored_row = row++;
      const kernels::SampledRow& scored = samples_.rows[scored_row];
      finite = finite && scored.finite;
      GeneratedToken token{scored.id, scored.logprob, {}};
      Alternatives(scored_row, &token);
      seq->prompt_scores.push_back(std::move(token));
    }
    seq->scored += scoring;
    if (!finite) {
      Fail(seq, absl::InternalError("the model produced non-finite logits (NaN or Inf)"));
      if (chunk.sample) ++row;
      continue;
    }
    if (!chunk.sample) continue;
    const int32_t sample_row = row++;
    const kernels::SampledRow& sampled = samples_.rows[sample_row];
    if (!sampled.finite) {
      Fail(seq, absl::InternalError("the model produced non-finite logits (NaN or Inf)"));
      continue;
    }
    EmitToken(seq, sample_row, mole, now);
  }
}

void Executor::EmitToken(Sequence* seq, int32_t sample_row, bool mole, absl::Time now) {
  const kernels::SampledRow& sampled = samples_.rows[sample_row];
  seq->sampler.Observe(sampled.id);
  seq->tokens.push_back(sampled.id);

  if (!seq->first_token) {
    seq->first_token = now;
    if (metrics_) metrics_->OnFirstToken(Seconds(now - seq->arrival));
  } else if (metrics_) {
    metrics_->OnInterTokenLatency(Seconds(now - seq->last_token));
  }
  seq->last_token = now;

  GenerationChunk out;
  if (seq->request.prompt_logprobs && seq->generated() == 1) {
    out.prompt_ids.assign(seq->tokens.begin(), seq->tokens.begin() + seq->prompt_len);
    out.prompt_logprobs = std::move(seq->prompt_scores);
    seq->prompt_scores = {};
  }
  GeneratedToken token{sampled.id, sampled.logprob, {}};
  Alternatives(sample_row, &token);
  if (mole && seq->adapter_slot >= 0 && !seq->routing_observed &&
      scheduler_.options().policy == SchedulingPolicy::kExpertAware) {
    seq->routing_observed = true;
    for (const RoutingRecord& rec : extras_.routing[sample_row]) {
      for (int32_t e : rec.experts) {
        seq->routed_experts.push_back(RoutedExpertKey(rec.layer, rec.module, e));
      }
    }
    std::sort(seq->routed_experts.begin(), seq->routed_experts.end());
    seq->routed_experts.erase(std::unique(seq->routed_experts.begin(), seq->routed_experts.end()),
                              seq->routed_experts.end());
  }
  if (mole && seq->request.return_routing) {
    token.routing = std::move(extras_.routing[sample_row]);
  }
  // X-LoRA: once `freeze_after` tokens are generated (mistral.rs's tgt_non_granular_index;
  // 0 acts as 1), the scalings that produced the last one are kept for the rest of the
  // request and the scaling pass and its KV go away.
  if (mole && seq->xlora && !seq->frozen_scalings) {
    const std::optional<int32_t>& freeze = seq->adapter->adapter->xlora->freeze_after;
    if (freeze && seq->generated() >= *freeze) {
      seq->frozen_scalings = std::move(extras_.xlora_scalings[sample_row]);
      scheduler_.ReleaseAuxBlocks(seq);
    }
  }
  out.tokens.push_back(std::move(token));

  const StoppingParams& stop = seq->request.stopping;
  const auto& eos = tokenizer_->eos_ids();
  if (!stop.ignore_eos && std::find(eos.begin(), eos.end(), sampled.id) != eos.end()) {
    out.text = seq->text.Flush();
    Finish(seq, FinishReason::kEos, "", std::move(out));
    return;
  }
  if (std::find(stop.stop_token_ids.begin(), stop.stop_token_ids.end(), sampled.id) !=
      stop.stop_token_ids.end()) {
    // The stop token is part of the output: its id and its text (empty for special tokens).
    out.text = seq->text.Append(tokenizer_->DecodeToken(sampled.id)).delta;
    out.text += seq->text.Flush();
    Finish(seq, FinishReason::kStopToken, absl::StrCat(sampled.id), std::move(out));
    return;
  }
  OutputText::Update update = seq->text.Append(tokenizer_->DecodeToken(sampled.id));
  out.text = std::move(update.delta);
  if (update.stopped) {
    Finish(seq, FinishReason::kStopSequence, std::move(update.matched), std::move(out));
    return;
  }
  if (seq->generated() >= stop.max_new_tokens) {
    out.text += seq->text.Flush();
    Finish(seq, FinishReason::kLength, "", std::move(out));
    return;
  }
  seq->sink->OnChunk(std::move(out));
}

void Executor::Finish(Sequence* seq, FinishReason reason, std::string matched,
                      GenerationChunk last) {
  by_handle_.erase(seq->handle);
  std::unique_ptr<Sequence> owned = scheduler_.Remove(seq, /*cache_computed=*/true);
  FinishInfo info;
  info.reason = reason;
  info.matched_stop = std::move(matched);
  info.prompt_tokens = owned->prompt_len;
  info.generated_tokens = owned->generated();
  const absl::Time admitted = owned->admitted.value_or(owned->arrival);
  const absl::Time first = owned->first_token.value_or(owned->last_token);
  info.timings.queue_seconds = Seconds(admitted - owned->arrival);
  info.timings.time_to_first_token_seconds = Seconds(first - owned->arrival);
  info.timings.prefill_seconds = Seconds(first - admitted);
  info.timings.decode_seconds = Seconds(owned->last_token - first);
  info.timings.total_seconds = Seconds(owned->last_token - owned->arrival);
  if (metrics_) {
    metrics_->OnRequestFinished({.code = absl::StatusCode::kOk,
                                 .finish_reason = FinishReasonName(reason),
                                 .prompt_tokens = info.prompt_tokens,
                                 .generated_tokens = info.generated_tokens,
                                 .queue_seconds = info.timings.queue_seconds,
                                 .e2e_seconds = info.timings.total_seconds,
                                 .prefill_seconds = info.timings.prefill_seconds,
                                 .decode_seconds = info.timings.decode_seconds,
                                 .expert_wait_seconds = owned->expert_wait_seconds,
                                 .protocol = owned->request.protocol});
  }
  owned->sink->OnFinish(std::move(last), std::move(info));
}

void Executor::Fail(Sequence* seq, absl::Status status) {
  by_handle_.erase(seq->handle);
  std::unique_ptr<Sequence> owned = scheduler_.Remove(seq);
  if (metrics_) {
    const absl::Time now = absl::Now();
    metrics_->OnRequestFinished(
        {.code = status.code(),
         .prompt_tokens = owned->prompt_len,
         .generated_tokens = owned->generated(),
         .queue_seconds = Seconds(owned->admitted.value_or(now) - owned->arrival),
         .e2e_seconds = Seconds(now - owned->arrival),
         .expert_wait_seconds = owned->expert_wait_seconds,
         .protocol = owned->request.protocol});
  }
  owned->sink->OnError(std::move(status));
}

}  // namespace moleserve::engine
