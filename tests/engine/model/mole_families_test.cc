// Every MoLE family end to end against an independent reference.
//
// tests/mole/make_public_adapters.py writes seeded random adapters, each in its family's PUBLIC
// on-disk format (PEFT safetensors, MixLoRA / MoE-PEFT / MoLA `.bin` pickles, X-LoRA in the peft
// and mistral.rs layouts, FlyLoRA), for a tiny random Llama written by
// tests/reference/make_tiny_checkpoints.py. tools/mole_convert.py converts them to mole/1 (PEFT
// LoRA loads directly). tests/reference/mole_reference.py (Debian's python3-torch, float64,
// routers in float32 as the public code runs them) computes each family from the PUBLIC files
// following its public code path (MixLoRA's naive per-expert FFN, X-LoRA's dual pass, ...); it
// shares no code with the converter or the engine.
//
// Checked per family: (1) the logits of every prompt position, max |ours - ref| <=
// 1e-4 * max(1, max |ref|) (fp32 compute vs float64); (2) the routing of every routed site at
// every position: the same experts (exactly) with weights within 2e-5 absolute (fp32 router
// logits on fp32 activations vs float32 logits on float64 activations); (3) greedy generation
// of 16 tokens through the engine (continuous batching, paged KV, X-LoRA's second KV) equals
// the reference's greedy tokens. Then a mixed batch: 12 adapters of 11 families plus base-model
// requests and routing overrides, all at once, each request getting exactly its tokens when run
// alone.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/engine.h"
#include "engine/metrics_sink.h"
#include "engine/model/llama_model.h"
#include "engine/model/model_directory.h"
#include "tests/common/mole_fixtures.h"
#include "tests/common/run_command.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

const std::vector<std::vector<int32_t>> kPrompts = {
    {256, 72, 105, 33, 10, 84, 104, 101},
    {256, 200, 13, 10, 9, 77, 255, 0, 128, 65, 66, 67, 68, 69}};
constexpr int kGreedyTokens = 16;
constexpr const char* kBase = test_util::kMoleFixtureBase;

using ::moleserve::test_util::RunCommand;

using ::moleserve::test_util::FamilyCase;

const std::vector<FamilyCase>& Cases() { return test_util::MoleFamilyCases(); }

// absl::Notification's API on std::mutex: Debian's Abseil is not TSan-instrumented, so its
// synchronisation is invisible to the cpu-tsan preset; pthread-based std types are.
class Flag {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool HasBeenNotified() const {
    std::lock_guard<std::mutex> lock(mu_);
    return set_;
  }
  void WaitForNotification() const {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return set_; });
  }

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool set_ = false;
};

struct Collect : GenerationSink {
  explicit Collect(bool may_fail = false) : may_fail(may_fail) {}
  const bool may_fail;  // an error is an expected outcome (cancellation)
  std::vector<int32_t> ids;
  std::vector<std::vector<RoutingRecord>> routing;  // per token, when return_routing
  absl::Status error;
  Flag first_token, done;
  void OnChunk(GenerationChunk chunk) override {
    for (auto& t : chunk.tokens) {
      ids.push_back(t.id);
      routing.push_back(std::move(t.routing));
    }
    if (!ids.empty() && !first_token.HasBeenNotified()) first_token.Notify();
  }
  void OnFinish(GenerationChunk last, FinishInfo) override {
    OnChunk(std::move(last));
    done.Notify();
  }
  void OnError(absl::Status s) override {
    if (!may_fail) ADD_FAILURE() << s;
    error = std::move(s);
    if (!first_token.HasBeenNotified()) first_token.Notify();
    done.Notify();
  }
};

class MoleFamiliesTest : public ::testing::TestWithParam<FamilyCase> {
 public:
  // The fixtures (base model, public adapters, converted mole/1 directories):
  // tests/common/mole_fixtures.h.
  static void SetUpTestSuite() {
    if (root_ != nullptr) return;  // shared by the parameterized and the mixed-batch suites
    std::string error;
    const std::string root = test_util::MoleFixturesRoot(&error);
    ASSERT_FALSE(root.empty()) << error;
    root_ = new std::string(root);
  }
  static std::string base() { return *root_ + "/" + kBase; }
  static std::string public_dir(const FamilyCase& c) { return *root_ + "/public/" + c.name; }
  static std::string load_dir(const FamilyCase& c) {
    return test_util::MoleFixtureAdapterDir(*root_, c);
  }

