// The Llama forward pass against an independent PyTorch reference (tests/reference/
// llama_reference.py, Debian's python3-torch, float64) on the demo model written to disk, plus the
// checkpoint loader's error paths.
//
// Tolerance: max |logit - reference| <= 1e-4 for fp32 weights (logits are O(1..10); fp32
// accumulation over hidden 256 / intermediate 688 measures ~5e-6), and <= 1e-4 for a bf16
// checkpoint (the reference reads the same bf16 values, so only fp32 compute error remains).

#include "engine/model/llama_model.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/backend/backend.h"
#include "engine/model/demo_model.h"
#include "engine/model/model_directory.h"
#include "engine/model_io/safetensors.h"
#include "engine/tokenizer/tokenizer.h"
#include "tests/common/run_command.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

constexpr float kTolerance = 1e-4f;

std::string TempDir(const std::string& name) {
  fs::path p = fs::path(::testing::TempDir()) / absl::StrCat("moleserve_", name, "_", getpid());
  fs::remove_all(p);
  return p.string();
}

std::string WriteDemo(const std::string& name, std::string_view dtype = "F32") {
  const std::string dir = TempDir(name);
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  EXPECT_TRUE(WriteModelDirectory(dir, config, weights, Tokenizer::ByteLevelDemo()->ToJson()).ok());
  if (dtype != "F32") {
    std::vector<SafetensorsWriteTensor> tensors;
    for (const TensorSpec& spec : LlamaTensorSpecs(config)) {
      tensors.push_back({spec.name, spec.shape, weights.tensors().at(spec.name).data.data()});
    }
    EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors, {}, dtype).ok());
  }
  return dir;
}

// Runs the PyTorch reference; returns logits[prompt][position][vocab].
std::vector<std::vector<std::vector<double>>> ReferenceLogits(
    const std::string& dir, const std::vector<std::vector<int32_t>>& prompts) {
  std::string cmd = absl::StrCat(MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR,
                                 "/tests/reference/llama_reference.py ", dir);
  for (const auto& p : prompts) absl::StrAppend(&cmd, " --prompt ", absl::StrJoin(p, ","));
  int rc = 0;
  const std::string out = ::moleserve::test_util::RunCommand(cmd, &rc);
  EXPECT_EQ(rc, 0) << "reference failed (is python3-torch installed?): " << cmd;
  nlohmann::json j = nlohmann::json::parse(out, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << "reference printed no JSON";
  if (j.is_discarded()) return {};
  auto logits = j["logits"].get<std::vector<std::vector<std::vector<double>>>>();
  // Every prompt, every position, every vocabulary entry: a short answer must not pass.
  EXPECT_EQ(logits.size(), prompts.size());
  for (size_t p = 0; p < std::min(logits.size(), prompts.size()); ++p) {
    EXPECT_EQ(logits[p].size(), prompts[p].size());
    for (const auto& row : logits[p]) EXPECT_EQ(row.size(), 260u);
  }
  if (::testing::Test::HasFailure()) return {};
  return logits;
}

struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
};

Loaded LoadDir(const std::string& dir) {
  Loaded l;
  l.backend = *CreateCpuBackend({.num_threads = 2});
  auto md = OpenModelDirectory(dir);
  EXPECT_TRUE(md.ok()) << md.status();
  auto model = LlamaModel::Create(
      l.backend.get(), md->config, *md->weights,
      {.num_kv_blocks = 64, .kv_block_size = 4, .max_batch_tokens = 128, .max_seqs = 64});
  EXPECT_TRUE(model.ok()) << model.status();
  l.model = *std::move(model);
  return l;
}

