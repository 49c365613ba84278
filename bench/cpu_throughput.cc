// CPU forward-pass throughput of the Llama engine: prefill and decode tokens/s at batch sizes
// 1..32, for the demo model and a ~200M-parameter Llama shape, so the gain from batching is
// visible. Prints a table with the speed-up over batch 1 and writes JSON.
//
//   bench_cpu_throughput [--out bench/results/cpu_throughput.json] [--threads 2]
//                        [--prompt_len 64] [--decode_steps 8] [--models demo,bench-200m]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/backend/backend.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model/synthetic.h"

ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(int, threads, 0, "CPU threads (0 = all)");
ABSL_FLAG(int, prompt_len, 64, "Prompt tokens per sequence for prefill");
ABSL_FLAG(int, decode_steps, 8, "Decode steps measured per batch size");
ABSL_FLAG(int, repeats, 3, "Measurements per point; the median is reported");
ABSL_FLAG(std::string, models, "demo,bench-200m",
          "Comma-separated: demo, bench-200m, synthetic:<preset> (e.g. synthetic:llama3.2-1b)");
ABSL_FLAG(std::string, batches, "1,2,4,8,16,32", "Comma-separated batch sizes");

namespace {

using namespace moleserve::engine;

double Now() { return absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

nlohmann::json BenchModel(const std::string& label, const ModelConfig& config,
                          const WeightSource& weights, const std::vector<int>& batches,
                          int prompt_len, int decode_steps) {
  auto backend = *CreateCpuBackend({.num_threads = absl::GetFlag(FLAGS_threads)});
  const int block = 16;
  const int max_b = *std::max_element(batches.begin(), batches.end());
  const int blocks_per_seq = (prompt_len + decode_steps + block - 1) / block;
  const double t0 = Now();
  auto model = *LlamaModel::Create(backend.get(), config, weights,
                                   {.num_kv_blocks = max_b * blocks_per_seq,
                                    .kv_block_size = block,
                                    .max_batch_tokens = max_b * prompt_len,
                                    .max_seqs = max_b});
  std::printf("%s: %.1fM parameters, built in %.1fs\n", label.c_str(),
              config.ParameterCount() / 1e6, Now() - t0);
  std::printf("%6s %14s %10s %14s %10s\n", "batch", "prefill tok/s", "x batch1", "decode tok/s",
              "x batch1");
  nlohmann::json rows = nlohmann::json::array();
  double prefill1 = 0, decode1 = 0;
  std::vector<float> logits;
  for (int b : batches) {
    // Prefill: b sequences of prompt_len tokens in one step.
    Batch batch;
    for (int s = 0; s < b; ++s) {
      for (int p = 0; p < prompt_len; ++p) {
        batch.tokens.push_back((s * 131 + p * 7) % config.vocab_size);
        batch.positions.push_back(p);
        batch.token_seq.push_back(s);
      }
      for (int k = 0; k < blocks_per_seq; ++k) batch.block_tables.push_back(s * blocks_per_seq + k);
      batch.block_table_offsets.push_back(static_cast<int32_t>(batch.block_tables.size()));
      batch.sample_rows.push_back(batch.num_tokens() - 1);
    }
    std::vector<double> prefill_runs, decode_runs;
    for (int rep = 0; rep < std::max(1, absl::GetFlag(FLAGS_repeats)); ++rep) {
      double start = Now();
      if (absl::Status st = model->Forward(batch, &logits); !st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        std::exit(1);
      }
      const double prefill = b * prompt_len / (Now() - start);
      // Decode: decode_steps steps of one token per sequence.
      start = Now();
      for (int step = 0; step < decode_steps; ++step) {
        Batch d;
        for (int s = 0; s < b; ++s) {
          d.tokens.push_back((s + step) % config.vocab_size);
          d.positions.push_back(prompt_len + step);
          d.token_seq.push_back(s);
          for (int k = 0; k < blocks_per_seq; ++k) d.block_tables.push_back(s * blocks_per_seq + k);
          d.block_table_offsets.push_back(static_cast<int32_t>(d.block_tables.size()));
          d.sample_rows.push_back(s);
        }
        if (absl::Status st = model->Forward(d, &logits); !st.ok()) {
          std::fprintf(stderr, "%s\n", st.ToString().c_str());
          std::exit(1);
        }
      }
      const double decode = b * decode_steps / (Now() - start);
      prefill_runs.push_back(prefill);
      decode_runs.push_back(decode);
    }
    const double prefill = Median(prefill_runs);
    const double decode = Median(decode_runs);
    if (b == batches.front()) {
      prefill1 = prefill;
      decode1 = decode;
    }
    std::printf("%6d %14.1f %10.2f %14.1f %10.2f\n", b, prefill, prefill / prefill1, decode,
                decode / decode1);
    std::fflush(stdout);
    rows.push_back({{"batch", b},
                    {"prefill_tokens_per_s", prefill},
                    {"decode_tokens_per_s", decode},
                    {"prefill_speedup_vs_batch1", prefill / prefill1},
                    {"decode_speedup_vs_batch1", decode / decode1}});
  }
  return {{"model", label},
          {"parameters", config.ParameterCount()},
          {"prompt_len", prompt_len},
          {"decode_steps", decode_steps},
          {"repeats", absl::GetFlag(FLAGS_repeats)},
          {"results", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<int> batches;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    batches.push_back(std::stoi(std::string(s)));
  }
  nlohmann::json report;
  report["benchmark"] = "cpu_throughput";
  report["date"] = absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone());
  report["threads"] = absl::GetFlag(FLAGS_threads) > 0
                          ? absl::GetFlag(FLAGS_threads)
                          : static_cast<int>(std::thread::hardware_concurrency());
  report["backend"] = "cpu (fp32, OpenBLAS)";
  for (absl::string_view m : absl::StrSplit(absl::GetFlag(FLAGS_models), ',')) {
    ModelConfig config;
    if (m == "demo") {
      config = DemoModelConfig();
    } else if (m == "bench-200m") {
      config = BenchModelConfig();
    } else if (absl::StartsWith(m, kSyntheticPrefix)) {
      absl::StatusOr<ModelConfig> c = SyntheticModelConfig(m.substr(kSyntheticPrefix.size()));
      if (!c.ok()) {
        std::fprintf(stderr, "%s\n", c.status().ToString().c_str());
        return 2;
      }
      config = *c;
    } else {
      std::fprintf(stderr, "unknown model '%s'\n", std::string(m).c_str());
      return 2;
    }
    // The demo model's own weights; generated on demand for the others (no host copy).
    std::unique_ptr<WeightSource> weights;
    if (m == "demo") {
      weights = std::make_unique<HostWeights>(RandomLlamaWeights(config, kDemoModelSeed));
    } else {
      weights = std::make_unique<RandomWeightSource>(config, 1);
    }
    report["models"].push_back(BenchModel(std::string(m), config, *weights, batches,
                                          absl::GetFlag(FLAGS_prompt_len),
                                          absl::GetFlag(FLAGS_decode_steps)));
  }
  if (!absl::GetFlag(FLAGS_out).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_out)) << report.dump(2) << "\n";
    std::printf("wrote %s\n", absl::GetFlag(FLAGS_out).c_str());
  }
  return 0;
}
