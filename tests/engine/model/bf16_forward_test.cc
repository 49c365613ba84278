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

#include "tests/common/bf16_cpu_backend.h"
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

}  // namespace
}  // namespace moleserve::engine
