// The decode fast path (LlamaModelOptions::decode_graphs, Backend::CaptureGraph): on the CPU
// backend, whose graphs are recorded op lists with the same rules as CUDA graphs, a model that
// replays graphs gives bit-identical logits to one that runs every op eagerly, over many steps
// whose positions, tokens and block tables change and batch sizes that come and go; and a
// capture refuses what a CUDA graph cannot hold (copies, allocation, synchronization).

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model_io/weights.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::engine {
namespace {

// The next step of the sequences s for which runs(s): each sends the tokens it has not sent yet
// (its prompt first, then one token a step), samples its last row, owns KV blocks 3s .. 3s + 2
// and uses adapter uses[s]. in_batch gets the step's sequences, in batch order.
Batch NextStep(const std::vector<int32_t>& uses, const std::vector<std::vector<int32_t>>& tokens,
               const std::function<bool(int32_t)>& runs, std::vector<int32_t>* computed,
               std::vector<int32_t>* in_batch) {
  Batch b;
  for (int32_t s = 0; s < static_cast<int32_t>(uses.size()); ++s) {
    if (!runs(s)) continue;
    const int32_t q = b.num_seqs();
    for (int32_t p = (*computed)[s]; p < static_cast<int32_t>(tokens[s].size()); ++p) {
      b.tokens.push_back(tokens[s][p]);
      b.positions.push_back(p);
      b.token_seq.push_back(q);
    }
    (*computed)[s] = static_cast<int32_t>(tokens[s].size());
    b.sample_rows.push_back(b.num_tokens() - 1);
    for (int32_t k = 0; k < 3; ++k) b.block_tables.push_back(s * 3 + k);
    b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
    b.seq_adapter.push_back(uses[s]);
    in_batch->push_back(s);
  }
  b.aux_block_table_offsets.assign(b.num_seqs() + 1, 0);
  return b;
}

// A model that replays decode graphs and one that runs every step eagerly, on the demo model's
// weights; AttachToBoth gives them the same adapters in the same slots.
struct GraphAndEager {
  ModelConfig config = DemoModelConfig();
  std::unique_ptr<Backend> graph_backend, eager_backend;
  std::unique_ptr<LlamaModel> graphed, eager;
};

void MakeGraphAndEager(GraphAndEager* m) {
  const HostWeights weights = RandomLlamaWeights(m->config, kDemoModelSeed);
  auto b_graph = CreateCpuBackend({.num_threads = 2});
  auto b_eager = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(b_graph.ok() && b_eager.ok());
  m->graph_backend = *std::move(b_graph);
  m->eager_backend = *std::move(b_eager);
  LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  auto graphed = LlamaModel::Create(m->graph_backend.get(), m->config, weights, options);
  options.decode_graphs = false;
  auto eager = LlamaModel::Create(m->eager_backend.get(), m->config, weights, options);
  ASSERT_TRUE(graphed.ok() && eager.ok());
  m->graphed = *std::move(graphed);
  m->eager = *std::move(eager);
}

// Loads the adapter in `dir` as `name` and attaches it to both models; appends its slot.
void AttachToBoth(GraphAndEager& m, const std::string& dir, const std::string& name,
                  std::vector<int32_t>* slots) {
  auto a = LoadAdapter(dir, name, m.config, {});
  ASSERT_TRUE(a.ok()) << a.status();
  auto g = m.graphed->AttachAdapter(*a);
  auto e = m.eager->AttachAdapter(*a);
  ASSERT_TRUE(g.ok() && e.ok());
  ASSERT_EQ(*g, *e);
  slots->push_back(*g);
}

// max |a - b| relative to max(1, max |b|): how far two runs' logits are apart.
float RelativeGap(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float scale = 1.0f, diff = 0.0f;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    scale = std::max(scale, std::fabs(b[i]));
    diff = std::max(diff, std::fabs(a[i] - b[i]));
  }
  return diff / scale;
}

TEST(DecodeGraphTest, ReplayedDecodeStepsEqualEagerOnes) {
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto b_graph = CreateCpuBackend({.num_threads = 2});
  auto b_eager = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(b_graph.ok() && b_eager.ok());
  LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  auto graphed = LlamaModel::Create(b_graph->get(), config, weights, options);
  options.decode_graphs = false;
  auto eager = LlamaModel::Create(b_eager->get(), config, weights, options);
  ASSERT_TRUE(graphed.ok() && eager.ok());

  // Three sequences with prompts of 5, 9 and 14 tokens; each gets blocks as it grows.
  const std::vector<int32_t> prompt_len = {5, 9, 14};
  std::vector<std::vector<int32_t>> blocks = {{10}, {3}, {7}};
  int32_t next_block = 20;
  Batch prefill;
  for (int32_t s = 0; s < 3; ++s) {
    for (int32_t i = 0; i < prompt_len[s]; ++i) {
      prefill.tokens.push_back((i * 29 + s * 71 + 3) % 256);
      prefill.positions.push_back(i);
      prefill.token_seq.push_back(s);
    }
    prefill.sample_rows.push_back(static_cast<int32_t>(prefill.tokens.size() - 1));
    prefill.block_tables.push_back(blocks[s][0]);
    prefill.block_table_offsets.push_back(s + 1);
  }
  std::vector<float> lg, le;
  absl::Status st = (*graphed)->Forward(prefill, &lg);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE((*eager)->Forward(prefill, &le).ok());
  ASSERT_EQ(lg, le);

  // 40 decode steps; sequence 1 pauses for steps 10..19 (a batch of 2 instead of 3), and every
  // sequence crosses a block boundary, so block tables change under the same graph.
  std::vector<int32_t> len = prompt_len;
  std::vector<int32_t> last(3, 65);
  for (int step = 0; step < 40; ++step) {
    Batch d;
    for (int32_t s = 0; s < 3; ++s) {
      if (s == 1 && step >= 10 && step < 20) continue;
      if (len[s] == static_cast<int32_t>(blocks[s].size()) * 16) blocks[s].push_back(next_block++);
      const int32_t q = d.num_seqs();
      d.tokens.push_back(last[s]);
      d.positions.push_back(len[s]);
      d.token_seq.push_back(q);
      d.sample_rows.push_back(q);
      d.block_tables.insert(d.block_tables.end(), blocks[s].begin(), blocks[s].end());
      d.block_table_offsets.push_back(static_cast<int32_t>(d.block_tables.size()));
    }
    ASSERT_TRUE((*graphed)->Forward(d, &lg).ok()) << "step " << step;
    ASSERT_TRUE((*eager)->Forward(d, &le).ok()) << "step " << step;
    ASSERT_EQ(lg, le) << "step " << step;
    int32_t q = 0;
    for (int32_t s = 0; s < 3; ++s) {
      if (s == 1 && step >= 10 && step < 20) continue;
      const float* row = lg.data() + int64_t{q++} * config.vocab_size;
      last[s] = static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row);
      ++len[s];
    }
  }
  // One graph per decode batch size seen (3 and 2), none for the eager model.
  EXPECT_EQ((*graphed)->decode_graphs(), 2);
  EXPECT_EQ((*eager)->decode_graphs(), 0);
  EXPECT_TRUE((*graphed)->graph_status().ok());
}

