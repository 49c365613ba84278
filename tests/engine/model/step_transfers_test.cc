// What one step costs in traffic with the device, counted on the CPU backend through
// tests/common/counting_backend.h (no GPU needed), and what the device sampler returns:
// - a pure decode step is one graph launch plus the sampler, one copy out of 16 bytes per
//   sequence (+160 when some row asks for top logprobs), one synchronisation, and small uploads;
// - steps with MoLE adapters bring no logits to the host either;
// - the tokens, logprobs and alternatives equal the host sampler's over the full logits of an
//   identical model (greedy: identical ids; logprobs within 1e-5).

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model_io/weights.h"
#include "engine/sampling/sampler.h"
#include "tests/common/counting_backend.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::engine {
namespace {

using test_util::BackendCounts;
using test_util::CountingBackend;

constexpr int64_t kRowBytes = sizeof(kernels::SampledRow);
constexpr int64_t kTopBytes = 2 * 4 * kernels::kMaxSampleTopLogprobs;

struct Models {
  std::unique_ptr<CountingBackend> counting;
  std::unique_ptr<Backend> plain;
  std::unique_ptr<LlamaModel> model;      // on `counting`, decode graphs on
  std::unique_ptr<LlamaModel> reference;  // on `plain`, eager, logits to the host
};

Models MakeModels() {
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  Models m;
  m.counting = std::make_unique<CountingBackend>(*CreateCpuBackend({.num_threads = 2}));
  m.plain = *CreateCpuBackend({.num_threads = 2});
  LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  m.model = *LlamaModel::Create(m.counting.get(), config, weights, options);
  options.decode_graphs = false;
  m.reference = *LlamaModel::Create(m.plain.get(), config, weights, options);
  return m;
}

// Loads the adapter in `dir` and attaches it to both models, which give it the same slot
// (appended to *slots).
void AttachToBoth(Models& m, const std::string& dir, const std::string& name,
                  std::vector<int32_t>* slots) {
  auto adapter = LoadAdapter(dir, name, m.model->config(), {});
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  auto slot = m.model->AttachAdapter(*adapter);
  auto ref_slot = m.reference->AttachAdapter(*adapter);
  ASSERT_TRUE(slot.ok() && ref_slot.ok());
  ASSERT_EQ(*slot, *ref_slot);
  slots->push_back(*slot);
}

// Sequences that decode together: tokens so far and one KV block each (prompts stay short).
struct Seqs {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<int32_t> slot;          // adapter slot per sequence, -1 = base
  std::vector<int32_t> top;           // top logprobs asked
  std::vector<uint8_t> routing = {};  // return_routing per sequence (empty: none)
  // X-LoRA sequences (empty: none): they run the scaling pass (over KV blocks 32 + 2s, 33 + 2s)
  // until frozen[s] holds the scalings of their first step, then decode with those (xlora[s]
  // == 1), or run it every step (xlora[s] == 2).
  std::vector<uint8_t> xlora = {};
  std::vector<std::vector<float>> frozen = {};
  std::vector<int32_t> override_index = {};  // per sequence, into overrides (empty: none)
  std::vector<RoutingOverride> overrides = {};
  int32_t computed = 0;  // tokens already in the KV cache (same for all)