  static Json Reference(const FamilyCase& c) {
    std::string cmd = absl::StrCat(
        MOLESERVE_PYTHON, " ", MOLESERVE_SOURCE_DIR, "/tests/reference/mole_reference.py ", base(),
        " ", public_dir(c), " --family ", c.family, " --greedy ", kGreedyTokens);
    for (const auto& p : kPrompts) absl::StrAppend(&cmd, " --prompt ", absl::StrJoin(p, ","));
    int rc = 0;
    const std::string out = RunCommand(cmd, &rc);
    EXPECT_EQ(rc, 0) << "reference failed: " << cmd;
    Json j = Json::parse(out, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "reference printed no JSON: " << out.substr(0, 2000);
    return j;
  }

 protected:
  static std::string* root_;
};
std::string* MoleFamiliesTest::root_ = nullptr;

TEST_P(MoleFamiliesTest, LogitsRoutingAndGreedyMatchReference) {
  const FamilyCase& c = GetParam();
  const Json ref = Reference(c);
  ASSERT_TRUE(ref.contains("logits")) << ref.dump().substr(0, 500);

  absl::StatusOr<ModelDirectory> dir = OpenModelDirectory(base());
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(backend.ok());
  absl::StatusOr<std::unique_ptr<LlamaModel>> model = LlamaModel::Create(
      backend->get(), dir->config, *dir->weights,
      {.num_kv_blocks = 64, .kv_block_size = 16, .max_batch_tokens = 256, .max_seqs = 256});
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<std::shared_ptr<const Adapter>> adapter =
      LoadAdapter(load_dir(c), c.name, dir->config, {});
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  absl::StatusOr<int32_t> slot = (*model)->AttachAdapter(*adapter);
  ASSERT_TRUE(slot.ok()) << slot.status();

  int64_t routed_sites_checked = 0;
  for (size_t p = 0; p < kPrompts.size(); ++p) {
    const std::vector<int32_t>& prompt = kPrompts[p];
    const int32_t n = static_cast<int32_t>(prompt.size());
    Batch b;
    b.tokens = prompt;
    for (int32_t i = 0; i < n; ++i) {
      b.positions.push_back(i);
      b.token_seq.push_back(0);
      b.sample_rows.push_back(i);
    }
    b.block_tables = {0};
    b.block_table_offsets = {0, 1};
    b.seq_adapter = {*slot};
    b.seq_return_routing = {1};
    b.aux_block_tables = {1};
    b.aux_block_table_offsets = {0, 1};
    std::vector<float> logits;
    ForwardExtras extras;
    absl::Status st = (*model)->Forward(b, &logits, &extras);
    ASSERT_TRUE(st.ok()) << st;
    const int32_t vocab = dir->config.vocab_size;
    double max_ref = 0, max_diff = 0;
    for (int32_t i = 0; i < n; ++i) {
      const Json& row = ref["logits"][p][i];
      for (int32_t v = 0; v < vocab; ++v) {
        const double r = row[v].get<double>();
        max_ref = std::max(max_ref, std::abs(r));
        max_diff = std::max(max_diff, std::abs(r - logits[int64_t{i} * vocab + v]));
      }
    }
    EXPECT_LE(max_diff, 1e-4 * std::max(1.0, max_ref))
        << c.name << " prompt " << p << ": max |logit diff| " << max_diff;

    // Routing: the reference's dense weights per site vs our records.
    for (int32_t i = 0; i < n; ++i) {
      const Json& sites = ref["routing"][p][i];
      std::map<std::string, const RoutingRecord*> ours;
      for (const RoutingRecord& r : extras.routing[i]) {
        ours[absl::StrCat(r.layer, ".", r.module)] = &r;
      }
      EXPECT_EQ(ours.size(), sites.size()) << c.name << " prompt " << p << " position " << i;
      for (auto it = sites.begin(); it != sites.end(); ++it) {
        auto found = ours.find(it.key());
        if (found == ours.end()) {
          ADD_FAILURE() << c.name << ": no routing recorded for site " << it.key();
          continue;
        }
        std::vector<double> dense(it.value().size(), 0.0);
        for (size_t j = 0; j < found->second->experts.size(); ++j) {
          const int32_t e = found->second->experts[j];
          ASSERT_LT(static_cast<size_t>(e), dense.size());
          dense[e] = found->second->weights[j];
        }
        for (size_t e = 0; e < dense.size(); ++e) {
          const double want = it.value()[e].get<double>();
          EXPECT_EQ(want != 0.0, dense[e] != 0.0)
              << c.name << " prompt " << p << " position " << i << " site " << it.key()
              << " expert " << e << ": reference weight " << want << ", ours " << dense[e];
          EXPECT_NEAR(dense[e], want, 2e-5) << c.name << " site " << it.key() << " expert " << e;
        }
        ++routed_sites_checked;
      }
    }
  }
  static const std::set<std::string> kStatic = {"peft_lora", "sora", "nola", "randlora", "mos"};
  if (!kStatic.count(c.family)) {
    EXPECT_GT(routed_sites_checked, 0) << "no routed site compared";
  }

  // Greedy generation through the whole engine.
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model = base(), .num_threads = 2, .adapters = {{c.name, load_dir(c)}}});
  ASSERT_TRUE(engine.ok()) << engine.status();
  for (size_t p = 0; p < kPrompts.size(); ++p) {
    GenerateRequest req;
    req.adapter = c.name;
    req.token_ids = kPrompts[p];
    req.sampling.temperature = 0;
    req.stopping.max_new_tokens = kGreedyTokens;
    req.stopping.ignore_eos = true;
    auto sink = std::make_shared<Collect>();
    ASSERT_TRUE((*engine)->Submit(req, sink).ok());
    sink->done.WaitForNotification();
    std::vector<int32_t> want = ref["greedy"][p].get<std::vector<int32_t>>();
    EXPECT_EQ(sink->ids, want) << c.name << " prompt " << p;
  }
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, MoleFamiliesTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

