#include "engine/engine.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <new>
#include <optional>
#include <random>
#include <sstream>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/adapters/adapter_files.h"
#include "engine/adapters/adapter_path.h"
#include "engine/backend/backend.h"
#include "engine/chat/chat_template.h"
#include "engine/core/background.h"
#include "engine/core/chunked_visit.h"
#include "engine/core/mutex.h"
#include "engine/core/quote.h"
#include "engine/core/status_macros.h"
#include "engine/executor/executor.h"
#include "engine/lifecycle/adapter_lifecycle.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "engine/model/synthetic.h"
#include "engine/tokenizer/tokenizer.h"

namespace moleserve::engine {

struct Engine::State {
  EngineOptions options;
  ModelInfo info;
  int32_t context_length = 0;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Tokenizer> tokenizer;
  std::optional<ChatTemplate> chat_template;  // none: chat requests are refused
  // The device pool of LoRA expert pages: used by the model's adapter passes and the executor's
  // scheduling and prefetching; outlives both.
  std::unique_ptr<ExpertCache> expert_cache;
  std::unique_ptr<LlamaModel> model;
  // Every adapter name and its versions (engine/lifecycle): declared before the executor, so
  // that the executor (whose requests hold leases) is destroyed first.
  std::unique_ptr<AdapterHost> adapter_host;
  std::unique_ptr<AdapterLifecycle> lifecycle;
  std::unique_ptr<Executor> executor;

  Mutex uploads_mu;  // serializes CommitUpload and the removal of uploaded files
  Mutex mu;          // guards the fields below
  CondVar idle_cv;   // signalled when in_flight drops to 0
  bool accepting ABSL_GUARDED_BY(mu) = true;
  int64_t in_flight ABSL_GUARDED_BY(mu) = 0;
  uint64_t next_handle ABSL_GUARDED_BY(mu) = 1;
};

namespace {

// The text of the model's special tokens that chat templates read (bos_token, eos_token): its
// BOS and first EOS pieces, "" where it has none.
std::pair<std::string, std::string> SpecialTokenTexts(const Tokenizer& tokenizer) {
  const std::optional<int32_t> bos = tokenizer.bos_id();
  const std::vector<int32_t>& eos = tokenizer.eos_ids();
  return {bos ? tokenizer.Piece(*bos) : "", eos.empty() ? "" : tokenizer.Piece(eos[0])};
}

// An adapter directory's own chat template, read after its files were inspected (confined to
// the adapter root, sizes checked): null when it has none (the base model's applies). Special
// tokens it does not name are the base model's.
absl::StatusOr<std::shared_ptr<const ChatTemplate>> AdapterChatTemplate(
    const std::string& dir, const Tokenizer& tokenizer) {
  const auto [bos, eos] = SpecialTokenTexts(tokenizer);
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromModelDir(dir, bos, eos);
  if (absl::IsNotFound(t.status())) return nullptr;
  if (!t.ok()) return t.status();
  return std::make_shared<const ChatTemplate>(*std::move(t));
}

// Wraps the caller's sink to count requests in flight (for drain) without the executor knowing,
// and to end the request's adapter lease (for an unload's drain) when it finishes.
class TrackedSink final : public GenerationSink {
 public:
  TrackedSink(std::shared_ptr<GenerationSink> inner, AdapterLifecycle::Lease lease,
              std::function<void()> on_done)
      : inner_(std::move(inner)), lease_(std::move(lease)), on_done_(std::move(on_done)) {}
  void OnChunk(GenerationChunk chunk) override { inner_->OnChunk(std::move(chunk)); }
  void OnFinish(GenerationChunk last, FinishInfo info) override {
    inner_->OnFinish(std::move(last), std::move(info));
    Done();
  }
  void OnError(absl::Status status) override {
    inner_->OnError(std::move(status));
    Done();
  }

