#include "server/grpc/inference_service.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/core/mutex.h"
#include "engine/core/quote.h"
#include "server/grpc/conversion.h"
#include "server/grpc/status_conversion.h"
#include "server/grpc/wire.h"

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

using Reactor = grpc::ServerWriteReactor<grpc::ByteBuffer>;

// Per-call output queue shared by the engine (producer, through one SequenceSink per sequence)
// and the gRPC reactor (consumer). It decides, under its mutex, the reactor's next operation: one
// write at a time, then exactly one Finish; the operation itself is started outside the mutex.
// After Finish nothing touches the reactor again, so gRPC may delete it in OnDone while the
// engine still holds this state. It also holds the call's engine handles: a broken stream, a
// client's cancel or one sequence's error cancels every sequence.
class StreamState {
 public:
  StreamState(Reactor* reactor, engine::Engine* engine, std::string request_id, int32_t n,
              bool logprobs, bool routing)
      : reactor_(reactor),
        engine_(engine),
        request_id_(std::move(request_id)),
        logprobs_(logprobs),
        routing_(routing),
        unfinished_(n) {}

  // From the engine loop thread, through SequenceSink.
  void OnChunk(uint32_t index, const engine::GenerationChunk& chunk) {
    for (pb::GenerateResponse& m : PromptLogprobMessages(chunk)) Push(std::move(m), index, false);
    pb::GenerateResponse msg;
    AppendChunk(chunk, logprobs_, routing_, &msg);
    Push(std::move(msg), index, false);
  }
  void OnFinish(uint32_t index, const engine::GenerationChunk& last,
                const engine::FinishInfo& info) {
    for (pb::GenerateResponse& m : PromptLogprobMessages(last)) Push(std::move(m), index, false);
    pb::GenerateResponse msg;
    AppendChunk(last, logprobs_, routing_, &msg);
    SetFinal(info, msg.mutable_final());
    Push(std::move(msg), index, true);
  }
  void OnError(absl::Status status) {
    End(ToGrpcStatus(status), /*drop_pending=*/false);
    CancelAll();
  }

  // A submitted sequence's engine handle; cancelled at once if the call already ended.
  void AddHandle(uint64_t handle) {
    {
      engine::MutexLock lock(&mu_);
      if (!final_status_) {
        handles_.push_back(handle);
        return;
      }
    }
    engine_->Cancel(handle);
  }