// Adapters in the graph (AdapterExecutor::PlanPass): decode steps whose sequences use two PEFT
// LoRAs, a routed MoLE and the base model replay graphs that give the eager model's logits and
// routing records bit for bit while the composition changes (sequences pause and come back, two
// sequences share an adapter, the MoLE sequence joins and leaves, records are asked on some
// steps only); a step with a routing override is not planned and runs eagerly, still equal.
TEST(DecodeGraphTest, PlainLoraStepsReplayEqualEagerOnesAsTheBatchChanges) {
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto b_graph = CreateCpuBackend({.num_threads = 2});
  auto b_eager = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(b_graph.ok() && b_eager.ok());
  LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  auto graphed = LlamaModel::Create(b_graph->get(), config, weights, options);
  options.decode_graphs = false;
  auto eager = LlamaModel::Create(b_eager->get(), config, weights, options);
  ASSERT_TRUE(graphed.ok() && eager.ok());
  const std::string root = testing::TempDir() + "/decode_graph_adapters";
  std::vector<std::shared_ptr<const Adapter>> adapters;
  for (int i = 0; i < 3; ++i) {
    const std::string dir = root + "/" + std::to_string(i);
    const std::string written = i < 2 ? test_util::WriteDemoPeftLora(dir, 30 + i, 4 + 4 * i)
                                      : test_util::WriteDemoMoleAdapter(dir);
    ASSERT_FALSE(written.empty());
    auto a = LoadAdapter(dir, "a" + std::to_string(i), config, {});
    ASSERT_TRUE(a.ok()) << a.status();
    adapters.push_back(*a);
  }
  std::vector<int32_t> slot;
  for (const auto& a : adapters) {
    auto g = (*graphed)->AttachAdapter(a);
    auto e = (*eager)->AttachAdapter(a);
    ASSERT_TRUE(g.ok() && e.ok());
    ASSERT_EQ(*g, *e);
    slot.push_back(*g);
  }
  std::filesystem::remove_all(root);

  // Sequence s uses uses[s]; active over steps [from[s], to[s]) (a pause when paused[s] holds).
  const std::vector<int32_t> uses = {-1, slot[0], slot[1], slot[1], slot[2]};
  const std::vector<int32_t> from = {0, 0, 0, 12, 24};
  const std::vector<int32_t> to = {36, 36, 36, 36, 30};
  auto paused = [](int32_t s, int32_t step) { return s == 1 && step >= 8 && step < 16; };
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 5 + static_cast<int32_t>(s); ++i) {
      tokens[s].push_back((i * 41 + static_cast<int32_t>(s) * 17 + 3) % 256);
    }
  }
  std::vector<int32_t> computed(uses.size(), 0);
  for (int32_t step = 0; step < 36; ++step) {
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens,
        [&](int32_t s) { return step >= from[s] && step < to[s] && !paused(s, step); }, &computed,
        &in_batch);
    // The MoLE sequence records its routing on even steps; on step 27 it overrides its routing
    // (top-1), which is not planned.
    b.seq_return_routing.assign(b.num_seqs(), 0);
    b.seq_override.assign(b.num_seqs(), -1);
    for (size_t r = 0; r < in_batch.size(); ++r) {
      if (in_batch[r] != 4) continue;
      b.seq_return_routing[r] = step % 2 == 0 ? 1 : 0;
      if (step == 27) {
        RoutingOverride o;
        o.k = 1;
        b.seq_override[r] = 0;
        b.overrides.push_back(o);
      }
    }
    std::vector<float> lg, le;
    ForwardExtras xg, xe;
    absl::Status st = (*graphed)->Forward(b, &lg, &xg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE((*eager)->Forward(b, &le, &xe).ok()) << "step " << step;
    ASSERT_EQ(lg, le) << "step " << step;
    ASSERT_EQ(xg.routing.size(), xe.routing.size());
    for (size_t r = 0; r < xg.routing.size(); ++r) {
      ASSERT_EQ(xg.routing[r].size(), xe.routing[r].size()) << "step " << step;
      for (size_t i = 0; i < xg.routing[r].size(); ++i) {
        EXPECT_EQ(xg.routing[r][i].experts, xe.routing[r][i].experts) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].weights, xe.routing[r][i].weights) << "step " << step;
      }
      // Only the MoLE sequence routes; it records 8 sites on the steps it asks.
      const bool mole_records = in_batch[r] == 4 && step % 2 == 0;
      EXPECT_EQ(xg.routing[r].size(), mole_records ? 8u : 0u) << "step " << step;
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  // Graphs for the shapes of the current plan-buffer epoch (the buffers grew when the MoLE
  // joined, which freed the older adapter graphs): MoLE steps with and without records, and the
  // LoRA-only steps after the MoLE left.
  EXPECT_GE((*graphed)->decode_graphs(), 3);
  EXPECT_EQ((*eager)->decode_graphs(), 0);
  // Detaching the MoLE frees the graphs that read its routers (and only those).
  const int64_t before = (*graphed)->decode_graphs();
  (*graphed)->DetachAdapter(slot[2]);
  EXPECT_LT((*graphed)->decode_graphs(), before);
  EXPECT_GE((*graphed)->decode_graphs(), 1);  // the LoRA-only graph stays
}

