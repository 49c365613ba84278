#pragma once

// Forward passes of one backend against another's, on the demo model and on every MoLE family
// fixture: logits of every sampled position and the routing of every routed site. Shared by
// tests/engine/model/bf16_forward_test.cc (bf16 emulation against fp32) and cuda_forward_test.cc
// (CUDA against the bf16 emulation). The callers state their tolerances (LogitTolerance); each
// comparison prints what it measured.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/model/demo_model.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "engine/model_io/weights.h"
#include "tests/common/mole_fixtures.h"

namespace moleserve::test_util {

inline const engine::LlamaModelOptions& CompareModelOptions() {
  static const engine::LlamaModelOptions options{
      .num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 16};
  return options;
}

// How close a bf16 forward pass must come to its reference, relative to max(1, max |ref|) for
// the largest difference and to mean |ref| for the mean difference.
struct LogitTolerance {
  double max_rel;
  double mean_rel;
  double routing_agreement;  // fraction of routed sites with the same expert set
};

inline void ExpectLogitsClose(const std::vector<float>& got, const std::vector<float>& want,
                              const std::string& what, const LogitTolerance& tol) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_ref = 0, max_diff = 0, sum_ref = 0, sum_diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << " at " << i;
    const double d = std::fabs(double{got[i]} - want[i]);
    max_ref = std::max(max_ref, std::fabs(double{want[i]}));
    max_diff = std::max(max_diff, d);
    sum_ref += std::fabs(double{want[i]});
    sum_diff += d;
  }
  const double max_rel = max_diff / std::max(1.0, max_ref);
  const double mean_rel = sum_diff / std::max(1e-30, sum_ref);
  std::printf("%s: max |diff| %.4g (relative %.4g), mean relative %.4g\n", what.c_str(), max_diff,
              max_rel, mean_rel);
  EXPECT_LE(max_rel, tol.max_rel) << what << ": max |diff| " << max_diff << ", max |ref| "
                                  << max_ref;
  EXPECT_LE(mean_rel, tol.mean_rel) << what;
}

// The demo model: two 20-token prefills in one batch, then three decode steps of both (on CUDA
// the first captures the decode graph of a batch of two and the next two replay it).
inline void ExpectDemoModelMatches(engine::Backend* ref_backend, engine::Backend* backend,
                                   const LogitTolerance& tol,
                                   std::unique_ptr<engine::LlamaModel>* kept = nullptr) {
  using namespace engine;  // NOLINT: test helper
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  auto cpu = LlamaModel::Create(ref_backend, config, weights, CompareModelOptions());
  auto other = LlamaModel::Create(backend, config, weights, CompareModelOptions());
  ASSERT_TRUE(cpu.ok() && other.ok()) << other.status();
  Batch prefill;
  for (int32_t s = 0; s < 2; ++s) {
    for (int32_t i = 0; i < 20; ++i) {
      prefill.tokens.push_back((i * 37 + s * 101 + 5) % config.vocab_size);
      prefill.positions.push_back(i);
      prefill.token_seq.push_back(s);
    }
    prefill.sample_rows.push_back(static_cast<int32_t>(prefill.tokens.size() - 1));
  }
  prefill.block_tables = {3, 4, 9, 7};
  prefill.block_table_offsets = {0, 2, 4};
  std::vector<float> want, got;
  absl::Status st = (*cpu)->Forward(prefill, &want);
  ASSERT_TRUE(st.ok()) << st;
  st = (*other)->Forward(prefill, &got);
  ASSERT_TRUE(st.ok()) << st;
  ExpectLogitsClose(got, want, "demo prefill", tol);
  for (int32_t step = 0; step < 3; ++step) {
    Batch decode;
    decode.tokens = {17 + step, 230 - step};
    decode.positions = {20 + step, 20 + step};
    decode.token_seq = {0, 1};
    decode.sample_rows = {0, 1};
    decode.block_tables = prefill.block_tables;
    decode.block_table_offsets = prefill.block_table_offsets;
    st = (*cpu)->Forward(decode, &want);
    ASSERT_TRUE(st.ok()) << st;
    st = (*other)->Forward(decode, &got);
    ASSERT_TRUE(st.ok()) << st;
    ExpectLogitsClose(got, want, absl::StrCat("demo decode step ", step), tol);
  }
  if (kept != nullptr) *kept = std::move(*other);
}

// One MoLE family fixture (mole_fixtures.h): the logits of every prompt position and the routing
// of every routed site. `backend` runs twice, on fresh models: the second run must give the same
// bits and the same routing (no sum may depend on the order of parallel work, e.g. atomics).
inline void ExpectFamilyMatches(engine::Backend* ref_backend, engine::Backend* backend,
                                const FamilyCase& c, const LogitTolerance& tol) {
  using namespace engine;  // NOLINT: test helper
  std::string error;
  const std::string root = MoleFixturesRoot(&error);
  ASSERT_FALSE(root.empty()) << error;
  auto dir = OpenModelDirectory(root + "/" + kMoleFixtureBase);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto adapter = LoadAdapter(MoleFixtureAdapterDir(root, c), c.name, dir->config, {});
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  std::vector<float> logits[3];
  ForwardExtras extras[3];
  int i = 0;
  for (Backend* b : {ref_backend, backend, backend}) {
    auto model = LlamaModel::Create(b, dir->config, *dir->weights, CompareModelOptions());
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
  ExpectLogitsClose(logits[1], logits[0], c.name, tol);
  ASSERT_EQ(logits[2].size(), logits[1].size());
  EXPECT_EQ(std::memcmp(logits[2].data(), logits[1].data(), logits[1].size() * sizeof(float)), 0)
      << c.name << ": a second run of the same pass gave other logits";
  ASSERT_EQ(extras[2].routing.size(), extras[1].routing.size());
  for (size_t p = 0; p < extras[1].routing.size(); ++p) {
    ASSERT_EQ(extras[2].routing[p].size(), extras[1].routing[p].size());
    for (size_t r = 0; r < extras[1].routing[p].size(); ++r) {
      EXPECT_EQ(extras[2].routing[p][r].experts, extras[1].routing[p][r].experts) << c.name;
      EXPECT_EQ(extras[2].routing[p][r].weights, extras[1].routing[p][r].weights) << c.name;
    }
  }
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
  std::printf("%s: %lld of %lld routed sites pick the same experts\n", c.name.c_str(),
              static_cast<long long>(same), static_cast<long long>(sites));
  EXPECT_GE(same, static_cast<int64_t>(sites * tol.routing_agreement))
      << c.name << ": " << same << " of " << sites << " routed sites picked the same experts";
}

}  // namespace moleserve::test_util
