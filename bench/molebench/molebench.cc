// molebench: load generator for moleserve's Inference/Generate, reporting what `vllm bench serve`
// reports (TTFT, TPOT, ITL, E2E, throughput, goodput) plus status counts, per-adapter latencies
// and server-side expert-cache deltas scraped from /metrics.
//
//   molebench --addr localhost:50051 --metrics-addr 127.0.0.1:9090 --mode open --rate 20
//             --num-requests 500 --adapters mole:40 --popularity zipf
//             --prompt-len uniform:16:64 --output-len fixed:32 --out run.json
//   molebench --mode closed --concurrency 64 --dataset prompts.jsonl --slo-ttft-ms 200
//
// Open loop sends on a Poisson schedule (--rate, optionally capped at --concurrency in flight: a
// request due while the cap is reached waits, and its send time is when it really goes out).
// Closed loop keeps --concurrency requests in flight. Requests are greedy (temperature 0) with
// ignore_eos, so each generates exactly its output length unless it fails.
//
// Requests run on gRPC's callback API (one ClientReadReactor per request), so hundreds of streams
// in flight need no thread each; token arrival times are taken in the reactors' callbacks.
// Exit status: 0 when the run completed (failed requests are counted, not fatal), 1 when the
// report could not be written, 2 on a setup error (flags, dataset, connection, first scrape).

#include <grpcpp/grpcpp.h>
#include <netdb.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/molebench/http_driver.h"
#include "bench/molebench/stats.h"
#include "bench/molebench/workload.h"
#include "engine/core/mutex.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/cli/dashed_flags.h"
#include "server/grpc/metadata.h"

ABSL_FLAG(std::string, addr, "localhost:50051", "moleserve gRPC address (host:port)");
ABSL_FLAG(std::string, protocol, "grpc",
          "grpc: Inference/Generate at --addr; http: the OpenAI-compatible API at --http-addr "
          "(POST /v1/completions, streamed), the same requests");
ABSL_FLAG(std::string, http_addr, "localhost:8000",
          "moleserve's OpenAI-compatible HTTP address (host:port), for --protocol http");
ABSL_FLAG(std::string, metrics_addr, "",
          "host:port of the server's Prometheus /metrics endpoint, scraped before and after the "
          "run (empty = no server-side metrics)");
ABSL_FLAG(std::string, mode, "open",
          "open: Poisson arrivals at --rate; closed: --concurrency requests always in flight; "
          "chat: --num-requests multi-turn conversations, --concurrency of them at once");
ABSL_FLAG(double, rate, std::numeric_limits<double>::infinity(),
          "Open loop: mean requests per second (inf = all at once)");
ABSL_FLAG(int, concurrency, 0,
          "Closed loop: requests in flight (required). Open loop: cap on requests in flight "
          "(0 = none)");
ABSL_FLAG(int, num_requests, 100, "Requests to send (with --dataset, 0 = one per line)");
ABSL_FLAG(uint64_t, seed, 0, "Seed of every random choice (lengths, prompts, adapters, arrivals)");
ABSL_FLAG(std::string, prompt_len, "fixed:32",
          "Prompt length: fixed:N, uniform:A:B or normal:MEAN:STD (random token ids)");
ABSL_FLAG(std::string, output_len, "fixed:32",
          "Output length (max_new_tokens, ignore_eos): fixed:N, uniform:A:B or normal:MEAN:STD");
ABSL_FLAG(std::string, dataset, "",
          "JSONL prompts instead of random ids: {\"prompt\": \"text\"} or {\"prompt_ids\": "
          "[...]}, optional \"output_len\": N and \"adapter\": \"name\"");
ABSL_FLAG(std::string, token_id_range, "10:250", "Random prompt ids are drawn from [LO, HI)");
ABSL_FLAG(std::string, adapters, "",
          "Adapters: a comma list, or PREFIX:N for PREFIX0..PREFIX{N-1}; empty = base model");
ABSL_FLAG(std::string, popularity, "uniform",
          "Adapter of each request: uniform or zipf over a seeded random ranking");
ABSL_FLAG(double, zipf_s, 1.0, "Zipf exponent s (rank k drawn with weight 1/k^s)");
ABSL_FLAG(double, slo_ttft_ms, 0, "Goodput SLO on TTFT in ms (0 = not set)");
ABSL_FLAG(double, slo_tpot_ms, 0, "Goodput SLO on TPOT in ms (0 = not set)");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(120), "Deadline of each request");
ABSL_FLAG(absl::Duration, connect_timeout, absl::Seconds(10),
          "How long connecting to the server may take before giving up");
ABSL_FLAG(bool, wait_for_server, false,
          "Keep retrying a refused connection until --connect-timeout (default: fail at once)");
