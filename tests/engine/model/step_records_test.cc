// StepRecords on the CPU backend: host decisions are recorded at once; device decisions kept with
// Keep (also across a growth of its buffer) or written to a buffer of the caller's
// (UseDeviceWords) come back in the order the pass visited the sites, with counts and weights
// read from the device words or fixed; the undefined-logits counter turns into an error naming
// the count, and only when some group routed on the device.

#include "engine/model/step_records.h"

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "engine/backend/backend.h"

namespace moleserve::engine {
namespace {

std::unique_ptr<Backend> Cpu() { return *CreateCpuBackend({.num_threads = 1}); }

DeviceBuffer Words(Backend& b, const std::vector<int32_t>& words) {
  DeviceBuffer buf = *b.Allocate(words.size() * 4);
  EXPECT_TRUE(b.CopyToDevice(buf.data(), words.data(), words.size() * 4).ok());
  return buf;
}

int32_t FloatBits(float f) {
  int32_t w;
  std::memcpy(&w, &f, 4);
  return w;
}

TEST(StepRecordsTest, HostAndDeviceDecisionsComeBackInSiteOrder) {
  auto backend = Cpu();
  StepRecords r(backend.get());
  // Tokens 0 and 2 record (into records 1 and 0), token 1 does not.
  ASSERT_TRUE(r.Begin({1, -1, 0}, 2, /*may_route=*/true).ok());
  EXPECT_TRUE(r.wants(0));
  EXPECT_FALSE(r.wants(1));
  const int32_t experts[] = {3, 1};
  const float weights[] = {0.75f, 0.25f};
  r.Record(0, 0, "q_proj", experts, weights, 2);
  r.Record(1, 0, "q_proj", experts, weights, 2);  // not recording: ignored
  // A device site: ids, weights and counts of two tokens, kept with one Keep each. The second
  // Keep grows the buffer (it starts empty) and must keep the first words.
  DeviceBuffer ids = Words(*backend, {5, 6, 7, 8});
  DeviceBuffer w = Words(*backend, {FloatBits(0.5f), FloatBits(0.5f), FloatBits(1.0f), 0});
  DeviceBuffer counts = Words(*backend, {2, 1});
  auto ids_at = r.Keep(ids.data(), 4);
  auto w_at = r.Keep(w.data(), 4);
  auto counts_at = r.Keep(counts.data(), 2);
  ASSERT_TRUE(ids_at.ok() && w_at.ok() && counts_at.ok());
  r.Defer(0, 1, "o_proj", *ids_at, *w_at, *counts_at, 0);
  r.Defer(2, 1, "o_proj", *ids_at + 2, *w_at + 2, *counts_at + 1, 0);
  // Rank routing: fixed count, unit weights.
  r.Defer(2, 2, "v_proj", *ids_at + 1, /*weights_at=*/-1, /*count_at=*/-1, 3);
  r.MarkDeviceRouted();
  ASSERT_TRUE(r.IssueCopies().ok());
  ASSERT_TRUE(r.Collect().ok());
  const auto& rec = r.records();
  ASSERT_EQ(rec.size(), 2u);
  ASSERT_EQ(rec[1].size(), 2u);  // token 0: the host site, then the device site
  EXPECT_EQ(rec[1][0].module, std::string("q_proj"));
  EXPECT_EQ(rec[1][0].experts, (std::vector<int32_t>{3, 1}));
  EXPECT_EQ(rec[1][0].weights, (std::vector<float>{0.75f, 0.25f}));
  EXPECT_EQ(rec[1][1].layer, 1);
  EXPECT_EQ(rec[1][1].experts, (std::vector<int32_t>{5, 6}));
  EXPECT_EQ(rec[1][1].weights, (std::vector<float>{0.5f, 0.5f}));
  ASSERT_EQ(rec[0].size(), 2u);  // token 2
  EXPECT_EQ(rec[0][0].experts, (std::vector<int32_t>{7}));
  EXPECT_EQ(rec[0][0].weights, (std::vector<float>{1.0f}));
  EXPECT_EQ(rec[0][1].experts, (std::vector<int32_t>{6, 7, 8}));
  EXPECT_EQ(rec[0][1].weights, (std::vector<float>{1.0f, 1.0f, 1.0f}));
}

TEST(StepRecordsTest, PlannedWordsAndUndefinedLogits) {
  auto backend = Cpu();
  StepRecords r(backend.get());
  ASSERT_TRUE(r.Begin({0}, 1, true).ok());
  DeviceBuffer plan = Words(*backend, {9, 4, FloatBits(0.25f), FloatBits(0.75f), 2});
  r.Defer(0, 3, "k_proj", 0, 2, 4, 0);
  r.UseDeviceWords(&plan, 5);
  r.MarkDeviceRouted();
  // Two token-sites with undefined logits, counted on the device.
  const int32_t two = 2;
  ASSERT_TRUE(backend->CopyToDevice(r.undefined_counter(), &two, 4).ok());
  ASSERT_TRUE(r.IssueCopies().ok());
  absl::Status st = r.Collect();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("for 2 token-site(s)"), std::string::npos) << st;
  EXPECT_EQ(r.records()[0][0].experts, (std::vector<int32_t>{9, 4}));
  EXPECT_EQ(r.records()[0][0].weights, (std::vector<float>{0.25f, 0.75f}));
  EXPECT_EQ(r.Check().code(), absl::StatusCode::kInvalidArgument);
  // A new pass starts from zero; without device routing the counter is not read at all.
  ASSERT_TRUE(r.Begin({0}, 1, true).ok());
  EXPECT_TRUE(r.Check().ok());
  ASSERT_TRUE(backend->CopyToDevice(r.undefined_counter(), &two, 4).ok());
  EXPECT_TRUE(r.Check().ok()) << "no group routed on the device: nothing to report";
  EXPECT_FALSE(StepRecords(backend.get()).Collect().ok()) << "Collect before IssueCopies";
}

}  // namespace
}  // namespace moleserve::engine
