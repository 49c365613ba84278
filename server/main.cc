// moleserve: the gRPC inference server.
//
//   moleserve                       # built-in demo model on 0.0.0.0:50051, metrics on :9090
//   moleserve --model DIR --port 8001 --metrics-port 9100
//
// SIGTERM / SIGINT drain: health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight
// requests finish (up to --drain-timeout), then the process exits 0. A second signal exits at once.

#include <google/protobuf/stubs/logging.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/core/quote.h"
#include "engine/engine.h"
#include "server/cli/dashed_flags.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/listeners.h"
#include "server/grpc/server.h"
#include "server/http/http_server.h"
#include "server/http/openai_api.h"
#if MOLESERVE_WITH_METRICS
#include "server/metrics/prometheus_metrics.h"
#endif

ABSL_FLAG(std::string, http_host, "0.0.0.0", "Address the OpenAI-compatible HTTP API listens on");
ABSL_FLAG(int, http_port, 8000,
          "OpenAI-compatible HTTP API port (/v1/completions, /v1/models, /health; 0 = any free "
          "port, -1 = off)");
ABSL_FLAG(int64_t, http_max_body_bytes, int64_t{4} << 20,
          "Largest HTTP request body; larger gets 413");
ABSL_FLAG(int32_t, max_n, 16,
          "Most sequences one request may ask for: gRPC GenerateRequest.n, HTTP n (times the "
          "prompts of a /v1/completions call)");
ABSL_FLAG(std::string, chat_template, "",
          "Jinja chat template file for /v1/chat/completions, replacing the model's "
          "(chat_template.jinja or tokenizer_config.json's chat_template)");
ABSL_FLAG(std::string, model, "",
          "Hugging Face-style model directory (config.json, model.safetensors, tokenizer.json); "
          "empty = the built-in demo model");
ABSL_FLAG(std::vector<std::string>, adapter, {},
          "MoLE adapter to serve, as name=DIR (a mole/1 or PEFT LoRA directory); repeat the flag "
          "or separate with commas");
ABSL_FLAG(int, max_adapter_rank, 256, "Largest LoRA rank an adapter may have");
ABSL_FLAG(int32_t, metrics_top_adapters, 10,
          "Adapters with their own series in moleserve_adapter_requests / "
          "moleserve_adapter_tokens_total (the most active); the rest are summed as "
          "adapter=\"(other)\"");
ABSL_FLAG(int32_t, adapter_load_nice, 10,
          "Nice value (Linux) of the thread that reads and checks a hot-loaded adapter's files, "
          "so that loads take the CPU serving leaves; 0 = the admin call's own thread");
ABSL_FLAG(absl::Duration, max_adapter_load_time, absl::Minutes(10),
          "Longest a hot load may take (checked between its stages); the admin call's deadline "
          "wins when earlier");
ABSL_FLAG(
    std::string, adapter_root, "",
    "Directory that AdapterAdmin.LoadAdapter paths are confined to (empty = hot loading off)");
ABSL_FLAG(int64_t, max_adapter_file_bytes, int64_t{8} << 30, "Largest file of an adapter");
ABSL_FLAG(int64_t, max_adapter_bytes, int64_t{32} << 30, "Largest adapter (all its files)");
ABSL_FLAG(int64_t, expert_cache_bytes, 0,
          "Device memory for LoRA expert pages (0 = hold every loaded expert)");
ABSL_FLAG(int64_t, expert_pinned_host_bytes, int64_t{8} << 30,
          "Page-locked host memory for the LoRA experts' bf16 copies (CUDA); beyond it they stay "
          "in ordinary memory");
ABSL_FLAG(std::string, admin_host, "127.0.0.1", "Address the AdapterAdmin API listens on");
ABSL_FLAG(int, admin_port, 50052, "AdapterAdmin port (0 = any free port, -1 = off)");
ABSL_FLAG(std::string, admin_token_file, "",
          "File whose first line is the admin bearer token (empty = admin API off)");
ABSL_FLAG(bool, admin_allow_insecure, false,
          "Allow the admin listener on a non-loopback address without TLS (the bearer token then "
          "travels in plaintext)");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM certificate chain for TLS on the gRPC listener (and the admin listener unless "
          "--admin-tls-cert-file is given); empty = plaintext");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls-cert-file");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle: gRPC clients must present a certificate signed by it (mTLS)");
ABSL_FLAG(std::string, admin_tls_cert_file, "",
          "PEM certificate chain for the admin listener (default: --tls-cert-file)");