  // Reactor callbacks (gRPC threads).
  void WriteDone(bool ok) {
    bool cancel = false;
    {
      engine::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        // The stream broke (client gone); nothing more can be delivered, so stop generating.
        pending_.clear();
        if (!final_status_) {
          final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "stream closed");
          cancel = true;
        }
      }
    }
    if (cancel) CancelAll();
    Advance();
  }
  void Cancelled() {
    End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"),
        /*drop_pending=*/true);
    CancelAll();
  }
  // Finish right away with `status` (the call is refused; sequences already submitted are
  // cancelled).
  void Reject(grpc::Status status) {
    End(std::move(status), /*drop_pending=*/true);
    CancelAll();
  }

 private:
  void CancelAll() {
    std::vector<uint64_t> handles;
    {
      engine::MutexLock lock(&mu_);
      handles.swap(handles_);
    }
    for (uint64_t h : handles) engine_->Cancel(h);  // a finished one is ignored by the engine
  }

  void Push(pb::GenerateResponse msg, uint32_t index, bool last) {
    {
      engine::MutexLock lock(&mu_);
      if (finished_ || final_status_) return;
      msg.set_index(index);
      // The newest message of this sequence still waiting (a write is in flight): fold this
      // chunk into it, so a slow reader costs one message per sequence, not one per token, up to
      // kMaxCoalescedBytes (routing adds kilobytes per token; clients' default receive limit is
      // 4 MiB). Prompt logprob messages keep their bounded size: never folded, nor folded into.
      auto same = std::find_if(pending_.rbegin(), pending_.rend(),
                               [&](const pb::GenerateResponse& m) { return m.index() == index; });
      if (same == pending_.rend() || same->ByteSizeLong() >= kMaxCoalescedBytes ||
          msg.prompt_logprobs_size() > 0 || same->prompt_logprobs_size() > 0) {
        msg.set_request_id(request_id_);
        pending_.push_back(std::move(msg));
      } else {
        Coalesce(std::move(msg), &*same);
      }
      if (last && --unfinished_ == 0) final_status_ = grpc::Status::OK;
    }
    Advance();
  }
  static constexpr size_t kMaxCoalescedBytes = 1 << 20;
  static void Coalesce(pb::GenerateResponse from, pb::GenerateResponse* into) {
    into->mutable_token_ids()->Add(from.token_ids().begin(), from.token_ids().end());
    into->mutable_text()->append(from.text());
    for (pb::TokenLogprob& lp : *from.mutable_logprobs()) *into->add_logprobs() = std::move(lp);
    for (pb::TokenRouting& r : *from.mutable_routing()) *into->add_routing() = std::move(r);
    into->mutable_prompt_token_ids()->Add(from.prompt_token_ids().begin(),
                                          from.prompt_token_ids().end());
    for (pb::TokenLogprob& lp : *from.mutable_prompt_logprobs()) {
      *into->add_prompt_logprobs() = std::move(lp);
    }
    if (from.has_final()) *into->mutable_final() = std::move(*from.mutable_final());
  }
  void End(grpc::Status status, bool drop_pending) {
    {
      engine::MutexLock lock(&mu_);
      if (drop_pending) pending_.clear();
      if (!final_status_) final_status_ = std::move(status);
    }
    Advance();
  }
  // Starts the next write, or Finish, if none is in flight.
  void Advance() {
    enum { kNone, kWrite, kFinish } action = kNone;
    grpc::Status status;
    {
      engine::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (!pending_.empty()) {
        current_ = SerializeMessage(pending_.front());
        pending_.pop_front();
        writing_ = true;
        action = kWrite;
      } else if (final_status_) {
        finished_ = true;
        status = *final_status_;
        action = kFinish;
      }
    }
    if (action == kWrite) reactor_->StartWrite(&current_);
    if (action == kFinish) reactor_->Finish(status);
  }

  Reactor* const reactor_;  // valid until Finish completes (gRPC deletes it in OnDone)
  engine::Engine* const engine_;
  const std::string request_id_;
  const bool logprobs_;
  const bool routing_;
  engine::Mutex mu_;  // guards everything below
  std::deque<pb::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  grpc::ByteBuffer current_;  // the message being written; owned by the writer in flight
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> final_status_ ABSL_GUARDED_BY(mu_);
  int32_t unfinished_ ABSL_GUARDED_BY(mu_);  // sequences without their final message yet
  std::vector<uint64_t> handles_ ABSL_GUARDED_BY(mu_);
};

// The engine's sink for one sequence of a call.
class SequenceSink final : public engine::GenerationSink {
 public:
  SequenceSink(std::shared_ptr<StreamState> state, uint32_t index)
      : state_(std::move(state)), index_(index) {}
  void OnChunk(engine::GenerationChunk chunk) override { state_->OnChunk(index_, chunk); }
  void OnFinish(engine::GenerationChunk last, engine::FinishInfo info) override {
    state_->OnFinish(index_, last, info);
  }
  void OnError(absl::Status status) override { state_->OnError(std::move(status)); }

 private:
  std::shared_ptr<StreamState> state_;
  uint32_t index_;
};

// Echoed in every response message, so it is kept short.
constexpr size_t kMaxRequestIdBytes = 256;