 private:
  void Done() {
    lease_ = AdapterLifecycle::Lease();
    on_done_();
  }
  std::shared_ptr<GenerationSink> inner_;
  AdapterLifecycle::Lease lease_;
  std::function<void()> on_done_;
};

// Device bytes an attached adapter keeps outside the expert cache: routers and classifier, in
// the compute dtype.
int64_t RouterBytes(const Adapter& a, size_t element_bytes) {
  int64_t floats = 0;
  auto router = [&](const RouterWeights& r) { floats += r.weight.size() + r.bias.size(); };
  for (const AdapterLayer& layer : a.layers) {
    for (const auto& r : layer.routed) {
      if (r) router(r->router);
    }
    if (layer.block_ffn) router(layer.block_ffn->router);
  }
  if (a.xlora) {
    for (const XloraSpec::Linear& lin : a.xlora->classifier) {
      floats += lin.weight.size() + lin.bias.size();
    }
  }
  return floats * static_cast<int64_t>(element_bytes);
}

// The lifecycle's view of the engine: adapters are parsed against the model's config and the
// tokenizer, attached and retired by the executor, and sized in the expert cache.
class EngineAdapterHost final : public AdapterHost {
 public:
  EngineAdapterHost(const EngineOptions& options, const LlamaModel* model,
                    const Tokenizer* tokenizer, Executor* executor, const ExpertCache* cache,
                    size_t element_bytes)
      : limits_{.max_rank = options.max_adapter_rank, .max_experts = options.max_adapter_experts},
        model_(model),
        tokenizer_(tokenizer),
        executor_(executor),
        cache_(cache),
        element_bytes_(element_bytes) {}

  absl::StatusOr<Read> ReadAdapter(const std::string& dir, const std::string& name) override {
    Read read;
    ASSIGN_OR_RETURN(read.adapter, engine::LoadAdapter(dir, name, model_->config(), limits_));
    ASSIGN_OR_RETURN(read.chat_template, AdapterChatTemplate(dir, *tokenizer_));
    return read;
  }
  absl::StatusOr<int32_t> Attach(std::shared_ptr<const Adapter> adapter) override {
    return executor_->AttachAdapter(std::move(adapter));
  }
  void Retire(int32_t slot, std::weak_ptr<const AdapterVersion> version) override {
    executor_->RetireAdapter(slot, std::move(version));
  }
  int64_t CancelRequests(const Adapter* adapter, absl::Status status) override {
    return executor_->CancelAdapterRequests(adapter, std::move(status));
  }
  int64_t DeviceBytes(int32_t slot, const Adapter& adapter) const override {
    return cache_->ResidentBytes(slot) + RouterBytes(adapter, element_bytes_);
  }