// Appends `count` tokens of prompt p starting at `from` to the batch, as sequence `seq`, with
// blocks [first_block, ...) (4 tokens per block, contiguous ids per sequence are fine: the
// kernel tests cover scattered tables).
void AddSeq(Batch* b, const std::vector<int32_t>& prompt, int from, int count,
            const std::vector<int32_t>& blocks, bool sample_all) {
  const int32_t seq = b->num_seqs();
  for (int i = from; i < from + count; ++i) {
    b->tokens.push_back(prompt[i]);
    b->positions.push_back(i);
    b->token_seq.push_back(seq);
    if (sample_all) b->sample_rows.push_back(b->num_tokens() - 1);
  }
  b->block_tables.insert(b->block_tables.end(), blocks.begin(), blocks.end());
  b->block_table_offsets.push_back(static_cast<int32_t>(b->block_tables.size()));
}

double MaxDiff(const float* got, const std::vector<double>& want) {
  double m = 0;
  for (size_t i = 0; i < want.size(); ++i) m = std::max(m, std::fabs(got[i] - want[i]));
  return m;
}

const std::vector<std::vector<int32_t>> kPrompts = {
    {256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33},
    {256, 1, 2, 3},
    {256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74}};

TEST(LlamaModelTest, MixedPrefillBatchMatchesTorchReference) {
  const std::string dir = WriteDemo("ref");
  auto ref = ReferenceLogits(dir, kPrompts);
  ASSERT_EQ(ref.size(), kPrompts.size());
  Loaded l = LoadDir(dir);
  Batch b;
  int32_t next_block = 0;
  for (const auto& p : kPrompts) {
    std::vector<int32_t> blocks;
    for (size_t i = 0; i < (p.size() + 3) / 4; ++i) blocks.push_back(next_block++);
    AddSeq(&b, p, 0, static_cast<int>(p.size()), blocks, /*sample_all=*/true);
  }
  std::vector<float> logits;
  ASSERT_TRUE(l.model->Forward(b, &logits).ok());
  const int vocab = l.model->config().vocab_size;
  int row = 0;
  double worst = 0;
  for (size_t s = 0; s < kPrompts.size(); ++s) {
    for (size_t pos = 0; pos < kPrompts[s].size(); ++pos, ++row) {
      worst = std::max(worst, MaxDiff(&logits[row * vocab], ref[s][pos]));
    }
  }
  EXPECT_LT(worst, kTolerance);
  std::printf("max |logit - torch| over %d positions: %.3g\n", row, worst);
}

// Prefill a prefix, then decode one token per step while another sequence prefills in chunks in
// the same steps: every position still matches the reference.
TEST(LlamaModelTest, ChunkedPrefillAndDecodeMatchReference) {
  const std::string dir = WriteDemo("decode");
  auto ref = ReferenceLogits(dir, {kPrompts[0], kPrompts[2]});
  ASSERT_EQ(ref.size(), 2u);
  Loaded l = LoadDir(dir);
  const int vocab = l.model->config().vocab_size;
  const std::vector<int32_t> a_blocks = {9, 3, 14, 20}, b_blocks = {1, 30, 7, 2, 11};
  int a_done = 0, b_done = 0;
  const int a_len = static_cast<int>(kPrompts[0].size()),
            b_len = static_cast<int>(kPrompts[2].size());
  // Step 0: A prefills 5 tokens. Then A decodes 1 per step while B prefills 3 per step.
  double worst = 0;
  for (int step = 0; a_done < a_len || b_done < b_len; ++step) {
    Batch batch;
    std::vector<std::pair<int, int>> rows;  // (sequence, position) per sampled row
    const int a_n = std::min(step == 0 ? 5 : 1, a_len - a_done);
    if (a_n > 0) {
      AddSeq(&batch, kPrompts[0], a_done, a_n, a_blocks, true);
      for (int i = 0; i < a_n; ++i) rows.push_back({0, a_done + i});
    }
    const int b_n = std::min(3, b_len - b_done);
    if (b_n > 0 && step > 0) {
      AddSeq(&batch, kPrompts[2], b_done, b_n, b_blocks, true);
      for (int i = 0; i < b_n; ++i) rows.push_back({1, b_done + i});
    }
    std::vector<float> logits;
    ASSERT_TRUE(l.model->Forward(batch, &logits).ok());
    for (size_t r = 0; r < rows.size(); ++r) {
      worst = std::max(worst, MaxDiff(&logits[r * vocab], ref[rows[r].first][rows[r].second]));
    }
    a_done += a_n;
    if (step > 0) b_done += b_n;
  }
  EXPECT_LT(worst, kTolerance);
}