  // The next batch: the whole prompt first, then one token per sequence.
  Batch Next() const {
    Batch b;
    for (int32_t s = 0; s < static_cast<int32_t>(tokens.size()); ++s) {
      for (int32_t p = computed; p < static_cast<int32_t>(tokens[s].size()); ++p) {
        b.tokens.push_back(tokens[s][p]);
        b.positions.push_back(p);
        b.token_seq.push_back(s);
      }
      b.sample_rows.push_back(b.num_tokens() - 1);
      b.block_tables.push_back(2 * s);
      b.block_tables.push_back(2 * s + 1);
      b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
    }
    if (std::any_of(slot.begin(), slot.end(), [](int32_t x) { return x >= 0; })) {
      b.seq_adapter = slot;
      b.aux_block_table_offsets = {0};
      b.seq_frozen_scalings.assign(slot.size(), nullptr);
      for (size_t s = 0; s < slot.size(); ++s) {
        if (!xlora.empty() && xlora[s] && !frozen[s].empty()) {
          b.seq_frozen_scalings[s] = &frozen[s];
        } else if (!xlora.empty() && xlora[s]) {
          b.aux_block_tables.push_back(32 + 2 * static_cast<int32_t>(s));
          b.aux_block_tables.push_back(33 + 2 * static_cast<int32_t>(s));
        }
        b.aux_block_table_offsets.push_back(static_cast<int32_t>(b.aux_block_tables.size()));
      }
      b.seq_return_routing = routing;
      b.seq_override = override_index;
      b.overrides = overrides;
    }
    return b;
  }
};

// One step on both models: the device sampler on `m.model`, the host sampler over the
// reference's logits; returns the counted traffic of the device side.
BackendCounts StepAndCompare(Models& m, Seqs& seqs, const std::string& what,
                             ForwardExtras* extras = nullptr) {
  const Batch b = seqs.Next();
  const int32_t vocab = m.model->config().vocab_size;
  StepSampling sampling;
  std::vector<TokenSampler> host;
  for (size_t s = 0; s < seqs.tokens.size(); ++s) {
    TokenSampler twin({.temperature = 0.0f}, 1, seqs.tokens[s], seqs.top[s]);
    sampling.rows.push_back(twin.NextRow(&sampling.penalty_ids, &sampling.penalty_counts,
                                         &sampling.bias_ids, &sampling.bias_values));
    host.emplace_back(SamplingParams{.temperature = 0.0f}, 1, seqs.tokens[s], seqs.top[s]);
  }
  m.counting->Reset();
  StepSamples got;
  ForwardExtras got_extras, want_extras;
  absl::Status st = m.model->ForwardSample(b, sampling, &got, &got_extras);
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  const BackendCounts counts = m.counting->counts();
  std::vector<float> logits;
  st = m.reference->Forward(b, &logits, &want_extras);
  EXPECT_TRUE(st.ok()) << what << ": " << st;
  // Routing records (copied with the step's results on the device side, per site on the
  // reference's eager host reads) agree exactly.
  EXPECT_EQ(got_extras.routing.size(), want_extras.routing.size()) << what;
  for (size_t r = 0; r < got_extras.routing.size() && r < want_extras.routing.size(); ++r) {
    const auto& g = got_extras.routing[r];
    const auto& w = want_extras.routing[r];
    EXPECT_EQ(g.size(), w.size()) << what << " row " << r;
    if (g.size() != w.size()) continue;
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_EQ(g[i].layer, w[i].layer) << what;
      EXPECT_EQ(g[i].module, w[i].module) << what;
      EXPECT_EQ(g[i].experts, w[i].experts) << what;
      EXPECT_EQ(g[i].weights, w[i].weights) << what;
    }
  }
  EXPECT_EQ(got_extras.xlora_scalings, want_extras.xlora_scalings) << what;
  for (size_t s = 0; s < seqs.xlora.size(); ++s) {
    if (seqs.xlora[s] == 1 && seqs.frozen[s].empty()) {
      seqs.frozen[s] = got_extras.xlora_scalings[s];
    }
  }
  EXPECT_EQ(got.rows.size(), seqs.tokens.size()) << what;
  for (size_t s = 0; s < seqs.tokens.size() && s < got.rows.size(); ++s) {
    const SampledToken want = host[s].Sample(absl::MakeConstSpan(logits.data() + s * vocab, vocab));
    EXPECT_EQ(got.rows[s].finite, 1) << what;
    EXPECT_EQ(got.rows[s].id, want.id) << what << " row " << s;
    EXPECT_NEAR(got.rows[s].logprob, want.logprob, 1e-5) << what << " row " << s;
    EXPECT_EQ(got.rows[s].num_top, static_cast<int32_t>(want.top.size())) << what;
    for (int32_t j = 0; j < got.rows[s].num_top; ++j) {
      EXPECT_EQ(got.top_ids[s * kernels::kMaxSampleTopLogprobs + j], want.top[j].first);
      EXPECT_NEAR(got.top_logprobs[s * kernels::kMaxSampleTopLogprobs + j], want.top[j].second,
                  1e-5);
    }
    seqs.tokens[s].push_back(want.id);
  }
  seqs.computed = static_cast<int32_t>(seqs.tokens[0].size()) - 1;
  if (extras != nullptr) *extras = std::move(got_extras);
  return counts;
}