 private:
  const AdapterLimits limits_;
  const LlamaModel* model_;
  const Tokenizer* tokenizer_;
  Executor* executor_;
  const ExpertCache* cache_;
  const size_t element_bytes_;
};

// What a sequence's KV depends on besides its tokens, for the prefix cache: the adapter (name and
// version: versions never repeat) and the routing override; 0 (never cached) for X-LoRA, whose
// second KV cache is not shared, and for prompt logprobs, which need every prompt position's
// logits.
uint64_t PrefixKey(const GenerateRequest& r, const AdapterVersion* v, bool xlora) {
  if (xlora || r.prompt_logprobs) return 0;
  const RoutingOverride& o = r.routing_override;
  const uint64_t h = absl::HashOf(
      v != nullptr ? v->adapter->name : std::string(), v != nullptr ? v->version : uint64_t{0},
      o.algorithm ? static_cast<int>(*o.algorithm) : -1, o.k.value_or(-1), o.p.has_value(),
      o.p.value_or(0.0f), o.disabled_experts);
  return h == 0 ? 1 : h;
}

absl::Status ValidateOptions(const EngineOptions& o) {
  if (o.max_num_seqs <= 0) return absl::InvalidArgumentError("max_num_seqs must be > 0");
  if (o.max_batch_tokens < o.max_num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("max_batch_tokens (", o.max_batch_tokens,
                                                   ") must be >= max_num_seqs (", o.max_num_seqs,
                                                   ")"));
  }
  if (o.max_queue < 1) return absl::InvalidArgumentError("max_queue must be >= 1");
  SchedulingPolicy policy;
  if (!ParseSchedulingPolicy(o.scheduling_policy, &policy)) {
    return absl::InvalidArgumentError(absl::StrCat("scheduling_policy '", o.scheduling_policy,
                                                   "' is not one of fcfs, expert_aware"));
  }
  if (o.max_queue_delay <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("max_queue_delay must be > 0");
  }
  if (!(o.queue_delay_slack >= 0) || o.queue_delay_slack > 1e6) {
    return absl::InvalidArgumentError("queue_delay_slack must be in [0, 1e6]");
  }
  if (o.max_bypass < 0) return absl::InvalidArgumentError("max_bypass must be >= 0");
  if (o.fair_share_half_life <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("fair_share_half_life must be > 0");
  }
  if (o.fair_share_tokens < 0) {
    return absl::InvalidArgumentError("fair_share_tokens must be >= 0");
  }
  if (o.backend != "cpu" && o.backend != "cuda" && o.backend != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("backend '", o.backend, "' is not one of cpu, cuda, auto"));
  }
  if (o.kv_block_size <= 0) return absl::InvalidArgumentError("kv_block_size must be > 0");
  if (o.max_model_len < 0) return absl::InvalidArgumentError("max_model_len must be >= 0");
  if (o.default_max_new_tokens <= 0) {
    return absl::InvalidArgumentError("default_max_new_tokens must be > 0");
  }
  if (o.expert_cache_bytes < 0)
    return absl::InvalidArgumentError("expert_cache_bytes must be >= 0");
  if (o.expert_pinned_host_bytes < 0)
    return absl::InvalidArgumentError("expert_pinned_host_bytes must be >= 0");
  if (o.max_adapter_file_bytes <= 0 || o.max_adapter_bytes <= 0) {
    return absl::InvalidArgumentError("adapter size limits must be > 0");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  auto state = std::make_unique<State>();
  state->options = options;
  const bool use_cuda =
      options.backend == "cuda" || (options.backend == "auto" && CudaDeviceCount() > 0);
  if (use_cuda) {
    ASSIGN_OR_RETURN(state->backend, CreateCudaBackend({.device = options.cuda_device}));
  } else {
    ASSIGN_OR_RETURN(state->backend, CreateCpuBackend({.num_threads = options.num_threads}));
  }

  ModelConfig config;
  std::unique_ptr<WeightSource> weights;
  SamplingParams default_sampling;
  if (options.model.empty()) {
    config = DemoModelConfig();
    weights = std::make_unique<HostWeights>(RandomLlamaWeights(config, kDemoModelSeed));
    state->tokenizer = Tokenizer::ByteLevelDemo();
  } else if (absl::StartsWith(options.model, kSyntheticPrefix)) {
    ASSIGN_OR_RETURN(config, SyntheticModelConfig(options.model.substr(kSyntheticPrefix.size())));
    weights = std::make_unique<RandomWeightSource>(config, kDemoModelSeed);
    state->tokenizer = Tokenizer::ByteLevelDemo();
  } else {
    ASSIGN_OR_RETURN(ModelDirectory dir, OpenModelDirectory(options.model));
    config = dir.config;
    const GenerationDefaults& g = dir.generation_defaults;
    SamplingParams& d = default_sampling;
    d.temperature = g.temperature.value_or(d.temperature);
    d.top_p = g.top_p.value_or(d.top_p);
    d.top_k = g.top_k.value_or(d.top_k);
    d.min_p = g.min_p.value_or(d.min_p);
    d.repetition_penalty = g.repetition_penalty.value_or(d.repetition_penalty);
    if (absl::Status s = ValidateSamplingParams(d); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(options.model, "/generation_config.json: ", s.message()));
    }
    weights = std::move(dir.weights);
    ASSIGN_OR_RETURN(state->tokenizer, Tokenizer::FromJsonFile(dir.tokenizer_path));
  }
  if (state->tokenizer->vocab_size() > config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("the tokenizer has ", state->tokenizer->vocab_size(),
                     " tokens but the model's vocab_size is ", config.vocab_size));
  }
  // BOS is the tokenizer's (its post-processor template, i.e. what HF adds with
  // add_special_tokens=True: Llama has one, Qwen2 has none, whatever config.json says). EOS ids
  // come from the model (generation_config.json overrides config.json), as HF generate does.
  if (!config.eos_token_ids.empty()) state->tokenizer->set_eos_ids(config.eos_token_ids);
  // The chat template: the operator's file, else the model's tokenizer_config.json (if any). A
  // template that does not parse stops the start, naming the construct.
  const bool model_dir =
      !options.model.empty() && !absl::StartsWith(options.model, kSyntheticPrefix);
  if (model_dir) {
    absl::StatusOr<ChatTemplate> own = ChatTemplate::FromModelDir(options.model);
    if (own.ok()) {
      state->chat_template = *std::move(own);
    } else if (!absl::IsNotFound(own.status())) {
      return own.status();
    }
  }
  if (!options.chat_template_file.empty()) {
    std::ifstream in(options.chat_template_file);
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("cannot read the chat template ", Quote(options.chat_template_file)));
    }
    std::stringstream text;
    text << in.rdbuf();
    const auto [bos, eos] = SpecialTokenTexts(*state->tokenizer);
    ASSIGN_OR_RETURN(state->chat_template, ChatTemplate::FromSource(text.str(), bos, eos));
  }

  const int64_t per_block_token =
      2LL * config.num_layers * config.num_kv_heads * config.head_dim *
      static_cast<int64_t>(ScalarTypeSize(state->backend->compute_dtype()));
  const int64_t num_blocks = options.kv_cache_bytes / (per_block_token * options.kv_block_size);
  if (num_blocks < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache_bytes (", options.kv_cache_bytes, ") is smaller than one KV block (",
                     per_block_token * options.kv_block_size, " bytes)"));
  }
  state->context_length = options.max_model_len > 0
                              ? std::min(options.max_model_len, config.max_position_embeddings)
                              : config.max_position_embeddings;
  LlamaModelOptions model_options{
      .num_kv_blocks = static_cast<int32_t>(std::min<int64_t>(num_blocks, 1 << 24)),
      .kv_block_size = options.kv_block_size,
      .max_batch_tokens = options.max_batch_tokens,
      .max_seqs = options.max_num_seqs,
      .max_context = state->context_length,
      .expert_cache = {.capacity_bytes = options.expert_cache_bytes,
                       .pinned_host_bytes = options.expert_pinned_host_bytes,
                       .host_backend = state->backend->name() == "cpu"}};
  state->expert_cache =
      std::make_unique<ExpertCache>(state->backend.get(), model_options.expert_cache);
  model_options.shared_expert_cache = state->expert_cache.get();
  try {
    // Host allocations while converting weights throw on exhaustion; report, don't abort.
    ASSIGN_OR_RETURN(state->model,
                     LlamaModel::Create(state->backend.get(), config, *weights, model_options));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat("out of memory loading the model (",
                                                     config.ParameterCount(), " parameters) and ",
                                                     options.kv_cache_bytes, " bytes of KV cache"));
  }
  weights.reset();  // weights now live on the backend; unmap the checkpoint

  state->info = ModelInfo{.name = config.name,
                          .architecture = config.architecture,
                          .num_layers = config.num_layers,
                          .hidden_size = config.hidden_size,
                          .vocab_size = config.vocab_size,
                          .context_length = state->context_length,
                          .parameter_count = config.ParameterCount(),
                          .backend = state->backend->name(),
                          .dtype = ScalarTypeName(state->backend->compute_dtype()),
                          .default_sampling = default_sampling};
  SchedulerOptions scheduling{.max_batch_tokens = options.max_batch_tokens,
                              .max_num_seqs = options.max_num_seqs,
                              .max_queue_delay = options.max_queue_delay,
                              .queue_delay_slack = options.queue_delay_slack,
                              .fair_share_tokens = options.fair_share_tokens,
                              .max_bypass = options.max_bypass,
                              .fair_share_half_life = options.fair_share_half_life,
                              .prefix_caching = options.prefix_caching};
  ParseSchedulingPolicy(options.scheduling_policy, &scheduling.policy);  // validated above
  state->executor = std::make_unique<Executor>(state->model.get(), state->expert_cache.get(),
                                               state->tokenizer.get(), scheduling, options.metrics);
  state->executor->Start();
  state->adapter_host = std::make_unique<EngineAdapterHost>(
      options, state->model.get(), state->tokenizer.get(), state->executor.get(),
      state->expert_cache.get(), ScalarTypeSize(state->backend->compute_dtype()));
  state->lifecycle = std::make_unique<AdapterLifecycle>(
      LifecycleOptions{.adapter_root = options.adapter_root,
                       .max_file_bytes = options.max_adapter_file_bytes,
                       .max_adapter_bytes = options.max_adapter_bytes,
                       .max_load_time = options.max_adapter_load_time,
                       .load_nice = options.adapter_load_nice,
                       .stage_hook = options.adapter_load_stage_hook,
                       .metrics = options.metrics},
      state->adapter_host.get());
  AdapterUpload::RemoveStaleStaging(options.adapter_root);  // uploads a crash interrupted
  auto engine = std::unique_ptr<Engine>(new Engine(std::move(state)));
  for (size_t i = 0; i < options.adapters.size(); ++i) {
    const auto& [name, dir] = options.adapters[i];
    RETURN_IF_ERROR(engine->LoadStartupAdapter(name, dir));
    if (options.startup_adapter_progress) {
      options.startup_adapter_progress(i + 1, options.adapters.size());
    }
  }
  return engine;
}

