// How much a request's output depends on the batch it runs in. One MoLE request (the demo model
// with a top-2-of-4 MoLE on q_proj and o_proj of every layer, greedy) runs alone, then inside
// batches of other requests of different composition (base-model and MoLE neighbours, neighbours
// still prefilling while it decodes, 3 to 63 of them). Inputs are teacher-forced (every run feeds
// the tokens the lone run chose), so any difference comes from the batch alone: the GEMMs and
// segmented GEMMs sum in an order that depends on how many rows they get. Per composition it
// reports the largest change of any logit, of the logprob of the lone run's token, greedy
// agreement, and how many routing decisions (expert sets per site) flip. Runs on the fp32 CPU
// backend and on the bf16 twin of the CUDA backend (tests/common/bf16_cpu_backend.h).
//
//   bench_batch_drift [--out bench/results/batch_drift_cpu.json] [--steps 16] [--commit <sha>]

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/adapters/adapter.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model_io/weights.h"
#include "tests/common/bf16_cpu_backend.h"
#include "tests/common/demo_mole_adapter.h"

ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(int, steps, 16, "Decode steps of the measured request");
ABSL_FLAG(std::string, commit, "", "Commit measured (recorded in the JSON)");
ABSL_FLAG(std::string, workdir, "/tmp/moleserve_batch_drift", "Where the adapter is written");