TEST(StepTransfersTest, ADecodeStepIsOneGraphLaunchTheSamplerAndOneSmallCopyOut) {
  Models m = MakeModels();
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}, {100, 3, 250, 1}},
            .slot = {-1, -1, -1},
            .top = {0, 0, 0}};
  // The residual adds ride in the RMSNorms after them (cpu_ops_test: the fused op is Add then
  // RmsNorm bit for bit): one fused norm per block but the last, one plain Add.
  const BackendCounts prefill = StepAndCompare(m, seqs, "prefill");
  const int64_t layers = m.model->config().num_layers;
  EXPECT_EQ(prefill.fused_norms, 2 * layers - 1);
  EXPECT_EQ(prefill.adds, 1);
  for (int step = 0; step < 12; ++step) {
    const std::string what = "decode step " + std::to_string(step);
    seqs.top[1] = step % 2 == 1 ? 5 : 0;  // alternatives on odd steps only
    const int64_t n = 3;
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.graph_launches, 1) << what;
    EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.d2h_copies, 1) << what;
    EXPECT_EQ(c.d2h_bytes, n * kRowBytes + (step % 2 == 1 ? n * kTopBytes : 0)) << what;
    EXPECT_LT(c.h2d_bytes, 1024) << what << ": the step's index arrays and sampler rows only";
  }
  EXPECT_EQ(m.model->decode_graphs(), 1);
}

TEST(StepTransfersTest, StepsWithAdaptersBringNoLogitsToTheHost) {
  Models m = MakeModels();
  const std::string dir = testing::TempDir() + "/step_transfers_mole";
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(dir).empty());
  std::vector<int32_t> slots;
  ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, dir, "mole", &slots));
  const int32_t slot = slots[0];
  // Sequence 1 asks for its routing: the decisions of its 8 routed sites (4 layers x q_proj,
  // o_proj; 4 experts) come back with the step's results, without a synchronisation per site.
  // The MoLE's routing is planned (AdapterExecutor::PlanPass), so its decode steps are graphed.
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}},
            .slot = {-1, slot},
            .top = {0, 3},
            .routing = {0, 1}};
  const int32_t vocab = m.model->config().vocab_size;
  for (int step = 0; step < 6; ++step) {
    const std::string what = step == 0 ? "prefill" : "step " + std::to_string(step);
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.graph_launches, step == 0 ? 0 : 1) << what;
    if (step > 0) {
      EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
    }
    // The sampler's rows and alternatives, the routing status, and the routed sites' decisions
    // for the step's tokens (ids, weights, counts; routing runs over the whole step under the
    // adapter's mask): never a row of logits.
    const int64_t step_tokens = step == 0 ? 8 : 2;
    const int64_t routing_bytes = 8 * step_tokens * (2 * 4 + 1) * 4;
    EXPECT_EQ(c.d2h_bytes, 2 * kRowBytes + 2 * kTopBytes + 4 + routing_bytes) << what;
    if (step > 0) {
      EXPECT_LT(c.d2h_bytes, vocab * 4) << what;
    }
  }
  std::filesystem::remove_all(dir);
}