absl::Status Engine::LoadStartupAdapter(const std::string& name, const std::string& dir) {
  return state_->lifecycle->Load({.name = name, .path = dir, .startup = true}).status();
}

Engine::Engine(std::unique_ptr<State> state) : state_(std::move(state)) {}

Engine::~Engine() { Shutdown(); }

struct Engine::Admission {
  AdapterLifecycle::Lease adapter;  // empty for the base model
  bool xlora = false;
  std::vector<int32_t> prompt;
};

absl::Status Engine::Validate(const GenerateRequest& request) const {
  {
    MutexLock lock(&state_->mu);
    if (!state_->accepting) {
      return absl::UnavailableError("server is draining; retry on another replica");
    }
  }
  GenerateRequest copy = request;
  Admission admission;
  return Admit(&copy, &admission);
}

absl::Status Engine::Admit(GenerateRequest* request_ptr, Admission* out) const {
  State& s = *state_;
  GenerateRequest& request = *request_ptr;
  const AdapterVersion* adapter = nullptr;
  if (!request.adapter.empty()) {
    ASSIGN_OR_RETURN(out->adapter, s.lifecycle->Resolve(request.adapter));
    adapter = out->adapter.version().get();
    // Disabled experts as a set: bounded, sorted, each once (so [2, 0] and [0, 0, 2] share the
    // prefix cache's key).
    std::vector<int32_t>& disabled = request.routing_override.disabled_experts;
    if (disabled.size() > static_cast<size_t>(kernels::kMaxRouteWidth)) {
      return absl::InvalidArgumentError(absl::StrCat("routing.disabled_experts lists ",
                                                     disabled.size(), " experts; at most ",
                                                     kernels::kMaxRouteWidth));
    }
    std::sort(disabled.begin(), disabled.end());
    disabled.erase(std::unique(disabled.begin(), disabled.end()), disabled.end());
    RETURN_IF_ERROR(ValidateRoutingOverride(*adapter->adapter, request.routing_override));
  } else if (!request.routing_override.empty()) {
    return absl::InvalidArgumentError(
        "a routing override needs an adapter: the base model has no router");
  }
  // Input.
  std::vector<int32_t>& prompt = out->prompt;
  if (request.text.has_value()) {
    if (!request.token_ids.empty()) {
      return absl::InvalidArgumentError("set either text or token_ids, not both");
    }
    if (static_cast<int64_t>(request.text->size()) > s.options.max_input_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("text input is ", request.text->size(),
                                                     " bytes; the limit is ",
                                                     s.options.max_input_bytes));
    }
    if (request.text->empty()) {
      return absl::InvalidArgumentError("the input is empty: give non-empty text or token_ids");
    }
    const bool add_bos = request.add_bos.value_or(s.tokenizer->bos_id().has_value());
    prompt = s.tokenizer->Encode(*request.text, add_bos);
  } else {
    prompt = request.token_ids;
    for (int32_t id : prompt) {
      if (id < 0 || id >= s.info.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token_ids: ", id, " is outside the vocabulary [0, ", s.info.vocab_size, ")"));
      }
    }
  }
  if (prompt.empty()) {
    return absl::InvalidArgumentError("the input is empty: give non-empty text or token_ids");
  }
  // Sampling, stopping and output options.
  if (absl::Status st = ValidateSamplingParams(request.sampling, s.info.vocab_size); !st.ok()) {
    return st;
  }
  if (absl::Status st = ValidateStoppingParams(request.stopping, s.info.vocab_size); !st.ok()) {
    return st;
  }
  if (request.top_logprobs < 0 || request.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("output.top_logprobs must be in [0, ", kMaxTopLogprobs, "]"));
  }
  // Context rule: prompt + max_new_tokens <= context_length. An unset max_new_tokens takes the
  // default, capped to the room left.
  const int32_t prompt_len = static_cast<int32_t>(prompt.size());
  if (prompt_len >= s.context_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("the prompt has ", prompt_len, " tokens; the context holds ", s.context_length,
                     " tokens, so it must be at most ", s.context_length - 1));
  }
  int32_t& max_new = request.stopping.max_new_tokens;
  if (max_new == 0) {
    max_new = std::min(s.options.default_max_new_tokens, s.context_length - prompt_len);
  } else if (int64_t{prompt_len} + max_new > s.context_length) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt_len, " tokens) + max_new_tokens (", max_new,
                     ") exceeds the context of ", s.context_length, " tokens; ask for at most ",
                     s.context_length - prompt_len, " new tokens"));
  }
  out->xlora = adapter != nullptr && adapter->adapter->is_xlora();
  const bool xlora = out->xlora;
  const int32_t blocks_needed =
      s.executor->BlocksNeeded(int64_t{prompt_len} + max_new) * (xlora ? 2 : 1);
  if (blocks_needed > s.executor->total_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request needs ", blocks_needed, " KV blocks but the whole cache has ",
        s.executor->total_blocks(), "; lower max_new_tokens or raise --kv-cache-bytes"));
  }
  if (s.executor->counters().waiting >= s.options.max_queue) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the request queue is full (", s.options.max_queue,
                     " waiting); retry later or on another replica"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> Engine::Submit(GenerateRequest request,
                                        std::shared_ptr<GenerationSink> sink) {
  State& s = *state_;
  auto reject = [&](absl::Status status) {
    if (s.options.metrics) s.options.metrics->OnRequestRejected(status.code(), request.protocol);
    return status;
  };
  {
    MutexLock lock(&s.mu);
    if (!s.accepting)
      return reject(absl::UnavailableError("server is draining; retry on another replica"));
  }
  Admission admission;
  if (absl::Status st = Admit(&request, &admission); !st.ok()) return reject(st);
  std::shared_ptr<const AdapterVersion> adapter = admission.adapter.version();
  const int32_t adapter_slot = admission.adapter.slot();
  const bool xlora = admission.xlora;
  std::vector<int32_t> prompt = std::move(admission.prompt);
  uint64_t seed = request.sampling.seed.has_value() ? *request.sampling.seed
                                                    : std::random_device{}() * 0x100000001ull;
  uint64_t handle;
  {
    MutexLock lock(&s.mu);
    if (!s.accepting)
      return reject(absl::UnavailableError("server is draining; retry on another replica"));
    handle = s.next_handle++;
    ++s.in_flight;
  }
  auto tracked = std::make_shared<TrackedSink>(std::move(sink), std::move(admission.adapter),
                                               [state = state_.get()] {
                                                 MutexLock lock(&state->mu);
                                                 if (--state->in_flight == 0)
                                                   state->idle_cv.NotifyAll();
                                               });
  auto seq = std::make_unique<Sequence>(handle, std::move(request), std::move(prompt), seed,
                                        std::move(tracked));
  seq->arrival = absl::Now();
  seq->prefix_key = s.options.prefix_caching ? PrefixKey(seq->request, adapter.get(), xlora) : 0;
  if (adapter != nullptr) {
    seq->adapter_slot = adapter_slot;
    seq->xlora = xlora;
    seq->adapter = std::move(adapter);
  }
  s.executor->Submit(std::move(seq));
  return handle;
}

void Engine::Cancel(uint64_t handle) { state_->executor->Cancel(handle); }

void Engine::CountRejected(absl::StatusCode code, ClientProtocol protocol) const {
  if (state_->options.metrics) state_->options.metrics->OnRequestRejected(code, protocol);
}

absl::StatusOr<Engine::Tokenized> Engine::Tokenize(std::string_view text,
                                                   std::optional<bool> add_bos,
                                                   bool return_pieces) const {
  if (static_cast<int64_t>(text.size()) > state_->options.max_input_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("text is ", text.size(), " bytes; the limit is ",
                                                   state_->options.max_input_bytes));
  }
  Tokenized out;
  out.ids =
      state_->tokenizer->Encode(text, add_bos.value_or(state_->tokenizer->bos_id().has_value()));
  if (return_pieces) {
    for (int32_t id : out.ids) out.pieces.push_back(state_->tokenizer->Piece(id));
  }
  return out;
}