ABSL_FLAG(int, channels, 1, "gRPC channels (connections) the requests are spread over");
ABSL_FLAG(std::string, out, "", "JSON report path (empty = none)");
ABSL_FLAG(std::string, label, "", "Free text copied into the report");
ABSL_FLAG(int, turns, 4, "--mode=chat: turns per conversation");
ABSL_FLAG(int, system_prompt_len, 256,
          "--mode=chat: tokens of the system prompt every conversation starts with");

namespace {

namespace pb = moleserve::v1;
using moleserve::bench::BenchSummary;
using moleserve::bench::MetricSample;
using moleserve::bench::PlannedRequest;
using moleserve::bench::RequestRecord;
using moleserve::engine::CondVar;
using moleserve::engine::Mutex;
using moleserve::engine::MutexLock;
using Clock = std::chrono::steady_clock;

constexpr int kSetupError = 2;

// --- /metrics scraping -------------------------------------------------------------------------

// GET /metrics from "host:port" over HTTP/1.0; the body of a 200 response.
absl::StatusOr<std::string> FetchMetrics(const std::string& addr) {
  absl::StatusOr<moleserve::bench::HttpEndpoint> endpoint =
      moleserve::bench::ParseHttpEndpoint(addr);
  if (!endpoint.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-addr: ", endpoint.status().message()));
  }
  const std::string& host = endpoint->host;
  const std::string& port = endpoint->port;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve ", addr, ": ", gai_strerror(rc)));
  }
  std::string response;
  bool connected = false;
  for (addrinfo* ai = found; ai != nullptr && !connected; ai = ai->ai_next) {
    const int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
    if (fd < 0) continue;
    timeval tv{.tv_sec = 10, .tv_usec = 0};  // bounds connect, send and every recv
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      connected = true;
      const std::string request = absl::StrCat("GET /metrics HTTP/1.0\r\nHost: ", host, "\r\n\r\n");
      if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) ==
          static_cast<ssize_t>(request.size())) {
        char buf[8192];
        ssize_t n;
        while ((n = recv(fd, buf, sizeof(buf), 0)) > 0) response.append(buf, n);
      }
    }
    close(fd);
  }
  freeaddrinfo(found);
  if (!connected) return absl::UnavailableError(absl::StrCat("cannot connect to ", addr));
  const size_t body = response.find("\r\n\r\n");
  const size_t status_end = response.find("\r\n");
  if (!absl::StartsWith(response, "HTTP/1.") || body == std::string::npos ||
      !absl::StrContains(response.substr(0, status_end), " 200")) {
    return absl::UnavailableError(absl::StrCat("bad /metrics response from ", addr, ": '",
                                               response.substr(0, status_end), "'"));
  }
  return response.substr(body + 4);
}

absl::StatusOr<std::vector<MetricSample>> ScrapeMetrics(const std::string& addr) {
  absl::StatusOr<std::string> text = FetchMetrics(addr);
  if (!text.ok()) return text.status();
  return moleserve::bench::ParsePrometheusText(*text);
}

// --- gRPC driver -------------------------------------------------------------------------------

// Sends a plan's requests and records what comes back.
//
// Lifecycle: Run() dispatches every request (pacing by send offset and/or in-flight cap) and
// returns when all have ended; one Driver runs one plan. Thread safety: Run() is called from one
// thread; reactors call OnCallDone() from gRPC's callback threads. Each reactor alone writes its
// request's RequestRecord; Run() reads the records only after every reactor has ended (ordered by
// mu_).
class Driver {
 public:
  Driver(std::vector<std::unique_ptr<pb::Inference::Stub>> stubs, absl::Duration timeout)
      : stubs_(std::move(stubs)), timeout_(timeout) {}

  // max_in_flight 0 = no cap; paced = honour send offsets (open loop).
  std::vector<RequestRecord> Run(const std::vector<PlannedRequest>& plan, int max_in_flight,
                                 bool paced);

  void OnCallDone() {
    MutexLock lock(&mu_);
    --in_flight_;
    ++done_;
    cv_.NotifyAll();
  }
  double Now() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  void Start(const PlannedRequest& request, RequestRecord* record);

  const std::vector<std::unique_ptr<pb::Inference::Stub>> stubs_;
  const absl::Duration timeout_;
  Clock::time_point start_;
  Mutex mu_;  // guards the counters below
  CondVar cv_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int done_ ABSL_GUARDED_BY(mu_) = 0;
};

// One Generate stream. Owns itself: deleted in OnDone, after which it tells the driver.
class GenerateCall final : public grpc::ClientReadReactor<pb::GenerateResponse> {
 public:
  GenerateCall(Driver* driver, RequestRecord* record, pb::GenerateRequest request,
               int64_t planned_prompt_tokens)
      : driver_(driver),
        record_(record),
        request_(std::move(request)),
        planned_prompt_tokens_(planned_prompt_tokens) {}

