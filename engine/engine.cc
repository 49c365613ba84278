#include "engine/engine.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <new>
#include <optional>
#include <random>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/adapters/adapter_files.h"
#include "engine/adapters/adapter_path.h"
#include "engine/adapters/registry.h"
#include "engine/backend/backend.h"
#include "engine/chat/chat_template.h"
#include "engine/core/background.h"
#include "engine/core/chunked_visit.h"
#include "engine/core/mutex.h"
#include "engine/core/quote.h"
#include "engine/core/status_macros.h"
#include "engine/executor/executor.h"
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
  std::unique_ptr<Executor> executor;
  AdapterRegistry adapters;
  // Registry lookups and slot assignment happen together under adapters_mu, so a request never
  // resolves a version whose slot is not known; hot loads of one name are serialized by
  // load_mu (validation runs outside both, off the engine loop).
  Mutex adapters_mu;
  std::map<const Adapter*, int32_t> adapter_slots ABSL_GUARDED_BY(adapters_mu);
  // Every known name's state (loading, ready, draining, failed), for the admin API.
  struct Record {
    AdapterState state = AdapterState::kLoading;
    std::string error;
    std::string path;
    std::string sha256;
    int64_t disk_bytes = 0;
    // DRAINING: the version being unloaded (no longer in the registry) and its slot.
    std::weak_ptr<const AdapterVersion> draining;
    int32_t draining_slot = -1;
  };
  std::map<std::string, Record> records ABSL_GUARDED_BY(adapters_mu);
  Mutex load_mu;

  // What an adapter's status is built from, copied under adapters_mu (Snapshot); the rest
  // (summary, expert cache bytes) is filled in after it is released (Fill).
  struct StatusSnapshot {
    AdapterStatus status;
    std::shared_ptr<const AdapterVersion> version;
    int32_t slot = -1;
  };
  StatusSnapshot Snapshot(const std::string& name, const Record& rec) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(adapters_mu);
  void Fill(StatusSnapshot* snap) const;

  Mutex mu;            // guards the fields below
  CondVar idle_cv;     // signalled when in_flight drops to 0
  CondVar adapter_cv;  // signalled when a name leaves adapter_in_flight (its last request ended)
  bool accepting ABSL_GUARDED_BY(mu) = true;
  int64_t in_flight ABSL_GUARDED_BY(mu) = 0;
  std::map<std::string, int64_t> adapter_in_flight ABSL_GUARDED_BY(mu);  // by adapter name
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

// Wraps the caller's sink to count requests in flight (for drain) without the executor knowing.
class TrackedSink final : public GenerationSink {
 public:
  TrackedSink(std::shared_ptr<GenerationSink> inner, std::function<void()> on_done)
      : inner_(std::move(inner)), on_done_(std::move(on_done)) {}
  void OnChunk(GenerationChunk chunk) override { inner_->OnChunk(std::move(chunk)); }
  void OnFinish(GenerationChunk last, FinishInfo info) override {
    inner_->OnFinish(std::move(last), std::move(info));
    on_done_();
  }
  void OnError(absl::Status status) override {
    inner_->OnError(std::move(status));
    on_done_();
  }

 private:
  std::shared_ptr<GenerationSink> inner_;
  std::function<void()> on_done_;
};

AdapterFileLimits FileLimits(const EngineOptions& o) {
  return {.max_file_bytes = o.max_adapter_file_bytes, .max_total_bytes = o.max_adapter_bytes};
}