// Rank-wise groups (FlyLoRA, SMoRA) are planned too: their decode steps replay from graphs with
// the same bits and the same kept ranks as eager execution while sequences join and leave. On
// the last step the eager model takes the unplanned path (LlamaModel::set_planned_passes), and
// its logits agree with the planned ones within 1e-5 relative, its kept ranks exactly.
// The fused projections: q|k|v and gate|up are one GEMM each, and a planned pass shrinks their
// static LoRAs in one call per projection (A rows side by side, each module's padded with zero
// rows to the plan's rank stride). Two LoRAs of different ranks, one on every module and one on
// q, v and down only (so k's and the MLP's rows of the second are all padding): graph replay
// equals eager execution bit for bit, and both match the unplanned path (one shrink per module,
// no padding) within 1e-5 on every step.
TEST(DecodeGraphTest, FusedProjectionsMatchTheUnplannedPath) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  auto unplanned_backend = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(unplanned_backend.ok());
  LlamaModelOptions options{.num_kv_blocks = 64,
                            .kv_block_size = 16,
                            .max_batch_tokens = 256,
                            .max_seqs = 8,
                            .decode_graphs = false};
  auto unplanned = LlamaModel::Create(unplanned_backend->get(), m.config,
                                      RandomLlamaWeights(m.config, kDemoModelSeed), options);
  ASSERT_TRUE(unplanned.ok());
  (*unplanned)->set_planned_passes(false);
  const std::string root = testing::TempDir() + "/decode_graph_fused";
  ASSERT_FALSE(test_util::WriteDemoPeftLora(root + "/every", 41, 4, 0.2f, true).empty());
  ASSERT_FALSE(test_util::WriteDemoPeftLora(root + "/some", 42, 8).empty());
  std::vector<int32_t> slot;
  for (const char* name : {"every", "some"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slot));
    auto a = LoadAdapter(root + "/" + name, name, m.config, {});
    ASSERT_TRUE(a.ok()) << a.status();
    auto s = (*unplanned)->AttachAdapter(*a);
    ASSERT_TRUE(s.ok());
    ASSERT_EQ(*s, slot.back());
  }
  std::filesystem::remove_all(root);
  const std::vector<int32_t> uses = {slot[0], -1, slot[1], slot[0]};
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 3 + static_cast<int32_t>(s); ++i) {
      tokens[s].push_back((i * 37 + static_cast<int32_t>(s) * 11 + 5) % 256);
    }
  }
  std::vector<int32_t> computed(uses.size(), 0);
  for (int32_t step = 0; step < 8; ++step) {
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [&](int32_t s) { return s != 3 || step >= 3; }, &computed, &in_batch);
    std::vector<float> lg, le, lu;
    ASSERT_TRUE(m.graphed->Forward(b, &lg, nullptr).ok()) << "step " << step;
    ASSERT_TRUE(m.eager->Forward(b, &le, nullptr).ok()) << "step " << step;
    ASSERT_TRUE((*unplanned)->Forward(b, &lu, nullptr).ok()) << "step " << step;
    ASSERT_EQ(lg, le) << "step " << step;
    EXPECT_LE(RelativeGap(le, lu), 1e-5f) << "step " << step << ": fused vs per-module shrinks";
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * m.config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + m.config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 1) << m.graphed->graph_status();
}

