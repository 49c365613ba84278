// CUDA decode at a real model shape with random weights (synthetic:llama-7b, bf16), in one run:
//  1. decode step time of the bare model (LlamaModel::ForwardSample: forward pass and greedy
//     sampling on the device) for --batches sequences at --contexts tokens of context (points
//     whose KV cache does not fit are skipped), against the bound: bytes a step reads (weights
//     without the embedding table, plus the KV cache) / measured copy bandwidth (cudaMemcpy
//     device to device, read + write bytes);
//  2. serving throughput through the engine (continuous batching, 64 concurrent greedy requests
//     of 64 prompt + 64 generated tokens) for the base model, for requests spread over 32
//     distinct plain LoRAs (PEFT, rank 16, all seven linear modules), and for a top-2-of-8 MoLE
//     adapter (mole/1, rank 16 experts on all seven linear modules), each as a ratio of the base
//     model's throughput measured in the same run.
//  3. determinism: one decode step of 64 sequences run twice, without adapters and with half the
//     sequences on the MoLE: how many logits differ between the runs (0 is the goal).
// The bound of (1) counts the bytes a step reads: every weight but the embedding table, plus the
// KV cache. Adapters are warmed before any throughput is timed.
// Adapters are written (bf16 safetensors) under --workdir. Prints a table, writes JSON.
//
//   bench_gpu_decode [--out bench/results/gpu_decode_raw.json] [--preset llama-7b]
//                    [--workdir /tmp/moleserve_gpu_decode]

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "bench/adapter_writer.h"
#include "bench/engine_bench.h"
#include "bench/gpu/copy_bandwidth.h"
#include "bench/list_flag.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/engine.h"
#include "engine/model/llama_model.h"
#include "engine/model/synthetic.h"
#include "engine/model_io/safetensors.h"

ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(std::string, preset, "llama-7b", "Synthetic model preset");
ABSL_FLAG(std::string, workdir, "/tmp/moleserve_gpu_decode", "Where the adapters are written");
ABSL_FLAG(std::string, contexts, "128,512,4096",
          "Decode-step contexts (tokens); those above 128 are not prefilled");
ABSL_FLAG(std::string, batches, "1,16,64", "Decode-step batch sizes");
ABSL_FLAG(int, requests, 64, "Concurrent requests per throughput run");
ABSL_FLAG(int, prompt_tokens, 64, "Prompt tokens per request");
ABSL_FLAG(int, new_tokens, 64, "Generated tokens per request");