// An output-gated MoLE routes on the device: the gate's logits (a dense pass of its LoRAs, the
// GEMM over their concatenation, the normalisation) never come to the host; only the step's
// results and the asked-for routing decisions do, in one copy. A request that turns expert 0
// off is not routed to it, and its other gates are renormalised.
TEST(StepTransfersTest, OutputGateStepsRouteOnTheDeviceWithOneCopyOut) {
  Models m = MakeModels();
  const std::string dir = testing::TempDir() + "/step_transfers_output_gate";
  ASSERT_FALSE(test_util::WriteDemoOutputGateAdapter(dir).empty());
  std::vector<int32_t> slots;
  ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, dir, "gate", &slots));
  std::filesystem::remove_all(dir);
  RoutingOverride off0;
  off0.disabled_experts = {0};
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {5, 9, 200, 13}, {100, 3, 250, 1}},
            .slot = {slots[0], slots[0], -1},
            .top = {0, 0, 0},
            .routing = {1, 1, 0},
            .override_index = {-1, 0, -1},
            .overrides = {off0}};
  for (int step = 0; step < 4; ++step) {
    const std::string what = step == 0 ? "prefill" : "step " + std::to_string(step);
    ForwardExtras extras;
    const BackendCounts c = StepAndCompare(m, seqs, what, &extras);
    EXPECT_EQ(c.syncs, 1) << what;
    // The sampler's rows, the kept routing decisions and the undefined-routing counter, issued
    // together before the step's one synchronisation: no gate logits per site (8 sites).
    EXPECT_EQ(c.d2h_copies, 3) << what;
    // Row 0 routes every token to all 3 experts at its 8 sites; row 1 to experts 1 and 2 only,
    // with the same gates as row 0's over 1 - row 0's gate of expert 0 at layer 0's q_proj (the
    // same tokens, whose input there does not depend on the mask).
    ASSERT_EQ(extras.routing.size(), 3u) << what;
    ASSERT_EQ(extras.routing[0].size(), extras.routing[1].size()) << what;
    EXPECT_GE(extras.routing[0].size(), 8u) << what;
    for (size_t i = 0; i < extras.routing[0].size(); ++i) {
      const RoutingRecord& all = extras.routing[0][i];
      const RoutingRecord& masked = extras.routing[1][i];
      ASSERT_EQ(all.experts.size(), 3u) << what;
      ASSERT_EQ(masked.experts.size(), 2u) << what;
      EXPECT_EQ(std::count(masked.experts.begin(), masked.experts.end(), 0), 0) << what;
      if (step > 0 || all.layer != 0 || all.module != "q_proj") continue;
      float w0 = 0;
      for (size_t j = 0; j < 3; ++j) w0 = all.experts[j] == 0 ? all.weights[j] : w0;
      for (size_t j = 0; j < 2; ++j) {
        const size_t k = std::find(all.experts.begin(), all.experts.end(), masked.experts[j]) -
                         all.experts.begin();
        EXPECT_NEAR(masked.weights[j], all.weights[k] / (1 - w0), 1e-5) << what;
      }
    }
  }
}

TEST(StepTransfersTest, RankWiseStepsDecodeInOneGraphLaunch) {
  Models m = MakeModels();
  const std::string root = testing::TempDir() + "/step_transfers_rank";
  std::vector<int32_t> slots;
  for (bool smora : {false, true}) {
    const std::string dir = root + (smora ? "/smora" : "/flylora");
    ASSERT_FALSE(test_util::WriteDemoRankAdapter(dir, smora).empty());
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, dir, smora ? "smora" : "flylora", &slots));
  }
  std::filesystem::remove_all(root);
  // The FlyLoRA sequence asks for its routing: the 3 kept ranks of its 8 routed sites, for every
  // token of the step (rank routing runs over the whole step under the adapter's mask).
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}, {1, 2, 3, 4}},
            .slot = {-1, slots[0], slots[1]},
            .top = {0, 0, 0},
            .routing = {0, 1, 0}};
  for (int step = 0; step < 6; ++step) {
    const std::string what = step == 0 ? "prefill" : "step " + std::to_string(step);
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.graph_launches, step == 0 ? 0 : 1) << what;
    if (step > 0) {
      EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
      EXPECT_EQ(c.page_copies, 0) << what << ": the experts stay resident";
    }
    const int64_t step_tokens = step == 0 ? 12 : 3;
    EXPECT_EQ(c.d2h_bytes, 3 * kRowBytes + 4 + 8 * step_tokens * 3 * 4) << what;
  }
}