TEST(DecodeGraphTest, RankWiseStepsReplayEqualEagerOnesAndMatchTheUnplannedPath) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  const ModelConfig& config = m.config;
  const std::string root = testing::TempDir() + "/decode_graph_rank";
  std::vector<int32_t> slot;
  for (bool smora : {false, true}) {
    const std::string dir = root + (smora ? "/smora" : "/flylora");
    ASSERT_FALSE(test_util::WriteDemoRankAdapter(dir, smora, smora ? 21 : 22).empty());
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, dir, smora ? "smora" : "flylora", &slot));
  }
  std::filesystem::remove_all(root);
  const std::vector<int32_t> uses = {-1, slot[0], slot[1], slot[0]};
  const std::vector<int32_t> from = {0, 0, 0, 6};
  const std::vector<int32_t> to = {16, 16, 12, 16};
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 4 + static_cast<int32_t>(s); ++i) {
      tokens[s].push_back((i * 29 + static_cast<int32_t>(s) * 13 + 7) % 256);
    }
  }
  std::vector<int32_t> computed(uses.size(), 0);
  constexpr int32_t kSteps = 16;
  for (int32_t step = 0; step < kSteps; ++step) {
    const bool last = step + 1 == kSteps;
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [&](int32_t s) { return step >= from[s] && step < to[s]; }, &computed,
        &in_batch);
    // The FlyLoRA sequence 1 records its kept ranks on odd steps and on the last one.
    b.seq_return_routing.assign(b.num_seqs(), 0);
    for (size_t r = 0; r < in_batch.size(); ++r) {
      if (in_batch[r] == 1 && (step % 2 == 1 || last)) b.seq_return_routing[r] = 1;
    }
    m.eager->set_planned_passes(!last);  // the last step: the unplanned, host-routed path
    std::vector<float> lg, le;
    ForwardExtras xg, xe;
    absl::Status st = m.graphed->Forward(b, &lg, &xg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE(m.eager->Forward(b, &le, &xe).ok()) << "step " << step;
    if (last) {
      ASSERT_EQ(lg.size(), le.size());
      EXPECT_LE(RelativeGap(lg, le), 1e-5f) << "planned vs unplanned rank routing";
    } else {
      ASSERT_EQ(lg, le) << "step " << step;
    }
    ASSERT_EQ(xg.routing.size(), xe.routing.size());
    for (size_t r = 0; r < xg.routing.size(); ++r) {
      ASSERT_EQ(xg.routing[r].size(), xe.routing[r].size()) << "step " << step;
      for (size_t i = 0; i < xg.routing[r].size(); ++i) {
        EXPECT_EQ(xg.routing[r][i].experts, xe.routing[r][i].experts) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].weights, xe.routing[r][i].weights) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].experts.size(), 3u) << "k ranks kept";
      }
      const bool records = in_batch[r] == 1 && (step % 2 == 1 || last);
      EXPECT_EQ(xg.routing[r].size(), records ? 8u : 0u) << "step " << step;
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 2) << m.graphed->graph_status();
}

