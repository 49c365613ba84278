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

}  // namespace
}  // namespace moleserve::server
