// Hot loading at scale (CPU backend, built-in demo model): what a user serving thousands of LoRA
// fine-tunes sees. One PEFT LoRA directory (rank --rank on all seven linear modules) is loaded
// under names a0, a1, ... through Engine::LoadAdapter, one at a time, up to each of --counts.
// At each count N:
//  - the time of the loads that led to it (mean and p99 of the last 100), and of all N;
//  - ListAdapters, AdapterStatuses and GetAdapterStatus of one name (median of 5 calls);
//  - closed-loop serving throughput of --streams requests on another adapter ("serve"), alone
//    and while a thread keeps loading new adapters (unloaded afterwards), three alternating
//    windows of each, medians, as a ratio;
//  - host memory (resident set) per loaded adapter over the adapter's raw fp32 bytes.
// Prints a table, writes JSON.
//
//   bench_adapter_loads [--counts 100,1000,10000] [--rank 8] [--out
//   bench/results/adapter_loads.json]

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/adapter_writer.h"
#include "bench/engine_bench.h"
#include "bench/list_flag.h"
#include "engine/adapters/adapter.h"
#include "engine/engine.h"
#include "engine/model/demo_model.h"

ABSL_FLAG(std::string, counts, "100,1000,10000", "Loaded-adapter counts to measure at");
ABSL_FLAG(int, rank, 8, "LoRA rank of the loaded adapters");
ABSL_FLAG(int, streams, 8, "Concurrent requests of the serving measurement");
ABSL_FLAG(double, serve_seconds, 3.0, "Length of each serving measurement");
ABSL_FLAG(int, threads, 0, "Engine CPU threads (0: all)");
ABSL_FLAG(std::string, workdir, "/tmp/moleserve_adapter_loads", "Where the adapters are written");
ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(std::string, churn, "load",
          "What the thread does during the loading windows: load (new names), replace (one "
          "name again and again) or read (parse the files only, no engine call)");
ABSL_FLAG(double, churn_rate, 20,
          "Loads per second during the loading windows (0: back to back, as fast as they go)");
ABSL_FLAG(std::string, commit, "", "The commit measured, recorded in the JSON");

namespace {

using moleserve::bench::Check;
using moleserve::bench::Done;
using moleserve::bench::Now;
using moleserve::bench::ParseList;
using namespace moleserve::engine;  // NOLINT: a benchmark's main file

// Resident set of this process (bytes), from /proc/self/status, after returning the allocator's
// free memory to the system (so memory of unloaded adapters that glibc kept is not counted).
int64_t ResidentBytes() {
  malloc_trim(0);
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) != 0) continue;
    int64_t kb = 0;
    std::string digits;
    for (char c : line) {
      if (c >= '0' && c <= '9') digits += c;
    }
    if (absl::SimpleAtoi(digits, &kb)) return kb * 1024;
  }
  return 0;
}

// Generated tokens per second of `streams` closed-loop greedy requests on `adapter` for
// `seconds`.
double Serve(Engine& engine, const std::string& adapter, int streams, double seconds) {
  std::atomic<int64_t> tokens{0};
  const double end = Now() + seconds;
  std::vector<std::thread> workers;
  for (int w = 0; w < streams; ++w) {
    workers.emplace_back([&, w] {
      for (int i = 0; Now() < end; ++i) {
        GenerateRequest req;
        req.adapter = adapter;
        for (int j = 0; j < 16; ++j) req.token_ids.push_back((w * 131 + i * 7 + j * 17) % 256);
        req.sampling.temperature = 0;
        req.stopping.max_new_tokens = 16;
        req.stopping.ignore_eos = true;
        auto sink = std::make_shared<Done>();
        Check(engine.Submit(req, sink).status(), "submit");
        sink->done.WaitForNotification();
        Check(sink->error, "request");
        tokens += sink->tokens;
      }
    });
  }
  const double start = Now();
  for (std::thread& t : workers) t.join();
  return static_cast<double>(tokens.load()) / (Now() - start);
}