TEST(DecodeGraphTest, XloraStepsReplayEqualEagerOnesAndMatchTheUnplannedPath) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  const ModelConfig& config = m.config;
  const std::string root = testing::TempDir() + "/decode_graph_xlora";
  ASSERT_FALSE(test_util::WriteDemoXloraAdapter(root + "/xlora").empty());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/mole").empty());
  std::vector<int32_t> slot;
  for (const char* name : {"xlora", "mole"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slot));
  }
  std::filesystem::remove_all(root);
  // Sequences 1 and 2 are X-LoRA: 1 freezes its scalings after its prefill, 2 runs the scaling
  // pass (over its own KV blocks 40 + 3s ..) every step and leaves at step 10.
  const std::vector<int32_t> uses = {-1, slot[0], slot[0], slot[1]};
  const std::vector<int32_t> from = {0, 0, 0, 4};
  const std::vector<int32_t> to = {16, 16, 10, 16};
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 4 + static_cast<int32_t>(s); ++i) {
      tokens[s].push_back((i * 31 + static_cast<int32_t>(s) * 11 + 5) % 256);
    }
  }
  std::vector<float> frozen;  // sequence 1's scalings
  std::vector<int32_t> computed(uses.size(), 0);
  constexpr int32_t kSteps = 16;
  for (int32_t step = 0; step < kSteps; ++step) {
    const bool last = step + 1 == kSteps;
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [&](int32_t s) { return step >= from[s] && step < to[s]; }, &computed,
        &in_batch);
    b.seq_return_routing.assign(b.num_seqs(), 0);
    b.seq_frozen_scalings.assign(b.num_seqs(), nullptr);
    b.aux_block_table_offsets = {0};
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const int32_t s = in_batch[r];
      if (s == 1 && !frozen.empty()) b.seq_frozen_scalings[r] = &frozen;
      if (s == 2 || (s == 1 && frozen.empty())) {
        for (int32_t k = 0; k < 3; ++k) b.aux_block_tables.push_back(40 + 3 * s + k);
      }
      b.aux_block_table_offsets.push_back(static_cast<int32_t>(b.aux_block_tables.size()));
      // Both X-LoRA sequences record their routing on odd steps and on the last one.
      if ((s == 1 || s == 2) && (step % 2 == 1 || last)) b.seq_return_routing[r] = 1;
    }
    m.eager->set_planned_passes(!last);  // the last step: the unplanned, host-routed path
    std::vector<float> lg, le;
    ForwardExtras xg, xe;
    absl::Status st = m.graphed->Forward(b, &lg, &xg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE(m.eager->Forward(b, &le, &xe).ok()) << "step " << step;
    ASSERT_EQ(lg, le) << "step " << step << (last ? ": planned vs unplanned" : "");
    ASSERT_EQ(xg.xlora_scalings, xe.xlora_scalings) << "step " << step;
    ASSERT_EQ(xg.routing.size(), xe.routing.size());
    for (size_t r = 0; r < xg.routing.size(); ++r) {
      ASSERT_EQ(xg.routing[r].size(), xe.routing[r].size()) << "step " << step;
      for (size_t i = 0; i < xg.routing[r].size(); ++i) {
        EXPECT_EQ(xg.routing[r][i].experts, xe.routing[r][i].experts) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].weights, xe.routing[r][i].weights) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].experts.size(), 2u) << "top-2 of 3";
      }
      const bool records = b.seq_return_routing[r] == 1;
      EXPECT_EQ(xg.routing[r].size(), records ? 8u : 0u) << "step " << step;
      if (in_batch[r] == 1 && frozen.empty()) frozen = xg.xlora_scalings[r];
      EXPECT_EQ(xg.xlora_scalings[r].size(), in_batch[r] == 1 || in_batch[r] == 2 ? 24u : 0u);
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 2) << m.graphed->graph_status();
}