ABSL_FLAG(std::string, admin_tls_key_file, "",
          "PEM private key of --admin-tls-cert-file (default: --tls-key-file)");
ABSL_FLAG(std::string, admin_tls_client_ca_file, "",
          "PEM CA bundle: admin clients must present a certificate signed by it (mTLS)");
ABSL_FLAG(absl::Duration, tls_reload_interval, absl::Minutes(1),
          "How often certificate, key and CA files are re-read (renewals apply without a "
          "restart)");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address the gRPC API listens on");
ABSL_FLAG(int, port, 50051, "gRPC port (0 = any free port, printed at startup)");
ABSL_FLAG(std::string, metrics_host, "0.0.0.0", "Address /metrics listens on");
ABSL_FLAG(int, metrics_port, 9090, "Prometheus /metrics port (0 = any free port, -1 = off)");
ABSL_FLAG(int, threads, 0, "CPU threads for the engine (0 = all cores)");
ABSL_FLAG(std::string, backend, "cpu",
          "Compute backend: cpu (fp32), cuda (bf16 on --cuda-device) or auto (cuda when a GPU is "
          "visible)");
ABSL_FLAG(int, cuda_device, 0, "CUDA device index for --backend=cuda/auto");
ABSL_FLAG(int, max_batch_tokens, 2048, "Tokens per engine step (prefill chunks + decode tokens)");
ABSL_FLAG(int, max_num_seqs, 64, "Requests decoded together at most");
ABSL_FLAG(int, max_queue, 256, "Requests waiting for admission; beyond it RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, scheduling_policy, "expert_aware",
          "Queue policy: expert_aware (group requests by the experts they use, within a fair "
          "share per adapter and --max-queue-delay) or fcfs (arrival order)");
ABSL_FLAG(absl::Duration, max_queue_delay, absl::Seconds(2),
          "expert_aware: longest a request waits because of grouping before it goes first");
ABSL_FLAG(double, queue_delay_slack, 1.25,
          "expert_aware: relative aging, a request that has waited this many times the mean "
          "queue delay of recent admissions (at least 100 ms) goes ahead of grouping, within the "
          "fair share, with the next expert-pool room; 0 = off");
ABSL_FLAG(int64_t, fair_share_tokens, 0,
          "expert_aware: weighted tokens an adapter may be served ahead of the least served "
          "waiting one (0 = --max-batch-tokens)");
ABSL_FLAG(absl::Duration, fair_share_half_life, absl::Seconds(1),
          "expert_aware: the fair-share counters halve over this long, so a popular adapter is "
          "held back only while it takes far more than its share");
ABSL_FLAG(int32_t, max_bypass, 0,
          "expert_aware: later requests grouping may admit ahead of a waiting one before it goes "
          "next (0 = --max-num-seqs / 2)");
ABSL_FLAG(int64_t, kv_cache_mib, 256, "KV cache memory in MiB");
ABSL_FLAG(bool, prefix_caching, true,
          "Share the KV blocks of repeated prompt prefixes between requests of the same adapter, "
          "version and routing override (--noprefix_caching or --prefix-caching=false: off)");
ABSL_FLAG(int, max_model_len, 0, "Longest prompt + output per request (0 = model's context)");
ABSL_FLAG(int, default_max_new_tokens, 256, "max_new_tokens when a request leaves it 0");
ABSL_FLAG(int, max_message_bytes, 4 << 20, "Largest gRPC request message accepted");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM, how long in-flight requests may run before they are cancelled");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");