  void Start(pb::Inference::Stub* stub, absl::Duration timeout) {
    context_.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
    // The adapter also as metadata, so a balancer that hashes on it (deploy/nginx) can route.
    if (!request_.adapter().empty())
      context_.AddMetadata(moleserve::server::kAdapterHeader, request_.adapter());
    record_->send_s = driver_->Now();
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    const double now = driver_->Now();
    record_->token_times_s.insert(record_->token_times_s.end(), response_.token_ids_size(), now);
    if (response_.has_final()) final_prompt_tokens_ = response_.final().prompt_tokens();
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    record_->end_s = driver_->Now();
    record_->code = static_cast<absl::StatusCode>(status.error_code());
    record_->error_message = status.error_message();
    record_->prompt_tokens =
        final_prompt_tokens_ > 0 ? final_prompt_tokens_ : planned_prompt_tokens_;
    Driver* driver = driver_;
    delete this;
    driver->OnCallDone();
  }

 private:
  Driver* const driver_;
  RequestRecord* const record_;
  grpc::ClientContext context_;
  const pb::GenerateRequest request_;
  const int64_t planned_prompt_tokens_;
  pb::GenerateResponse response_;
  int64_t final_prompt_tokens_ = 0;
};

pb::GenerateRequest BuildRequest(const PlannedRequest& p) {
  pb::GenerateRequest req;
  req.set_request_id(absl::StrCat("molebench-", p.index));
  req.set_adapter(p.adapter);
  if (!p.prompt_ids.empty()) {
    req.mutable_token_ids()->mutable_ids()->Add(p.prompt_ids.begin(), p.prompt_ids.end());
  } else {
    req.set_text(p.prompt_text);
  }
  req.mutable_sampling()->set_temperature(0);
  req.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(p.output_len));
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

void Driver::Start(const PlannedRequest& request, RequestRecord* record) {
  record->adapter = request.adapter;
  auto* call = new GenerateCall(this, record, BuildRequest(request),
                                static_cast<int64_t>(request.prompt_ids.size()));
  call->Start(stubs_[request.index % stubs_.size()].get(), timeout_);
}

std::vector<RequestRecord> Driver::Run(const std::vector<PlannedRequest>& plan, int max_in_flight,
                                       bool paced) {
  std::vector<RequestRecord> records(plan.size());
  const int total = static_cast<int>(plan.size());
  start_ = Clock::now();
  for (const PlannedRequest& request : plan) {
    if (paced) {
      std::this_thread::sleep_until(start_ +
                                    std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(request.send_offset_s)));
    }
    {
      MutexLock lock(&mu_);
      if (max_in_flight > 0) {
        cv_.WaitFor(&mu_, absl::InfiniteDuration(),
                    [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return in_flight_ < max_in_flight; });
      }
      ++in_flight_;
    }
    Start(request, &records[request.index]);
  }
  // Wait for the stragglers, with a progress line every 10 s.
  MutexLock lock(&mu_);
  while (!cv_.WaitFor(&mu_, absl::Seconds(10),
                      [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return done_ == total; })) {
    std::cerr << absl::StreamFormat("molebench: %d/%d requests done, %d in flight\n", done_, total,
                                    in_flight_);
  }
  return records;
}

// --- chat mode ---------------------------------------------------------------------------------

// One multi-turn conversation: its adapter, and per turn the question it adds and the tokens it
// asks for. Turn t's prompt is the system prompt, every earlier question and answer (the tokens
// the server generated), then question t: what a chat client sends back every turn.
struct Conversation {
  std::string adapter;
  std::vector<std::vector<uint32_t>> questions;
  std::vector<int> output_lens;
};

std::vector<Conversation> PlanChat(const moleserve::bench::WorkloadConfig& c, int turns,
                                   const moleserve::bench::AdapterSampler& adapters) {
  std::mt19937_64 adapter_rng(c.seed * 3 + 1), length_rng(c.seed * 3 + 2), id_rng(c.seed * 3 + 3);
  std::uniform_int_distribution<uint32_t> id(c.token_id_min, c.token_id_max - 1);
  std::vector<Conversation> out(c.num_requests);
  for (Conversation& conv : out) {
    conv.adapter = adapters.Sample(adapter_rng);
    for (int t = 0; t < turns; ++t) {
      std::vector<uint32_t> q(c.prompt_len.Sample(length_rng));
      for (uint32_t& v : q) v = id(id_rng);
      conv.questions.push_back(std::move(q));
      conv.output_lens.push_back(c.output_len.Sample(length_rng));
    }
  }
  return out;
}

