// proto -> engine request conversion: defaults for unset fields, explicit values kept, range
// checks of proto integer types.

#include "server/grpc/conversion.h"

#include <gtest/gtest.h>

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

TEST(ConversionTest, UnsetSamplingFieldsTakeTheModelDefaults) {
  engine::SamplingParams defaults{
      .temperature = 0.6f, .top_p = 0.9f, .top_k = 40, .repetition_penalty = 1.1f};
  pb::GenerateRequest req;
  req.set_text("hi");
  req.mutable_sampling()->set_top_k(5);
  req.mutable_sampling()->set_temperature(0.0f);  // explicitly greedy: kept, not defaulted
  auto r = FromProto(req, absl::InfiniteFuture(), defaults);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_EQ(r->sampling.top_k, 5);
  EXPECT_EQ(r->sampling.top_p, 0.9f);
  EXPECT_EQ(r->sampling.repetition_penalty, 1.1f);
  EXPECT_FALSE(r->sampling.seed.has_value());
}

TEST(ConversionTest, RejectsValuesOutsideTheEngineTypes) {
  pb::GenerateRequest req;
  req.mutable_token_ids()->add_ids(0x80000000u);
  EXPECT_EQ(FromProto(req, absl::InfiniteFuture(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  pb::GenerateRequest none;
  EXPECT_EQ(FromProto(none, absl::InfiniteFuture(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  pb::GenerateRequest big;
  big.set_text("x");
  big.mutable_stopping()->set_max_new_tokens(0x80000000u);
  EXPECT_EQ(FromProto(big, absl::InfiniteFuture(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ConversionTest, PriorityIsCarried) {
  pb::GenerateRequest req;
  req.set_text("hi");
  auto normal = FromProto(req, absl::InfiniteFuture(), {});
  ASSERT_TRUE(normal.ok());
  EXPECT_EQ(normal->priority, 0);
  req.set_priority(-3);
  auto background = FromProto(req, absl::InfiniteFuture(), {});
  ASSERT_TRUE(background.ok());
  EXPECT_EQ(background->priority, -3);
}

TEST(ConversionTest, DisabledExpertsAreCarried) {
  pb::GenerateRequest req;
  req.set_text("hi");
  req.mutable_routing()->add_disabled_experts(2);
  req.mutable_routing()->add_disabled_experts(0);
  auto r = FromProto(req, absl::InfiniteFuture(), {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->routing_override.disabled_experts, (std::vector<int32_t>{2, 0}));
  EXPECT_FALSE(r->routing_override.empty());
  req.mutable_routing()->add_disabled_experts(0xffffffffu);
  EXPECT_EQ(FromProto(req, absl::InfiniteFuture(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Long prompts' logprobs are split over messages a client's default 4 MiB limit accepts, the
// prompt ids in the first; logit_bias comes over sorted, ids checked.
TEST(ConversionTest, PromptLogprobsAreSplitAndLogitBiasIsCarried) {
  engine::GenerationChunk chunk;
  chunk.prompt_ids.assign(10001, 7);
  engine::GeneratedToken t{7, -1.5f, {}};
  for (int k = 0; k < 20; ++k) t.top.emplace_back(k, -2.0f - k);
  chunk.prompt_logprobs.assign(10000, t);
  const std::vector<pb::GenerateResponse> msgs = PromptLogprobMessages(chunk);
  ASSERT_EQ(msgs.size(), 3u);
  EXPECT_EQ(msgs[0].prompt_token_ids_size(), 10001);
  EXPECT_EQ(msgs[1].prompt_token_ids_size(), 0);
  EXPECT_EQ(msgs[0].prompt_logprobs_size(), kMaxPromptLogprobsPerMessage);
  EXPECT_EQ(msgs[1].prompt_logprobs_size(), kMaxPromptLogprobsPerMessage);
  EXPECT_EQ(msgs[2].prompt_logprobs_size(), 10000 - 2 * kMaxPromptLogprobsPerMessage);
  for (const pb::GenerateResponse& m : msgs) EXPECT_LT(m.ByteSizeLong(), size_t{1} << 20);
  EXPECT_TRUE(PromptLogprobMessages(engine::GenerationChunk{}).empty());

  pb::GenerateRequest req;
  req.set_text("x");
  (*req.mutable_sampling()->mutable_logit_bias())[9] = -3.0f;
  (*req.mutable_sampling()->mutable_logit_bias())[2] = 5.0f;
  auto r = FromProto(req, absl::InfiniteFuture(), {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->sampling.logit_bias,
            (std::vector<std::pair<int32_t, float>>{{2, 5.0f}, {9, -3.0f}}));
  (*req.mutable_sampling()->mutable_logit_bias())[0x80000000u] = 1.0f;
  EXPECT_EQ(FromProto(req, absl::InfiniteFuture(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moleserve::server