// X-LoRA with frozen scalings (inference.freeze_scalings_after = 3, mistral.rs's
// tgt_non_granular_index): the first 3 tokens are exactly those of the unfrozen adapter (their
// scalings come from full scaling passes), the rest reuse the last scalings; every KV block,
// the scaling pass's included, is back in the pool afterwards.
// The output gate's inference-time masking (routing.disabled_experts): the other gates are
// renormalised. At layer 0 the gate's inputs do not depend on the mask, so each kept gate must be
// exactly the unmasked one over 1 - the disabled one's.
TEST_F(MoleFamiliesTest, OutputGateMaskRenormalisesTheOtherGates) {
  const FamilyCase* gate = nullptr;
  const FamilyCase* mixlora = nullptr;
  for (const FamilyCase& c : Cases()) {
    if (c.name == "output_gate") gate = &c;
    if (c.name == "mixlora") mixlora = &c;
  }
  ASSERT_NE(gate, nullptr);
  ASSERT_NE(mixlora, nullptr);
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model = base(),
                      .num_threads = 2,
                      .adapters = {{"gate", load_dir(*gate)}, {"mixlora", load_dir(*mixlora)}}});
  ASSERT_TRUE(engine.ok()) << engine.status();
  auto run = [&](std::vector<int32_t> disabled) {
    GenerateRequest r;
    r.adapter = "gate";
    r.token_ids = kPrompts[0];
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = 1;
    r.return_routing = true;
    r.routing_override.disabled_experts = std::move(disabled);
    auto sink = std::make_shared<Collect>();
    EXPECT_TRUE((*engine)->Submit(r, sink).ok());
    sink->done.WaitForNotification();
    return sink;
  };
  auto all = run({});
  auto masked = run({0});
  ASSERT_EQ(all->routing.size(), 1u);
  ASSERT_EQ(masked->routing.size(), 1u);
  int checked = 0;
  for (size_t site = 0; site < all->routing[0].size(); ++site) {
    const RoutingRecord& a = all->routing[0][site];
    const RoutingRecord& b = masked->routing[0][site];
    ASSERT_EQ(a.experts.size(), 3u);  // soft: every expert
    ASSERT_EQ(b.experts.size(), 2u);
    EXPECT_EQ(std::count(b.experts.begin(), b.experts.end(), 0), 0) << "expert 0 is off";
    if (a.layer != 0) continue;
    float w0 = 0;
    std::map<int32_t, float> wa;
    for (size_t j = 0; j < a.experts.size(); ++j) {
      wa[a.experts[j]] = a.weights[j];
      if (a.experts[j] == 0) w0 = a.weights[j];
    }
    for (size_t j = 0; j < b.experts.size(); ++j) {
      EXPECT_NEAR(b.weights[j], wa[b.experts[j]] / (1 - w0), 1e-5) << a.module;
    }
    ++checked;
  }
  EXPECT_EQ(checked, 2);  // q_proj and v_proj of layer 0
  // Refused: an index out of range, every expert off, an adapter without an output gate.
  for (const auto& [adapter, disabled, want] :
       std::vector<std::tuple<std::string, std::vector<int32_t>, std::string>>{
           {"gate", {3}, "is not an expert"},
           {"gate", {0, 1, 2}, "turns every expert off"},
           {"gate", std::vector<int32_t>(129, 1), "at most 128"},
           {"mixlora", {0}, "applies to output-gated groups"}}) {
    GenerateRequest r;
    r.adapter = adapter;
    r.token_ids = kPrompts[0];
    r.routing_override.disabled_experts = disabled;
    absl::StatusOr<uint64_t> h = (*engine)->Submit(r, std::make_shared<Collect>(true));
    ASSERT_FALSE(h.ok()) << want;
    EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(h.status().message()), ::testing::HasSubstr(want));
  }
}

