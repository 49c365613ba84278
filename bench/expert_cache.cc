// Expert-cache benchmark: throughput and device-pool hit rate for a request mix over N MoLE
// adapters (uniform or Zipf popularity) as the pool shrinks from holding all their experts to a
// tenth of them. CPU backend: the "device" pool is a bounded host arena with the same page tables
// and kernels' row indexing, so the hit rates are those a GPU pool of the same size would see;
// the copy costs are memcpy, not PCIe.
//
//   bench_expert_cache [--out bench/results/expert_cache.json] [--adapters 40] [--requests 240]
//                      [--tokens 8] [--concurrency 16] [--threads 2]
//
// Prints one row per (popularity, pool fraction) with tokens/s relative to the full pool, and
// writes the rows as JSON.

#include <unistd.h>

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "tests/common/demo_mole_adapter.h"

ABSL_FLAG(std::string, out, "bench/results/expert_cache.json", "JSON report path ('' = none)");
ABSL_FLAG(int, adapters, 40, "MoLE adapters");
ABSL_FLAG(int, requests, 240, "Requests per configuration");
ABSL_FLAG(int, tokens, 8, "Generated tokens per request");
ABSL_FLAG(int, concurrency, 16, "Requests in flight at once");
ABSL_FLAG(int, threads, 2, "Engine CPU threads");

namespace {

namespace fs = std::filesystem;
using moleserve::engine::Engine;

constexpr int kLayers = 4, kHidden = 256, kExperts = 8, kRank = 8;  // the demo model's shape
// Expert bytes of one adapter: 4 layers x 2 sites x 8 experts x (8 A + 8 Bt rows) x 256 fp32.
constexpr int64_t kAdapterExpertBytes = int64_t{kLayers} * 2 * kExperts * 2 * kRank * kHidden * 4;

// Counts finished requests; Wait blocks until `n` finished.
class Done {
 public:
  void Add() {
    std::lock_guard<std::mutex> lock(mu_);
    ++n_;
    cv_.notify_all();
  }
  void WaitFor(int n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return n_ >= n; });
  }
  int count() {
    std::lock_guard<std::mutex> lock(mu_);
    return n_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_ = 0;
};

class Sink final : public moleserve::engine::GenerationSink {
 public:
  explicit Sink(Done* done) : done_(done) {}
  void OnChunk(moleserve::engine::GenerationChunk) override {}
  void OnFinish(moleserve::engine::GenerationChunk, moleserve::engine::FinishInfo) override {
    done_->Add();
  }
  void OnError(absl::Status status) override {
    std::fprintf(stderr, "request failed: %s\n", status.ToString().c_str());
    std::exit(1);
  }

 private:
  Done* done_;
};

