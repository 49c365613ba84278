// The whole forward pass on the CUDA backend (bf16 weights and activations, fp32 accumulation)
// against the CPU backend (fp32), and generation with 64 concurrent streams on CUDA. Skipped
// without a CUDA device (ctest label `gpu`).
//
// Tolerances (bf16 keeps 8 significant bits; the tiny models have 2-4 layers):
//  - logits: max |cuda - cpu| <= 5e-2 * max(1, max |cpu|) over every position and vocab entry;
//  - routing: at least 95% of the routed sites of every position pick the same expert set (bf16
//    activations may flip near-ties; a systematic error flips most of them);
//  - 64 streams: every stream completes with exactly its token count, no error, all KV blocks
//    back; the first greedy token equals the CPU engine's for at least 90% of the prompts.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/engine.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "engine/model/weights.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/mole_fixtures.h"

namespace moleserve::engine {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

struct Backends {
  std::unique_ptr<Backend> cpu, cuda;
};
Backends MakeBackends() {
  Backends b;
  auto cpu = CreateCpuBackend({.num_threads = 2});
  auto cuda = CreateCudaBackend({});
  EXPECT_TRUE(cpu.ok() && cuda.ok()) << cuda.status();
  if (cpu.ok()) b.cpu = std::move(*cpu);
  if (cuda.ok()) b.cuda = std::move(*cuda);
  return b;
}

const LlamaModelOptions kModelOptions{
    .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 16};

void ExpectLogitsClose(const std::vector<float>& got, const std::vector<float>& want,
                       const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_ref = 0, max_diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << " at " << i;
    max_ref = std::max(max_ref, std::fabs(double{want[i]}));
    max_diff = std::max(max_diff, std::fabs(double{got[i]} - want[i]));
  }
  EXPECT_LE(max_diff, 5e-2 * std::max(1.0, max_ref))
      << what << ": max |cuda - cpu| " << max_diff << " (max |cpu| " << max_ref << ")";
}

// Two sequences: a 20-token prefill and, after it, decode steps of both at once.
TEST(CudaForwardTest, DemoModelPrefillAndDecodeMatchCpu) {
  SKIP_WITHOUT_GPU();
  Backends b = MakeBackends();
  ASSERT_TRUE(b.cuda);
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto cpu = LlamaModel::Create(b.cpu.get(), config, weights, kModelOptions);
  auto cuda = LlamaModel::Create(b.cuda.get(), config, weights, kModelOptions);
  ASSERT_TRUE(cpu.ok() && cuda.ok()) << cuda.status();
  Batch prefill;
  for (int32_t s = 0; s < 2; ++s) {
    for (int32_t i = 0; i < 20; ++i) {
      prefill.tokens.push_back((i * 37 + s * 101 + 5) % config.vocab_size);
      prefill.positions.push_back(i);
      prefill.token_seq.push_back(s);
      prefill.sample_rows.push_back(static_cast<int32_t>(prefill.tokens.size() - 1));
    }
  }
  prefill.block_tables = {3, 4, 9, 7};
  prefill.block_table_offsets = {0, 2, 4};
  std::vector<float> want, got;
  ASSERT_TRUE((*cpu)->Forward(prefill, &want).ok());
  ASSERT_TRUE((*cuda)->Forward(prefill, &got).ok());
  ExpectLogitsClose(got, want, "prefill");
  // Three decode steps of both sequences: the first captures the CUDA graph of a batch of two,
  // the next two replay it with new tokens and positions.
  for (int32_t step = 0; step < 3; ++step) {
    Batch decode;
    decode.tokens = {17 + step, 230 - step};
    decode.positions = {20 + step, 20 + step};
    decode.token_seq = {0, 1};
    decode.sample_rows = {0, 1};
    decode.block_tables = prefill.block_tables;
    decode.block_table_offsets = prefill.block_table_offsets;
    ASSERT_TRUE((*cpu)->Forward(decode, &want).ok());
    ASSERT_TRUE((*cuda)->Forward(decode, &got).ok());
    ExpectLogitsClose(got, want, absl::StrCat("decode step ", step));
  }
  EXPECT_EQ((*cuda)->decode_graphs(), 1) << (*cuda)->graph_status();
}

class CudaFamiliesTest : public ::testing::TestWithParam<test_util::FamilyCase> {};