// The fixture was produced on the GPU host by Hugging Face transformers' own LlamaForCausalLM in
// float64 (tools/gpu/hf_reference.py) from the demo model directory; no Python needed here.
TEST(LlamaModelTest, MatchesTransformersFixture) {
  std::ifstream in(std::string(MOLESERVE_SOURCE_DIR) + "/tests/fixtures/demo_model_hf_logits.json");
  ASSERT_TRUE(in.good());
  nlohmann::json fixture = nlohmann::json::parse(in, nullptr, false);
  ASSERT_FALSE(fixture.is_discarded());
  const auto prompts = fixture["prompts"].get<std::vector<std::vector<int32_t>>>();
  const auto ref = fixture["logits"].get<std::vector<std::vector<std::vector<double>>>>();
  ASSERT_EQ(prompts, kPrompts);
  ASSERT_EQ(ref.size(), prompts.size());
  for (size_t p = 0; p < prompts.size(); ++p) {
    ASSERT_EQ(ref[p].size(), prompts[p].size());
    for (const auto& row : ref[p]) ASSERT_EQ(row.size(), 260u);
  }
  Loaded l = LoadDir(WriteDemo("hf"));
  Batch b;
  int32_t next_block = 0;
  for (const auto& p : prompts) {
    std::vector<int32_t> blocks;
    for (size_t i = 0; i < (p.size() + 3) / 4; ++i) blocks.push_back(next_block++);
    AddSeq(&b, p, 0, static_cast<int>(p.size()), blocks, true);
  }
  std::vector<float> logits;
  ASSERT_TRUE(l.model->Forward(b, &logits).ok());
  double worst = 0;
  int row = 0;
  for (size_t s = 0; s < prompts.size(); ++s) {
    for (size_t pos = 0; pos < prompts[s].size(); ++pos, ++row) {
      worst = std::max(worst, MaxDiff(&logits[row * 260], ref[s][pos]));
    }
  }
  EXPECT_LT(worst, kTolerance);
  std::printf("max |logit - transformers| over %d positions: %.3g\n", row, worst);
}

TEST(LlamaModelTest, Bf16CheckpointMatchesReferenceOnSameValues) {
  const std::string dir = WriteDemo("bf16", "BF16");
  auto ref = ReferenceLogits(dir, {kPrompts[0]});
  ASSERT_EQ(ref.size(), 1u);
  Loaded l = LoadDir(dir);
  Batch b;
  AddSeq(&b, kPrompts[0], 0, static_cast<int>(kPrompts[0].size()), {0, 1, 2, 3}, true);
  std::vector<float> logits;
  ASSERT_TRUE(l.model->Forward(b, &logits).ok());
  double worst = 0;
  for (size_t pos = 0; pos < kPrompts[0].size(); ++pos) {
    worst = std::max(worst, MaxDiff(&logits[pos * 260], ref[0][pos]));
  }
  EXPECT_LT(worst, kTolerance);
}

TEST(LlamaModelTest, DirectoryRoundTripIsBitExact) {
  const std::string dir = WriteDemo("roundtrip");
  Loaded from_dir = LoadDir(dir);
  auto backend = *CreateCpuBackend({.num_threads = 2});
  const ModelConfig config = DemoModelConfig();
  auto in_memory = *LlamaModel::Create(
      backend.get(), config, RandomLlamaWeights(config, kDemoModelSeed),
      {.num_kv_blocks = 64, .kv_block_size = 4, .max_batch_tokens = 128, .max_seqs = 64});
  Batch b;
  AddSeq(&b, kPrompts[1], 0, 4, {5}, true);
  std::vector<float> x, y;
  ASSERT_TRUE(from_dir.model->Forward(b, &x).ok());
  ASSERT_TRUE(in_memory->Forward(b, &y).ok());
  EXPECT_EQ(x, y);
}