// The adapter a Generate call names: GenerateRequest.adapter and the kAdapterHeader metadata
// (see metadata.h), which must agree when both are set. An empty header counts as absent (a
// client interceptor may always send it; nginx treats it so too).
absl::StatusOr<std::string> ResolveAdapter(const grpc::CallbackServerContext& context,
                                           const std::string& body_adapter) {
  std::optional<std::string> header;
  const auto [first, last] = context.client_metadata().equal_range(kAdapterHeader);
  for (auto it = first; it != last; ++it) {
    std::string value(it->second.data(), it->second.size());
    if (value.empty()) continue;
    if (header && *header != value) {
      return absl::InvalidArgumentError(absl::StrCat("the ", kAdapterHeader, " header is set to ",
                                                     engine::Quote(*header), " and to ",
                                                     engine::Quote(value), "; send it once"));
    }
    header = std::move(value);
  }
  if (!header) return body_adapter;
  if (!body_adapter.empty() && body_adapter != *header) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GenerateRequest.adapter is ", engine::Quote(body_adapter), " but the ", kAdapterHeader,
        " header is ", engine::Quote(*header), "; set one of them, or both to the same name"));
  }
  return *header;
}

// A call refused before any engine work.
class RejectedReactor final : public Reactor {
 public:
  void OnDone() override { delete this; }
};

class GenerateReactor final : public Reactor {
 public:
  // `n` is GenerateRequest.n, already checked: 1 to the server's limit.
  GenerateReactor(engine::Engine* engine, grpc::CallbackServerContext* context,
                  const pb::GenerateRequest& request, std::string request_id, int32_t n) {
    state_ = std::make_shared<StreamState>(
        this, engine, request_id, n,
        request.output().logprobs() || request.output().top_logprobs() > 0,
        request.output().return_routing());
    const auto deadline = context->deadline();
    const absl::Time engine_deadline = deadline == std::chrono::system_clock::time_point::max()
                                           ? absl::InfiniteFuture()
                                           : absl::FromChrono(deadline);
    absl::StatusOr<engine::GenerateRequest> converted =
        FromProto(request, engine_deadline, engine->model_info().default_sampling);
    if (!converted.ok()) {
      engine->CountRejected(converted.status().code());
      state_->Reject(ToGrpcStatus(converted.status()));
      return;
    }
    absl::StatusOr<std::string> adapter = ResolveAdapter(*context, request.adapter());
    if (!adapter.ok()) {
      engine->CountRejected(adapter.status().code());
      state_->Reject(ToGrpcStatus(adapter.status()));
      return;
    }
    converted->adapter = *std::move(adapter);
    for (int32_t i = 0; i < n; ++i) {
      engine::GenerateRequest r = *converted;
      r.request_id = n == 1 ? request_id : absl::StrCat(request_id, "/", i);
      if (i > 0) {
        r.prompt_logprobs = false;  // sent once, with sequence 0
        if (r.sampling.seed) *r.sampling.seed += static_cast<uint64_t>(i);
      }
      absl::StatusOr<uint64_t> handle =
          engine->Submit(std::move(r), std::make_shared<SequenceSink>(state_, i));
      if (!handle.ok()) {
        state_->Reject(ToGrpcStatus(handle.status()));
        return;
      }
      state_->AddHandle(*handle);
    }
  }