std::string Engine::DecodeToken(int32_t id) const { return state_->tokenizer->DecodeToken(id); }

const ModelInfo& Engine::model_info() const { return state_->info; }

absl::StatusOr<AdapterSummary> Engine::LoadAdapter(const std::string& name, const std::string& path,
                                                   bool replace, const std::string& sha256,
                                                   absl::Time deadline) {
  return state_->lifecycle->Load(
      {.name = name, .path = path, .replace = replace, .sha256 = sha256, .deadline = deadline});
}

absl::StatusOr<std::unique_ptr<AdapterUpload>> Engine::BeginUpload(const UploadSpec& spec) const {
  const EngineOptions& o = state_->options;
  return AdapterUpload::Begin(o.adapter_root, spec,
                              {.max_file_bytes = o.max_adapter_file_bytes,
                               .max_total_bytes = o.max_adapter_bytes,
                               .hash_nice = o.adapter_load_nice});
}

absl::StatusOr<AdapterSummary> Engine::CommitUpload(std::unique_ptr<AdapterUpload> upload,
                                                    bool replace, absl::Time deadline) {
  State& s = *state_;
  const std::string root = s.options.adapter_root;
  const UploadSpec spec = upload->spec();
  MutexLock lock(&s.uploads_mu);
  absl::StatusOr<std::string> path = upload->Finish([&]() -> absl::Status {
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          "the upload passed its deadline while its files were hashed");
    }
    return absl::OkStatus();
  });
  upload.reset();  // a staging copy that was not moved into place goes now
  if (!path.ok()) return path.status();
  // Finish hashed the files: the load records the digest without reading them once more.
  absl::StatusOr<AdapterSummary> loaded = state_->lifecycle->Load({.name = spec.name,
                                                                   .path = *path,
                                                                   .replace = replace,
                                                                   .sha256 = spec.sha256,
                                                                   .sha256_checked = true,
                                                                   .deadline = deadline});
  if (!loaded.ok()) {
    // The placed files stay only when they are what the name serves now.
    absl::StatusOr<AdapterStatus> now = state_->lifecycle->Status(spec.name);
    if (!now.ok() || !now->has_version || now->sha256 != spec.sha256) {
      std::error_code ec;
      std::filesystem::remove_all(std::filesystem::path(root) / *path, ec);
    }
    return loaded.status();
  }
  AdapterUpload::RemoveUploadedVersions(root, spec.name, spec.sha256);
  return loaded;
}