TEST(LlamaModelTest, ForwardRejectsBrokenBatches) {
  const std::string dir = WriteDemo("badbatch");
  Loaded l = LoadDir(dir);
  std::vector<float> logits;
  Batch b;
  AddSeq(&b, {256, 999}, 0, 2, {0}, true);  // token 999 outside the vocabulary
  EXPECT_EQ(l.model->Forward(b, &logits).code(), absl::StatusCode::kInvalidArgument);
  Batch c;
  AddSeq(&c, {1, 2, 3, 4, 5}, 0, 5, {0}, true);  // 5 positions, one 4-token block
  absl::Status s = l.model->Forward(c, &logits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("block table"), std::string::npos) << s;
  Batch d;
  AddSeq(&d, {1}, 0, 1, {64}, true);  // block id out of range
  EXPECT_EQ(l.model->Forward(d, &logits).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(l.model->Forward(Batch{}, &logits).code(), absl::StatusCode::kInvalidArgument);
}

// Block tables hold every sequence's blocks (shared prefix blocks appear in several tables), up
// to the served context per sequence, not the model's whole position range.
TEST(LlamaModelTest, BlockTablesAreSizedByTheServedContext) {
  auto backend = *CreateCpuBackend({.num_threads = 1});
  const ModelConfig config = DemoModelConfig();
  const HostWeights weights = RandomLlamaWeights(config, kDemoModelSeed);
  const LlamaModelOptions base{
      .num_kv_blocks = 64, .kv_block_size = 4, .max_batch_tokens = 128, .max_seqs = 64};
  ASSERT_GE(config.max_position_embeddings, 64 * 4);
  auto whole = LlamaModel::Create(backend.get(), config, weights, base);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ((*whole)->BlockTableCapacity(), 64 * 64);  // the whole cache per sequence
  LlamaModelOptions served = base;
  served.max_context = 16;  // 4 blocks per sequence
  auto model = LlamaModel::Create(backend.get(), config, weights, served);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->BlockTableCapacity(), 4 * 64);
  // 64 one-token sequences naming 5 blocks each: more entries than the tables hold.
  Batch b;
  for (int s = 0; s < 64; ++s) AddSeq(&b, {256}, 0, 1, {0, 1, 2, 3, 4}, true);
  std::vector<float> logits;
  absl::Status st = (*model)->Forward(b, &logits);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("block-table entries"), std::string::npos) << st;
}

void Overwrite(const std::string& path, size_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TEST(ModelDirectoryTest, CorruptSafetensorsHeaderIsAClearError) {
  const std::string dir = WriteDemo("corrupt");
  Overwrite(dir + "/model.safetensors", 0, std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8));
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("model.safetensors"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, HeaderThatIsNotJsonIsAClearError) {
  const std::string dir = WriteDemo("notjson");
  Overwrite(dir + "/model.safetensors", 8, "#");
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("model.safetensors"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, MissingAndMisshapedTensorsAreNamed) {
  const ModelConfig config = DemoModelConfig();
  HostWeights weights = RandomLlamaWeights(config, 1);
  std::vector<SafetensorsWriteTensor> tensors;
  std::vector<float> wrong(7, 0.0f);
  for (const TensorSpec& spec : LlamaTensorSpecs(config)) {
    if (spec.name == "model.layers.2.mlp.up_proj.weight") continue;  // missing
    if (spec.name == "model.layers.1.self_attn.k_proj.weight") {
      tensors.push_back({spec.name, {7}, wrong.data()});  // mis-shaped
      continue;
    }
    tensors.push_back({spec.name, spec.shape, weights.tensors().at(spec.name).data.data()});
  }
  const std::string dir = WriteDemo("missing");
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors, {}).ok());
  auto md = OpenModelDirectory(dir);
  ASSERT_TRUE(md.ok()) << md.status();
  auto backend = *CreateCpuBackend({.num_threads = 1});
  auto model = LlamaModel::Create(backend.get(), md->config, *md->weights, {});
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("model.layers.1.self_attn.k_proj.weight"),
            std::string::npos)
      << model.status();
  // Fix the shape; now the missing tensor is reported.
  for (auto& t : tensors) {
    if (t.name == "model.layers.1.self_attn.k_proj.weight") {
      t.shape = {128, 256};
      t.data = weights.tensors().at(t.name).data.data();
    }
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors, {}).ok());
  md = OpenModelDirectory(dir);
  ASSERT_TRUE(md.ok());
  model = LlamaModel::Create(backend.get(), md->config, *md->weights, {});
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("model.layers.2.mlp.up_proj.weight"), std::string::npos)
      << model.status();
}