namespace {

int g_signal_pipe[2] = {-1, -1};
std::atomic<int> g_signals{0};

// protobuf logs an ERROR line for every string field that is not UTF-8, that is for every such
// request, which is already answered INVALID_ARGUMENT and counted in the rejections: its lines go
// to debug, escaped, so that hostile clients cannot flood or forge the log.
void ProtobufLog(google::protobuf::LogLevel level, const char* file, int line,
                 const std::string& message) {
  const std::string text = absl::CHexEscape(message);
  if (level == google::protobuf::LOGLEVEL_FATAL) {
    spdlog::critical("protobuf {}:{}: {}", file, line, text);
  } else {
    spdlog::debug("protobuf {}:{}: {}", file, line, text);
  }
}

// Async-signal-safe: only write(2) and _exit(2).
void OnSignal(int sig) {
  if (g_signals.fetch_add(1) > 0) _exit(128 + sig);
  const char byte = static_cast<char>(sig);
  [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &byte, 1);
}

int Run() {
  const std::string level_name = absl::GetFlag(FLAGS_log_level);
  const spdlog::level::level_enum level = spdlog::level::from_str(level_name);
  if (level == spdlog::level::off && level_name != "off") {
    spdlog::critical("--log-level: unknown level '{}' (trace, debug, info, warn, error, off)",
                     level_name);
    return 2;
  }
  spdlog::set_level(level);
  google::protobuf::SetLogHandler(&ProtobufLog);
  // SIGTERM/SIGINT: the first one starts a drain, a second one exits at once. A handler (not
  // sigwait) because threads started before main (OpenBLAS's) do not block signals.
  if (pipe(g_signal_pipe) != 0) {
    spdlog::critical("cannot create the signal pipe");
    return 1;
  }
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

#if MOLESERVE_WITH_METRICS
  std::unique_ptr<moleserve::server::PrometheusMetrics> metrics;
  if (absl::GetFlag(FLAGS_metrics_port) >= 0) {
    auto created = moleserve::server::PrometheusMetrics::Create(
        absl::StrCat(absl::GetFlag(FLAGS_metrics_host), ":", absl::GetFlag(FLAGS_metrics_port)),
        absl::GetFlag(FLAGS_metrics_top_adapters));
    if (!created.ok()) {
      spdlog::critical("{}", created.status().ToString());
      return 1;
    }
    metrics = *std::move(created);
  }
#else
  struct NoMetrics {
    moleserve::engine::MetricsSink* get() const { return nullptr; }
  } metrics;
  if (absl::GetFlag(FLAGS_metrics_port) >= 0) {
    spdlog::warn("built without MOLESERVE_ENABLE_METRICS: /metrics is off");
  }
#endif

  if (absl::GetFlag(FLAGS_max_n) < 1 || absl::GetFlag(FLAGS_max_n) > 1024) {
    spdlog::critical("--max-n must be in 1..1024 (it is {})", absl::GetFlag(FLAGS_max_n));
    return 1;
  }
  moleserve::engine::EngineOptions options;
  options.model = absl::GetFlag(FLAGS_model);
  options.num_threads = absl::GetFlag(FLAGS_threads);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.cuda_device = absl::GetFlag(FLAGS_cuda_device);
  options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  options.max_num_seqs = absl::GetFlag(FLAGS_max_num_seqs);
  options.max_queue = absl::GetFlag(FLAGS_max_queue);
  options.scheduling_policy = absl::GetFlag(FLAGS_scheduling_policy);
  options.max_queue_delay = absl::GetFlag(FLAGS_max_queue_delay);
  options.queue_delay_slack = absl::GetFlag(FLAGS_queue_delay_slack);
  options.fair_share_tokens = absl::GetFlag(FLAGS_fair_share_tokens);
  options.prefix_caching = absl::GetFlag(FLAGS_prefix_caching);
  options.max_bypass = absl::GetFlag(FLAGS_max_bypass);
  options.fair_share_half_life = absl::GetFlag(FLAGS_fair_share_half_life);
  options.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_mib) << 20;
  options.max_model_len = absl::GetFlag(FLAGS_max_model_len);
  options.default_max_new_tokens = absl::GetFlag(FLAGS_default_max_new_tokens);
  options.metrics = metrics.get();
  options.max_adapter_rank = absl::GetFlag(FLAGS_max_adapter_rank);
  options.adapter_root = absl::GetFlag(FLAGS_adapter_root);
  options.max_adapter_file_bytes = absl::GetFlag(FLAGS_max_adapter_file_bytes);
  options.max_adapter_bytes = absl::GetFlag(FLAGS_max_adapter_bytes);
  options.expert_cache_bytes = absl::GetFlag(FLAGS_expert_cache_bytes);
  options.chat_template_file = absl::GetFlag(FLAGS_chat_template);
  options.expert_pinned_host_bytes = absl::GetFlag(FLAGS_expert_pinned_host_bytes);
  options.max_adapter_load_time = absl::GetFlag(FLAGS_max_adapter_load_time);
  options.adapter_load_nice = absl::GetFlag(FLAGS_adapter_load_nice);
  moleserve::server::ServerOptions server_options{
      .listen_address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port)),
      .max_receive_message_bytes = absl::GetFlag(FLAGS_max_message_bytes),
      .max_n = absl::GetFlag(FLAGS_max_n),
      .tls = {.cert_file = absl::GetFlag(FLAGS_tls_cert_file),
              .key_file = absl::GetFlag(FLAGS_tls_key_file),
              .client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file),
              .reload_interval = absl::GetFlag(FLAGS_tls_reload_interval)},
      .allow_insecure_admin = absl::GetFlag(FLAGS_admin_allow_insecure)};
  const bool own_admin_cert = !absl::GetFlag(FLAGS_admin_tls_cert_file).empty() ||
                              !absl::GetFlag(FLAGS_admin_tls_key_file).empty();
  server_options.admin_tls = {.cert_file = own_admin_cert ? absl::GetFlag(FLAGS_admin_tls_cert_file)
                                                          : server_options.tls.cert_file,
                              .key_file = own_admin_cert ? absl::GetFlag(FLAGS_admin_tls_key_file)
                                                         : server_options.tls.key_file,
                              .client_ca_file = absl::GetFlag(FLAGS_admin_tls_client_ca_file),
                              .reload_interval = absl::GetFlag(FLAGS_tls_reload_interval)};
  if (const std::string token_file = absl::GetFlag(FLAGS_admin_token_file);
      !token_file.empty() && absl::GetFlag(FLAGS_admin_port) >= 0) {
    absl::StatusOr<std::string> token = moleserve::server::ReadAdminToken(token_file);
    if (!token.ok()) {
      spdlog::critical("--admin-token-file: {}", std::string(token.status().message()));
      return 2;
    }
    server_options.admin_address =
        absl::StrCat(absl::GetFlag(FLAGS_admin_host), ":", absl::GetFlag(FLAGS_admin_port));
    server_options.admin_token = *std::move(token);
    // One JSON object per line: nothing a caller sends can forge or split an audit line.
    server_options.admin_audit = [](const moleserve::server::AdminAuditEntry& e) {
      spdlog::info("admin audit: {}", moleserve::server::FormatAuditLine(e));
    };
  }
  for (const std::string& spec : absl::GetFlag(FLAGS_adapter)) {
    const size_t eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
      spdlog::critical("--adapter '{}': expected name=DIR", spec);
      return 2;
    }
    options.adapters.emplace_back(spec.substr(0, eq), spec.substr(eq + 1));
  }
  spdlog::info("loading {}", options.model.empty() ? "the built-in demo model" : options.model);
  // Start-up adapters are loaded once the listeners are up (health NOT_SERVING meanwhile), so a
  // start with thousands of them is reachable and reports its progress.
  const std::vector<std::pair<std::string, std::string>> startup_adapters =
      std::move(options.adapters);
  options.adapters.clear();
  server_options.serving_at_start = startup_adapters.empty();
  auto engine = moleserve::engine::Engine::Create(options);
  if (!engine.ok()) {
    spdlog::critical("cannot start the engine: {}", engine.status().ToString());
    return 1;
  }
  const moleserve::engine::ModelInfo& info = (*engine)->model_info();
  spdlog::info("model {} ({}, {} layers, hidden {}, vocab {}, context {}, {:.1f}M params) on {}",
               info.name, info.architecture, info.num_layers, info.hidden_size, info.vocab_size,
               info.context_length, info.parameter_count / 1e6, info.backend);
  auto server = moleserve::server::MoleServer::Start(engine->get(), server_options);
  if (!server.ok()) {
    spdlog::critical("{}", server.status().ToString());
    return 1;
  }
  auto security = [](const moleserve::server::TlsOptions& tls) {
    if (!tls.enabled()) return std::string("plaintext");
    return tls.client_ca_file.empty() ? std::string("TLS")
                                      : std::string("TLS, client certificates required");
  };
  if (!startup_adapters.empty()) {
    spdlog::info(
        "listening for gRPC on {}:{} ({}); readiness NOT_SERVING until {} start-up "
        "adapters are loaded",
        absl::GetFlag(FLAGS_host), (*server)->port(), security(server_options.tls),
        startup_adapters.size());
  }
  if ((*server)->admin_port() != 0) {
    spdlog::info("serving AdapterAdmin on {}:{} ({}; adapter root: {})",
                 absl::GetFlag(FLAGS_admin_host), (*server)->admin_port(),
                 security(server_options.admin_tls),
                 options.adapter_root.empty() ? "none, loads refused" : options.adapter_root);
  } else {
    spdlog::info("AdapterAdmin off (no --admin-token-file)");
  }
