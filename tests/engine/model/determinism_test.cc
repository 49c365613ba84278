// The same mixed workload twice, on fresh models, gives bit-identical logits: prefill and decode
// mixed, base and MoLE sequences, a batch whose composition changes every step (sequences join
// and leave), routing records asked by one sequence. On the fp32 CPU backend (with decode graphs)
// and on the bf16 twin of the CUDA backend (tests/common/bf16_cpu_backend.h). Tolerance: exact.

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model_io/weights.h"
#include "tests/common/bf16_cpu_backend.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::engine {
namespace {

struct Outputs {
  std::vector<std::vector<float>> logits;  // per step
  std::vector<std::vector<std::vector<RoutingRecord>>> routing;
};

// Sequence s joins at step join[s] with a prompt of prompt[s] tokens, decodes one token a step
// and leaves after step leave[s]; tokens are fixed (they do not depend on the logits), so both
// runs feed the same inputs whatever they compute.
Outputs RunWorkload(Backend* backend, const std::string& adapter_dir) {
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto model = LlamaModel::Create(
      backend, config, weights,
      {.num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8});
  EXPECT_TRUE(model.ok()) << model.status();
  auto adapter = LoadAdapter(adapter_dir, "mole", config, {});
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  auto slot = (*model)->AttachAdapter(*adapter);
  EXPECT_TRUE(slot.ok()) << slot.status();
  const std::vector<int32_t> join = {0, 0, 1, 4, 6};
  const std::vector<int32_t> leave = {7, 11, 11, 11, 9};
  const std::vector<int32_t> prompt = {6, 9, 4, 12, 3};
  const std::vector<int32_t> uses = {-1, *slot, *slot, -1, *slot};
  std::vector<int32_t> computed(join.size(), 0);
  Outputs run;
  for (int32_t step = 0; step < 12; ++step) {
    Batch b;
    for (int32_t s = 0; s < static_cast<int32_t>(join.size()); ++s) {
      if (step < join[s] || step > leave[s]) continue;
      const int32_t q = b.num_seqs();
      const int32_t upto = computed[s] == 0 ? prompt[s] : computed[s] + 1;
      for (int32_t p = computed[s]; p < upto; ++p) {
        b.tokens.push_back((p * 37 + s * 11 + 5) % 256);
        b.positions.push_back(p);
        b.token_seq.push_back(q);
      }
      computed[s] = upto;
      b.sample_rows.push_back(b.num_tokens() - 1);
      b.block_tables.push_back(2 * s);
      b.block_tables.push_back(2 * s + 1);
      b.block_table_offsets.push_back(static_cast<int32_t>(b.block_tables.size()));
      b.seq_adapter.push_back(uses[s]);
      b.seq_return_routing.push_back(s == 2 ? 1 : 0);
    }
    b.aux_block_table_offsets.assign(b.num_seqs() + 1, 0);
    std::vector<float> logits;
    ForwardExtras extras;
    absl::Status st = (*model)->Forward(b, &logits, &extras);
    EXPECT_TRUE(st.ok()) << "step " << step << ": " << st;
    run.logits.push_back(std::move(logits));
    run.routing.push_back(std::move(extras.routing));
  }
  return run;
}

void ExpectIdentical(const Outputs& a, const Outputs& b, const char* what) {
  ASSERT_EQ(a.logits.size(), b.logits.size());
  for (size_t step = 0; step < a.logits.size(); ++step) {
    ASSERT_EQ(a.logits[step].size(), b.logits[step].size());
    EXPECT_EQ(std::memcmp(a.logits[step].data(), b.logits[step].data(),
                          a.logits[step].size() * sizeof(float)),
              0)
        << what << ": logits of step " << step << " differ";
    ASSERT_EQ(a.routing[step].size(), b.routing[step].size());
    for (size_t r = 0; r < a.routing[step].size(); ++r) {
      ASSERT_EQ(a.routing[step][r].size(), b.routing[step][r].size());
      for (size_t i = 0; i < a.routing[step][r].size(); ++i) {
        EXPECT_EQ(a.routing[step][r][i].experts, b.routing[step][r][i].experts) << what;
        EXPECT_EQ(a.routing[step][r][i].weights, b.routing[step][r][i].weights) << what;
      }
    }
  }
}

class DeterminismTest : public testing::Test {
 protected:
  void SetUp() override {
    // One directory per test: ctest runs the tests of this file in parallel processes.
    dir_ = testing::TempDir() + "/determinism_mole_" +
           testing::UnitTest::GetInstance()->current_test_info()->name();
    ASSERT_FALSE(test_util::WriteDemoMoleAdapter(dir_).empty());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(DeterminismTest, MixedWorkloadTwiceIsBitIdenticalOnCpu) {
  auto b1 = CreateCpuBackend({.num_threads = 2});
  auto b2 = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(b1.ok() && b2.ok());
  const Outputs first = RunWorkload(b1->get(), dir_);
  const Outputs second = RunWorkload(b2->get(), dir_);
  // The workload did route: sequence 2's sample rows carry records.
  size_t records = 0;
  for (const auto& step : first.routing) {
    for (const auto& row : step) records += row.size();
  }
  EXPECT_GT(records, 0u);
  ExpectIdentical(first, second, "cpu fp32");
}

TEST_F(DeterminismTest, MixedWorkloadTwiceIsBitIdenticalOnTheBf16Twin) {
  auto b1 = test_util::Bf16CpuBackend::Create();
  auto b2 = test_util::Bf16CpuBackend::Create();
  ASSERT_TRUE(b1 && b2);
  ExpectIdentical(RunWorkload(b1.get(), dir_), RunWorkload(b2.get(), dir_), "cpu bf16");
}

}  // namespace
}  // namespace moleserve::engine