// Runs the conversations, `concurrency` at a time (0 = all at once), each turn after the one
// before it ended. records[conversation * turns + turn]; a failed turn ends its conversation
// (its later turns stay unsent: code kUnknown, not counted as requests).
std::vector<RequestRecord> RunChat(const std::vector<std::unique_ptr<pb::Inference::Stub>>& stubs,
                                   const std::vector<uint32_t>& system_prompt,
                                   const std::vector<Conversation>& conversations, int turns,
                                   int concurrency, absl::Duration timeout) {
  std::vector<RequestRecord> records(conversations.size() * turns);
  const Clock::time_point start = Clock::now();
  auto now = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t c = next++; c < conversations.size(); c = next++) {
      const Conversation& conv = conversations[c];
      std::vector<uint32_t> history = system_prompt;
      for (int t = 0; t < turns; ++t) {
        history.insert(history.end(), conv.questions[t].begin(), conv.questions[t].end());
        pb::GenerateRequest req;
        req.set_request_id(absl::StrCat("molebench-chat-", c, "-", t));
        req.set_adapter(conv.adapter);
        req.mutable_token_ids()->mutable_ids()->Add(history.begin(), history.end());
        req.mutable_sampling()->set_temperature(0);
        req.mutable_stopping()->set_max_new_tokens(static_cast<uint32_t>(conv.output_lens[t]));
        req.mutable_stopping()->set_ignore_eos(true);
        RequestRecord& r = records[c * turns + t];
        r.adapter = conv.adapter;
        r.prompt_tokens = static_cast<int64_t>(history.size());
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout));
        if (!conv.adapter.empty()) {
          ctx.AddMetadata(moleserve::server::kAdapterHeader, conv.adapter);
        }
        r.send_s = now();
        auto reader = stubs[c % stubs.size()]->Generate(&ctx, req);
        pb::GenerateResponse msg;
        while (reader->Read(&msg)) {
          r.token_times_s.insert(r.token_times_s.end(), msg.token_ids_size(), now());
          history.insert(history.end(), msg.token_ids().begin(), msg.token_ids().end());
        }
        const grpc::Status st = reader->Finish();
        r.end_s = now();
        r.code = static_cast<absl::StatusCode>(st.error_code());
        r.error_message = st.error_message();
        if (!st.ok()) break;
      }
    }
  };
  const int n = concurrency > 0 ? std::min<int>(concurrency, static_cast<int>(conversations.size()))
                                : static_cast<int>(conversations.size());
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) threads.emplace_back(worker);
  for (std::thread& t : threads) t.join();
  return records;
}

void PrintLine(absl::string_view key, absl::string_view value);  // below, with the report

// TTFT per turn: where a prefix cache shows (later turns repeat the earlier ones).
nlohmann::json PerTurn(const std::vector<RequestRecord>& records, int turns,
                       const moleserve::bench::SloConfig& slo) {
  nlohmann::json out = nlohmann::json::array();
  std::cout << "--------------- Per turn (TTFT ms) ---------------\n";
  for (int t = 0; t < turns; ++t) {
    std::vector<RequestRecord> of_turn;
    for (size_t i = t; i < records.size(); i += turns) {
      if (records[i].code != absl::StatusCode::kUnknown) of_turn.push_back(records[i]);
    }
    const BenchSummary s = moleserve::bench::SummarizeRun(of_turn, slo);
    PrintLine(absl::StrCat("  turn ", t + 1, ":"),
              absl::StrFormat("n=%d  prompt tokens %d  TTFT p50 %.2f p99 %.2f", s.completed,
                              s.completed > 0 ? s.input_tokens / s.completed : 0, s.ttft_ms.p50,
                              s.ttft_ms.p99));
    out.push_back({{"turn", t + 1},
                   {"completed", s.completed},
                   {"mean_prompt_tokens", s.completed > 0 ? s.input_tokens / s.completed : 0},
                   {"ttft_ms", moleserve::bench::SummaryToJson(s.ttft_ms)}});
  }
  return out;
}

// --- report ------------------------------------------------------------------------------------

std::string AdapterName(const std::string& name) { return name.empty() ? "(base)" : name; }

void PrintLine(absl::string_view key, absl::string_view value) {
  std::cout << absl::StreamFormat("%-40s %s\n", key, value);
}

std::string FormatSummary(const moleserve::bench::Summary& s) {
  if (s.count == 0) return "n/a";
  return absl::StrFormat("mean %.2f  p50 %.2f  p90 %.2f  p99 %.2f  max %.2f  (n=%d)", s.mean, s.p50,
                         s.p90, s.p99, s.max, s.count);
}

std::string FormatOptional(const std::optional<double>& v) {
  return v.has_value() ? absl::StrFormat("%.2f", *v) : "n/a";
}