TEST_F(MoleFamiliesTest, XloraFrozenScalingsKeepPrefixAndFreeTheirKv) {
  const FamilyCase* xlora = nullptr;
  for (const FamilyCase& c : Cases()) {
    if (c.name == "xlora_peft") xlora = &c;
  }
  ASSERT_NE(xlora, nullptr);
  const std::string frozen = *root_ + ".frozen_" + std::to_string(getpid());
  fs::remove_all(frozen);
  fs::copy(load_dir(*xlora), frozen, fs::copy_options::recursive);
  {
    std::ifstream in(frozen + "/mole_config.json");
    Json cfg = Json::parse(in);
    cfg["inference"]["freeze_scalings_after"] = 3;
    std::ofstream(frozen + "/mole_config.json") << cfg.dump();
  }
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model = base(),
                      .num_threads = 2,
                      .adapters = {{"live", load_dir(*xlora)}, {"frozen", frozen}}});
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::map<std::string, std::vector<int32_t>> out;
  for (const std::string name : {"live", "frozen"}) {
    GenerateRequest r;
    r.adapter = name;
    r.token_ids = kPrompts[1];
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = 24;
    r.stopping.ignore_eos = true;
    auto sink = std::make_shared<Collect>();
    ASSERT_TRUE((*engine)->Submit(r, sink).ok());
    sink->done.WaitForNotification();
    out[name] = sink->ids;
  }
  ASSERT_EQ(out["frozen"].size(), 24u);
  EXPECT_EQ(std::vector<int32_t>(out["frozen"].begin(), out["frozen"].begin() + 3),
            std::vector<int32_t>(out["live"].begin(), out["live"].begin() + 3));
  // The fixture's classifier gives every position its own scalings, so reusing them changes
  // the continuation (deterministic for these seeded weights): freezing really took effect.
  EXPECT_NE(out["frozen"], out["live"]);
  ASSERT_TRUE((*engine)->WaitIdle(absl::Seconds(10)));
  // The loop publishes its block counters after the step that finished the request.
  EngineStats stats = (*engine)->Stats();
  for (int i = 0; i < 500 && stats.free_kv_blocks != stats.total_kv_blocks; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
    stats = (*engine)->Stats();
  }
  EXPECT_EQ(stats.free_kv_blocks, stats.total_kv_blocks);
  fs::remove_all(frozen);
}

