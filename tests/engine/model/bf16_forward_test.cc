// The bf16 forward pass without a GPU: test_util::Bf16CpuBackend computes like the CUDA backend
// (bf16 buffers, fp32 math inside each op, one rounding per output), so the model, adapter
// executor and expert cache run their bf16 code (element sizes, weight and page conversion,
// logits and router logits through Convert, X-LoRA's classifier round trips) against the fp32
// CPU backend, for the demo model and every MoLE family.
//
// Tolerances: bf16 keeps 8 significant bits and every op output is rounded, so the tiny models'
// logits move by about a percent (measured: demo model mean relative 1.0%, families 0.8-3.5%),
// and a routing decision near a tie can flip, which moves that position's logits by up to ~40%
// of their range (measured: max 0.37 and mean 6.7% on MixLoRA-dynamic, whose top-p cut flips 2
// of 28 sites). A plumbing bug (a wrong element size, fp32 bytes read as bf16, a missed
// conversion) gives errors of order 100% or NaN. So: mean relative <= 10%, max <= 0.5 of
// max(1, max |fp32|), and at least 90% of the routed sites pick the same experts.

#include <gtest/gtest.h>

#include <filesystem>

#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "tests/common/bf16_cpu_backend.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/forward_compare.h"
#include "tests/common/mole_fixtures.h"

