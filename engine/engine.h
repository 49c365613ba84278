#pragma once

// Engine: the facade the server talks to (DESIGN.md section 2: server -> engine.h).
//
//   ASSIGN_OR_RETURN(auto engine, Engine::Create({.model = ""}));   // "" = built-in demo model
//   ASSIGN_OR_RETURN(uint64_t handle, engine->Submit(request, sink));
//   engine->Cancel(handle);
//
// Lifecycle: Create loads the model and tokenizer, allocates the KV cache and starts the engine
// loop; StopAccepting() begins a drain (Submit then fails with kUnavailable); Shutdown() (or the
// destructor) fails whatever is still in flight with kUnavailable and stops the loop.
// Thread safety: every method may be called from any thread.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/lifecycle/adapter_status.h"
#include "engine/lifecycle/adapter_upload.h"
#include "engine/metrics_sink.h"
#include "engine/request.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {

struct EngineOptions {
  // A Hugging Face-style model directory; "synthetic:<preset>" for a real shape with random
  // weights (engine/model/synthetic.h); empty = the built-in demo model.
  std::string model;
  // CPU threads for kernels and BLAS; 0 = all hardware threads.
  int32_t num_threads = 0;
  // "cpu" (fp32), "cuda" (bf16 on cuda_device; kFailedPrecondition without a device or a CUDA
  // build) or "auto" (cuda when a device is visible, else cpu).
  std::string backend = "cpu";
  int32_t cuda_device = 0;
  // Tokens per step (prefill chunks + decode tokens); must be >= max_num_seqs.
  int32_t max_batch_tokens = 2048;
  // Sequences running at once.
  int32_t max_num_seqs = 64;
  // Requests waiting for admission (>= 1); beyond it Submit fails with kResourceExhausted.
  int32_t max_queue = 256;
  // Queue policy (engine/scheduler/scheduler.h): "expert_aware" groups requests by the experts
  // they use, within a per-adapter fair share and an aging bound; "fcfs" is arrival order.
  std::string scheduling_policy = "expert_aware";
  // expert_aware: longest a request waits because of grouping or fair share before it is taken
  // first (oldest first).
  absl::Duration max_queue_delay = absl::Seconds(2);
  // expert_aware: relative aging. A request that has waited this many times the mean queue
  // delay of recent admissions (and at least 100 ms) goes ahead of grouping, within the fair
  // share, with the next pool room (bench/results/scheduling.json); 0 = off.
  double queue_delay_slack = 1.25;
  // expert_aware: weighted tokens (prefill 1, decode 2) an adapter may be served ahead of the
  // least served waiting adapter and still be picked; 0 = max_batch_tokens.
  int64_t fair_share_tokens = 0;
  // expert_aware: later requests grouping may admit ahead of a waiting one before it goes next;
  // 0 = max_num_seqs / 2.
  int32_t max_bypass = 0;
  // expert_aware: the fair-share counters halve over this long (recent service counts).
  absl::Duration fair_share_half_life = absl::Seconds(1);
  // Prefix caching (engine/kv_cache/block_manager.h): full KV blocks computed under the same
  // adapter, version and routing override are shared by later requests with the same prefix.
  bool prefix_caching = true;
  // KV cache memory; the block count is kv_cache_bytes / bytes per block.
  int64_t kv_cache_bytes = int64_t{256} << 20;
  int32_t kv_block_size = 16;
  // Longest prompt + output of one request; 0 = the model's max_position_embeddings.
  int32_t max_model_len = 0;
  // max_new_tokens when a request leaves it 0 (capped by the room left in the context).
  int32_t default_max_new_tokens = 256;
  // Longest accepted text input in bytes.
  int64_t max_input_bytes = int64_t{1} << 20;
  MetricsSink* metrics = nullptr;  // not owned; must outlive the engine
  // MoLE adapters loaded at start: (name, directory) of a mole/1 or PEFT LoRA directory.
  std::vector<std::pair<std::string, std::string>> adapters;
  // Called by Create after each of `adapters` is loaded (loaded of total), so that a start with
  // thousands of them can report its progress.
  std::function<void(size_t loaded, size_t total)> startup_adapter_progress;
  // Directory that hot-loaded adapter paths are confined to; empty = hot loading is off.
  std::string adapter_root;
  int32_t max_adapter_rank = 256;
  int32_t max_adapter_experts = 64;
  // Size limits on an adapter directory's files (hot loads and start-up adapters).
  int64_t max_adapter_file_bytes = int64_t{8} << 30;
  int64_t max_adapter_bytes = int64_t{32} << 30;
  // A Jinja chat template file that replaces the model's (chat_template.jinja or
  // tokenizer_config.json's chat_template);
  // empty = the model's, if it has one.
  std::string chat_template_file;
  // Device pool for LoRA expert pages (engine/expert_cache); 0 = hold every loaded expert.
  int64_t expert_cache_bytes = 0;
  // Page-locked host memory for the experts' compute-dtype copies (a miss is then a DMA from
  // them); copies beyond it stay in ordinary memory. Unused by the CPU backend (fp32 experts).
  int64_t expert_pinned_host_bytes = int64_t{8} << 30;
  // Longest a hot load may take (LoadAdapter's own deadline, when earlier, wins). Checked
  // between the load's stages; a load past it fails with kDeadlineExceeded.
  absl::Duration max_adapter_load_time = absl::Minutes(10);
  // Nice value (Linux, per thread) of the thread that reads, hashes and parses a hot-loaded
  // adapter's files, so that loads take the CPU serving leaves; 0 = the calling thread itself.
  int32_t adapter_load_nice = 10;
  // Called on the loading thread as each stage of a hot load begins: "inspect" (size limits and
  // digest), "read" (parse and validate), "attach". For tests, which hold a load at a stage;
  // production leaves it empty.
  std::function<void(std::string_view stage)> adapter_load_stage_hook;
};