absl::StatusOr<Engine::UnloadResult> Engine::UnloadAdapter(const std::string& name,
                                                           absl::Duration drain_timeout,
                                                           bool force) {
  ASSIGN_OR_RETURN(AdapterLifecycle::UnloadResult r,
                   state_->lifecycle->Unload(name, drain_timeout, force));
  MutexLock lock(&state_->uploads_mu);
  AdapterUpload::RemoveUploadedVersions(state_->options.adapter_root, name, "");
  return UnloadResult{.drained = r.drained, .cancelled = r.cancelled};
}

std::vector<AdapterSummary> Engine::ListAdapters() const { return state_->lifecycle->Summaries(); }

std::vector<AdapterStatus> Engine::AdapterStatuses() const { return state_->lifecycle->Statuses(); }

absl::StatusOr<AdapterStatus> Engine::GetAdapterStatus(const std::string& name) const {
  return state_->lifecycle->Status(name);
}

absl::StatusOr<std::string> Engine::ApplyChatTemplate(const nlohmann::ordered_json& messages,
                                                      const nlohmann::ordered_json& tools,
                                                      bool add_generation_prompt,
                                                      const std::string& adapter) const {
  if (!adapter.empty()) {
    const std::shared_ptr<const AdapterVersion> version = state_->lifecycle->Find(adapter);
    if (version != nullptr && version->chat_template != nullptr) {
      return version->chat_template->Apply(messages, tools, add_generation_prompt);
    }
  }
  if (!state_->chat_template) {
    return absl::FailedPreconditionError(
        "this model has no chat template (no chat_template.jinja, no chat_template in "
        "tokenizer_config.json): start "
        "moleserve with --chat-template FILE");
  }
  return state_->chat_template->Apply(messages, tools, add_generation_prompt);
}