void PrintReport(const BenchSummary& s, const moleserve::bench::SloConfig& slo,
                 const std::string& label, const std::string& mode,
                 const std::optional<moleserve::bench::ServerMetricsDelta>& server,
                 const std::string& server_error) {
  std::cout << "============ Serving Benchmark Result ============\n";
  if (!label.empty()) PrintLine("Label:", label);
  PrintLine("Mode:", mode);
  PrintLine("Requests (sent/completed/failed):",
            absl::StrCat(s.requests, " / ", s.completed, " / ", s.failed));
  std::vector<std::string> codes;
  for (const auto& [code, n] : s.status_counts) codes.push_back(absl::StrCat(code, "=", n));
  PrintLine("Status codes:", absl::StrJoin(codes, "  "));
  for (const auto& [code, message] : s.first_errors) {
    PrintLine(absl::StrCat("  first ", code, ":"), message);
  }
  PrintLine("Benchmark duration (s):", absl::StrFormat("%.2f", s.duration_s));
  PrintLine("Tokens (input/output):", absl::StrCat(s.input_tokens, " / ", s.output_tokens));
  PrintLine("Throughput (req/s, out tok/s, tok/s):",
            absl::StrFormat("%.2f  %.2f  %.2f", s.request_throughput, s.output_token_throughput,
                            s.total_token_throughput));
  if (slo.any()) {
    std::vector<std::string> slos;
    if (slo.ttft_ms > 0) slos.push_back(absl::StrCat("TTFT <= ", slo.ttft_ms, " ms"));
    if (slo.tpot_ms > 0) slos.push_back(absl::StrCat("TPOT <= ", slo.tpot_ms, " ms"));
    PrintLine("Goodput (req/s):",
              absl::StrFormat("%.2f  (%d requests met %s)", s.goodput.value_or(0), s.good_requests,
                              absl::StrJoin(slos, " and ")));
  }
  std::cout << "---------------- Latency (ms) --------------------\n";
  PrintLine("TTFT:", FormatSummary(s.ttft_ms));
  PrintLine("TPOT:", FormatSummary(s.tpot_ms));
  PrintLine("ITL:", FormatSummary(s.itl_ms));
  PrintLine("E2E latency:", FormatSummary(s.e2e_ms));
  std::cout << "------ Per adapter (top 10 by requests, ms) ------\n";
  const moleserve::bench::AdapterStats* worst = nullptr;
  for (size_t i = 0; i < s.per_adapter.size(); ++i) {
    const moleserve::bench::AdapterStats& a = s.per_adapter[i];
    if (a.ttft_ms.count > 0 && (worst == nullptr || a.ttft_ms.p99 > worst->ttft_ms.p99)) worst = &a;
    if (i >= 10) continue;
    if (a.completed == 0) {
      PrintLine(absl::StrCat("  ", AdapterName(a.adapter), ":"),
                absl::StrFormat("n=%d ok=0", a.requests));
      continue;
    }
    PrintLine(
        absl::StrCat("  ", AdapterName(a.adapter), ":"),
        absl::StrFormat("n=%d ok=%d  TTFT p50 %.2f p99 %.2f  E2E p50 %.2f p99 %.2f", a.requests,
                        a.completed, a.ttft_ms.p50, a.ttft_ms.p99, a.e2e_ms.p50, a.e2e_ms.p99));
  }
  if (worst != nullptr) {
    PrintLine(absl::StrCat("Worst adapter TTFT p99 (of ", s.per_adapter.size(), "):"),
              absl::StrFormat("%s %.2f ms", AdapterName(worst->adapter), worst->ttft_ms.p99));
  }
  if (server.has_value() || !server_error.empty()) {
    std::cout << "------------ Server (/metrics deltas) ------------\n";
  }
  if (!server_error.empty()) PrintLine("Scrape error:", server_error);
  if (server.has_value()) {
    const auto delta = [&](absl::string_view key) {
      const auto it = server->deltas.find(std::string(key));
      return it == server->deltas.end() ? 0.0 : it->second;
    };
    PrintLine("Generated tokens / steps:",
              absl::StrFormat("%.0f / %.0f", delta("moleserve_generation_tokens_total"),
                              delta("moleserve_steps_total")));
    PrintLine("Rejected / preempted requests:",
              absl::StrFormat("%.0f / %.0f", delta("moleserve_requests_rejected_total"),
                              server->preemptions));
    PrintLine("Expert bytes moved per gen token:", FormatOptional(server->expert_bytes_per_token));
    PrintLine("Swaps per 1000 gen tokens:", FormatOptional(server->swaps_per_1k_tokens));
    PrintLine("Mean distinct experts per step:",
              FormatOptional(server->mean_distinct_experts_per_step));
    if (!server->missing.empty())
      PrintLine("Missing metrics:", absl::StrJoin(server->missing, " "));
  }
  std::cout << "==================================================" << std::endl;
}

// --- setup -------------------------------------------------------------------------------------

int SetupError(const absl::Status& status) {
  std::cerr << "molebench: error: " << status.message() << "\n";
  return kSetupError;
}

int SetupError(absl::string_view message) {
  std::cerr << "molebench: error: " << message << "\n";
  return kSetupError;
}