// Hot loading (issue 5's engine side): adapters loaded, replaced and unloaded while requests run.
TEST_F(MoleFamiliesTest, HotLoadReplaceAndUnloadWhileServing) {
  const std::string tag = std::to_string(getpid());
  absl::StatusOr<std::unique_ptr<Engine>> engine =
      Engine::Create({.model = base(), .num_threads = 2, .adapter_root = *root_});
  ASSERT_TRUE(engine.ok()) << engine.status();
  Engine& e = **engine;
  auto run = [&](const std::string& adapter, int32_t n, bool may_fail = false) {
    GenerateRequest r;
    r.adapter = adapter;
    r.token_ids = kPrompts[0];
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = n;
    r.stopping.ignore_eos = true;
    auto sink = std::make_shared<Collect>(may_fail);
    absl::StatusOr<uint64_t> h = e.Submit(r, sink);
    if (!h.ok()) {
      sink->error = h.status();
      sink->first_token.Notify();
      sink->done.Notify();
    }
    return sink;
  };
  // Reference outputs from engines that load the adapters at startup.
  auto startup_tokens = [&](const std::string& dir, int32_t n) {
    absl::StatusOr<std::unique_ptr<Engine>> ref =
        Engine::Create({.model = base(), .num_threads = 2, .adapters = {{"a", dir}}});
    EXPECT_TRUE(ref.ok()) << ref.status();
    GenerateRequest r;
    r.adapter = "a";
    r.token_ids = kPrompts[0];
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = n;
    r.stopping.ignore_eos = true;
    auto sink = std::make_shared<Collect>();
    EXPECT_TRUE((*ref)->Submit(r, sink).ok());
    sink->done.WaitForNotification();
    return sink->ids;
  };
  const std::vector<int32_t> want_topk = startup_tokens(*root_ + "/mole/mixlora", 300);
  const std::vector<int32_t> want_switch = startup_tokens(*root_ + "/mole/mixlora_switch", 300);
  ASSERT_NE(want_topk, want_switch);

  // Load while base-model requests decode: none fails, and the adapter serves its own tokens.
  std::vector<std::shared_ptr<Collect>> base_runs;
  for (int i = 0; i < 4; ++i) base_runs.push_back(run("", 300));
  base_runs[0]->first_token.WaitForNotification();
  absl::StatusOr<AdapterSummary> loaded = e.LoadAdapter("mix", "mole/mixlora", false);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->family, "mixlora");
  EXPECT_EQ(loaded->version, 1u);
  for (auto& r : base_runs) {
    r->done.WaitForNotification();
    EXPECT_TRUE(r->error.ok()) << r->error;
    EXPECT_EQ(r->ids.size(), 300u);
  }
  auto first = run("mix", 300);
  first->done.WaitForNotification();
  EXPECT_EQ(first->ids, want_topk);

  // Replace while a request of the old version runs: it finishes on the old version, new
  // requests get the new one.
  auto old_run = run("mix", 300);
  old_run->first_token.WaitForNotification();
  absl::StatusOr<AdapterSummary> replaced = e.LoadAdapter("mix", "mole/mixlora_switch", true);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(replaced->version, 2u);
  auto new_run = run("mix", 300);
  old_run->done.WaitForNotification();
  new_run->done.WaitForNotification();
  EXPECT_EQ(old_run->ids, want_topk);
  EXPECT_EQ(new_run->ids, want_switch);

  // Refused loads leave the serving version alone.
  const std::string corrupt = "corrupt_" + tag;
  fs::copy(*root_ + "/mole/mixlora", *root_ + "/" + corrupt);
  fs::resize_file(*root_ + "/" + corrupt + "/model.safetensors", 100);
  const std::string escape = "escape_" + tag;
  fs::create_directory_symlink(fs::temp_directory_path(), *root_ + "/" + escape);
  const std::string linked = "linked_" + tag;
  fs::copy(*root_ + "/mole/mixlora", *root_ + "/" + linked);
  fs::remove(*root_ + "/" + linked + "/model.safetensors");
  fs::create_symlink("/etc/hostname", *root_ + "/" + linked + "/model.safetensors");
  struct Refused {
    std::string name, path;
    bool replace;
    absl::StatusCode code;
    std::string message;
  };
  for (const Refused& r : std::vector<Refused>{
           {"mix", corrupt, true, absl::StatusCode::kDataLoss, "model.safetensors"},
           {"mix", "../" + std::string(kBase), true, absl::StatusCode::kInvalidArgument,
            "'..' component"},
           {"mix", "/etc", true, absl::StatusCode::kInvalidArgument, "absolute"},
           {"mix", escape, true, absl::StatusCode::kInvalidArgument, "leaves the adapter root"},
           {"mix", linked, true, absl::StatusCode::kInvalidArgument, "links outside"},
           {"mix", "no_such_dir", true, absl::StatusCode::kNotFound, "not a directory"},
           {"mix", "mole/mixlora", false, absl::StatusCode::kAlreadyExists, "already loaded"},
           {"bad/name", "mole/mixlora", false, absl::StatusCode::kInvalidArgument, "name"}}) {
    absl::StatusOr<AdapterSummary> s = e.LoadAdapter(r.name, r.path, r.replace);
    EXPECT_EQ(s.status().code(), r.code) << r.path << ": " << s.status();
    EXPECT_THAT(std::string(s.status().message()), ::testing::HasSubstr(r.message)) << r.path;
  }
  auto still = run("mix", 300);
  still->done.WaitForNotification();
  EXPECT_EQ(still->ids, want_switch);
  fs::remove_all(*root_ + "/" + corrupt);
  fs::remove_all(*root_ + "/" + linked);
  fs::remove(*root_ + "/" + escape);

  // Unload drains a running request, then the name is gone.
  auto draining = run("mix", 300);
  draining->first_token.WaitForNotification();
  absl::StatusOr<Engine::UnloadResult> unloaded = e.UnloadAdapter("mix", absl::Seconds(30), false);
  ASSERT_TRUE(unloaded.ok()) << unloaded.status();
  draining->done.WaitForNotification();
  EXPECT_TRUE(draining->error.ok()) << draining->error;
  EXPECT_EQ(draining->ids, want_switch);
  EXPECT_EQ(unloaded->cancelled, 0);
  auto gone = run("mix", 4, /*may_fail=*/true);
  EXPECT_EQ(gone->error.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(e.UnloadAdapter("mix", absl::Seconds(1), false).status().code(),
            absl::StatusCode::kNotFound);

  // Forced unload cancels what runs, with a status that says why.
  ASSERT_TRUE(e.LoadAdapter("mix", "mole/mixlora", false).ok());
  auto cancelled = run("mix", 400, /*may_fail=*/true);
  cancelled->first_token.WaitForNotification();
  unloaded = e.UnloadAdapter("mix", absl::Seconds(30), true);
  ASSERT_TRUE(unloaded.ok()) << unloaded.status();
  cancelled->done.WaitForNotification();
  if (unloaded->cancelled == 1) {
    EXPECT_EQ(cancelled->error.code(), absl::StatusCode::kCancelled);
    EXPECT_THAT(std::string(cancelled->error.message()), ::testing::HasSubstr("unloaded"));
  } else {  // the request had already finished: nothing to cancel
    EXPECT_TRUE(cancelled->error.ok());
  }
  EXPECT_TRUE(e.ListAdapters().empty());
  ASSERT_TRUE(e.WaitIdle(absl::Seconds(10)));
  EngineStats stats = e.Stats();
  for (int i = 0; i < 500 && stats.free_kv_blocks != stats.total_kv_blocks; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
    stats = e.Stats();
  }
  EXPECT_EQ(stats.free_kv_blocks, stats.total_kv_blocks);
}