bool Engine::has_chat_template() const { return state_->chat_template.has_value(); }

ExpertCacheInfo Engine::CacheInfo() const {
  const ExpertCacheStats st = state_->expert_cache->stats();
  return {.capacity_bytes = st.capacity_bytes,
          .hits = st.hits,
          .misses = st.misses,
          .evictions = st.evicted_lru + st.evicted_resize,
          .resident_experts = st.resident_experts,
          .bytes_to_device = st.bytes_to_device};
}

EngineStats Engine::Stats() const {
  Executor::Counters c = state_->executor->counters();
  EngineStats out{.waiting = c.waiting,
                  .running = c.running,
                  .free_kv_blocks = c.free_blocks,
                  .total_kv_blocks = state_->executor->total_blocks(),
                  .steps = c.steps,
                  .kv_block_size = state_->options.kv_block_size,
                  .prefix_caching = state_->options.prefix_caching,
                  .cached_kv_blocks = c.cached_blocks,
                  .prefix_query_tokens = c.prefix_query_tokens,
                  .prefix_hit_tokens = c.prefix_hit_tokens,
                  .prefix_evictions = c.prefix_evictions};
  MutexLock lock(&state_->mu);
  out.in_flight = state_->in_flight;
  return out;
}

void Engine::StopAccepting() {
  {
    MutexLock lock(&state_->mu);
    state_->accepting = false;
  }
  // Hot loads in progress stop at their next stage; a drain never waits for a whole load.
  if (state_->lifecycle) state_->lifecycle->StopLoads();
}

bool Engine::WaitIdle(absl::Duration timeout) {
  MutexLock lock(&state_->mu);
  return state_->idle_cv.WaitFor(&state_->mu, timeout, [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    return state_->in_flight == 0;
  });
}

void Engine::Shutdown() {
  StopAccepting();
  if (state_->executor) state_->executor->Stop();
}

}  // namespace moleserve::engine