// FileLimits of a hot load: every entry must resolve inside the adapter root, at any depth.
AdapterFileLimits ConfinedFileLimits(const EngineOptions& o) {
  AdapterFileLimits limits = FileLimits(o);
  std::error_code ec;
  limits.confine_to = std::filesystem::canonical(o.adapter_root, ec).string();
  return limits;
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
  LlamaModelOptions model_options{
      .num_kv_blocks = static_cast<int32_t>(std::min<int64_t>(num_blocks, 1 << 24)),
      .kv_block_size = options.kv_block_size,
      .max_batch_tokens = options.max_batch_tokens,
      .max_seqs = options.max_num_seqs,
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

  state->context_length = options.max_model_len > 0
                              ? std::min(options.max_model_len, config.max_position_embeddings)
                              : config.max_position_embeddings;
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
                              .fair_share_tokens = options.fair_share_tokens};
  ParseSchedulingPolicy(options.scheduling_policy, &scheduling.policy);  // validated above
  state->executor = std::make_unique<Executor>(state->model.get(), state->expert_cache.get(),
                                               state->tokenizer.get(), scheduling, options.metrics);
  state->executor->Start();
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
  State& s = *state_;
  MutexLock load_lock(&s.load_mu);
  {
    MutexLock lock(&s.adapters_mu);
    if (name.empty() || s.records.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter name ", Quote(name), " is empty or given twice"));
    }
  }
  const AdapterLimits limits{.max_rank = s.options.max_adapter_rank,
                             .max_experts = s.options.max_adapter_experts};
  ASSIGN_OR_RETURN(AdapterFiles files,
                   InspectAdapterFiles(dir, FileLimits(s.options), /*digest=*/false));
  ASSIGN_OR_RETURN(std::shared_ptr<const Adapter> adapter,
                   engine::LoadAdapter(dir, name, s.model->config(), limits));
  ASSIGN_OR_RETURN(std::shared_ptr<const ChatTemplate> chat_template,
                   AdapterChatTemplate(dir, *s.tokenizer));
  ASSIGN_OR_RETURN(int32_t slot, s.executor->AttachAdapter(adapter));
  MutexLock lock(&s.adapters_mu);
  s.adapter_slots[adapter.get()] = slot;
  s.adapters.Publish(std::move(adapter), dir, std::move(chat_template));
  s.records[name] = {.state = AdapterState::kReady, .path = dir, .disk_bytes = files.total_bytes};
  return absl::OkStatus();
}

Engine::Engine(std::unique_ptr<State> state) : state_(std::move(state)) {}

Engine::~Engine() { Shutdown(); }

struct Engine::Admission {
  std::shared_ptr<const AdapterVersion> adapter;  // null for the base model
  int32_t adapter_slot = -1;
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
  std::shared_ptr<const AdapterVersion>& adapter = out->adapter;
  int32_t& adapter_slot = out->adapter_slot;
  if (!request.adapter.empty()) {
    absl::Status not_ready;
    {
      MutexLock lock(&s.adapters_mu);
      adapter = s.adapters.Find(request.adapter);
      if (adapter != nullptr) adapter_slot = s.adapter_slots.at(adapter->adapter.get());
      auto rec = s.records.find(request.adapter);
      if (adapter == nullptr && rec != s.records.end()) {
        const std::string& n = request.adapter;
        switch (rec->second.state) {
          case AdapterState::kLoading:
            not_ready = absl::FailedPreconditionError(
                absl::StrCat("adapter ", Quote(n), " is still loading; retry when it is READY"));
            break;
          case AdapterState::kDraining:
            not_ready = absl::FailedPreconditionError(
                absl::StrCat("adapter ", Quote(n), " is being unloaded"));
            break;
          default:
            not_ready = absl::FailedPreconditionError(
                absl::StrCat("adapter ", Quote(n), " failed to load: ", rec->second.error));
        }
      }
    }
    if (!not_ready.ok()) return not_ready;
    if (adapter == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("adapter ", Quote(request.adapter),
                       " is not loaded; ListModels shows the loaded adapters"));
    }
    if (absl::Status st = ValidateRoutingOverride(*adapter->adapter, request.routing_override);
        !st.ok()) {
      return st;
    }
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
  std::shared_ptr<const AdapterVersion> adapter = std::move(admission.adapter);
  const int32_t adapter_slot = admission.adapter_slot;
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
    if (adapter != nullptr) ++s.adapter_in_flight[request.adapter];
  }
  std::string adapter_name = adapter != nullptr ? request.adapter : std::string();
  auto tracked = std::make_shared<TrackedSink>(
      std::move(sink), [state = state_.get(), adapter_name = std::move(adapter_name)] {
        MutexLock lock(&state->mu);
        if (!adapter_name.empty()) {
          auto it = state->adapter_in_flight.find(adapter_name);
          if (it != state->adapter_in_flight.end() && --it->second == 0) {
            state->adapter_in_flight.erase(it);
            state->adapter_cv.NotifyAll();  // an unload may be draining it
          }
        }
        if (--state->in_flight == 0) state->idle_cv.NotifyAll();
      });
  auto seq = std::make_unique<Sequence>(handle, std::move(request), std::move(prompt), seed,
                                        std::move(tracked));
  seq->arrival = absl::Now();
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

// Why a load failed, for the load-failure metric.
std::string LoadFailureReason(const absl::Status& status, const char* stage) {
  if (absl::IsAlreadyExists(status)) return "already_exists";
  if (absl::IsResourceExhausted(status)) return "does_not_fit";
  if (absl::IsNotFound(status)) return "not_found";
  if (absl::IsFailedPrecondition(status)) return "disabled";
  if (absl::IsUnavailable(status)) return "shutdown";
  if (absl::IsDeadlineExceeded(status)) return "timeout";
  return stage;
}