namespace {

using namespace moleserve::engine;  // NOLINT: a benchmark's main file
using moleserve::bench::Check;
using moleserve::bench::Done;
using moleserve::bench::Now;
using moleserve::bench::ParseList;
using moleserve::bench::WriteMole;
using moleserve::bench::WritePeftLora;
namespace fs = std::filesystem;

// Generated tokens per second of `n` concurrent greedy requests; adapter_of(i) names request i's.
double Throughput(Engine& engine, int n, const std::function<std::string(int)>& adapter_of) {
  std::vector<std::shared_ptr<Done>> sinks;
  const double start = Now();
  for (int i = 0; i < n; ++i) {
    GenerateRequest req;
    req.adapter = adapter_of(i);
    req.token_ids.push_back(256);
    for (int j = 1; j < absl::GetFlag(FLAGS_prompt_tokens); ++j) {
      req.token_ids.push_back((i * 131 + j * 17) % 256);
    }
    req.sampling.temperature = 0;
    req.stopping.max_new_tokens = absl::GetFlag(FLAGS_new_tokens);
    req.stopping.ignore_eos = true;
    sinks.push_back(std::make_shared<Done>());
    Check(engine.Submit(req, sinks.back()).status(), "submit");
  }
  int64_t tokens = 0;
  for (auto& s : sinks) {
    s->done.WaitForNotification();
    Check(s->error, "request");
    tokens += s->tokens;
  }
  return tokens / (Now() - start);
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // Line by line, so a run cut short by the GPU host's time limit still shows what it measured.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const double t_start = Now();
  const std::string preset = absl::GetFlag(FLAGS_preset);
  absl::StatusOr<ModelConfig> config = SyntheticModelConfig(preset);
  Check(config.status(), "preset");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const double copy_bw = moleserve::bench::MeasureCopyBandwidth();
  // What a decode step really reads: every weight except the embedding table (a lookup reads one
  // row per token; when tied, it is read once as lm_head), plus the KV cache of the context.
  const double embed_bytes =
      config->tie_word_embeddings ? 0.0 : 2.0 * config->vocab_size * config->hidden_size;
  const double weight_bytes = 2.0 * config->ParameterCount() - embed_bytes;
  const double kv_bytes_per_token =
      2.0 * 2.0 * config->num_layers * config->num_kv_heads * config->head_dim;  // K and V, bf16
  std::printf("device %s: copy bandwidth %.0f GB/s; %s weights read per step %.2f GB\n", prop.name,
              copy_bw / 1e9, preset.c_str(), weight_bytes / 1e9);
  nlohmann::json steps = nlohmann::json::array();
  nlohmann::json determinism = nlohmann::json::object();
  // The JSON is rewritten after each part ("complete": false until the end), so a run cut short
  // keeps what it measured.
  nlohmann::json result = {{"bench", "gpu_decode"},
                           {"device", prop.name},
                           {"preset", preset},
                           {"dtype", "bf16"},
                           {"copy_bandwidth_bytes_per_s", copy_bw},
                           {"weight_bytes_read_per_step", weight_bytes},
                           {"complete", false}};
  auto write_json = [&] {
    result["decode_steps"] = steps;
    result["determinism"] = determinism;
    if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
      std::ofstream(out) << result.dump(1) << "\n";
    }
  };
  {
    auto backend = CreateCudaBackend({});
    Check(backend.status(), "cuda backend");
    RandomWeightSource weights(*config, 1);
    constexpr int kContext = 128, kBlock = 16, kMaxSeqs = 64;
    // KV blocks for the largest (batch, context) point that fits next to the weights with 8 GB
    // to spare; points that need more are reported as skipped.
    struct Point {
      int context, batch;
    };
    std::vector<Point> points;
    for (int ctx : ParseList(absl::GetFlag(FLAGS_contexts))) {
      for (int batch : ParseList(absl::GetFlag(FLAGS_batches))) points.push_back({ctx, batch});
    }
    auto blocks_per_seq = [](int ctx) { return (ctx + 32 + kBlock - 1) / kBlock; };
    const double kv_budget = static_cast<double>(prop.totalGlobalMem) - weight_bytes - 8e9;
    const double block_bytes = kv_bytes_per_token * kBlock;
    int64_t num_kv_blocks = int64_t{kMaxSeqs} * blocks_per_seq(kContext);
    for (const Point& pt : points) {
      const int64_t need = int64_t{pt.batch} * blocks_per_seq(pt.context);
      if (need * block_bytes <= kv_budget) num_kv_blocks = std::max(num_kv_blocks, need);
    }
    auto model = LlamaModel::Create(backend->get(), *config, weights,
                                    {.num_kv_blocks = static_cast<int32_t>(num_kv_blocks),
                                     .kv_block_size = kBlock,
                                     .max_batch_tokens = 2048,
                                     .max_seqs = kMaxSeqs});
    Check(model.status(), "model");
    std::printf("%8s %6s %10s %10s %10s %10s %12s\n", "context", "batch", "ms/step", "bound ms",
                "bound/step", "step/bound", "1st step ms");
    for (const auto [context, batch] : points) {
      const int bps = blocks_per_seq(context);
      if (int64_t{batch} * bps > num_kv_blocks) {
        std::printf("%8d %6d skipped: its KV cache (%.1f GB) does not fit\n", context, batch,
                    batch * bps * block_bytes / 1e9);
        steps.push_back({{"context", context}, {"batch", batch}, {"skipped", "KV does not fit"}});
        continue;
      }
      Batch b;
      for (int s = 0; s < batch; ++s) {
        for (int blk = 0; blk < bps; ++blk) b.block_tables.push_back(s * bps + blk);
        // Batch::block_table_offsets starts at {0}: each sequence adds where its table ends.
        b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
      }
      // Prefill contexts up to kContext tokens, 16 sequences per forward. Longer contexts are
      // not prefilled (a prefill of thousands of tokens per sequence would take the run's
      // budget): their decode steps attend over whatever the cache blocks hold, which changes
      // the values but not the bytes read or the work done.
      std::vector<float> logits;
      for (int s0 = 0; context <= kContext && s0 < batch; s0 += 16) {
        Batch p = b;
        for (int s = s0; s < std::min(batch, s0 + 16); ++s) {
          for (int i = 0; i < context; ++i) {
            p.tokens.push_back((s * 7 + i) % 256);
            p.positions.push_back(i);
            p.token_seq.push_back(s);
          }
          p.sample_rows.push_back(static_cast<int32_t>(p.tokens.size() - 1));
        }
        Check((*model)->Forward(p, &logits), "prefill");
      }
      // Decode steps as the engine runs them: greedy sampling on the device, 16 bytes per
      // sequence back to the host.
      StepSampling sampling;
      sampling.rows.resize(batch);
      StepSamples samples;
      std::vector<double> ms;
      double first_ms = 0;  // the first decode step of this batch size captures its graph
      for (int step = 0; step < 24; ++step) {
        Batch d = b;
        for (int s = 0; s < batch; ++s) {
          d.tokens.push_back((s + step) % 256);
          d.positions.push_back(context + step);
          d.token_seq.push_back(s);
          d.sample_rows.push_back(s);
        }
        const double t0 = Now();
        Check((*model)->ForwardSample(d, sampling, &samples), "decode");
        if (step == 0) first_ms = (Now() - t0) * 1e3;
        if (step >= 4) ms.push_back((Now() - t0) * 1e3);
      }
      std::sort(ms.begin(), ms.end());
      const double step_ms = ms[ms.size() / 2];
      // The timed steps' mean context is context + 14 tokens.
      const double bytes = weight_bytes + batch * (context + 14.0) * kv_bytes_per_token;
      const double bound_ms = bytes / copy_bw * 1e3;
      std::printf("%8d %6d %10.3f %10.3f %10.3f %10.3f %12.3f\n", context, batch, step_ms, bound_ms,
                  bound_ms / step_ms, step_ms / bound_ms, first_ms);
      steps.push_back({{"context", context},
                       {"batch", batch},
                       {"ms_per_step", step_ms},
                       {"bytes_read_per_step", bytes},
                       {"bound_ms", bound_ms},
                       {"bound_over_step", bound_ms / step_ms},
                       {"step_over_bound", step_ms / bound_ms},
                       {"first_step_ms_with_graph_capture", first_ms}});
      write_json();
    }
    // Determinism: the same decode step twice (same inputs, same KV positions rewritten with the
    // same values) must give bit-identical logits.
    Batch d;
    for (int s = 0; s < kMaxSeqs; ++s) {
      for (int blk = 0; blk < (kContext + 64) / kBlock; ++blk) {
        d.block_tables.push_back(s * ((kContext + 64) / kBlock) + blk);
      }
      d.block_table_offsets.push_back(static_cast<int32_t>(d.block_tables.size()));
      d.tokens.push_back((s * 3 + 1) % 256);
      d.positions.push_back(kContext + 30);
      d.token_seq.push_back(s);
      d.sample_rows.push_back(s);
    }
    std::vector<float> first, second;
    Check((*model)->Forward(d, &first), "determinism run 1");
    Check((*model)->Forward(d, &second), "determinism run 2");
    int64_t differ = 0;
    double max_diff = 0;
    for (size_t i = 0; i < first.size(); ++i) {
      differ += first[i] != second[i] ? 1 : 0;
      max_diff = std::max<double>(max_diff, std::fabs(first[i] - second[i]));
    }
    std::printf("determinism (base, batch %d): %lld of %zu logits differ (max %.3g)\n", kMaxSeqs,
                static_cast<long long>(differ), first.size(), max_diff);
    determinism["base_batch64_logits_differing"] = differ;
    determinism["base_batch64_max_abs_diff"] = max_diff;
    // The same with half the sequences on a top-2-of-8 MoLE (planned, in the decode graph):
    // two experts per row, summed in a fixed order (SgmvExpandRows).
    const std::string mole_dir = absl::GetFlag(FLAGS_workdir) + "/determinism_mole";
    auto mole = LoadAdapter(WriteMole(mole_dir, *config, 8, 2, 16), "mole", *config, {});
    Check(mole.status(), "load mole");
    auto slot = (*model)->AttachAdapter(*mole);
    Check(slot.status(), "attach mole");
    d.seq_adapter.assign(kMaxSeqs, -1);
    for (int s = 0; s < kMaxSeqs; s += 2) d.seq_adapter[s] = *slot;
    d.aux_block_table_offsets.assign(kMaxSeqs + 1, 0);
    Check((*model)->Forward(d, &first), "determinism mole run 1");
    Check((*model)->Forward(d, &second), "determinism mole run 2");
    differ = 0;
    max_diff = 0;
    for (size_t i = 0; i < first.size(); ++i) {
      differ += first[i] != second[i] ? 1 : 0;
      max_diff = std::max<double>(max_diff, std::fabs(first[i] - second[i]));
    }
    std::printf("determinism (half MoLE, batch %d): %lld of %zu logits differ (max %.3g)\n",
                kMaxSeqs, static_cast<long long>(differ), first.size(), max_diff);
    determinism["mole_batch64_logits_differing"] = differ;
    determinism["mole_batch64_max_abs_diff"] = max_diff;
    fs::remove_all(mole_dir);
    write_json();
  }

