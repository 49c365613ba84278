// The trained demo model (models/demo, written by tools/train_demo/train_demo.py) served by the
// engine against the training script's own numbers (metrics.json), all from the stored bf16
// weights with float32 math:
// - the tokenizer: each held-out text encodes (after BOS) to the ids the script trained and
//   scored with;
// - held-out perplexity per domain for the base model and each adapter, from the engine's prompt
//   logprobs (what gRPC's output.prompt_logprobs returns): the summed NLL within 1e-3 relative of
//   torch's (both float32; the sums run in another order);
// - each adapter is good at its job: `code` and `mail` divide perplexity on their own domain by
//   more than 10 and beat each other there; the MixLoRA does so on both and keeps prose within
//   15% of the base model;
// - the MixLoRA's routing: the share of each domain's (token, layer) slots sent to each expert,
//   from the engine's routing records over the held-out tokens, within 0.02 of the script's
//   (a near-tie may flip a token), and some expert is preferred by one domain over another by a
//   share of at least 0.2.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/adapters/adapter.h"
#include "engine/engine.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "engine/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

using Json = nlohmann::json;

const std::string kDir = std::string(MOLESERVE_SOURCE_DIR) + "/models/demo";
const char* const kDomains[] = {"prose", "code", "mail"};

Json ReadJson(const std::string& path) {
  std::ifstream in(path);
  Json j = Json::parse(in, nullptr, false);
  EXPECT_FALSE(j.is_discarded()) << path;
  return j;
}

class Collect final : public GenerationSink {
 public:
  void OnChunk(GenerationChunk c) override { Take(std::move(c)); }
  void OnFinish(GenerationChunk c, FinishInfo) override {
    Take(std::move(c));
    std::lock_guard<std::mutex> l(mu_);
    done_ = true;
    cv_.notify_all();
  }
  void OnError(absl::Status s) override {
    std::lock_guard<std::mutex> l(mu_);
    status_ = s;
    done_ = true;
    cv_.notify_all();
  }
  // The prompt's summed negative log-likelihood (every token after the first).
  double Nll() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return done_; });
    EXPECT_TRUE(status_.ok()) << status_;
    return nll_;
  }

 private:
  void Take(GenerationChunk c) {
    std::lock_guard<std::mutex> l(mu_);
    for (const GeneratedToken& t : c.prompt_logprobs) nll_ -= t.logprob;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  absl::Status status_;
  double nll_ = 0;
};

std::string Shares(const std::vector<double>& v) {
  std::string out;
  for (double x : v) out += absl::StrFormat("%.2f ", x);
  return out;
}

class DemoModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    heldout_ = new Json(ReadJson(kDir + "/heldout.json"));
    metrics_ = new Json(ReadJson(kDir + "/metrics.json"));
  }
  static void TearDownTestSuite() {
    delete heldout_;
    delete metrics_;
  }
  static const Json& Heldout(const char* domain) { return (*heldout_)[domain]; }
  static Json* heldout_;
  static Json* metrics_;
};
Json* DemoModelTest::heldout_ = nullptr;
Json* DemoModelTest::metrics_ = nullptr;

TEST_F(DemoModelTest, TokenizerGivesTheTrainingIds) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok =
      Tokenizer::FromJsonFile(kDir + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const char* d : kDomains) {
    ASSERT_EQ(Heldout(d).size(), 4u) << d;
    for (const Json& seq : Heldout(d)) {
      const std::vector<int32_t> want = seq["ids"].get<std::vector<int32_t>>();
      std::vector<int32_t> got = (*tok)->Encode(seq["text"].get<std::string>(), true);
      ASSERT_GE(got.size(), want.size()) << seq["name"];
      got.resize(want.size());
      EXPECT_EQ(got, want) << d << " " << seq["name"];
    }
  }
}

TEST_F(DemoModelTest, HeldOutPerplexityMatchesTheScriptAndAdaptersHelpTheirDomains) {
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model = kDir,
                      .num_threads = 2,
                      .adapters = {{"code", kDir + "/adapters/code"},
                                   {"mail", kDir + "/adapters/mail"},
                                   {"mixlora", kDir + "/adapters/mixlora"}}});
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::map<std::string, std::map<std::string, double>> ppl;
  for (const std::string model : {"base", "code", "mail", "mixlora"}) {
    for (const char* d : kDomains) {
      double nll = 0;
      int64_t tokens = 0;
      for (const Json& seq : Heldout(d)) {
        GenerateRequest r;
        r.adapter = model == "base" ? "" : model;
        r.token_ids = seq["ids"].get<std::vector<int32_t>>();
        r.prompt_logprobs = true;
        r.stopping.max_new_tokens = 1;
        r.sampling.temperature = 0;
        auto sink = std::make_shared<Collect>();
        ASSERT_TRUE((*engine)->Submit(r, sink).ok());
        nll += sink->Nll();
        tokens += static_cast<int64_t>(r.token_ids.size()) - 1;
      }
      const Json& want = (*metrics_)["perplexity"][model][d];
      EXPECT_EQ(tokens, want["tokens"].get<int64_t>()) << model << " " << d;
      EXPECT_NEAR(nll, want["nll"].get<double>(), 1e-3 * want["nll"].get<double>())
          << model << " on " << d;
      ppl[model][d] = std::exp(nll / static_cast<double>(tokens));
    }
  }
  for (const auto& [model, by_domain] : ppl) {
    for (const auto& [d, p] : by_domain) {
      std::printf("  held-out perplexity  %-8s on %-6s %8.2f\n", model.c_str(), d.c_str(), p);
    }
  }
  // The specialists: each divides its own domain's perplexity by more than 10 (the base model
  // never saw code or e-mail), and is the better of the two there.
  EXPECT_LT(ppl["code"]["code"], 0.1 * ppl["base"]["code"]);
  EXPECT_LT(ppl["mail"]["mail"], 0.1 * ppl["base"]["mail"]);
  EXPECT_LT(ppl["code"]["code"], ppl["mail"]["code"]);
  EXPECT_LT(ppl["mail"]["mail"], ppl["code"]["mail"]);
  // The MixLoRA, trained on all three: likewise on code and e-mail, and prose within 15% of the
  // base model's.
  EXPECT_LT(ppl["mixlora"]["code"], 0.1 * ppl["base"]["code"]);
  EXPECT_LT(ppl["mixlora"]["mail"], 0.1 * ppl["base"]["mail"]);
  EXPECT_LT(ppl["mixlora"]["prose"], 1.15 * ppl["base"]["prose"]);
}