namespace {
AdapterSummary Summarize(const AdapterVersion& v);  // below, with the admin views
}  // namespace

absl::StatusOr<AdapterSummary> Engine::LoadAdapter(const std::string& name, const std::string& path,
                                                   bool replace, const std::string& sha256,
                                                   absl::Time deadline) {
  State& s = *state_;
  AdapterLoadMetrics m;
  absl::Time t0 = absl::Now();
  auto fail = [&](absl::Status status, const char* stage) {
    m.failure_reason = LoadFailureReason(status, stage);
    if (s.options.metrics) s.options.metrics->OnAdapterLoad(m);
    return status;
  };
  if (s.options.adapter_root.empty()) {
    return fail(
        absl::FailedPreconditionError("hot loading is off: start the server with an adapter root"),
        "disabled");
  }
  if (absl::Status st = ValidateAdapterName(name); !st.ok()) return fail(st, "invalid_name");
  if (absl::Status st = ValidateSha256(sha256); !st.ok()) return fail(st, "invalid_name");
  MutexLock load_lock(&s.load_mu);
  {
    MutexLock lock(&s.adapters_mu);
    if (!replace && s.adapters.Find(name) != nullptr) {
      return fail(absl::AlreadyExistsError(absl::StrCat(
                      "adapter ", Quote(name), " is already loaded; set replace to reload it")),
                  "already_exists");
    }
    State::Record& rec = s.records[name];
    if (rec.state != AdapterState::kReady) rec = {.state = AdapterState::kLoading, .path = path};
  }
  // A failure leaves a first load FAILED and a reload READY on its previous version.
  auto failed = [&](absl::Status status, const char* stage) {
    {
      MutexLock lock(&s.adapters_mu);
      State::Record& rec = s.records[name];
      // Shown by GetAdapter/ListAdapters: escaped and bounded, whatever file text reached it.
      const absl::string_view message = status.message();
      rec.error = SanitizeMessage(std::string_view(message.data(), message.size()));
      if (rec.state != AdapterState::kReady) {
        rec.state = AdapterState::kFailed;
        rec.path = path;
      }
    }
    return fail(std::move(status), stage);
  };
  deadline = std::min(deadline, absl::Now() + s.options.max_adapter_load_time);
  // Whether the load may go on: not past the deadline, and the engine still accepting.
  auto keep_going = [&](const char* stage) -> absl::Status {
    {
      MutexLock lock(&s.mu);
      if (!s.accepting) {
        return absl::UnavailableError(
            absl::StrCat("the server is shutting down; the load stopped in its ", stage, " stage"));
      }
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the load passed its deadline in its ", stage, " stage (at most ",
          absl::FormatDuration(s.options.max_adapter_load_time), ", --max-adapter-load-time)"));
    }
    return absl::OkStatus();
  };
  // Entering `stage`: the test hook, then the same check.
  auto enter = [&](const char* stage) -> absl::Status {
    if (s.options.adapter_load_stage_hook) s.options.adapter_load_stage_hook(stage);
    return keep_going(stage);
  };
  if (absl::Status st = ValidateAdapterPath(path); !st.ok()) return failed(st, "invalid_path");
  if (absl::Status st = enter("inspect"); !st.ok()) return failed(st, "timeout");
  absl::StatusOr<std::string> dir = ConfinedAdapterDir(s.options.adapter_root, path);
  if (!dir.ok()) return failed(dir.status(), "invalid_path");
  // Reading, hashing and parsing run at background priority (EngineOptions::adapter_load_nice).
  const int nice = s.options.adapter_load_nice;
  absl::StatusOr<AdapterFiles> files = AtBackgroundPriority(nice, [&] {
    return InspectAdapterFiles(*dir, ConfinedFileLimits(s.options), /*digest=*/!sha256.empty(),
                               [&] { return keep_going("inspect"); });
  });
  if (!files.ok()) {
    const absl::Status& st = files.status();
    return failed(
        st, absl::IsDeadlineExceeded(st) || absl::IsUnavailable(st) ? "timeout" : "too_large");
  }
  if (!sha256.empty() && files->sha256 != sha256) {
    return failed(absl::InvalidArgumentError(absl::StrCat("sha256 mismatch: the files of ",
                                                          Quote(path), " digest to ", files->sha256,
                                                          ", expected ", sha256)),
                  "digest_mismatch");
  }
  const AdapterLimits limits{.max_rank = s.options.max_adapter_rank,
                             .max_experts = s.options.max_adapter_experts};
  if (absl::Status st = enter("read"); !st.ok()) return failed(st, "timeout");
  absl::StatusOr<std::shared_ptr<const Adapter>> adapter =
      AtBackgroundPriority(nice, [&]() -> absl::StatusOr<std::shared_ptr<const Adapter>> {
        try {
          return engine::LoadAdapter(*dir, name, s.model->config(), limits);
        } catch (const std::bad_alloc&) {
          return absl::ResourceExhaustedError("out of host memory reading the adapter");
        }
      });
  if (!adapter.ok()) return failed(adapter.status(), "invalid_adapter");
  absl::StatusOr<std::shared_ptr<const ChatTemplate>> chat_template =
      AdapterChatTemplate(*dir, *s.tokenizer);
  if (!chat_template.ok()) return failed(chat_template.status(), "invalid_adapter");
  m.read_seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  t0 = absl::Now();
  if (absl::Status st = enter("attach"); !st.ok()) return failed(st, "timeout");
  absl::StatusOr<int32_t> slot = s.executor->AttachAdapter(*adapter);
  if (!slot.ok()) return failed(slot.status(), "invalid_adapter");
  m.attach_seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  t0 = absl::Now();
  std::shared_ptr<const AdapterVersion> old, published;
  int32_t old_slot = -1;
  {
    MutexLock lock(&s.adapters_mu);
    old = s.adapters.Find(name);
    if (old != nullptr) {
      old_slot = s.adapter_slots.at(old->adapter.get());
      s.adapter_slots.erase(old->adapter.get());
    }
    s.adapter_slots[adapter->get()] = *slot;
    published = s.adapters.Publish(*adapter, *dir, *std::move(chat_template));
    s.records[name] = {.state = AdapterState::kReady,
                       .path = path,
                       .sha256 = files->sha256,
                       .disk_bytes = files->total_bytes};
  }
  if (old != nullptr) s.executor->RetireAdapter(old_slot, old);
  m.publish_seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  if (s.options.metrics) s.options.metrics->OnAdapterLoad(m);
  return Summarize(*published);
}