// The paged expert cache (Engine::CacheStats).
struct ExpertCacheInfo {
  int64_t capacity_bytes = 0;  // of all pools now
  int64_t hits = 0;
  int64_t misses = 0;
  int64_t evictions = 0;
  int64_t resident_experts = 0;
  int64_t bytes_to_device = 0;
};

struct ModelInfo {
  std::string name;
  std::string architecture;
  int32_t num_layers = 0;
  int32_t hidden_size = 0;
  int32_t vocab_size = 0;
  int32_t context_length = 0;
  int64_t parameter_count = 0;
  std::string backend;
  std::string dtype;
  // Sampling fields a request leaves unset take these values: the model's
  // generation_config.json where it has them, else SamplingParams' defaults.
  SamplingParams default_sampling;
};

struct EngineStats {
  int64_t waiting = 0;
  int64_t running = 0;
  int64_t free_kv_blocks = 0;
  int64_t total_kv_blocks = 0;
  int64_t steps = 0;
  int64_t in_flight = 0;  // submitted and not yet reported finished
  // Prefix cache: KV blocks holding a registered prefix (in use or evictable), and since start
  // the prompt tokens looked up at admission, those found, and cached blocks evicted.
  int32_t kv_block_size = 0;
  bool prefix_caching = false;
  int64_t cached_kv_blocks = 0;
  int64_t prefix_query_tokens = 0;
  int64_t prefix_hit_tokens = 0;
  int64_t prefix_evictions = 0;
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  ~Engine();

  // Validates and queues a request; the sink then receives its output. Returns a handle for
  // Cancel. Errors (nothing is queued): kInvalidArgument (bad input, naming the field),
  // kNotFound (unknown adapter; a routing override without an adapter, or one that does not fit
  // it, is kInvalidArgument), kResourceExhausted (queue full, or a request larger than the
  // whole KV cache), kUnavailable (draining).
  absl::StatusOr<uint64_t> Submit(GenerateRequest request, std::shared_ptr<GenerationSink> sink);
  // Every check Submit makes, with the same codes and messages, without queueing anything or
  // counting a rejection: adapter lookup, input (text is tokenized), sampling, stopping,
  // top_logprobs, the context rule, KV blocks, a full queue and draining. OK means Submit would
  // accept the request if nothing changed in between.
  absl::Status Validate(const GenerateRequest& request) const;
  void Cancel(uint64_t handle);
  // Counts a request refused before it reached Submit (a malformed message, an overlong
  // request_id) in the metrics sink's rejections, by code, like Submit's own refusals.
  void CountRejected(absl::StatusCode code, ClientProtocol protocol = ClientProtocol::kGrpc) const;

  struct Tokenized {
    std::vector<int32_t> ids;
    std::vector<std::string> pieces;
  };
  absl::StatusOr<Tokenized> Tokenize(std::string_view text, std::optional<bool> add_bos,
                                     bool return_pieces) const;
  // Bytes of one token's text (special tokens: empty).
  std::string DecodeToken(int32_t id) const;

  const ModelInfo& model_info() const;
  // The chat prompt for OpenAI-style `messages` (and `tools`: null or a list) through the chat
  // template (engine/chat/chat_template.h) of `adapter` (its directory's own, when it carries
  // one) or else the model's: text with its special tokens, to submit with add_bos = false.
  // kFailedPrecondition when there is no chat template; kInvalidArgument when the template
  // raises (roles out of order, a role it refuses).
  absl::StatusOr<std::string> ApplyChatTemplate(const nlohmann::ordered_json& messages,
                                                const nlohmann::ordered_json& tools,
                                                bool add_generation_prompt,
                                                const std::string& adapter = "") const;
  bool has_chat_template() const;
  std::vector<AdapterSummary> ListAdapters() const;