TEST_F(DemoModelTest, MixloraRoutesEachDomainAsTheScriptDid) {
  absl::StatusOr<ModelDirectory> dir = OpenModelDirectory(kDir);
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<std::unique_ptr<LlamaModel>> model = LlamaModel::Create(
      backend->get(), dir->config, *dir->weights,
      {.num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 512, .max_seqs = 512});
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<std::shared_ptr<const Adapter>> adapter =
      LoadAdapter(kDir + "/adapters/mixlora", "mixlora", dir->config, {});
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  absl::StatusOr<int32_t> slot = (*model)->AttachAdapter(*adapter);
  ASSERT_TRUE(slot.ok()) << slot.status();
  const int32_t layers = dir->config.num_layers;
  std::map<std::string, std::vector<std::vector<double>>> share;
  for (const char* d : kDomains) {
    std::vector<std::vector<double>> counts(layers);
    int64_t positions = 0;
    for (const Json& seq : Heldout(d)) {
      std::vector<int32_t> ids = seq["ids"].get<std::vector<int32_t>>();
      ids.pop_back();  // the script routes the positions that predict a next token
      const int32_t n = static_cast<int32_t>(ids.size());
      Batch b;
      b.tokens = ids;
      for (int32_t i = 0; i < n; ++i) {
        b.positions.push_back(i);
        b.token_seq.push_back(0);
        b.sample_rows.push_back(i);
      }
      for (int32_t blk = 0; blk * 16 < n; ++blk) b.block_tables.push_back(blk);
      b.block_table_offsets = {0, static_cast<int32_t>(b.block_tables.size())};
      b.seq_adapter = {*slot};
      b.seq_return_routing = {1};
      b.aux_block_tables = {40};
      b.aux_block_table_offsets = {0, 1};
      std::vector<float> logits;
      ForwardExtras extras;
      ASSERT_TRUE((*model)->Forward(b, &logits, &extras).ok());
      ASSERT_EQ(extras.routing.size(), static_cast<size_t>(n));
      for (const auto& row : extras.routing) {
        for (const RoutingRecord& r : row) {
          if (r.module != "ffn") continue;
          auto& c = counts[r.layer];
          for (int32_t e : r.experts) {
            if (c.size() <= static_cast<size_t>(e)) c.resize(e + 1, 0.0);
            c[e] += 1;
          }
        }
      }
      positions += n;
    }
    const Json& want = (*metrics_)["routing_share"][d];
    ASSERT_EQ(want.size(), static_cast<size_t>(layers));
    for (int32_t l = 0; l < layers; ++l) {
      const std::vector<double> w = want[l].get<std::vector<double>>();
      counts[l].resize(w.size(), 0.0);
      for (size_t e = 0; e < w.size(); ++e) {
        const double got = counts[l][e] / (2.0 * static_cast<double>(positions));
        EXPECT_NEAR(got, w[e], 0.02) << d << " layer " << l << " expert " << e;
        share[d].resize(layers);
        share[d][l].push_back(got);
      }
    }
  }
  // Specialisation: in some layer one expert takes a share of one domain's slots at least 0.2
  // larger than of another domain's (the router tells the domains apart).
  double widest = 0;
  for (int32_t l = 0; l < layers; ++l) {
    for (size_t e = 0; e < share["prose"][l].size(); ++e) {
      double lo = 1, hi = 0;
      for (const char* d : kDomains) {
        lo = std::min(lo, share[d][l][e]);
        hi = std::max(hi, share[d][l][e]);
      }
      widest = std::max(widest, hi - lo);
    }
    std::printf("  layer %d  expert shares  prose %s  code %s  mail %s\n", l,
                Shares(share["prose"][l]).c_str(), Shares(share["code"][l]).c_str(),
                Shares(share["mail"][l]).c_str());
  }
  EXPECT_GE(widest, 0.2) << "no expert is preferred by one domain over another";
}

}  // namespace
}  // namespace moleserve::engine