TEST(StepTransfersTest, PlainLoraStepsUploadOnceAndDecodeInOneGraphLaunch) {
  Models m = MakeModels();
  const std::string dir = testing::TempDir() + "/step_transfers_lora";
  std::vector<int32_t> slots;
  for (uint32_t seed : {11u, 12u}) {
    const std::string d = dir + std::to_string(seed);
    ASSERT_FALSE(test_util::WriteDemoPeftLora(d, seed).empty());
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, d, "lora" + std::to_string(seed), &slots));
    std::filesystem::remove_all(d);
  }
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}, {100, 3, 250, 1}},
            .slot = {-1, slots[0], slots[1]},
            .top = {0, 0, 0}};
  // Prefill, eager: every site's tables in one upload (the demo model adapts 12 sites; before,
  // each site uploaded 8 tables).
  const BackendCounts prefill = StepAndCompare(m, seqs, "prefill");
  EXPECT_EQ(prefill.graph_launches, 0);
  EXPECT_LE(prefill.h2d_copies, 10);
  EXPECT_GT(prefill.page_copies, 0);  // the experts' first use copies them in
  // q_proj and v_proj shrink in one call (the fused q|k|v projection), down_proj in its own: two
  // per layer, not three.
  EXPECT_EQ(prefill.shrinks, 2 * m.model->config().num_layers);
  for (int step = 0; step < 8; ++step) {
    const std::string what = "lora decode step " + std::to_string(step);
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.graph_launches, 1) << what;
    EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.d2h_bytes, 3 * kRowBytes) << what;
    EXPECT_LE(c.h2d_copies, 10) << what;
    EXPECT_EQ(c.page_copies, 0) << what << ": the experts stay resident";
  }
  EXPECT_EQ(m.model->decode_graphs(), 1);
}

TEST(StepTransfersTest, LoraMoleAndXloraInOneBatchDecodeInOneGraphLaunch) {
  Models m = MakeModels();
  const std::string root = testing::TempDir() + "/step_transfers_mixed";
  ASSERT_FALSE(test_util::WriteDemoPeftLora(root + "/lora").empty());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/mole").empty());
  ASSERT_FALSE(test_util::WriteDemoXloraAdapter(root + "/xlora").empty());
  std::vector<int32_t> slots;
  for (const char* name : {"lora", "mole", "xlora"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slots));
  }
  std::filesystem::remove_all(root);
  // X-LoRA sequence 3 freezes its scalings after the prefill (its scaling pass and classifier
  // run then); sequence 4 runs its scaling pass and classifier every step, inside the graph.
  // The MoLE and the first X-LoRA sequence ask for their routing.
  Seqs seqs{
      .tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}, {100, 3, 250, 1}, {1, 2, 3, 4}, {9, 8, 7, 6}},
      .slot = {-1, slots[0], slots[1], slots[2], slots[2]},
      .top = {0, 0, 0, 0, 0},
      .routing = {0, 0, 1, 1, 0},
      .xlora = {0, 0, 0, 1, 2},
      .frozen = {{}, {}, {}, {}, {}}};
  StepAndCompare(m, seqs, "prefill");
  ASSERT_EQ(seqs.frozen[3].size(), 24u) << "8 modules x 3 adapters";
  for (int step = 0; step < 6; ++step) {
    const std::string what = "mixed decode step " + std::to_string(step);
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.graph_launches, 1) << what;
    EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.page_copies, 0) << what << ": the experts stay resident";
    // Rows, the routing status, the decisions of the 8 routed sites of each recording adapter
    // for the step's 5 tokens (MoLE: 4 experts, X-LoRA: 3 adapters), and the scalings table the
    // classifier wrote (5 rows of 24).
    const int64_t routing_bytes = 8 * 5 * (2 * 4 + 1) * 4 + 8 * 5 * (2 * 3 + 1) * 4;
    EXPECT_EQ(c.d2h_bytes, 5 * kRowBytes + 4 + routing_bytes + 5 * 24 * 4) << what;
  }
  EXPECT_GE(m.model->decode_graphs(), 1);
}