  void OnWriteDone(bool ok) override { state_->WriteDone(ok); }
  void OnCancel() override { state_->Cancelled(); }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<StreamState> state_;
};

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw) {
  auto reject = [&](const absl::Status& status) {
    engine_->CountRejected(status.code());
    auto* reactor = new RejectedReactor();
    reactor->Finish(ToGrpcStatus(status));
    return reactor;
  };
  pb::GenerateRequest request;
  if (absl::Status st = ParseRequest(*raw, &request); !st.ok()) return reject(st);
  if (request.request_id().size() > kMaxRequestIdBytes) {
    return reject(absl::InvalidArgumentError(absl::StrCat(
        "request_id is ", request.request_id().size(), " bytes; at most ", kMaxRequestIdBytes)));
  }
  if (request.n() > static_cast<uint32_t>(max_n_)) {
    return reject(absl::InvalidArgumentError(
        absl::StrCat("n = ", request.n(), "; at most ", max_n_, " sequences per call (--max-n)")));
  }
  std::string id = request.request_id().empty()
                       ? absl::StrCat("req-", next_request_id_.fetch_add(1))
                       : request.request_id();
  return new GenerateReactor(engine_, context, request, std::move(id),
                             std::max<int32_t>(1, static_cast<int32_t>(request.n())));
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* raw,
                                                     grpc::ByteBuffer* raw_response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  pb::TokenizeRequest parsed;
  if (absl::Status st = ParseRequest(*raw, &parsed); !st.ok()) {
    engine_->CountRejected(st.code());
    reactor->Finish(ToGrpcStatus(st));
    return reactor;
  }
  const pb::TokenizeRequest* request = &parsed;
  pb::TokenizeResponse out;
  pb::TokenizeResponse* response = &out;
  std::optional<bool> add_bos;
  if (request->has_add_bos()) add_bos = request->add_bos();
  absl::StatusOr<engine::Engine::Tokenized> result =
      engine_->Tokenize(request->text(), add_bos, request->return_pieces());
  if (!result.ok()) {
    reactor->Finish(ToGrpcStatus(result.status()));
    return reactor;
  }
  for (int32_t id : result->ids) response->add_ids(static_cast<uint32_t>(id));
  for (std::string& piece : result->pieces) response->add_pieces(std::move(piece));
  *raw_response = SerializeMessage(out);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::ListModels(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* raw,
                                                       grpc::ByteBuffer* raw_response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  pb::ListModelsRequest request;
  if (absl::Status st = ParseRequest(*raw, &request); !st.ok()) {
    engine_->CountRejected(st.code());
    reactor->Finish(ToGrpcStatus(st));
    return reactor;
  }
  pb::ListModelsResponse out;
  pb::ListModelsResponse* response = &out;
  const engine::ModelInfo& info = engine_->model_info();
  pb::BaseModelInfo* base = response->mutable_base();
  base->set_name(info.name);
  base->set_architecture(info.architecture);
  base->set_num_layers(static_cast<uint32_t>(info.num_layers));
  base->set_hidden_size(static_cast<uint32_t>(info.hidden_size));
  base->set_vocab_size(static_cast<uint32_t>(info.vocab_size));
  base->set_context_length(static_cast<uint32_t>(info.context_length));
  base->set_parameter_count(static_cast<uint64_t>(info.parameter_count));
  base->set_backend(info.backend);
  base->set_dtype(info.dtype);
  pb::SamplingParams* d = base->mutable_default_sampling();
  d->set_temperature(info.default_sampling.temperature);
  d->set_top_p(info.default_sampling.top_p);
  d->set_top_k(info.default_sampling.top_k);
  d->set_min_p(info.default_sampling.min_p);
  d->set_repetition_penalty(info.default_sampling.repetition_penalty);
  const engine::EngineStats stats = engine_->Stats();
  pb::KvCacheInfo* kv = base->mutable_kv_cache();
  kv->set_block_size(static_cast<uint32_t>(stats.kv_block_size));
  kv->set_total_blocks(static_cast<uint64_t>(stats.total_kv_blocks));
  kv->set_free_blocks(static_cast<uint64_t>(stats.free_kv_blocks));
  kv->set_prefix_caching(stats.prefix_caching);
  kv->set_cached_blocks(static_cast<uint64_t>(stats.cached_kv_blocks));
  kv->set_prefix_query_tokens(static_cast<uint64_t>(stats.prefix_query_tokens));
  kv->set_prefix_hit_tokens(static_cast<uint64_t>(stats.prefix_hit_tokens));
  for (const engine::AdapterSummary& a : engine_->ListAdapters()) {
    ToProto(a, response->add_adapters());
  }
  *raw_response = SerializeMessage(out);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace moleserve::server