namespace moleserve::engine {
namespace {

constexpr test_util::LogitTolerance kTolerance{
    .max_rel = 0.5, .mean_rel = 0.1, .routing_agreement = 0.9};

TEST(Bf16ForwardTest, DemoModelPrefillAndDecodeMatchFp32) {
  auto cpu = CreateCpuBackend({.num_threads = 2});
  auto bf16 = test_util::Bf16CpuBackend::Create();
  ASSERT_TRUE(cpu.ok() && bf16);
  test_util::ExpectDemoModelMatches(cpu->get(), bf16.get(), kTolerance);
}

class Bf16FamiliesTest : public ::testing::TestWithParam<test_util::FamilyCase> {};

TEST_P(Bf16FamiliesTest, LogitsAndRoutingMatchFp32) {
  auto cpu = CreateCpuBackend({.num_threads = 2});
  auto bf16 = test_util::Bf16CpuBackend::Create();
  ASSERT_TRUE(cpu.ok() && bf16);
  test_util::ExpectFamilyMatches(cpu->get(), bf16.get(), GetParam(), kTolerance);
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, Bf16FamiliesTest,
                         ::testing::ValuesIn(test_util::MoleFamilyCases()),
                         [](const auto& info) { return info.param.name; });

// Planned adapter passes (StepPlanner: every table uploaded once, then ops only) with LoRAs of
// two ranks on different modules and a routed MoLE in one batch: a planned row table leaves
// null entries between adapters' segments (a rank below the table's stride, an adapter with no
// LoRA at a site). The bf16 twin must read only each segment's own rows (it once read them all
// and crashed, first seen on the GPU host). Its planned steps equal its module-by-module steps
// (the same bf16 ops; measured bit-identical, checked to 1e-6), and stay within a plumbing
// bound of fp32 (mean relative 25%: the MoLE's routing flips at near ties move these steps by
// up to 11% measured; a plumbing bug moves them by ~100%).
TEST(Bf16ForwardTest, PlannedPassesOfLorasOfTwoRanksAndAMoleMatchModuleByModule) {
  constexpr test_util::LogitTolerance kSamePath{
      .max_rel = 1e-6, .mean_rel = 1e-6, .routing_agreement = 1};
  constexpr test_util::LogitTolerance kPlumbing{
      .max_rel = 0.5, .mean_rel = 0.25, .routing_agreement = 0.9};
  auto cpu = CreateCpuBackend({.num_threads = 2});
  auto bf16 = test_util::Bf16CpuBackend::Create();
  ASSERT_TRUE(cpu.ok() && bf16);
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  const LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 8};
  auto ref = LlamaModel::Create(cpu->get(), config, weights, options);
  auto twin = LlamaModel::Create(bf16.get(), config, weights, options);
  auto unplanned = LlamaModel::Create(bf16.get(), config, weights, options);
  ASSERT_TRUE(ref.ok() && twin.ok() && unplanned.ok());
  (*unplanned)->set_planned_passes(false);
  // Both models plan their adapter passes (LlamaModel's default).
  const std::string root = ::testing::TempDir() + "/bf16_planned_adapters";
  std::vector<int32_t> slots = {-1};  // the base model's sequence
  for (int i = 0; i < 3; ++i) {
    const std::string dir = root + "/" + std::to_string(i);
    // Rank 4 on the default modules, then rank 16 on all seven: the first leaves null entries
    // in its segment (stride 16) and at the sites only the second adapts.
    const std::string written =
        i == 2 ? test_util::WriteDemoMoleAdapter(dir)
               : test_util::WriteDemoPeftLora(dir, 40 + i, /*rank=*/i == 0 ? 4 : 16,
                                              /*stddev=*/0.2f, /*every_module=*/i == 1);
    ASSERT_FALSE(written.empty());
    auto a = LoadAdapter(dir, "a" + std::to_string(i), config, {});
    ASSERT_TRUE(a.ok()) << a.status();
    int32_t slot = -1;
    for (LlamaModel* m : {ref->get(), twin->get(), unplanned->get()}) {
      auto attached = m->AttachAdapter(*a);
      ASSERT_TRUE(attached.ok()) << attached.status();
      slot = *attached;
    }
    slots.push_back(slot);
  }
  std::filesystem::remove_all(root);
  std::vector<std::vector<int32_t>> tokens(slots.size());
  std::vector<int32_t> computed(slots.size(), 0);
  for (size_t s = 0; s < slots.size(); ++s) {
    for (int32_t i = 0; i < 6; ++i) tokens[s].push_back((i * 23 + s * 7 + 1) % 256);
  }
  for (int32_t step = 0; step < 8; ++step) {
    Batch batch;
    for (size_t s = 0; s < slots.size(); ++s) {
      for (int32_t p = computed[s]; p < static_cast<int32_t>(tokens[s].size()); ++p) {
        batch.tokens.push_back(tokens[s][p]);
        batch.positions.push_back(p);
        batch.token_seq.push_back(batch.num_seqs());
      }
      computed[s] = static_cast<int32_t>(tokens[s].size());
      batch.sample_rows.push_back(batch.num_tokens() - 1);
      for (int32_t k = 0; k < 2; ++k) batch.block_tables.push_back(static_cast<int32_t>(s) * 2 + k);
      batch.block_table_offsets.push_back(static_cast<int32_t>(batch.block_tables.size()));
      batch.seq_adapter.push_back(slots[s]);
    }
    batch.aux_block_table_offsets.assign(batch.num_seqs() + 1, 0);
    std::vector<float> want, got, module_by_module;
    ASSERT_TRUE((*ref)->Forward(batch, &want).ok());
    ASSERT_TRUE((*twin)->Forward(batch, &got).ok());
    ASSERT_TRUE((*unplanned)->Forward(batch, &module_by_module).ok());
    test_util::ExpectLogitsClose(got, module_by_module,
                                 absl::StrCat("bf16 step ", step, ", planned vs module by module"),
                                 kSamePath);
    test_util::ExpectLogitsClose(got, want, absl::StrCat("planned step ", step, " vs fp32"),
                                 kPlumbing);
    for (size_t s = 0; s < slots.size(); ++s) {
      const float* row = want.data() + s * config.vocab_size;
      tokens[s].push_back(
          static_cast<int32_t>(std::max_element(row, row + config.vocab_size) - row));
    }
  }
}

}  // namespace
}  // namespace moleserve::engine