TEST(StepTransfersTest, MixloraStepsDecodeInOneGraphLaunch) {
  Models m = MakeModels();
  const std::string root = testing::TempDir() + "/step_transfers_mixlora";
  std::vector<int32_t> slots;
  ASSERT_FALSE(test_util::WriteDemoMixloraAdapter(root + "/topk").empty());
  ASSERT_FALSE(
      test_util::WriteDemoMixloraAdapter(root + "/topp", 23, R"({"algorithm": "top_p", "p": 0.6})")
          .empty());
  for (const char* name : {"topk", "topp"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slots));
  }
  std::filesystem::remove_all(root);
  // The top-2 sequence asks for its routing: its 4 layers' block decisions (4 experts) for
  // every token of the step (routing runs over the whole step under the adapter's mask).
  // A fourth sequence routes the top-2 adapter with a per-request override (k = 1).
  Seqs seqs{.tokens = {{5, 9, 200, 13}, {7, 7, 7, 40}, {100, 3, 250, 1}, {8, 8, 9, 9}},
            .slot = {-1, slots[0], slots[1], slots[0]},
            .top = {0, 0, 0, 0},
            .routing = {0, 1, 0, 0},
            .override_index = {-1, -1, -1, 0},
            .overrides = {RoutingOverride{.k = 1}}};
  for (int step = 0; step < 6; ++step) {
    const std::string what = step == 0 ? "prefill" : "mixlora step " + std::to_string(step);
    const BackendCounts c = StepAndCompare(m, seqs, what);
    EXPECT_EQ(c.syncs, 1) << what;
    EXPECT_EQ(c.graph_launches, step == 0 ? 0 : 1) << what;
    if (step > 0) {
      EXPECT_EQ(c.ops, 1) << what << ": only the sampler runs outside the graph";
      EXPECT_EQ(c.page_copies, 0) << what << ": the experts stay resident";
    }
    const int64_t step_tokens = step == 0 ? 16 : 4;
    EXPECT_EQ(c.d2h_bytes, 4 * kRowBytes + 4 + 4 * step_tokens * (2 * 4 + 1) * 4) << what;
  }
}

TEST(StepTransfersTest, SamplingThatDoesNotFitTheBatchIsRefused) {
  Models m = MakeModels();
  Seqs seqs{.tokens = {{5, 9}}, .slot = {-1}, .top = {0}};
  const Batch b = seqs.Next();
  StepSamples out;
  StepSampling none;  // no row for the batch's one sample row
  EXPECT_EQ(m.model->ForwardSample(b, none, &out).code(), absl::StatusCode::kInvalidArgument);
  StepSampling bad;
  bad.rows.resize(1);
  bad.rows[0].num_top_logprobs = 21;
  EXPECT_EQ(m.model->ForwardSample(b, bad, &out).code(), absl::StatusCode::kInvalidArgument);
  bad.rows[0] = {};
  bad.rows[0].penalty_end = 1;  // past the entries
  EXPECT_EQ(m.model->ForwardSample(b, bad, &out).code(), absl::StatusCode::kInvalidArgument);
  bad.rows[0].penalty_end = 1;
  bad.penalty_ids = {m.model->config().vocab_size};  // outside the vocabulary
  bad.penalty_counts = {1};
  EXPECT_EQ(m.model->ForwardSample(b, bad, &out).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moleserve::engine