namespace {

using namespace moleserve::engine;

constexpr int32_t kPrompt = 24;
constexpr int32_t kBlocksPerSeq = 6;  // 96 positions

struct Neighbour {
  bool mole;
  int32_t prompt;  // tokens; a neighbour longer than a step's chunk prefills over several steps
};

struct Composition {
  std::string name;
  std::vector<Neighbour> neighbours;
};

struct Trace {
  std::vector<std::vector<float>> logits;               // per step: the request's row
  std::vector<std::vector<std::set<int32_t>>> routing;  // per step, per site: chosen experts
};

// The request (sequence 0) prefills its prompt, then decodes `steps` tokens (forced to `forced`
// when given, else greedy); neighbours prefill in chunks of 16 and then decode alongside.
Trace RunOne(LlamaModel& model, int32_t slot, const Composition& comp, int steps,
             std::vector<int32_t>* forced) {
  std::vector<int32_t> tokens(kPrompt);
  for (int32_t i = 0; i < kPrompt; ++i) tokens[i] = (i * 53 + 7) % 256;
  const int32_t n = 1 + static_cast<int32_t>(comp.neighbours.size());
  std::vector<std::vector<int32_t>> nb_tokens(n);
  std::vector<int32_t> computed(n, 0);
  for (int32_t s = 1; s < n; ++s) {
    for (int32_t i = 0; i < comp.neighbours[s - 1].prompt; ++i) {
      nb_tokens[s].push_back((i * 29 + s * 13 + 1) % 256);
    }
  }
  Trace trace;
  for (int step = 0; step <= steps; ++step) {
    Batch b;
    int32_t target_row = -1;
    for (int32_t s = 0; s < n; ++s) {
      std::vector<int32_t>& toks = s == 0 ? tokens : nb_tokens[s];
      const int32_t begin = computed[s];
      int32_t end = static_cast<int32_t>(toks.size());
      if (s > 0) end = std::min(end, begin + 16);  // neighbours prefill in chunks
      if (begin == end) {  // a neighbour that is done prefilling decodes a fixed token
        toks.push_back((step * 17 + s) % 256);
        end = begin + 1;
      }
      const int32_t q = b.num_seqs();
      for (int32_t p = begin; p < end; ++p) {
        b.tokens.push_back(toks[p]);
        b.positions.push_back(p);
        b.token_seq.push_back(q);
      }
      computed[s] = end;
      if (s == 0) target_row = static_cast<int32_t>(b.sample_rows.size());
      b.sample_rows.push_back(b.num_tokens() - 1);
      for (int32_t k = 0; k < kBlocksPerSeq; ++k) b.block_tables.push_back(s * kBlocksPerSeq + k);
      b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
      b.seq_adapter.push_back(s == 0 || comp.neighbours[s - 1].mole ? slot : -1);
      b.seq_return_routing.push_back(s == 0 ? 1 : 0);
    }
    b.aux_block_table_offsets.assign(b.num_seqs() + 1, 0);
    std::vector<float> logits;
    ForwardExtras extras;
    if (absl::Status st = model.Forward(b, &logits, &extras); !st.ok()) {
      std::fprintf(stderr, "forward: %s\n", std::string(st.message()).c_str());
      std::exit(1);
    }
    const int32_t vocab = model.config().vocab_size;
    std::vector<float> row(logits.begin() + int64_t{target_row} * vocab,
                           logits.begin() + int64_t{target_row + 1} * vocab);
    std::vector<std::set<int32_t>> sites;
    for (const RoutingRecord& r : extras.routing[target_row]) {
      sites.emplace_back(r.experts.begin(), r.experts.end());
    }
    if (step < steps) {
      int32_t next;
      if (forced->size() > static_cast<size_t>(step)) {
        next = (*forced)[step];
      } else {
        next = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
        forced->push_back(next);
      }
      tokens.push_back(next);
    }
    trace.logits.push_back(std::move(row));
    trace.routing.push_back(std::move(sites));
  }
  return trace;
}

double LogSoftmaxAt(const std::vector<float>& row, int32_t id) {
  const float m = *std::max_element(row.begin(), row.end());
  double s = 0;
  for (float v : row) s += std::exp(static_cast<double>(v) - m);
  return row[id] - (m + std::log(s));
}

nlohmann::json Measure(const std::string& label, Backend* backend, const std::string& adapter_dir,
                       const std::vector<Composition>& comps, int steps) {
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto model = *LlamaModel::Create(backend, config, weights,
                                   {.num_kv_blocks = 64 * kBlocksPerSeq + 8,
                                    .kv_block_size = 16,
                                    .max_batch_tokens = 2048,
                                    .max_seqs = 64});
  auto adapter = *LoadAdapter(adapter_dir, "mole", config, {});
  const int32_t slot = *model->AttachAdapter(adapter);
  std::vector<int32_t> forced;
  const Trace alone = RunOne(*model, slot, {"alone", {}}, steps, &forced);
  nlohmann::json rows = nlohmann::json::array();
  std::printf("%s\n%-34s %12s %12s %12s %8s %14s\n", label.c_str(), "composition", "max|dlogit|",
              "(decode)", "max|dlogprob|", "greedy", "routing flips");
  for (const Composition& comp : comps) {
    const Trace t = RunOne(*model, slot, comp, steps, &forced);
    double max_logit = 0, max_logprob = 0, max_decode_logit = 0;
    int agree = 0, sites = 0, flips = 0;
    for (size_t step = 0; step < alone.logits.size(); ++step) {
      const auto& a = alone.logits[step];
      const auto& b = t.logits[step];
      for (size_t i = 0; i < a.size(); ++i) {
        const double d = std::fabs(a[i] - b[i]);
        max_logit = std::max(max_logit, d);
        if (step > 0) max_decode_logit = std::max(max_decode_logit, d);  // step 0 is the prefill
      }
      const int32_t pick = static_cast<int32_t>(std::max_element(a.begin(), a.end()) - a.begin());
      max_logprob = std::max(max_logprob, std::fabs(LogSoftmaxAt(a, pick) - LogSoftmaxAt(b, pick)));
      agree += pick == static_cast<int32_t>(std::max_element(b.begin(), b.end()) - b.begin());
      for (size_t r = 0; r < alone.routing[step].size(); ++r) {
        ++sites;
        flips += alone.routing[step][r] != t.routing[step][r] ? 1 : 0;
      }
    }
    const int total = static_cast<int>(alone.logits.size());
    std::printf("%-34s %12.3g %12.3g %12.3g %4d/%-3d %7d/%-6d\n", comp.name.c_str(), max_logit,
                max_decode_logit, max_logprob, agree, total, flips, sites);
    rows.push_back({{"composition", comp.name},
                    {"neighbours", comp.neighbours.size()},
                    {"max_abs_logit_diff", max_logit},
                    {"max_abs_logprob_diff", max_logprob},
                    {"max_abs_logit_diff_decode_steps", max_decode_logit},
                    {"greedy_agree", agree},
                    {"steps", total},
                    {"routing_sites", sites},
                    {"routing_flips", flips}});
  }
  return {{"backend", label}, {"compositions", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int steps = absl::GetFlag(FLAGS_steps);
  const std::string dir = absl::GetFlag(FLAGS_workdir);
  if (moleserve::test_util::WriteDemoMoleAdapter(dir).empty()) {
    std::fprintf(stderr, "cannot write the adapter under %s\n", dir.c_str());
    return 1;
  }
  auto mix = [](int count, int mole_every, int32_t prompt) {
    std::vector<Neighbour> v;
    for (int i = 0; i < count; ++i) v.push_back({i % mole_every == 0, prompt + (i * 7) % 24});
    return v;
  };
  const std::vector<Composition> comps = {
      {"3 base neighbours", mix(3, 1000, 8)},
      {"3 MoLE neighbours", mix(3, 1, 8)},
      {"15 mixed (1 in 3 MoLE)", mix(15, 3, 8)},
      {"15 mixed, prefilling 40-63 tokens", mix(15, 3, 40)},
      {"63 mixed (1 in 2 MoLE)", mix(63, 2, 8)},
  };
  auto cpu = *CreateCpuBackend({.num_threads = 2});
  auto bf16 = moleserve::test_util::Bf16CpuBackend::Create();
  nlohmann::json report;
  report["benchmark"] = "batch_drift";
  report["date"] = absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone());
  report["commit"] = absl::GetFlag(FLAGS_commit);
  report["model"] = "demo (random weights), demo MoLE adapter top-2-of-4 rank 4 on q_proj, o_proj";
  report["request"] = {{"prompt_tokens", kPrompt}, {"decode_steps", steps}, {"greedy", true}};
  report["results"] = {Measure("cpu fp32", cpu.get(), dir, comps, steps),
                       Measure("cpu bf16 twin of the CUDA backend", bf16.get(), dir, comps, steps)};
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    std::ofstream(out) << report.dump(2) << "\n";
  }
  std::filesystem::remove_all(dir);
  return 0;
}