  // Hot-loads the mole/1 or PEFT LoRA directory `path`, relative to EngineOptions::adapter_root
  // (absolute paths, `..` and symlinks that leave the root are refused), as adapter `name`
  // ([A-Za-z0-9._-], at most 128 bytes). Everything is read and validated on the calling thread
  // (decoding goes on); the engine loop only attaches the finished adapter between steps; then
  // the version is published atomically. With `replace`, requests that already resolved the old
  // version finish on it and its memory is freed after the last one. Loads of one name are
  // serialized. Errors, after which the previous version (if any) keeps serving:
  // kFailedPrecondition (no adapter root), kAlreadyExists (loaded, no `replace`),
  // kInvalidArgument (bad name, path or adapter content), kNotFound (no such directory).
  // A non-empty `sha256` (hex, InspectAdapterFiles' digest) must match the files:
  // kInvalidArgument otherwise. Files over EngineOptions' size limits: kInvalidArgument. An
  // adapter whose largest expert cannot fit the expert cache: kResourceExhausted. Between its
  // stages the load gives up with kDeadlineExceeded past `deadline` or
  // EngineOptions::max_adapter_load_time, and with kUnavailable once the engine stops accepting
  // (a drain or shutdown never waits for more than the stage in progress).
  absl::StatusOr<AdapterSummary> LoadAdapter(const std::string& name, const std::string& path,
                                             bool replace, const std::string& sha256 = "",
                                             absl::Time deadline = absl::InfiniteFuture());

  // Uploads (AdapterAdmin.UploadAdapter, engine/lifecycle/adapter_upload.h): BeginUpload checks
  // the header (a name, the files' sha256, their count and total size within the adapter size
  // limits; hot loading must be on); the caller writes the files into the upload; CommitUpload
  // checks them (every declared byte, then the sha256, before anything is parsed), moves them to
  // <adapter root>/.uploads/<name>/<sha256> and loads them as LoadAdapter(name, that path,
  // replace, sha256, deadline) would, with its errors; after a successful load the name's older
  // uploads are removed. Whatever fails, nothing of the upload is left behind and a previous
  // version keeps serving. Commits are serialized (the receiving is not).
  absl::StatusOr<std::unique_ptr<AdapterUpload>> BeginUpload(const UploadSpec& spec) const;
  absl::StatusOr<AdapterSummary> CommitUpload(std::unique_ptr<AdapterUpload> upload, bool replace,
                                              absl::Time deadline = absl::InfiniteFuture());

  // Loads a start-up adapter from `dir` (read as given, not confined to adapter_root; no
  // deadline), as Create does for EngineOptions::adapters: for a server that brings its
  // listeners up first (health NOT_SERVING) and loads its start-up adapters afterwards.
  // kInvalidArgument for an empty or known name; otherwise LoadAdapter's errors.
  absl::Status LoadStartupAdapter(const std::string& name, const std::string& dir);

  struct UnloadResult {
    int64_t drained = 0;    // in-flight requests that finished normally during the drain
    int64_t cancelled = 0;  // cancelled (force, or still running at the drain timeout)
  };
  // Unloads adapter `name`: it is DRAINING (new requests get kFailedPrecondition), requests in
  // flight finish for up to `drain_timeout` (none with `force`), the rest end with kCancelled
  // naming the unload; then its memory is freed and the name is gone (kNotFound). Unloading a
  // FAILED name forgets it; an uploaded adapter's files go with it. kNotFound when the name is
  // unknown.
  absl::StatusOr<UnloadResult> UnloadAdapter(const std::string& name, absl::Duration drain_timeout,
                                             bool force);
  EngineStats Stats() const;

  // Admin view: every name that is loading, ready, draining or failed, by name.
  std::vector<AdapterStatus> AdapterStatuses() const;
  absl::StatusOr<AdapterStatus> GetAdapterStatus(const std::string& name) const;  // kNotFound
  ExpertCacheInfo CacheInfo() const;

  // Drain: refuse new requests from now on.
  void StopAccepting();
  // Waits until no request is in flight; false on timeout.
  bool WaitIdle(absl::Duration timeout);
  void Shutdown();

 private:
  struct State;
  // What Admit resolves for an accepted request (defined in engine.cc).
  struct Admission;
  explicit Engine(std::unique_ptr<State> state);
  // Submit's validation, after the draining check: fills `out` and defaults
  // request->stopping.max_new_tokens, or returns the error Submit rejects the request with.
  absl::Status Admit(GenerateRequest* request, Admission* out) const;
  std::unique_ptr<State> state_;
};

}  // namespace moleserve::engine