TEST(DecodeGraphTest, MixloraStepsReplayEqualEagerOnesAndMatchTheUnplannedPath) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  const ModelConfig& config = m.config;
  // Two MixLoRA adapters (top-2 and top-p: a token's decision count varies) and a MoLE.
  const std::string root = testing::TempDir() + "/decode_graph_mixlora";
  ASSERT_FALSE(test_util::WriteDemoMixloraAdapter(root + "/topk").empty());
  ASSERT_FALSE(
      test_util::WriteDemoMixloraAdapter(root + "/topp", 23, R"({"algorithm": "top_p", "p": 0.6})")
          .empty());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/mole").empty());
  std::vector<int32_t> slot;
  for (const char* name : {"topk", "topp", "mole"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slot));
  }
  std::filesystem::remove_all(root);
  const std::vector<int32_t> uses = {-1, slot[0], slot[1], slot[2], slot[0]};
  const std::vector<int32_t> from = {0, 0, 0, 3, 6};
  const std::vector<int32_t> to = {16, 16, 12, 16, 16};
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 4 + static_cast<int32_t>(s); ++i) {
      tokens[s].push_back((i * 37 + static_cast<int32_t>(s) * 17 + 3) % 256);
    }
  }
  std::vector<int32_t> computed(uses.size(), 0);
  constexpr int32_t kSteps = 16;
  for (int32_t step = 0; step < kSteps; ++step) {
    const bool last = step + 1 == kSteps;
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [&](int32_t s) { return step >= from[s] && step < to[s]; }, &computed,
        &in_batch);
    // The MixLoRA sequences 1 and 2 record their routing on odd steps and on the last one.
    b.seq_return_routing.assign(b.num_seqs(), 0);
    for (size_t r = 0; r < in_batch.size(); ++r) {
      if ((in_batch[r] == 1 || in_batch[r] == 2) && (step % 2 == 1 || last)) {
        b.seq_return_routing[r] = 1;
      }
    }
    m.eager->set_planned_passes(!last);  // the last step: the unplanned, host-routed path
    std::vector<float> lg, le;
    ForwardExtras xg, xe;
    absl::Status st = m.graphed->Forward(b, &lg, &xg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE(m.eager->Forward(b, &le, &xe).ok()) << "step " << step;
    ASSERT_EQ(lg.size(), le.size());
    if (last) {  // the host-routed path sums a token's experts in expert order: fp32 rounding
      EXPECT_LE(RelativeGap(lg, le), 1e-5f) << "planned vs unplanned block FFN";
    } else {
      ASSERT_EQ(lg, le) << "step " << step;
    }
    ASSERT_EQ(xg.routing.size(), xe.routing.size());
    for (size_t r = 0; r < xg.routing.size(); ++r) {
      ASSERT_EQ(xg.routing[r].size(), xe.routing[r].size()) << "step " << step;
      int32_t ffn_records = 0;
      for (size_t i = 0; i < xg.routing[r].size(); ++i) {
        EXPECT_EQ(xg.routing[r][i].layer, xe.routing[r][i].layer) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].module, xe.routing[r][i].module) << "step " << step;
        EXPECT_EQ(xg.routing[r][i].experts, xe.routing[r][i].experts) << "step " << step;
        ASSERT_EQ(xg.routing[r][i].weights.size(), xe.routing[r][i].weights.size());
        for (size_t w = 0; w < xg.routing[r][i].weights.size(); ++w) {
          // Bit for bit, except across paths, whose router inputs differ by fp32 rounding.
          EXPECT_NEAR(xg.routing[r][i].weights[w], xe.routing[r][i].weights[w], last ? 1e-5 : 0.0)
              << "step " << step;
        }
        ffn_records += xg.routing[r][i].module == std::string("ffn");
      }
      EXPECT_EQ(ffn_records, b.seq_return_routing[r] ? 4 : 0) << "one per layer";
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 2) << m.graphed->graph_status();
}