absl::StatusOr<Engine::UnloadResult> Engine::UnloadAdapter(const std::string& name,
                                                           absl::Duration drain_timeout,
                                                           bool force) {
  State& s = *state_;
  MutexLock load_lock(&s.load_mu);
  std::shared_ptr<const AdapterVersion> version;
  int32_t slot = -1;
  {
    MutexLock lock(&s.adapters_mu);
    version = s.adapters.Find(name);
    if (version == nullptr) {
      auto rec = s.records.find(name);
      if (rec != s.records.end() && rec->second.state == AdapterState::kFailed) {
        s.records.erase(rec);  // forget the failed load
        return UnloadResult{};
      }
      return absl::NotFoundError(absl::StrCat("adapter ", Quote(name), " is not loaded"));
    }
    slot = s.adapter_slots.at(version->adapter.get());
    s.adapter_slots.erase(version->adapter.get());
    RETURN_IF_ERROR(s.adapters.Remove(name));
    s.records[name].state = AdapterState::kDraining;
    s.records[name].draining = version;
    s.records[name].draining_slot = slot;
  }
  // Requests in flight hold the version; ours is the one extra reference.
  UnloadResult result;
  const int64_t in_flight = version.use_count() - 1;
  std::weak_ptr<const AdapterVersion> watch = version;
  const Adapter* adapter = version->adapter.get();
  version.reset();
  // Drain: wait until the name's last request in flight has ended (a condition, not a poll).
  if (!force) {
    MutexLock lock(&s.mu);
    s.adapter_cv.WaitFor(&s.mu, drain_timeout, [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      return s.adapter_in_flight.count(name) == 0;
    });
  }
  bool still_running;
  {
    MutexLock lock(&s.mu);
    still_running = s.adapter_in_flight.count(name) > 0;
  }
  if (still_running) {
    result.cancelled = s.executor->CancelAdapterRequests(
        adapter, absl::CancelledError(absl::StrCat("adapter ", Quote(name), " was unloaded")));
  }
  result.drained = std::max<int64_t>(0, in_flight - result.cancelled);
  s.executor->RetireAdapter(slot, watch);
  MutexLock lock(&s.adapters_mu);
  s.records.erase(name);
  return result;
}

