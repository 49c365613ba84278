// The whole forward pass on the CUDA backend (bf16 weights and activations, fp32 accumulation)
// against its CPU twin (the bf16 emulation of tests/common/bf16_cpu_backend.h), and generation
// with 64 concurrent streams on CUDA. Skipped
// without a CUDA device (ctest label `gpu`).
//
// Tolerances: kTolerance below for logits and routing;
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
#include "engine/model_io/weights.h"
#include "tests/common/bf16_cpu_backend.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/forward_compare.h"
#include "tests/common/mole_fixtures.h"

namespace moleserve::engine {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

// The reference is the bf16 emulation on the CPU (test_util::Bf16CpuBackend): the same bf16
// rounding of every op output, fp32 inside, so only summation order differs (no sum uses
// atomics: every family also runs twice on the GPU with bit-identical logits). Tolerances (first
// estimates, to be confirmed on the GPU): mean relative 1%, max 10% of max(1, max |ref|), 95% of
// routed sites identical.
constexpr test_util::LogitTolerance kTolerance{
    .max_rel = 0.1, .mean_rel = 0.01, .routing_agreement = 0.95};

struct Backends {
  std::unique_ptr<Backend> ref, cuda;
};
Backends MakeBackends() {
  Backends b;
  b.ref = test_util::Bf16CpuBackend::Create();
  auto cuda = CreateCudaBackend({});
  EXPECT_TRUE(b.ref != nullptr && cuda.ok()) << cuda.status();
  if (cuda.ok()) b.cuda = std::move(*cuda);
  return b;
}

// Two sequences: a 20-token prefill and, after it, decode steps of both at once; the CUDA model
// captures the decode graph of a batch of two once and replays it.
TEST(CudaForwardTest, DemoModelPrefillAndDecodeMatchCpu) {
  SKIP_WITHOUT_GPU();
  Backends b = MakeBackends();
  ASSERT_TRUE(b.cuda);
  std::unique_ptr<LlamaModel> cuda;
  test_util::ExpectDemoModelMatches(b.ref.get(), b.cuda.get(), kTolerance, &cuda);
  ASSERT_TRUE(cuda);
  EXPECT_EQ(cuda->decode_graphs(), 1) << cuda->graph_status();
}

class CudaFamiliesTest : public ::testing::TestWithParam<test_util::FamilyCase> {};

// Every MoLE family (PEFT LoRA included) on the tiny checkpoint of mole_families_test.
TEST_P(CudaFamiliesTest, LogitsAndRoutingMatchCpu) {
  SKIP_WITHOUT_GPU();
  Backends b = MakeBackends();
  ASSERT_TRUE(b.cuda);
  test_util::ExpectFamilyMatches(b.ref.get(), b.cuda.get(), GetParam(), kTolerance);
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
// Planned adapter steps in CUDA graphs (AdapterExecutor::PlanPass): two PEFT LoRAs and the demo
// MoLE with the base model, decode steps replayed from graphs on the GPU. Against the bf16 CPU
// twin (kTolerance) every step; against an eager CUDA model (which runs the same planned ops),
// every decode step bit-identical: static LoRAs add once per row and site, routed groups sum a
// row's k experts in a fixed order (SgmvExpandRows), so nothing depends on atomics' order. The
// graphed model captures graphs for adapter steps.
TEST(CudaForwardTest, PlannedAdapterDecodeStepsInGraphsMatch) {
  SKIP_WITHOUT_GPU();
  Backends b = MakeBackends();
  ASSERT_TRUE(b.cuda);
  auto eager_backend = CreateCudaBackend({});
  ASSERT_TRUE(eager_backend.ok()) << eager_backend.status();
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  auto graphed = LlamaModel::Create(b.cuda.get(), config, weights, options);
  auto ref = LlamaModel::Create(b.ref.get(), config, weights, options);
  options.decode_graphs = false;
  auto eager = LlamaModel::Create(eager_backend->get(), config, weights, options);
  ASSERT_TRUE(graphed.ok() && ref.ok() && eager.ok());
  const std::string root = ::testing::TempDir() + "/cuda_planned_adapters";
  std::vector<int32_t> slot;
  for (int i = 0; i < 3; ++i) {
    const std::string dir = root + "/" + std::to_string(i);
    const std::string written =
        i < 2 ? test_util::WriteDemoPeftLora(dir, 40 + i) : test_util::WriteDemoMoleAdapter(dir);
    ASSERT_FALSE(written.empty());
    auto a = LoadAdapter(dir, "a" + std::to_string(i), config, {});
    ASSERT_TRUE(a.ok()) << a.status();
    int32_t s = -1;
    for (LlamaModel* m : {graphed->get(), ref->get(), eager->get()}) {
      auto attached = m->AttachAdapter(*a);
      ASSERT_TRUE(attached.ok()) << attached.status();
      s = *attached;
    }
    slot.push_back(s);
  }
  std::filesystem::remove_all(root);
  // Four sequences (base, LoRA 0, LoRA 1, MoLE); the MoLE sequence decodes on steps 10.. only.
  const std::vector<int32_t> uses = {-1, slot[0], slot[1], slot[2]};
  std::vector<std::vector<int32_t>> tokens(4);
  for (int32_t s = 0; s < 4; ++s) {
    for (int32_t i = 0; i < 6; ++i) tokens[s].push_back((i * 23 + s * 7 + 1) % 256);
  }
  std::vector<int32_t> computed(4, 0);
  int64_t steps_identical = 0, decode_steps = 0;
  for (int32_t step = 0; step < 20; ++step) {
    Batch batch;
    std::vector<int32_t> in_batch;
    for (int32_t s = 0; s < 4; ++s) {
      if (s == 3 && step < 10) continue;
      for (int32_t p = computed[s]; p < static_cast<int32_t>(tokens[s].size()); ++p) {
        batch.tokens.push_back(tokens[s][p]);
        batch.positions.push_back(p);
        batch.token_seq.push_back(batch.num_seqs());
      }
      computed[s] = static_cast<int32_t>(tokens[s].size());
      batch.sample_rows.push_back(batch.num_tokens() - 1);
      for (int32_t k = 0; k < 2; ++k) batch.block_tables.push_back(s * 2 + k);
      batch.block_table_offsets.push_back(static_cast<int32_t>(batch.block_tables.size()));
      batch.seq_adapter.push_back(uses[s]);
      in_batch.push_back(s);
    }
    batch.aux_block_table_offsets.assign(batch.num_seqs() + 1, 0);
    std::vector<float> lg, lr, le;
    absl::Status st = (*graphed)->Forward(batch, &lg);
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st;
    ASSERT_TRUE((*ref)->Forward(batch, &lr).ok());
    ASSERT_TRUE((*eager)->Forward(batch, &le).ok());
    const std::string what = absl::StrCat("planned adapters, step ", step);
    test_util::ExpectLogitsClose(lg, lr, what + " vs the bf16 twin", kTolerance);
    test_util::ExpectLogitsClose(lg, le, what + " vs eager CUDA", kTolerance);
    if (step > 0 && step != 10) {  // step 10 prefills the MoLE sequence
      ++decode_steps;
      steps_identical += lg == le ? 1 : 0;
    }
    for (size_t r = 0; r < in_batch.size(); ++r) {
      const float* row = lg.data() + r * config.vocab_size;
      tokens[in_batch[r]].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
  EXPECT_EQ(steps_identical, decode_steps) << "decode steps, graphed vs eager, bit for bit";
  EXPECT_GE((*graphed)->decode_graphs(), 2) << (*graphed)->graph_status();
}

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