// Records the most sequences one step ran, to prove the requests really shared steps.
class StepWatcher final : public MetricsSink {
 public:
  void OnRequestRejected(absl::StatusCode, ClientProtocol) override {}
  void OnFirstToken(double) override {}
  void OnInterTokenLatency(double) override {}
  void OnRequestFinished(const FinishedRequestMetrics&) override {}
  void OnStep(const StepMetrics& m) override {
    int64_t cur = max_running.load();
    while (m.num_running > cur && !max_running.compare_exchange_weak(cur, m.num_running)) {
    }
  }
  void OnQueueState(int64_t, int64_t, double) override {}
  std::atomic<int64_t> max_running{0};
};

// 12 adapters of 11 families (PEFT LoRA, MixLoRA top-k and top-p, MoLA, LoRAMoE, DynMoLE,
// X-LoRA, FlyLoRA, SoRA, Mixture of Routers, NOLA, output-gated MoLE) plus base-model requests and
// requests with a routing override (top-1 on MixLoRA and on MoR, soft on MoLA) in the same steps:
// each request gets exactly the greedy tokens and the routing it gets when it runs alone.
TEST_F(MoleFamiliesTest, MixedBatchEqualsEachRequestAlone) {
  const std::vector<std::string> names = {"peft_lora",
                                          "mixlora",
                                          "mixlora_dynamic",
                                          "moepeft_mola",
                                          "moepeft_loramoe",
                                          "moepeft_dynmole",
                                          "xlora_peft",
                                          "flylora",
                                          "sora",
                                          "mor",
                                          "nola",
                                          "output_gate"};
  StepWatcher watcher;
  EngineOptions options{.model = base(), .num_threads = 2, .metrics = &watcher};
  for (const std::string& n : names) {
    for (const FamilyCase& c : Cases()) {
      if (c.name == n) options.adapters.emplace_back(n, load_dir(c));
    }
  }
  ASSERT_EQ(options.adapters.size(), names.size());
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<GenerateRequest> requests;
  for (size_t p = 0; p < kPrompts.size(); ++p) {
    for (const std::string& adapter : names) {
      GenerateRequest r;
      r.adapter = adapter;
      r.token_ids = kPrompts[p];
      requests.push_back(r);
    }
    GenerateRequest base_request;  // base model
    base_request.token_ids = kPrompts[p];
    requests.push_back(base_request);
    // The same adapters with a per-request override, in the same steps as those without.
    GenerateRequest top1;
    top1.adapter = "mixlora";
    top1.token_ids = kPrompts[p];
    top1.routing_override.k = 1;
    requests.push_back(top1);
    GenerateRequest soft;
    soft.adapter = "moepeft_mola";
    soft.token_ids = kPrompts[p];
    soft.routing_override.algorithm = RoutingAlgorithm::kSoft;
    requests.push_back(soft);
    GenerateRequest gate_top2;  // an output gate keeping its two largest gates, renormalised
    gate_top2.adapter = "output_gate";
    gate_top2.token_ids = kPrompts[p];
    gate_top2.routing_override.algorithm = RoutingAlgorithm::kTopK;
    gate_top2.routing_override.k = 2;
    requests.push_back(gate_top2);
    GenerateRequest mor_top1;  // a mixture router's k, overridden
    mor_top1.adapter = "mor";
    mor_top1.token_ids = kPrompts[p];
    mor_top1.routing_override.k = 1;
    requests.push_back(mor_top1);
  }
  for (GenerateRequest& r : requests) {
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = 12;
    r.stopping.ignore_eos = true;
    r.return_routing = true;
  }
  std::vector<std::shared_ptr<Collect>> alone;
  for (const GenerateRequest& r : requests) {
    auto sink = std::make_shared<Collect>();
    ASSERT_TRUE((*engine)->Submit(r, sink).ok());
    sink->done.WaitForNotification();
    ASSERT_EQ(sink->ids.size(), 12u);
    alone.push_back(sink);
  }
  const int64_t max_alone = watcher.max_running.load();
  std::vector<std::shared_ptr<Collect>> sinks;
  for (const GenerateRequest& r : requests) {
    sinks.push_back(std::make_shared<Collect>());
    ASSERT_TRUE((*engine)->Submit(r, sinks.back()).ok());
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    sinks[i]->done.WaitForNotification();
    EXPECT_EQ(sinks[i]->ids, alone[i]->ids)
        << "request " << i << " (adapter '" << requests[i].adapter << "')";
    // The same routing decisions too (weights within fp32 noise of a different batch shape).
    ASSERT_EQ(sinks[i]->routing.size(), alone[i]->routing.size());
    for (size_t t = 0; t < sinks[i]->routing.size(); ++t) {
      const auto& a = sinks[i]->routing[t];
      const auto& b = alone[i]->routing[t];
      ASSERT_EQ(a.size(), b.size()) << "request " << i << " token " << t;
      for (size_t site = 0; site < a.size(); ++site) {
        EXPECT_EQ(a[site].experts, b[site].experts) << "request " << i << " token " << t;
        for (size_t e = 0; e < a[site].weights.size() && e < b[site].weights.size(); ++e) {
          EXPECT_NEAR(a[site].weights[e], b[site].weights[e], 1e-5f);
        }
      }
    }
    if (!requests[i].adapter.empty() && requests[i].adapter != "peft_lora" &&
        requests[i].adapter != "sora" && requests[i].adapter != "nola") {  // static LoRAs
      EXPECT_FALSE(sinks[i]->routing[0].empty()) << "no routing for " << requests[i].adapter;
    }
    if (requests[i].routing_override.k == 1) {
      for (const RoutingRecord& r : sinks[i]->routing[0]) EXPECT_EQ(r.experts.size(), 1u);
    }
  }
  EXPECT_EQ(max_alone, 1);
  EXPECT_GE(watcher.max_running.load(), 10) << "the requests did not share steps";
}

}  // namespace
}  // namespace moleserve::engine