// Adapter index of each request: uniform, or Zipf (s = 1) over a random ranking of the adapters.
std::vector<int> RequestMix(const std::string& popularity, int adapters, int requests) {
  std::mt19937 rng(42);
  std::vector<int> order(adapters);
  for (int i = 0; i < adapters; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<double> weights(adapters, 1.0);
  if (popularity == "zipf") {
    for (int i = 0; i < adapters; ++i) weights[i] = 1.0 / (i + 1);
  }
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  std::vector<int> mix(requests);
  for (int& m : mix) m = order[pick(rng)];
  return mix;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int num_adapters = absl::GetFlag(FLAGS_adapters);
  const int num_requests = absl::GetFlag(FLAGS_requests);
  const int tokens = absl::GetFlag(FLAGS_tokens);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const fs::path root = fs::temp_directory_path() / absl::StrCat("moleserve_bench_", getpid());
  for (int i = 0; i < num_adapters; ++i) {
    const fs::path dir = root / absl::StrCat("a", i);
    if (moleserve::test_util::WriteDemoMoleAdapter(dir.string(), 100 + i, kExperts, kRank, 0.2f)
            .empty()) {
      std::fprintf(stderr, "cannot write %s\n", dir.c_str());
      return 1;
    }
  }
  const int64_t all_bytes = kAdapterExpertBytes * num_adapters;

  std::printf("%d adapters x %.0f KiB of experts, %d requests x %d tokens, %d in flight\n",
              num_adapters, kAdapterExpertBytes / 1024.0, num_requests, tokens, concurrency);
  std::printf("%-8s %8s %10s %9s %8s %10s %11s %9s\n", "mix", "pool", "pool_MiB", "hit_rate",
              "evicted", "MiB_moved", "tokens/s", "vs_full");
  nlohmann::json rows = nlohmann::json::array();
  // The first configuration runs twice and its first run is not reported (warm-up: page faults,
  // allocator and thread-pool start).
  bool warmed_up = false;
  for (const std::string popularity : {"uniform", "zipf"}) {
    const std::vector<int> mix = RequestMix(popularity, num_adapters, num_requests);
    double full_tps = 0;
    for (const double fraction : {1.0, 1.0, 0.5, 0.25, 0.1}) {
      if (fraction == 1.0 && full_tps > 0) continue;  // the repeated full pool of the second mix
      moleserve::engine::EngineOptions o;
      o.num_threads = absl::GetFlag(FLAGS_threads);
      o.kv_cache_bytes = int64_t{64} << 20;
      o.max_num_seqs = concurrency;
      o.adapter_root = root.string();
      o.expert_cache_bytes = static_cast<int64_t>(std::ceil(all_bytes * fraction));
      auto engine = Engine::Create(o);
      if (!engine.ok()) {
        std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
        return 1;
      }
      for (int i = 0; i < num_adapters; ++i) {
        auto loaded = (*engine)->LoadAdapter(absl::StrCat("a", i), absl::StrCat("a", i), false);
        if (!loaded.ok()) {
          std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
          return 1;
        }
      }
      Done done;
      const absl::Time start = absl::Now();
      for (int r = 0; r < num_requests; ++r) {
        done.WaitFor(r - concurrency + 1);  // keep `concurrency` in flight
        moleserve::engine::GenerateRequest req;
        req.adapter = absl::StrCat("a", mix[r]);
        req.text = absl::StrCat("request ", r, " for adapter ", mix[r]);
        req.sampling.temperature = 0;
        req.stopping.max_new_tokens = tokens;
        req.stopping.ignore_eos = true;
        auto submitted = (*engine)->Submit(std::move(req), std::make_shared<Sink>(&done));
        if (!submitted.ok()) {
          std::fprintf(stderr, "%s\n", submitted.status().ToString().c_str());
          return 1;
        }
      }
      done.WaitFor(num_requests);
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      const moleserve::engine::ExpertCacheInfo c = (*engine)->CacheInfo();
      const double tps = static_cast<double>(num_requests) * tokens / seconds;
      if (!warmed_up) {
        warmed_up = true;
        continue;
      }
      if (fraction == 1.0) full_tps = tps;
      const double lookups = static_cast<double>(c.hits + c.misses);
      const double hit_rate = lookups > 0 ? c.hits / lookups : 0;
      std::printf("%-8s %7.0f%% %10.2f %9.3f %8lld %10.1f %11.1f %8.2fx\n", popularity.c_str(),
                  fraction * 100, c.capacity_bytes / 1048576.0, hit_rate,
                  static_cast<long long>(c.evictions), c.bytes_to_device / 1048576.0, tps,
                  tps / full_tps);
      rows.push_back({{"popularity", popularity},
                      {"pool_fraction", fraction},
                      {"pool_bytes", c.capacity_bytes},
                      {"hits", c.hits},
                      {"misses", c.misses},
                      {"hit_rate", hit_rate},
                      {"evictions", c.evictions},
                      {"bytes_to_device", c.bytes_to_device},
                      {"seconds", seconds},
                      {"tokens_per_second", tps},
                      {"throughput_vs_full_pool", tps / full_tps}});
    }
  }
  fs::remove_all(root);
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    nlohmann::json report{{"bench", "expert_cache"},
                          {"backend", "cpu"},
                          {"model", "built-in demo (4 layers, hidden 256)"},
                          {"adapters", num_adapters},
                          {"adapter_expert_bytes", kAdapterExpertBytes},
                          {"experts_per_site", kExperts},
                          {"rank", kRank},
                          {"routing", "top-2 on q_proj and o_proj of every layer"},
                          {"requests", num_requests},
                          {"tokens_per_request", tokens},
                          {"concurrency", concurrency},
                          {"threads", absl::GetFlag(FLAGS_threads)},
                          {"rows", rows}};
    std::ofstream(out) << report.dump(2) << "\n";
    std::printf("wrote %s\n", out.c_str());
  }
  return 0;
}