// Every MoLE family (PEFT LoRA included) on the tiny checkpoint of mole_families_test.
TEST_P(CudaFamiliesTest, LogitsAndRoutingMatchCpu) {
  SKIP_WITHOUT_GPU();
  const test_util::FamilyCase& c = GetParam();
  std::string error;
  const std::string root = test_util::MoleFixturesRoot(&error);
  ASSERT_FALSE(root.empty()) << error;
  auto dir = OpenModelDirectory(root + "/" + test_util::kMoleFixtureBase);
  ASSERT_TRUE(dir.ok()) << dir.status();
  Backends b = MakeBackends();
  ASSERT_TRUE(b.cuda);
  auto adapter = LoadAdapter(test_util::MoleFixtureAdapterDir(root, c), c.name, dir->config, {});
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  std::vector<float> logits[2];
  ForwardExtras extras[2];
  int i = 0;
  for (Backend* backend : {b.cpu.get(), b.cuda.get()}) {
    auto model = LlamaModel::Create(backend, dir->config, *dir->weights, kModelOptions);
    ASSERT_TRUE(model.ok()) << model.status();
    auto slot = (*model)->AttachAdapter(*adapter);
    ASSERT_TRUE(slot.ok()) << slot.status();
    Batch batch;
    batch.tokens = {256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69};
    for (int32_t p = 0; p < static_cast<int32_t>(batch.tokens.size()); ++p) {
      batch.positions.push_back(p);
      batch.token_seq.push_back(0);
      batch.sample_rows.push_back(p);
    }
    batch.block_tables = {0};
    batch.block_table_offsets = {0, 1};
    batch.seq_adapter = {*slot};
    batch.seq_return_routing = {1};
    batch.aux_block_tables = {1};
    batch.aux_block_table_offsets = {0, 1};
    absl::Status st = (*model)->Forward(batch, &logits[i], &extras[i]);
    ASSERT_TRUE(st.ok()) << st;
    ++i;
  }
  ExpectLogitsClose(logits[1], logits[0], c.name);
  int64_t sites = 0, same = 0;
  for (size_t p = 0; p < extras[0].routing.size(); ++p) {
    ASSERT_EQ(extras[0].routing[p].size(), extras[1].routing[p].size());
    for (size_t r = 0; r < extras[0].routing[p].size(); ++r) {
      const auto& a = extras[0].routing[p][r].experts;
      const auto& g = extras[1].routing[p][r].experts;
      ++sites;
      same += std::set<int32_t>(a.begin(), a.end()) == std::set<int32_t>(g.begin(), g.end());
    }
  }
  EXPECT_GE(same, sites * 95 / 100)
      << c.name << ": " << same << " of " << sites << " routed sites picked the same experts";
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, CudaFamiliesTest,
                         ::testing::ValuesIn(test_util::MoleFamilyCases()),
                         [](const auto& info) { return info.param.name; });

struct Collect : GenerationSink {
  std::vector<int32_t> ids;
  absl::Status error;
  absl::Notification done;
  void OnChunk(GenerationChunk chunk) override {
    for (auto& t : chunk.tokens) ids.push_back(t.id);
  }
  void OnFinish(GenerationChunk last, FinishInfo) override {
    OnChunk(std::move(last));
    done.Notify();
  }
  void OnError(absl::Status s) override {
    error = std::move(s);
    done.Notify();
  }
};

// 64 greedy streams at once (half through a MoLE adapter) on the CUDA engine, and the same
// requests on the CPU engine.
TEST(CudaForwardTest, SixtyFourConcurrentStreams) {
  SKIP_WITHOUT_GPU();
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("moleserve_cuda_streams_", getpid()))
          .string();
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(dir).empty());
  constexpr int kStreams = 64, kTokens = 48;
  std::vector<int32_t> first_token[2];
  int e = 0;
  for (const char* backend : {"cpu", "cuda"}) {
    auto engine = Engine::Create({.num_threads = 2,
                                  .backend = backend,
                                  .max_num_seqs = kStreams,
                                  .adapters = {{"mole", dir}}});
    ASSERT_TRUE(engine.ok()) << engine.status();
    std::vector<std::shared_ptr<Collect>> sinks;
    for (int i = 0; i < kStreams; ++i) {
      GenerateRequest req;
      if (i % 2 == 1) req.adapter = "mole";
      req.token_ids = {256};
      for (int j = 0; j < 5 + i % 23; ++j) req.token_ids.push_back((i * 31 + j * 7) % 256);
      req.sampling.temperature = 0;
      req.stopping.max_new_tokens = kTokens;
      req.stopping.ignore_eos = true;
      sinks.push_back(std::make_shared<Collect>());
      ASSERT_TRUE((*engine)->Submit(req, sinks.back()).ok());
    }
    for (int i = 0; i < kStreams; ++i) {
      ASSERT_TRUE(sinks[i]->done.WaitForNotificationWithTimeout(absl::Seconds(120)));
      ASSERT_TRUE(sinks[i]->error.ok()) << backend << " stream " << i << ": " << sinks[i]->error;
      ASSERT_EQ(sinks[i]->ids.size(), static_cast<size_t>(kTokens)) << backend << " " << i;
      first_token[e].push_back(sinks[i]->ids[0]);
    }
    EngineStats s;
    for (int tries = 0; tries < 500; ++tries) {
      s = (*engine)->Stats();
      if (s.free_kv_blocks == s.total_kv_blocks && s.running == 0) break;
      absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_EQ(s.free_kv_blocks, s.total_kv_blocks) << backend;
    ++e;
  }
  int agree = 0;
  for (int i = 0; i < kStreams; ++i) agree += first_token[0][i] == first_token[1][i];
  EXPECT_GE(agree, kStreams * 9 / 10) << agree << " of " << kStreams << " first tokens agree";
  std::filesystem::remove_all(dir);
}

TEST(CudaForwardTest, EngineRefusesCudaWithoutADevice) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a device is present";
  auto engine = Engine::Create({.backend = "cuda"});
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kFailedPrecondition);
  auto bogus = Engine::Create({.backend = "tpu"});
  ASSERT_FALSE(bogus.ok());
  EXPECT_EQ(bogus.status().code(), absl::StatusCode::kInvalidArgument);
  auto fallback = Engine::Create({.num_threads = 2, .backend = "auto"});
  EXPECT_TRUE(fallback.ok()) << fallback.status();
}

}  // namespace
}  // namespace moleserve::engine
