// Synthetic presets: real shapes (checked against the published parameter counts of the models),
// deterministic lazily generated weights, and an engine serving one end to end.

#include "engine/model/synthetic.h"

#include <gtest/gtest.h>

#include <cmath>

#include "absl/synchronization/notification.h"
#include "engine/engine.h"

namespace moleserve::engine {
namespace {

TEST(SyntheticTest, PresetShapesHaveThePublishedParameterCounts) {
  // Parameter counts from the models' cards / safetensors metadata.
  const std::vector<std::pair<std::string, double>> expected = {
      {"smollm-135m", 134.5e6}, {"qwen2.5-0.5b", 494e6},  {"tinyllama-1.1b", 1.100e9},
      {"llama3.2-1b", 1.236e9}, {"llama3.2-3b", 3.213e9}, {"llama-7b", 6.738e9},
      {"mistral-7b", 7.242e9},  {"qwen2-7b", 7.616e9},    {"llama3-8b", 8.030e9},
      {"llama3.1-8b", 8.030e9}};
  EXPECT_EQ(SyntheticPresetNames().size(), expected.size());
  for (const auto& [name, params] : expected) {
    absl::StatusOr<ModelConfig> c = SyntheticModelConfig(name);
    ASSERT_TRUE(c.ok()) << c.status();
    EXPECT_TRUE(c->Validate().ok()) << name;
    EXPECT_NEAR(c->ParameterCount() / params, 1.0, 0.01) << name << ": " << c->ParameterCount();
  }
}

TEST(SyntheticTest, UnknownPresetListsTheKnownOnes) {
  absl::StatusOr<ModelConfig> c = SyntheticModelConfig("gpt-5");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("llama3.2-1b"), std::string::npos) << c.status();
}

TEST(SyntheticTest, RandomWeightsAreDeterministicWithTheRequestedVariance) {
  const ModelConfig c = *SyntheticModelConfig("smollm-135m");
  RandomWeightSource a(c, 7), b(c, 7), other(c, 8);
  const std::string name = "model.layers.3.mlp.down_proj.weight";
  const std::vector<int64_t> shape = *a.Shape(name);
  ASSERT_EQ(shape, (std::vector<int64_t>{576, 1536}));
  std::vector<float> x(576 * 1536), y(x.size()), z(x.size());
  ASSERT_TRUE(a.ReadF32(name, shape, x.data()).ok());
  ASSERT_TRUE(b.ReadF32(name, shape, y.data()).ok());
  ASSERT_TRUE(other.ReadF32(name, shape, z.data()).ok());
  EXPECT_EQ(x, y);
  EXPECT_NE(x, z);
  double sum_sq = 0;
  for (float v : x) sum_sq += double{v} * v;
  EXPECT_NEAR(sum_sq / x.size(), 1.0 / 1536, 0.05 / 1536);  // variance 1 / in_features
  EXPECT_FALSE(a.ReadF32(name, {576, 1535}, x.data()).ok());
  EXPECT_FALSE(a.Shape("lm_head.weight").ok());  // tied: no lm_head
}

TEST(SyntheticTest, EngineServesASyntheticModel) {
  auto engine = Engine::Create(
      {.model = "synthetic:smollm-135m", .num_threads = 2, .kv_cache_bytes = int64_t{64} << 20});
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ((*engine)->model_info().name, "synthetic:smollm-135m");
  EXPECT_EQ((*engine)->model_info().num_layers, 30);
  EXPECT_EQ((*engine)->model_info().vocab_size, 49152);
  struct Sink : GenerationSink {
    int tokens = 0;
    absl::Status status;
    absl::Notification done;
    void OnChunk(GenerationChunk c) override { tokens += static_cast<int>(c.tokens.size()); }
    void OnFinish(GenerationChunk c, FinishInfo) override {
      tokens += static_cast<int>(c.tokens.size());
      done.Notify();
    }
    void OnError(absl::Status s) override {
      status = s;
      done.Notify();
    }
  };
  auto sink = std::make_shared<Sink>();
  GenerateRequest r;
  r.text = "Hello";
  r.sampling.temperature = 0;
  r.stopping.max_new_tokens = 6;
  r.stopping.ignore_eos = true;
  ASSERT_TRUE((*engine)->Submit(r, sink).ok());
  ASSERT_TRUE(sink->done.WaitForNotificationWithTimeout(absl::Seconds(120)));
  ASSERT_TRUE(sink->status.ok()) << sink->status;
  EXPECT_EQ(sink->tokens, 6);
  EXPECT_EQ(Engine::Create({.model = "synthetic:nope"}).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moleserve::engine