#if MOLESERVE_WITH_METRICS
  if (metrics) {
    spdlog::info("serving /metrics on port {} (host {}, plaintext)", metrics->port(),
                 absl::GetFlag(FLAGS_metrics_host));
  }
#endif
  // The OpenAI-compatible HTTP API, on the same engine.
  std::unique_ptr<moleserve::server::OpenAiApi> openai;
  std::unique_ptr<moleserve::server::HttpServer> http;
  if (absl::GetFlag(FLAGS_http_port) >= 0) {
    moleserve::server::OpenAiApiOptions api_options;
    api_options.max_n = absl::GetFlag(FLAGS_max_n);
#if MOLESERVE_WITH_METRICS
    if (metrics) api_options.metrics_text = [m = metrics.get()] { return m->Text(); };
#endif
    openai = std::make_unique<moleserve::server::OpenAiApi>(engine->get(), api_options);
    auto started = moleserve::server::HttpServer::Start(
        {.address = absl::GetFlag(FLAGS_http_host),
         .port = absl::GetFlag(FLAGS_http_port),
         .max_body_bytes = absl::GetFlag(FLAGS_http_max_body_bytes)},
        [api = openai.get()](moleserve::server::HttpRequest r,
                             std::shared_ptr<moleserve::server::HttpResponder> out) {
          api->Handle(std::move(r), std::move(out));
        });
    if (!started.ok()) {
      spdlog::critical("{}", started.status().ToString());
      return 1;
    }
    http = *std::move(started);
    spdlog::info("serving the OpenAI-compatible HTTP API on {}:{} (plaintext)",
                 absl::GetFlag(FLAGS_http_host), http->port());
  } else {
    spdlog::info("HTTP API off (--http-port=-1)");
  }
  // The start-up adapters, now that every listener is up; a signal stops the start.
  if (!startup_adapters.empty()) {
    if (openai) openai->SetReady(false);
    const absl::Time t0 = absl::Now();
    for (size_t i = 0; i < startup_adapters.size(); ++i) {
      const auto& [name, dir] = startup_adapters[i];
      if (absl::Status st = (*engine)->LoadStartupAdapter(name, dir); !st.ok()) {
        spdlog::critical("start-up adapter {}: {}", moleserve::engine::Quote(name), st.ToString());
        return 1;
      }
      const size_t loaded = i + 1;
      if (loaded % 100 == 0 || loaded == startup_adapters.size()) {
        spdlog::info("loaded {} of {} start-up adapters ({:.1f} s)", loaded,
                     startup_adapters.size(), absl::ToDoubleSeconds(absl::Now() - t0));
      }
      pollfd signalled{.fd = g_signal_pipe[0], .events = POLLIN, .revents = 0};
      if (poll(&signalled, 1, 0) > 0) {
        spdlog::info("signal during start-up: exiting before every adapter is loaded");
        return 0;
      }
    }
  }
  const std::vector<moleserve::engine::AdapterSummary> adapters = (*engine)->ListAdapters();
  constexpr size_t kListed = 20;  // one line each for the first ones, then a count
  for (size_t i = 0; i < adapters.size() && i < kListed; ++i) {
    const moleserve::engine::AdapterSummary& a = adapters[i];
    spdlog::info("adapter {} ({}, {}; {} experts, {:.1f} MiB) from {}", a.name, a.family, a.format,
                 a.num_experts, a.bytes / 1048576.0, a.source);
  }
  if (adapters.size() > kListed) {
    spdlog::info("... and {} more adapters (molectl admin list)", adapters.size() - kListed);
  }

  spdlog::info("serving gRPC on {}:{} ({})", absl::GetFlag(FLAGS_host), (*server)->port(),
               security(server_options.tls));
  (*server)->SetServing(true);
  if (openai) openai->SetReady(true);
  // Every socket this process listens on, as the kernel reports them: an operator can check
  // that nothing serves on an address they were not told about.
  for (const std::string& address : moleserve::server::ListeningTcpAddresses()) {
    spdlog::info("listening socket: {}", address);
  }
  std::fflush(stdout);

  char sig = 0;
  while (read(g_signal_pipe[0], &sig, 1) < 0 && errno == EINTR) {
  }
  spdlog::info("signal {}: draining (up to {}); a second signal exits at once", int{sig},
               absl::FormatDuration(absl::GetFlag(FLAGS_drain_timeout)));
  if (openai) openai->StartDrain();  // new HTTP requests 503; in-flight ones finish
  (*server)->Drain(absl::GetFlag(FLAGS_drain_timeout));
  if (http) http->Shutdown();
  spdlog::info("drained; exiting");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "moleserve: gRPC and OpenAI-compatible HTTP inference server for Mixture-of-LoRA-Experts "
      "models.\n"
      "  moleserve [--model DIR] [--port 50051] [--http-port 8000] [--metrics-port 9090]");
  std::vector<std::string> storage;
  std::vector<char*> args =
      moleserve::server::NormalizeDashedFlags(argc, argv, &storage, {"adapter"});
  absl::ParseCommandLine(static_cast<int>(args.size()), args.data());
  return Run();
}