  // Throughput with adapters.
  const std::string work = absl::GetFlag(FLAGS_workdir);
  fs::remove_all(work);
  EngineOptions options{.model = "synthetic:" + preset,
                        .backend = "cuda",
                        .max_num_seqs = 64,
                        .kv_cache_bytes = int64_t{6} << 30,
                        .adapter_root = work};
  for (int i = 0; i < 32; ++i) {
    const std::string name = absl::StrCat("lora", i);
    options.adapters.push_back(
        {name, WritePeftLora(work + "/" + name, *config, 16, 1000u * (i + 1))});
  }
  options.adapters.push_back({"mole", WriteMole(work + "/mole", *config, 8, 2, 16)});
  std::printf("throughput: 32 LoRAs and the MoLE written (%.0f s into the run)\n", Now() - t_start);
  auto engine = Engine::Create(options);
  Check(engine.status(), "engine");
  std::printf("throughput: engine ready (%.0f s into the run)\n", Now() - t_start);
  const int n = absl::GetFlag(FLAGS_requests);
  // Warm-up: the base model's graphs, then every adapter's experts (so no timed run pays for
  // cold expert copies or graph captures its adapters need).
  Throughput(**engine, 8, [](int) { return ""; });
  Throughput(**engine, 32, [](int i) { return absl::StrCat("lora", i % 32); });
  Throughput(**engine, 8, [](int) { return "mole"; });
  std::printf("throughput: warmed up (%.0f s into the run)\n", Now() - t_start);
  const double base = Throughput(**engine, n, [](int) { return ""; });
  const double loras = Throughput(**engine, n, [](int i) { return absl::StrCat("lora", i % 32); });
  const double mole = Throughput(**engine, n, [](int) { return "mole"; });
  std::printf(
      "throughput (tokens/s): base %.1f, 32 LoRAs %.1f (%.3f x base), "
      "top-2-of-8 MoLE %.1f (%.3f x base)\n",
      base, loras, loras / base, mole, mole / base);
  result["throughput"] = {{"requests", n},
                          {"prompt_tokens", absl::GetFlag(FLAGS_prompt_tokens)},
                          {"new_tokens", absl::GetFlag(FLAGS_new_tokens)},
                          {"base_tokens_per_s", base},
                          {"loras32_rank16_tokens_per_s", loras},
                          {"loras32_over_base", loras / base},
                          {"mole_top2_of_8_tokens_per_s", mole},
                          {"mole_over_base", mole / base}};
  result["complete"] = true;
  write_json();
  fs::remove_all(work);
  return 0;
}