// Per-request routing overrides are planned too: each override of an adapter routes its own
// tokens with its own spec, in the same graph.
TEST(DecodeGraphTest, RoutingOverridesAreGraphedPerRequest) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  const ModelConfig& config = m.config;
  const std::string root = testing::TempDir() + "/decode_graph_overrides";
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/mole").empty());
  ASSERT_FALSE(test_util::WriteDemoMixloraAdapter(root + "/mixlora").empty());
  std::vector<int32_t> slot;
  for (const char* name : {"mole", "mixlora"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slot));
  }
  std::filesystem::remove_all(root);
  // MoLE: none, k = 1, top-p 0.5; MixLoRA: k = 1, none.
  const std::vector<int32_t> uses = {slot[0], slot[0], slot[0], slot[1], slot[1]};
  const std::vector<int32_t> override_of = {-1, 0, 1, 0, -1};
  std::vector<RoutingOverride> overrides(2);
  overrides[0].k = 1;
  overrides[1].algorithm = RoutingAlgorithm::kTopP;
  overrides[1].p = 0.5f;
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 5; ++i)
      tokens[s].push_back((i * 41 + static_cast<int32_t>(s) * 7) % 256);
  }
  std::vector<int32_t> computed(uses.size(), 0);
  constexpr int32_t kSteps = 10;
  for (int32_t step = 0; step < kSteps; ++step) {
    const bool last = step + 1 == kSteps;
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [](int32_t) { return true; }, &computed, &in_batch);
    b.seq_override = override_of;
    b.overrides = overrides;
    b.seq_return_routing = {0, 1, 1, 1, 0};
    std::vector<float> lg, le;
    ForwardExtras xg, xe;
    m.eager->set_planned_passes(!last);  // the last step: the unplanned, host-routed path
    absl::Status st = m.graphed->Forward(b, &lg, &xg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE(m.eager->Forward(b, &le, &xe).ok()) << "step " << step;
    ASSERT_EQ(lg.size(), le.size());
    EXPECT_LE(RelativeGap(lg, le), last ? 1e-5f : 0.0f) << "step " << step;
    for (size_t r = 0; r < xg.routing.size(); ++r) {
      ASSERT_EQ(xg.routing[r].size(), xe.routing[r].size()) << "step " << step;
      for (size_t i = 0; i < xg.routing[r].size(); ++i) {
        EXPECT_EQ(xg.routing[r][i].experts, xe.routing[r][i].experts) << "step " << step;
        if (r == 1 || r == 3) {
          EXPECT_EQ(xg.routing[r][i].experts.size(), 1u) << "k = 1 for this request";
        }
        if (r == 2) {
          EXPECT_GE(xg.routing[r][i].experts.size(), 1u);
        }
      }
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 1) << m.graphed->graph_status();
}