TEST(ModelDirectoryTest, NanWeightIsRejected) {
  const ModelConfig config = DemoModelConfig();
  HostWeights weights = RandomLlamaWeights(config, 1);
  weights.tensors().at("model.norm.weight").data[3] = NAN;
  auto backend = *CreateCpuBackend({.num_threads = 1});
  auto model = LlamaModel::Create(backend.get(), config, weights, {});
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("model.norm.weight"), std::string::npos);
}

TEST(ModelDirectoryTest, TruncatedSafetensorsIsAClearError) {
  const std::string dir = WriteDemo("truncated");
  const std::string file = dir + "/model.safetensors";
  fs::resize_file(file, fs::file_size(file) / 2);
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("model.safetensors"), std::string::npos) << md.status();
  EXPECT_NE(md.status().message().find("data"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, HeaderPointingPastTheEndIsAClearError) {
  const std::string dir = WriteDemo("pastend");
  const std::string file = dir + "/model.safetensors";
  // Header length = file size: the header would end past the end of the file.
  const uint64_t len = fs::file_size(file);
  Overwrite(file, 0, std::string(reinterpret_cast<const char*>(&len), 8));
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("model.safetensors"), std::string::npos) << md.status();
  EXPECT_NE(md.status().message().find("header"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, UnknownDtypeIsNamed) {
  const std::string dir = WriteDemo("dtype");
  const std::string file = dir + "/model.safetensors";
  std::string bytes;
  {
    std::ifstream in(file, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const size_t at = bytes.find("\"F32\"");
  ASSERT_NE(at, std::string::npos);
  Overwrite(file, at, "\"Q32\"");  // same length, so offsets stay valid
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("Q32"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, UnsupportedRopeScalingNamesIt) {
  const std::string dir = WriteDemo("rope");
  auto config = nlohmann::json::parse(ToHfConfigJson(DemoModelConfig()));
  config["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  std::ofstream(dir + "/config.json") << config.dump();
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("config.json"), std::string::npos) << md.status();
  EXPECT_NE(md.status().message().find("dynamic"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, GenerationConfigGivesEosAndSamplingDefaults) {
  const std::string dir = WriteDemo("genconfig");
  std::ofstream(dir + "/generation_config.json")
      << R"({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 40,
             "eos_token_id": [257, 258]})";
  auto md = OpenModelDirectory(dir);
  ASSERT_TRUE(md.ok()) << md.status();
  EXPECT_EQ(md->config.eos_token_ids, (std::vector<int32_t>{257, 258}));
  EXPECT_EQ(md->generation_defaults.temperature, 0.6f);
  EXPECT_EQ(md->generation_defaults.top_p, 0.9f);
  EXPECT_EQ(md->generation_defaults.top_k, 40);
  EXPECT_FALSE(md->generation_defaults.repetition_penalty.has_value());
  std::ofstream(dir + "/generation_config.json") << R"({"temperature": "hot"})";
  md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("temperature"), std::string::npos) << md.status();
}

TEST(ModelDirectoryTest, MissingFilesAreNamed) {
  const std::string dir = WriteDemo("nofiles");
  fs::remove(dir + "/model.safetensors");
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_EQ(md.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(md.status().message().find("model.safetensors"), std::string::npos);
  fs::remove(dir + "/config.json");
  md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("config.json"), std::string::npos);
  EXPECT_EQ(OpenModelDirectory(dir + "/nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelConfigTest, ArchitectureSpecificOptions) {
  auto base = nlohmann::json::parse(ToHfConfigJson(DemoModelConfig()));
  nlohmann::json llama = base;
  llama["attention_bias"] = true;
  auto l = ParseHfConfig(llama.dump());
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_TRUE(l->qkv_bias && l->o_bias);

  nlohmann::json qwen = base;
  qwen["architectures"] = {"Qwen2ForCausalLM"};
  qwen["sliding_window"] = 4096;  // ignored unless use_sliding_window
  auto q = ParseHfConfig(qwen.dump());
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->qkv_bias);
  EXPECT_FALSE(q->o_bias);
  EXPECT_EQ(q->sliding_window, 0);
  qwen["use_sliding_window"] = true;
  EXPECT_NE(ParseHfConfig(qwen.dump()).status().message().find("use_sliding_window"),
            std::string::npos);

  nlohmann::json mistral = base;
  mistral["architectures"] = {"MistralForCausalLM"};
  mistral["sliding_window"] = 4096;
  auto m = ParseHfConfig(mistral.dump());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->sliding_window, 4096);
  EXPECT_FALSE(m->qkv_bias);
  mistral["sliding_window"] = nullptr;
  EXPECT_EQ(ParseHfConfig(mistral.dump())->sliding_window, 0);
  // Keys a config may leave out take transformers' per-architecture defaults.
  mistral.erase("sliding_window");
  mistral.erase("max_position_embeddings");
  EXPECT_EQ(ParseHfConfig(mistral.dump())->sliding_window, 4096);
  EXPECT_EQ(ParseHfConfig(mistral.dump())->max_position_embeddings, 131072);
  qwen.erase("use_sliding_window");
  qwen.erase("max_position_embeddings");
  EXPECT_EQ(ParseHfConfig(qwen.dump())->max_position_embeddings, 32768);

  // transformers 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling.
  nlohmann::json v5 = base;
  v5.erase("rope_theta");
  v5.erase("rope_scaling");
  v5["rope_parameters"] = {{"rope_type", "linear"}, {"rope_theta", 5e5}, {"factor", 4.0}};
  auto p = ParseHfConfig(v5.dump());
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->rope_theta, 5e5f);
  EXPECT_EQ(p->rope_scaling.type, RopeScalingType::kLinear);
  EXPECT_EQ(p->rope_scaling.factor, 4.0);
}

// llama3 rope scaling against values worked out from transformers' formula by hand:
// theta 10000, head_dim 8 -> inv_freq 1, 0.1, 0.01, 0.001 (wavelengths 6.3, 63, 628, 6283);
// original context 1024, low 1, high 4 -> wavelengths above 1024 are divided by the factor 8,
// those below 256 kept, 628 interpolated with smooth = (1024 / 628.3 - 1) / 3.
TEST(ModelConfigTest, Llama3RopeFrequencies) {
  ModelConfig c = DemoModelConfig();
  c.head_dim = 8;
  c.rope_theta = 10000;
  c.rope_scaling = {.type = RopeScalingType::kLlama3,
                    .factor = 8,
                    .low_freq_factor = 1,
                    .high_freq_factor = 4,
                    .original_max_position_embeddings = 1024};
  const std::vector<double> f = RopeInverseFrequencies(c);
  ASSERT_EQ(f.size(), 4u);
  EXPECT_DOUBLE_EQ(f[0], 1.0);
  EXPECT_NEAR(f[1], 0.1, 1e-15);
  const double smooth = (1024 / (2 * M_PI / 0.01) - 1) / 3;
  EXPECT_NEAR(f[2], (1 - smooth) * 0.01 / 8 + smooth * 0.01, 1e-15);
  EXPECT_NEAR(f[3], 0.001 / 8, 1e-15);
  c.rope_scaling = {.type = RopeScalingType::kLinear, .factor = 2};
  EXPECT_NEAR(RopeInverseFrequencies(c)[1], 0.05, 1e-15);
}

// A hostile file nested a million levels deep is an error, not a stack overflow.
TEST(HostileJsonTest, DeepNestingIsRejectedEverywhere) {
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  auto config = ParseHfConfig("{\"hidden_act\": " + deep + "}");
  ASSERT_FALSE(config.ok());
  EXPECT_NE(config.status().message().find("nested"), std::string::npos) << config.status();
  auto tokenizer = Tokenizer::FromJsonString("{\"normalizer\": " + deep + "}");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_NE(tokenizer.status().message().find("nested"), std::string::npos) << tokenizer.status();
  const std::string dir = WriteDemo("deepgen");
  std::ofstream(dir + "/generation_config.json") << "{\"x\": " << deep << "}";
  EXPECT_FALSE(OpenModelDirectory(dir).ok());
  std::ofstream(dir + "/generation_config.json") << R"({"top_k": 1e30})";
  auto md = OpenModelDirectory(dir);
  ASSERT_FALSE(md.ok());
  EXPECT_NE(md.status().message().find("top_k"), std::string::npos) << md.status();
}

TEST(ModelConfigTest, ParsesAndRoundTrips) {
  const ModelConfig c = DemoModelConfig();
  auto parsed = ParseHfConfig(ToHfConfigJson(c));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->num_kv_heads, 4);
  EXPECT_EQ(parsed->head_dim, 32);
  EXPECT_EQ(parsed->eos_token_ids, std::vector<int32_t>{257});
  EXPECT_EQ(parsed->bos_token_id, 256);
}

TEST(ModelConfigTest, RejectsWhatItCannotRunByName) {
  auto base = nlohmann::json::parse(ToHfConfigJson(DemoModelConfig()));
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expect;
  };
  for (const Case& c :
       {Case{"architectures", {"GPT2LMHeadModel"}, "GPT2LMHeadModel"},
        Case{"rope_scaling", {{"type", "yarn"}, {"factor", 4.0}}, "yarn"},
        Case{"rope_scaling", {{"rope_type", "dynamic"}, {"factor", 2.0}}, "dynamic"},
        Case{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}, "low_freq_factor"},
        Case{"rope_scaling", {{"rope_type", "linear"}, {"factor", 0.5}}, "factor"},
        Case{"mlp_bias", true, "mlp_bias"}, Case{"hidden_act", "gelu", "hidden_act"},
        Case{"num_key_value_heads", 3, "num_key_value_heads"},
        Case{"hidden_size", -1, "hidden_size"}, Case{"hidden_size", 1.5, "hidden_size"},
        Case{"vocab_size", 1e12, "vocab_size"}, Case{"hidden_size", 1 << 20, "hidden_size"},
        Case{"rope_scaling", {{"factor", 8.0}}, "rope_type"},
        Case{"rope_parameters", {{"full_attention", {{"rope_type", "default"}}}}, "rope_type"},
        Case{"eos_token_id", 4294967298.0, "eos_token_id"},
        Case{"eos_token_id", {257, -1}, "eos_token_id"},
        Case{"bos_token_id", 1.5, "bos_token_id"}}) {
    nlohmann::json j = base;
    j[c.key] = c.value;
    auto parsed = ParseHfConfig(j.dump());
    ASSERT_FALSE(parsed.ok()) << c.key;
    EXPECT_NE(parsed.status().message().find(c.expect), std::string::npos) << parsed.status();
  }
  nlohmann::json j = base;
  j.erase("num_hidden_layers");
  EXPECT_NE(ParseHfConfig(j.dump()).status().message().find("num_hidden_layers"),
            std::string::npos);
  EXPECT_FALSE(ParseHfConfig("{not json").ok());
}

}  // namespace
}  // namespace moleserve::engine