// Adapter names the server does not list (warned about, not fatal: the server may load them).
void CheckServer(pb::Inference::Stub& stub, const std::vector<PlannedRequest>& plan,
                 nlohmann::json* info) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  pb::ListModelsResponse resp;
  const grpc::Status status = stub.ListModels(&ctx, pb::ListModelsRequest(), &resp);
  if (!status.ok()) {
    std::cerr << "molebench: warning: ListModels failed (" << status.error_message()
              << "); adapters not checked\n";
    return;
  }
  std::set<std::string> known = {""};
  for (const pb::AdapterInfo& a : resp.adapters()) known.insert(a.name());
  std::set<std::string> unknown;
  for (const PlannedRequest& p : plan) {
    if (!known.contains(p.adapter)) unknown.insert(p.adapter);
  }
  if (!unknown.empty()) {
    std::vector<std::string> some(unknown.begin(),
                                  std::next(unknown.begin(), std::min<size_t>(unknown.size(), 8)));
    if (some.size() < unknown.size()) some.push_back(absl::StrCat("... (", unknown.size(), ")"));
    std::cerr << "molebench: warning: the server lists no adapter named "
              << absl::StrJoin(some, ", ") << "; those requests will likely fail NOT_FOUND\n";
  }
  *info = {{"base_model", resp.base().name()},
           {"backend", resp.base().backend()},
           {"dtype", resp.base().dtype()},
           {"adapters_listed", resp.adapters_size()}};
}