// Steps of the same size whose override parts belong to different adapters get different
// graphs: (A, A + override X, B + override Y) and (A, B + X, B + Y) lay out their tables alike
// but route different adapters with different masks.
TEST(DecodeGraphTest, OverridePartsOfDifferentAdaptersNeverShareAGraph) {
  GraphAndEager m;
  ASSERT_NO_FATAL_FAILURE(MakeGraphAndEager(&m));
  const ModelConfig& config = m.config;
  const std::string root = testing::TempDir() + "/decode_graph_parts";
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/a", 7, 4, 4).empty());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(root + "/b", 8, 8, 2).empty());
  std::vector<int32_t> slot;
  for (const char* name : {"a", "b"}) {
    ASSERT_NO_FATAL_FAILURE(AttachToBoth(m, root + "/" + name, name, &slot));
  }
  std::filesystem::remove_all(root);
  std::vector<RoutingOverride> overrides(2);
  overrides[0].k = 1;
  overrides[1].k = 3;
  // Sequences 0..2 run on even steps, 3..5 on odd ones: the same batch size, other adapters.
  const std::vector<int32_t> uses = {slot[0], slot[0], slot[1], slot[0], slot[1], slot[1]};
  const std::vector<int32_t> override_of = {-1, 0, 1, -1, 0, 1};
  std::vector<std::vector<int32_t>> tokens(uses.size());
  for (size_t s = 0; s < uses.size(); ++s) {
    for (int32_t i = 0; i < 4; ++i)
      tokens[s].push_back((i * 53 + static_cast<int32_t>(s) * 19) % 256);
  }
  std::vector<int32_t> computed(uses.size(), 0);
  for (int32_t step = 0; step < 10; ++step) {
    std::vector<int32_t> in_batch;
    Batch b = NextStep(
        uses, tokens, [&](int32_t s) { return (s < 3) == (step % 2 == 0); }, &computed, &in_batch);
    b.seq_override.clear();
    for (int32_t s : in_batch) b.seq_override.push_back(override_of[s]);
    b.overrides = overrides;
    std::vector<float> lg, le;
    ASSERT_TRUE(m.graphed->Forward(b, &lg, nullptr).ok()) << "step " << step;
    ASSERT_TRUE(m.eager->Forward(b, &le, nullptr).ok()) << "step " << step;
    ASSERT_EQ(lg, le) << "step " << step;
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_GE(m.graphed->decode_graphs(), 2) << m.graphed->graph_status();
}

TEST(DecodeGraphTest, CaptureHoldsOpsOnlyAndReplaysThemOnCurrentInputs) {
  auto backend = CreateCpuBackend({.num_threads = 1});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  auto a = b.Allocate(16), c = b.Allocate(16), out = b.Allocate(16);
  ASSERT_TRUE(a.ok() && c.ok() && out.ok());
  std::vector<float> va = {1, 2, 3, 4}, vc = {10, 20, 30, 40}, got(4);
  ASSERT_TRUE(b.CopyToDevice(a->data(), va.data(), 16).ok());
  ASSERT_TRUE(b.CopyToDevice(c->data(), vc.data(), 16).ok());
  const kernels::AddParams add{.a = a->data(), .b = c->data(), .out = out->data(), .n = 4};
  auto graph = b.CaptureGraph([&] { return b.Add(add); });
  ASSERT_TRUE(graph.ok()) << graph.status();
  ASSERT_TRUE(b.CopyToHost(got.data(), out->data(), 16).ok());
  EXPECT_EQ(got, (std::vector<float>{0, 0, 0, 0}));  // recorded, not run
  ASSERT_TRUE(b.LaunchGraph(*graph).ok());
  ASSERT_TRUE(b.CopyToHost(got.data(), out->data(), 16).ok());
  EXPECT_EQ(got, (std::vector<float>{11, 22, 33, 44}));
  va = {100, 200, 300, 400};
  ASSERT_TRUE(b.CopyToDevice(a->data(), va.data(), 16).ok());
  ASSERT_TRUE(b.LaunchGraph(*graph).ok());
  ASSERT_TRUE(b.CopyToHost(got.data(), out->data(), 16).ok());
  EXPECT_EQ(got, (std::vector<float>{110, 220, 330, 440}));

  // What a CUDA graph cannot hold is refused inside a capture, and the capture fails.
  for (int what = 0; what < 4; ++what) {
    auto bad = b.CaptureGraph([&]() -> absl::Status {
      switch (what) {
        case 0:
          return b.CopyToDevice(a->data(), va.data(), 16);
        case 1:
          return b.CopyToHost(got.data(), a->data(), 16);
        case 2:
          return b.Allocate(16).status();
        default:
          return b.Synchronize();
      }
    });
    ASSERT_FALSE(bad.ok()) << what;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kFailedPrecondition) << bad.status();
  }
  EXPECT_FALSE(b.LaunchGraph(*graph + 5).ok());
  b.DestroyGraph(*graph);
  EXPECT_FALSE(b.LaunchGraph(*graph).ok());  // freed
  EXPECT_TRUE(b.Synchronize().ok());         // no capture left open
}

}  // namespace
}  // namespace moleserve::engine