// Median milliseconds of 5 calls of fn.
template <typename Fn>
double MedianMs(Fn fn) {
  std::vector<double> ms;
  for (int i = 0; i < 5; ++i) {
    const double t0 = Now();
    fn();
    ms.push_back((Now() - t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  return ms[2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::vector<int> counts = ParseList(absl::GetFlag(FLAGS_counts));
  const int rank = absl::GetFlag(FLAGS_rank);
  const int streams = absl::GetFlag(FLAGS_streams);
  const double serve_seconds = absl::GetFlag(FLAGS_serve_seconds);
  const std::string work = absl::GetFlag(FLAGS_workdir);
  std::filesystem::remove_all(work);
  const ModelConfig config = DemoModelConfig();
  moleserve::bench::WritePeftLora(work + "/lora", config, rank, 1);
  moleserve::bench::WritePeftLora(work + "/serve", config, rank, 7);
  const double raw_bytes = 4.0 * moleserve::bench::PeftLoraValues(config, rank);

  auto engine = Engine::Create({.num_threads = absl::GetFlag(FLAGS_threads),
                                .max_num_seqs = 16,
                                .max_queue = 1024,
                                .adapters = {{"serve", work + "/serve"}},
                                .adapter_root = work});
  Check(engine.status(), "engine");
  Engine& e = **engine;
  Serve(e, "serve", streams, 1.0);  // warm-up
  const int64_t rss0 = ResidentBytes();
  std::printf("demo model, PEFT LoRA rank %d on 7 modules: %.0f KB of fp32 values per adapter\n",
              rank, raw_bytes / 1024);
  std::printf("%7s %9s %9s %9s %9s %9s %10s %10s %8s %9s\n", "N", "load ms", "p99 ms", "list ms",
              "status ms", "get ms", "serve t/s", "loading", "ratio", "rss/raw");
  nlohmann::json points = nlohmann::json::array();
  std::vector<double> load_ms;
  int loaded = 0;
  int churn = 0;
  const double t_start = Now();
  for (int n : counts) {
    for (; loaded < n; ++loaded) {
      const double t0 = Now();
      Check(e.LoadAdapter(absl::StrCat("a", loaded), "lora", false).status(), "load");
      load_ms.push_back((Now() - t0) * 1e3);
    }
    const double elapsed = Now() - t_start;
    const size_t window = std::min<size_t>(100, load_ms.size());
    std::vector<double> last(load_ms.end() - static_cast<int64_t>(window), load_ms.end());
    double mean = 0;
    for (double v : last) mean += v / static_cast<double>(window);
    std::sort(last.begin(), last.end());
    const double p99 = last[std::min(window - 1, static_cast<size_t>(0.99 * window))];
    const double list_ms = MedianMs([&] { (void)e.ListAdapters(); });
    const double status_ms = MedianMs([&] { (void)e.AdapterStatuses(); });
    const double get_ms = MedianMs([&] { Check(e.GetAdapterStatus("a0").status(), "get"); });
    const int64_t rss = ResidentBytes();
    // Serving alone and while another thread loads new adapters back to back (unloaded
    // afterwards), in three alternating windows each (this machine's speed drifts): medians.
    std::vector<double> alone, loading;
    int churned = 0;
    for (int round = 0; round < 3; ++round) {
      alone.push_back(Serve(e, "serve", streams, serve_seconds));
      std::atomic<bool> stop{false};
      std::thread loader([&] {
        const std::string mode = absl::GetFlag(FLAGS_churn);
        const double rate = absl::GetFlag(FLAGS_churn_rate);
        for (double next = Now(); !stop.load(); next += rate > 0 ? 1.0 / rate : 0.0) {
          if (rate > 0 && Now() < next) {
            std::this_thread::sleep_for(std::chrono::duration<double>(next - Now()));
          }
          if (mode == "read") {
            Check(LoadAdapter(work + "/lora", "r", config, {}).status(), "churn read");
          } else if (mode == "replace") {
            Check(e.LoadAdapter("c", "lora", true).status(), "churn replace");
          } else {
            Check(e.LoadAdapter(absl::StrCat("c", churn + churned), "lora", false).status(),
                  "churn load");
            ++churned;
          }
        }
      });
      loading.push_back(Serve(e, "serve", streams, serve_seconds));
      stop = true;
      loader.join();
    }
    for (int i = 0; i < churned; ++i) {
      Check(e.UnloadAdapter(absl::StrCat("c", churn + i), absl::ZeroDuration(), true).status(),
            "churn unload");
    }
    churn += churned;
    std::sort(alone.begin(), alone.end());
    std::sort(loading.begin(), loading.end());
    const double serve_alone = alone[1], serve_loading = loading[1];
    const double rss_ratio = static_cast<double>(rss - rss0) / n / raw_bytes;
    std::printf("%7d %9.2f %9.2f %9.2f %9.2f %9.3f %10.1f %10.1f %8.3f %9.3f\n", n, mean, p99,
                list_ms, status_ms, get_ms, serve_alone, serve_loading, serve_loading / serve_alone,
                rss_ratio);
    double loading_seconds = 0;
    for (double v : load_ms) loading_seconds += v / 1e3;
    points.push_back({{"adapters", n},
                      {"seconds_loading_all", loading_seconds},
                      {"seconds_since_start", elapsed},
                      {"load_ms_mean_last_100", mean},
                      {"load_ms_p99_last_100", p99},
                      {"list_adapters_ms", list_ms},
                      {"adapter_statuses_ms", status_ms},
                      {"get_adapter_status_ms", get_ms},
                      {"serve_tokens_per_s", serve_alone},
                      {"serve_tokens_per_s_while_loading", serve_loading},
                      {"serve_ratio_while_loading", serve_loading / serve_alone},
                      {"loads_during_serving_windows", churned},
                      {"host_bytes_per_adapter", static_cast<double>(rss - rss0) / n},
                      {"host_bytes_over_raw", rss_ratio}});
  }
  const nlohmann::json result = {
      {"bench", "adapter_loads"},
      {"date", absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone())},
      {"commit", absl::GetFlag(FLAGS_commit)},
      {"cpu_threads", std::thread::hardware_concurrency()},
      {"backend", "cpu"},
      {"model", "demo"},
      {"rank", rank},
      {"raw_fp32_bytes_per_adapter", raw_bytes},
      {"streams", streams},
      {"points", points}};
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    std::ofstream(out) << result.dump(1) << "\n";
  }
  std::filesystem::remove_all(work);
  return 0;
}