namespace {

AdapterSummary Summarize(const AdapterVersion& v) {
  const Adapter& a = *v.adapter;
  AdapterSummary sum{.name = a.name,
                     .family = a.source_family,
                     .format = a.format,
                     .version = v.version,
                     .source = v.source,
                     .num_experts = a.num_experts(),
                     .bytes = a.bytes};
  for (const GroupInfo& g : a.groups) {
    sum.max_experts = std::max(sum.max_experts, g.max_experts);
    sum.ranks.insert(sum.ranks.end(), g.ranks.begin(), g.ranks.end());
    sum.algorithms.push_back(g.algorithm);
  }
  std::sort(sum.ranks.begin(), sum.ranks.end());
  sum.ranks.erase(std::unique(sum.ranks.begin(), sum.ranks.end()), sum.ranks.end());
  return sum;
}

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

}  // namespace

Engine::State::StatusSnapshot Engine::State::Snapshot(const std::string& name,
                                                      const Record& rec) const {
  StatusSnapshot snap;
  snap.status = {.name = name,
                 .state = rec.state,
                 .error = rec.error,
                 .path = rec.path,
                 .sha256 = rec.sha256,
                 .disk_bytes = rec.disk_bytes};
  if (rec.state == AdapterState::kDraining) {
    snap.version = rec.draining.lock();
    snap.slot = rec.draining_slot;
  } else {
    snap.version = adapters.Find(name);
    if (snap.version != nullptr) snap.slot = adapter_slots.at(snap.version->adapter.get());
  }
  return snap;
}

void Engine::State::Fill(StatusSnapshot* snap) const {
  const std::shared_ptr<const AdapterVersion>& v = snap->version;
  if (v == nullptr) return;
  AdapterStatus& st = snap->status;
  st.has_version = true;
  st.summary = Summarize(*v);
  st.host_bytes = v->adapter->bytes;
  st.device_bytes = expert_cache->ResidentBytes(snap->slot) +
                    RouterBytes(*v->adapter, ScalarTypeSize(backend->compute_dtype()));
  st.loaded_at = v->loaded_at;
}

const char* AdapterStateName(AdapterState s) {
  switch (s) {
    case AdapterState::kLoading:
      return "LOADING";
    case AdapterState::kReady:
      return "READY";
    case AdapterState::kDraining:
      return "DRAINING";
    case AdapterState::kFailed:
      return "FAILED";
  }
  return "UNKNOWN";
}

std::vector<AdapterSummary> Engine::ListAdapters() const {
  std::vector<AdapterSummary> out;
  for (const auto& v : state_->adapters.List()) out.push_back(Summarize(*v));
  return out;
}

std::vector<AdapterStatus> Engine::AdapterStatuses() const {
  State& s = *state_;
  std::vector<State::StatusSnapshot> snaps;
  // In chunks: admission and loads take adapters_mu for one lookup and never wait for a whole
  // listing.
  VisitInChunks(&s.adapters_mu, s.records, 256,
                [&](const std::string& name, const State::Record& rec) {
                  snaps.push_back(s.Snapshot(name, rec));
                });
  std::map<std::string, int64_t> in_flight;
  {
    MutexLock lock(&s.mu);
    in_flight = s.adapter_in_flight;  // names with requests in flight only
  }
  std::vector<AdapterStatus> out;
  out.reserve(snaps.size());
  for (State::StatusSnapshot& snap : snaps) {
    s.Fill(&snap);
    auto it = in_flight.find(snap.status.name);
    if (it != in_flight.end()) snap.status.in_flight = it->second;
    out.push_back(std::move(snap.status));
  }
  return out;
}

absl::StatusOr<AdapterStatus> Engine::GetAdapterStatus(const std::string& name) const {
  State& s = *state_;
  State::StatusSnapshot snap;
  {
    MutexLock lock(&s.adapters_mu);
    auto it = s.records.find(name);
    if (it == s.records.end()) {
      return absl::NotFoundError(absl::StrCat("adapter ", Quote(name), " is not known"));
    }
    snap = s.Snapshot(name, it->second);
  }
  s.Fill(&snap);
  MutexLock lock(&s.mu);
  auto it = s.adapter_in_flight.find(name);
  if (it != s.adapter_in_flight.end()) snap.status.in_flight = it->second;
  return std::move(snap.status);
}

absl::StatusOr<std::string> Engine::ApplyChatTemplate(const nlohmann::ordered_json& messages,
                                                      const nlohmann::ordered_json& tools,
                                                      bool add_generation_prompt,
                                                      const std::string& adapter) const {
  if (!adapter.empty()) {
    const std::shared_ptr<const AdapterVersion> version = state_->adapters.Find(adapter);
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
                  .steps = c.steps};
  MutexLock lock(&state_->mu);
  out.in_flight = state_->in_flight;
  return out;
}

void Engine::StopAccepting() {
  MutexLock lock(&state_->mu);
  state_->accepting = false;
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