// Waits for `channel` to be READY: up to --connect-timeout, failing at the first refused attempt
// unless --wait-for-server.
absl::Status Connect(grpc::Channel& channel, const std::string& addr) {
  const absl::Duration timeout = absl::GetFlag(FLAGS_connect_timeout);
  const auto deadline = absl::ToChronoTime(absl::Now() + timeout);
  grpc_connectivity_state state = channel.GetState(/*try_to_connect=*/true);
  while (state != GRPC_CHANNEL_READY) {
    if (state == GRPC_CHANNEL_TRANSIENT_FAILURE && !absl::GetFlag(FLAGS_wait_for_server)) {
      return absl::UnavailableError(absl::StrCat(
          "cannot connect to ", addr,
          " (connection failed: is moleserve running there? --wait-for-server retries)"));
    }
    if (!channel.WaitForStateChange(state, deadline)) {
      return absl::DeadlineExceededError(
          absl::StrCat("cannot connect to ", addr, " within ", absl::FormatDuration(timeout)));
    }
    state = channel.GetState(/*try_to_connect=*/true);
  }
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "molebench [flags]: load generator for moleserve Inference/Generate.\n"
      "  open loop:   molebench --rate 20 --num-requests 500 --adapters mole:40 --popularity zipf\n"
      "  closed loop: molebench --mode closed --concurrency 64 --dataset prompts.jsonl\n"
      "  chat:        molebench --mode chat --num-requests 32 --turns 4 --system-prompt-len 256\n"
      "               (--num-requests conversations; each turn repeats the ones before it)\n"
      "Reports TTFT/TPOT/ITL/E2E (ms), throughput, goodput (--slo-ttft-ms/--slo-tpot-ms), status\n"
      "counts, per-adapter latency and, with --metrics-addr, server expert-cache deltas;\n"
      "--out writes the same as JSON.");
  std::vector<std::string> storage;
  std::vector<char*> normalized = moleserve::server::NormalizeDashedFlags(argc, argv, &storage);
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  if (args.size() > 1) return SetupError(absl::StrCat("unexpected argument '", args[1], "'"));

  // Flags -> workload config.
  moleserve::bench::WorkloadConfig config;
  config.num_requests = absl::GetFlag(FLAGS_num_requests);
  config.seed = absl::GetFlag(FLAGS_seed);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const double rate = absl::GetFlag(FLAGS_rate);
  if (mode != "open" && mode != "closed" && mode != "chat") {
    return SetupError(absl::StrCat("--mode must be open, closed or chat, not '", mode, "'"));
  }
  const int turns = absl::GetFlag(FLAGS_turns);
  if (mode == "chat" && (turns < 1 || absl::GetFlag(FLAGS_system_prompt_len) < 0)) {
    return SetupError("--mode=chat needs --turns >= 1 and --system-prompt-len >= 0");
  }
  if (concurrency < 0) return SetupError("--concurrency must be >= 0");
  if (mode == "closed" && concurrency < 1) return SetupError("--mode=closed needs --concurrency");
  if (mode == "open") config.rate = rate;
  if (absl::GetFlag(FLAGS_channels) < 1) return SetupError("--channels must be >= 1");
  if (absl::GetFlag(FLAGS_timeout) <= absl::ZeroDuration()) {
    return SetupError("--timeout must be positive");
  }
  if (config.num_requests < 0) return SetupError("--num-requests must be >= 0");
  const moleserve::bench::SloConfig slo{.ttft_ms = absl::GetFlag(FLAGS_slo_ttft_ms),
                                        .tpot_ms = absl::GetFlag(FLAGS_slo_tpot_ms)};
  if (!(slo.ttft_ms >= 0) || !(slo.tpot_ms >= 0)) return SetupError("SLOs must be >= 0");
  absl::StatusOr<moleserve::bench::LengthDistribution> prompt_len =
      moleserve::bench::LengthDistribution::Parse(absl::GetFlag(FLAGS_prompt_len));
  if (!prompt_len.ok())
    return SetupError(absl::StrCat("--prompt-len: ", prompt_len.status().message()));
  config.prompt_len = *prompt_len;
  absl::StatusOr<moleserve::bench::LengthDistribution> output_len =
      moleserve::bench::LengthDistribution::Parse(absl::GetFlag(FLAGS_output_len));
  if (!output_len.ok())
    return SetupError(absl::StrCat("--output-len: ", output_len.status().message()));
  config.output_len = *output_len;
  {
    std::vector<std::string> range = absl::StrSplit(absl::GetFlag(FLAGS_token_id_range), ':');
    if (range.size() != 2 || !absl::SimpleAtoi(range[0], &config.token_id_min) ||
        !absl::SimpleAtoi(range[1], &config.token_id_max)) {
      return SetupError("--token-id-range must be LO:HI");
    }
  }
  absl::StatusOr<std::vector<std::string>> adapters =
      moleserve::bench::ParseAdapterList(absl::GetFlag(FLAGS_adapters));
  if (!adapters.ok()) return SetupError(adapters.status());
  config.adapters = *adapters;
  absl::StatusOr<moleserve::bench::Popularity> popularity =
      moleserve::bench::ParsePopularity(absl::GetFlag(FLAGS_popularity));
  if (!popularity.ok()) return SetupError(popularity.status());
  config.popularity = *popularity;
  config.zipf_s = absl::GetFlag(FLAGS_zipf_s);
  if (const std::string path = absl::GetFlag(FLAGS_dataset); !path.empty()) {
    absl::StatusOr<std::vector<moleserve::bench::DatasetEntry>> dataset =
        moleserve::bench::LoadDatasetJsonl(path);
    if (!dataset.ok()) return SetupError(dataset.status());
    config.dataset = *std::move(dataset);
  }
  absl::StatusOr<std::vector<PlannedRequest>> plan = moleserve::bench::PlanWorkload(config);
  if (!plan.ok()) return SetupError(plan.status());

  // Channels (or the HTTP endpoint), connection, first scrape.
  const std::string protocol = absl::GetFlag(FLAGS_protocol);
  if (protocol != "grpc" && protocol != "http") {
    return SetupError(absl::StrCat("--protocol must be grpc or http, not '", protocol, "'"));
  }
  const bool use_http = protocol == "http";
  const std::string addr = use_http ? absl::GetFlag(FLAGS_http_addr) : absl::GetFlag(FLAGS_addr);
  moleserve::bench::HttpEndpoint http_endpoint;
  std::string base_model;
  nlohmann::json server_info = nullptr;
  if (use_http) {
    absl::StatusOr<moleserve::bench::HttpEndpoint> endpoint =
        moleserve::bench::ParseHttpEndpoint(addr);
    if (!endpoint.ok())
      return SetupError(absl::StrCat("--http-addr: ", endpoint.status().message()));
    http_endpoint = *endpoint;
    absl::StatusOr<std::vector<std::string>> models =
        moleserve::bench::HttpListModels(http_endpoint, absl::GetFlag(FLAGS_connect_timeout));
    if (!models.ok()) return SetupError(models.status());
    base_model = models->front();
    const std::set<std::string> known(models->begin(), models->end());
    std::set<std::string> unknown;
    for (const PlannedRequest& p : *plan) {
      if (!p.adapter.empty() && !known.contains(p.adapter)) unknown.insert(p.adapter);
    }
    if (!unknown.empty()) {
      std::cerr << "molebench: warning: /v1/models lists no model named " << *unknown.begin()
                << (unknown.size() > 1 ? absl::StrCat(" (and ", unknown.size() - 1, " more)") : "")
                << "; those requests will likely fail with 404\n";
    }
    server_info = {{"base_model", base_model},
                   {"adapters_listed", static_cast<int64_t>(models->size()) - 1}};
  }
  std::vector<std::unique_ptr<pb::Inference::Stub>> stubs;
  for (int i = 0; !use_http && i < absl::GetFlag(FLAGS_channels); ++i) {
    grpc::ChannelArguments channel_args;
    channel_args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    channel_args.SetMaxReceiveMessageSize(64 << 20);
    std::shared_ptr<grpc::Channel> channel =
        grpc::CreateCustomChannel(addr, grpc::InsecureChannelCredentials(), channel_args);
    if (absl::Status s = Connect(*channel, addr); !s.ok()) return SetupError(s);
    stubs.push_back(pb::Inference::NewStub(channel));
  }
  if (!use_http) CheckServer(*stubs[0], *plan, &server_info);
  const std::string metrics_addr = absl::GetFlag(FLAGS_metrics_addr);
  std::vector<MetricSample> before;
  if (!metrics_addr.empty()) {
    absl::StatusOr<std::vector<MetricSample>> scraped = ScrapeMetrics(metrics_addr);
    if (!scraped.ok()) return SetupError(absl::StrCat("/metrics: ", scraped.status().message()));
    before = *std::move(scraped);
  }

  std::cerr << absl::StreamFormat("molebench: %d requests over %s, %s loop, %s\n", plan->size(),
                                  protocol, mode,
                                  mode == "open" ? absl::StrCat("rate ", rate, " req/s")
                                                 : absl::StrCat("concurrency ", concurrency));
  const absl::Time started = absl::Now();
  std::vector<RequestRecord> records;
  std::vector<Conversation> conversations;
  std::vector<RequestRecord> chat_records;  // mode chat: conversation * turns + turn
  if (mode == "chat") {
    if (use_http) return SetupError("--mode=chat runs over gRPC");
    absl::StatusOr<moleserve::bench::AdapterSampler> sampler =
        moleserve::bench::AdapterSampler::Create(config.adapters, config.popularity, config.zipf_s,
                                                 config.seed);
    if (!sampler.ok()) return SetupError(sampler.status());
    conversations = PlanChat(config, turns, *sampler);
    std::mt19937_64 system_rng(config.seed * 3 + 4);
    std::uniform_int_distribution<uint32_t> id(config.token_id_min, config.token_id_max - 1);
    std::vector<uint32_t> system_prompt(absl::GetFlag(FLAGS_system_prompt_len));
    for (uint32_t& v : system_prompt) v = id(system_rng);
    chat_records = RunChat(stubs, system_prompt, conversations, turns, concurrency,
                           absl::GetFlag(FLAGS_timeout));
    for (const RequestRecord& r : chat_records) {
      if (r.code != absl::StatusCode::kUnknown) records.push_back(r);  // unsent turns aside
    }
  } else if (use_http) {
    records = moleserve::bench::RunHttpPlan(http_endpoint, base_model, *plan, concurrency,
                                            /*paced=*/mode == "open", absl::GetFlag(FLAGS_timeout));
  } else {
    Driver driver(std::move(stubs), absl::GetFlag(FLAGS_timeout));
    records = driver.Run(*plan, concurrency, /*paced=*/mode == "open");
  }

  std::optional<moleserve::bench::ServerMetricsDelta> server;
  std::string server_error;
  if (!metrics_addr.empty()) {
    absl::StatusOr<std::vector<MetricSample>> after = ScrapeMetrics(metrics_addr);
    if (after.ok()) {
      server = moleserve::bench::DiffServerMetrics(before, *after);
    } else {
      server_error = std::string(after.status().message());
    }
  }
  const BenchSummary summary = moleserve::bench::SummarizeRun(records, slo);
  PrintReport(summary, slo, absl::GetFlag(FLAGS_label), mode, server, server_error);
  nlohmann::json per_turn;
  if (mode == "chat") per_turn = PerTurn(chat_records, turns, slo);

  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return 0;
  nlohmann::json report = moleserve::bench::BenchSummaryToJson(summary);
  report["label"] = absl::GetFlag(FLAGS_label);
  report["config"] = {
      {"protocol", protocol},
      {"addr", addr},
      {"metrics_addr", metrics_addr},
      {"mode", mode},
      {"rate", std::isinf(rate) ? nlohmann::json("inf") : nlohmann::json(rate)},
      {"concurrency", concurrency},
      {"num_requests", plan->size()},
      {"seed", config.seed},
      {"prompt_len", absl::GetFlag(FLAGS_dataset).empty() ? config.prompt_len.ToString() : ""},
      {"output_len", config.output_len.ToString()},
      {"dataset", absl::GetFlag(FLAGS_dataset)},
      {"token_id_range", absl::GetFlag(FLAGS_token_id_range)},
      {"adapters", absl::GetFlag(FLAGS_adapters)},
      {"num_adapters", config.adapters.size()},
      {"popularity", absl::GetFlag(FLAGS_popularity)},
      {"zipf_s", config.zipf_s},
      {"slo_ttft_ms", slo.ttft_ms},
      {"slo_tpot_ms", slo.tpot_ms},
      {"timeout_s", absl::ToDoubleSeconds(absl::GetFlag(FLAGS_timeout))},
      {"channels", absl::GetFlag(FLAGS_channels)},
      {"started", absl::FormatTime(absl::RFC3339_sec, started, absl::UTCTimeZone())},
  };
  if (mode == "chat") {
    report["config"]["turns"] = turns;
    report["config"]["conversations"] = conversations.size();
    report["config"]["system_prompt_len"] = absl::GetFlag(FLAGS_system_prompt_len);
    report["per_turn"] = per_turn;
  }
  report["server"] = server_info;
  report["server_metrics"] =
      server.has_value() ? moleserve::bench::ServerMetricsDeltaToJson(*server) : nlohmann::json();
  if (!server_error.empty()) report["server_metrics_error"] = server_error;
  std::ofstream file(out);
  file << report.dump(2) << "\n";
  if (!file.flush()) {
    std::cerr << "molebench: error: cannot write " << out << "\n";
    return 1;
  }
  std::cerr << "molebench: wrote " << out << "\n";
  return 0;
}
