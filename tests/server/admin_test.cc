// AdapterAdmin over gRPC: MoleServer on 127.0.0.1:0 with the admin listener on a second port,
// around a CPU engine with the built-in demo model. Adapters are written under a per-test adapter
// root; requests go through the Inference stub while the admin stub loads, replaces and unloads.

#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moleserve/v1/admin.grpc.pb.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/server.h"
#include "server/metrics/prometheus_metrics.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/metrics_scrape.h"

namespace moleserve::server {
namespace {

namespace fs = std::filesystem;
namespace pb = moleserve::v1;

using ::testing::HasSubstr;

constexpr char kToken[] = "test-admin-token-0123456789";
constexpr absl::Duration kCallTimeout = absl::Seconds(120);

// An adapter root under the gtest temp dir, removed at the end.
struct AdapterRoot {
  fs::path path;
  AdapterRoot() {
    path = fs::path(::testing::TempDir()) / absl::StrCat("moleserve_admin_root_", getpid());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~AdapterRoot() { fs::remove_all(path); }
  // Writes a demo adapter at root/rel.
  std::string Write(const std::string& rel, uint32_t seed, int32_t experts = 4, int32_t rank = 4) {
    EXPECT_FALSE(
        test_util::WriteDemoMoleAdapter((path / rel).string(), seed, experts, rank).empty());
    return rel;
  }
};

struct Instance {
  std::unique_ptr<PrometheusMetrics> metrics;
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<MoleServer> server;
  std::unique_ptr<pb::Inference::Stub> stub;
  std::unique_ptr<pb::AdapterAdmin::Stub> admin;
  std::mutex audit_mu;
  std::vector<AdminAuditEntry> audit;

  static std::unique_ptr<Instance> Start(
      const std::string& root, int64_t expert_cache_bytes = 0, bool with_metrics = false,
      std::function<void(std::string_view)> load_stage_hook = nullptr) {
    auto inst = std::make_unique<Instance>();
    engine::EngineOptions o;
    o.num_threads = 2;
    o.kv_cache_bytes = int64_t{64} << 20;
    o.adapter_root = root;
    o.expert_cache_bytes = expert_cache_bytes;
    o.adapter_load_stage_hook = std::move(load_stage_hook);
    if (with_metrics) {
      auto m = PrometheusMetrics::Create("127.0.0.1:0");
      EXPECT_TRUE(m.ok()) << m.status();
      if (!m.ok()) return nullptr;
      inst->metrics = *std::move(m);
      o.metrics = inst->metrics.get();
    }
    auto e = engine::Engine::Create(o);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return nullptr;
    inst->engine = *std::move(e);
    Instance* self = inst.get();
    auto s =
        MoleServer::Start(inst->engine.get(), {.listen_address = "127.0.0.1:0",
                                               .admin_address = "127.0.0.1:0",
                                               .admin_token = kToken,
                                               .admin_audit = [self](const AdminAuditEntry& entry) {
                                                 std::lock_guard<std::mutex> lock(self->audit_mu);
                                                 self->audit.push_back(entry);
                                               }});
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    inst->server = *std::move(s);
    EXPECT_NE(inst->server->admin_port(), inst->server->port());
    inst->stub = pb::Inference::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", inst->server->port()), grpc::InsecureChannelCredentials()));
    inst->admin = pb::AdapterAdmin::NewStub(
        grpc::CreateChannel(absl::StrCat("127.0.0.1:", inst->server->admin_port()),
                            grpc::InsecureChannelCredentials()));
    return inst;
  }

  std::unique_ptr<grpc::ClientContext> AdminContext(const std::string& token = kToken) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    return ctx;
  }
  grpc::Status Load(const std::string& name, const std::string& path, bool replace = false,
                    const std::string& sha256 = "", pb::LoadAdapterResponse* out = nullptr) {
    pb::LoadAdapterRequest req;
    req.set_name(name);
    req.set_path(path);
    req.set_replace(replace);
    req.set_sha256(sha256);
    pb::LoadAdapterResponse resp;
    return admin->LoadAdapter(AdminContext().get(), req, out != nullptr ? out : &resp);
  }
  grpc::Status Unload(const std::string& name, bool force, double drain_seconds,
                      pb::UnloadAdapterResponse* out) {
    pb::UnloadAdapterRequest req;
    req.set_name(name);
    req.set_force(force);
    req.set_drain_timeout_seconds(drain_seconds);
    return admin->UnloadAdapter(AdminContext().get(), req, out);
  }
  absl::StatusOr<pb::AdapterStatus> Get(const std::string& name) {
    pb::GetAdapterRequest req;
    req.set_name(name);
    pb::AdapterStatus resp;
    grpc::Status st = admin->GetAdapter(AdminContext().get(), req, &resp);
    if (!st.ok())
      return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
    return resp;
  }
  pb::ListAdaptersResponse List() {
    pb::ListAdaptersResponse resp;
    EXPECT_TRUE(admin->ListAdapters(AdminContext().get(), pb::ListAdaptersRequest(), &resp).ok());
    return resp;
  }
};

pb::GenerateRequest Greedy(const std::string& adapter, const std::string& text, uint32_t n) {
  pb::GenerateRequest req;
  req.set_adapter(adapter);
  req.set_text(text);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_stopping()->set_max_new_tokens(n);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

struct GenResult {
  grpc::Status status;
  std::vector<uint32_t> ids;
  std::vector<absl::Time> arrivals;  // when each message arrived
};

GenResult RunGenerate(pb::Inference::Stub& stub, const pb::GenerateRequest& req) {
  GenResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
  auto reader = stub.Generate(&ctx, req);
  pb::GenerateResponse msg;
  while (reader->Read(&msg)) {
    r.ids.insert(r.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    r.arrivals.push_back(absl::Now());
  }
  r.status = reader->Finish();
  return r;
}

// The coreutils digest that LoadAdapterRequest.sha256 documents.
std::string ShellDigest(const fs::path& dir) {
  const std::string cmd = absl::StrCat("cd '", dir.string(),
                                       "' && find -L . -type f | LC_ALL=C sort | xargs sha256sum "
                                       "| sha256sum");
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return "";
  char buf[128] = {};
  const size_t n = fread(buf, 1, sizeof(buf) - 1, p);
  pclose(p);
  std::string out(buf, n);
  return out.substr(0, out.find(' '));
}

TEST(AdminTest, MissingOrWrongTokenIsUnauthenticatedAndEveryCallIsAudited) {
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  root.Write("a", 1);
  pb::LoadAdapterRequest req;
  req.set_name("a");
  req.set_path("a");
  pb::LoadAdapterResponse resp;
  grpc::Status none = inst->admin->LoadAdapter(inst->AdminContext("").get(), req, &resp);
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED) << none.error_message();
  grpc::Status wrong =
      inst->admin->LoadAdapter(inst->AdminContext("test-admin-token-0123456780").get(), req, &resp);
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED) << wrong.error_message();
  pb::ListAdaptersResponse list;
  EXPECT_EQ(inst->admin->ListAdapters(inst->AdminContext("x").get(), {}, &list).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  // Nothing was loaded by the refused calls.
  EXPECT_TRUE(absl::IsNotFound(inst->Get("a").status()));
  ASSERT_TRUE(inst->Load("a", "a").ok());
  // The admin API is not on the inference port, and inference is not on the admin port.
  auto cross = pb::Inference::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", inst->server->admin_port()), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(RunGenerate(*cross, Greedy("a", "hi", 2)).status.error_code(),
            grpc::StatusCode::UNIMPLEMENTED);

  std::lock_guard<std::mutex> lock(inst->audit_mu);
  ASSERT_EQ(inst->audit.size(), 5u);
  EXPECT_EQ(inst->audit[0].method, "LoadAdapter");
  EXPECT_FALSE(inst->audit[0].authenticated);
  EXPECT_THAT(inst->audit[0].result, HasSubstr("UNAUTHENTICATED"));
  EXPECT_THAT(inst->audit[0].peer, HasSubstr("127.0.0.1"));
  EXPECT_FALSE(inst->audit[1].authenticated);
  EXPECT_EQ(inst->audit[2].method, "ListAdapters");
  EXPECT_EQ(inst->audit[3].method, "GetAdapter");
  EXPECT_TRUE(inst->audit[3].authenticated);
  EXPECT_THAT(inst->audit[3].result, HasSubstr("NOT_FOUND"));
  EXPECT_EQ(inst->audit[4].method, "LoadAdapter");
  EXPECT_EQ(inst->audit[4].adapter, "a");
  EXPECT_THAT(inst->audit[4].detail, HasSubstr("path=a"));
  EXPECT_EQ(inst->audit[4].result, "OK");
}

TEST(AdminTest, HostilePathsAreRefusedAndLeaveNothingServing) {
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  const fs::path outside = fs::path(::testing::TempDir()) / absl::StrCat("outside_", getpid());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(outside.string(), 3).empty());
  fs::create_directory_symlink(outside, root.path / "escape");
  root.Write("inner", 4);
  fs::create_symlink(outside / "model.safetensors", root.path / "inner" / "linked.safetensors");
  struct Case {
    std::string path;
    grpc::StatusCode code;
    std::string message;
  };
  for (const Case& c : std::vector<Case>{
           {"../" + outside.filename().string(), grpc::StatusCode::INVALID_ARGUMENT, "'..'"},
           {outside.string(), grpc::StatusCode::INVALID_ARGUMENT, "absolute"},
           {"escape", grpc::StatusCode::INVALID_ARGUMENT, "leaves"},
           {"inner", grpc::StatusCode::INVALID_ARGUMENT, "links outside"},
           {"missing", grpc::StatusCode::NOT_FOUND, "not a directory"}}) {
    grpc::Status st = inst->Load("x", c.path);
    EXPECT_EQ(st.error_code(), c.code) << c.path << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(c.message)) << c.path;
    // A failed first load is FAILED with its error, and requests for it are refused.
    absl::StatusOr<pb::AdapterStatus> got = inst->Get("x");
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->info().state(), pb::ADAPTER_STATE_FAILED);
    EXPECT_EQ(got->error(), st.error_message());
    EXPECT_EQ(got->info().version(), 0u);
    GenResult r = RunGenerate(*inst->stub, Greedy("x", "hi", 2));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_TRUE(r.ids.empty());
  }
  // Unloading a FAILED name forgets it.
  pb::UnloadAdapterResponse un;
  ASSERT_TRUE(inst->Unload("x", false, 0, &un).ok());
  EXPECT_TRUE(absl::IsNotFound(inst->Get("x").status()));
  fs::remove_all(outside);
}

TEST(AdminTest, Sha256IsCheckedAndCorruptReplaceKeepsTheOldVersionServing) {
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  root.Write("v1", 11);
  const std::string digest = ShellDigest(root.path / "v1");
  ASSERT_EQ(digest.size(), 64u);
  std::string wrong = digest;
  wrong[0] = wrong[0] == 'a' ? 'b' : 'a';
  grpc::Status mismatch = inst->Load("m", "v1", false, wrong);
  EXPECT_EQ(mismatch.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(mismatch.error_message(), HasSubstr("sha256 mismatch"));
  ASSERT_TRUE(inst->Load("m", "v1", /*replace=*/true, digest).ok());
  absl::StatusOr<pb::AdapterStatus> v1 = inst->Get("m");
  ASSERT_TRUE(v1.ok());
  EXPECT_EQ(v1->info().state(), pb::ADAPTER_STATE_READY);
  EXPECT_EQ(v1->sha256(), digest);
  EXPECT_EQ(v1->error(), "");
  const uint64_t version = v1->info().version();
  GenResult before = RunGenerate(*inst->stub, Greedy("m", "Hello, world", 10));
  ASSERT_TRUE(before.status.ok()) << before.status.error_message();

  // Corrupt candidates: a NaN in a tensor, a truncated safetensors file, a shape that does not
  // fit the base model.
  root.Write("nan", 12);
  {
    std::fstream f(root.path / "nan" / "model.safetensors",
                   std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-4, std::ios::end);
    const uint32_t nan_bits = 0x7fc00000;
    f.write(reinterpret_cast<const char*>(&nan_bits), 4);
  }
  root.Write("truncated", 13);
  fs::resize_file(root.path / "truncated" / "model.safetensors",
                  fs::file_size(root.path / "truncated" / "model.safetensors") / 2);
  for (const std::string bad : {"nan", "truncated"}) {
    grpc::Status st = inst->Load("m", bad, /*replace=*/true);
    EXPECT_THAT(st.error_code(),
                ::testing::AnyOf(grpc::StatusCode::INVALID_ARGUMENT, grpc::StatusCode::DATA_LOSS))
        << bad << ": " << st.error_message();
    absl::StatusOr<pb::AdapterStatus> after = inst->Get("m");
    ASSERT_TRUE(after.ok());
    EXPECT_EQ(after->info().state(), pb::ADAPTER_STATE_READY) << bad;
    EXPECT_EQ(after->info().version(), version) << bad;
    EXPECT_EQ(after->error(), st.error_message()) << bad;
    GenResult still = RunGenerate(*inst->stub, Greedy("m", "Hello, world", 10));
    ASSERT_TRUE(still.status.ok());
    EXPECT_EQ(still.ids, before.ids) << "the old version must keep serving after " << bad;
  }
  // A good replacement is served from then on.
  root.Write("v2", 14);
  ASSERT_TRUE(inst->Load("m", "v2", /*replace=*/true).ok());
  absl::StatusOr<pb::AdapterStatus> v2 = inst->Get("m");
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v2->info().version(), version + 1);
  EXPECT_EQ(v2->error(), "");
  EXPECT_NE(RunGenerate(*inst->stub, Greedy("m", "Hello, world", 10)).ids, before.ids);
}

// A hot load runs beside decoding: the load is held at each of its stages (the stage hook) until
// every stream still running has received two more messages, so the test asserts progress, not
// speed. A load that blocked the engine loop would hold the streams, and the test would fail at
// the bound (60 s) instead of passing on a fast machine and failing on a busy one.
TEST(AdminTest, LoadWhileSixteenStreamsDecodeStallsNone) {
  constexpr int kStreams = 16;
  constexpr uint32_t kTokens = 96;
  std::vector<GenResult> results(kStreams);
  std::mutex results_mu;  // guards results[i].ids while streams run
  std::vector<bool> done(kStreams, false);
  std::atomic<bool> armed{false};
  std::vector<std::string> held_stages;
  int running_at_first_hold = -1;
  // Runs on the loading thread at each stage of the armed load.
  auto hold = [&](std::string_view stage) {
    if (!armed.load()) return;
    std::vector<size_t> seen(kStreams);
    int running = 0;
    {
      std::lock_guard<std::mutex> lock(results_mu);
      for (int i = 0; i < kStreams; ++i) {
        seen[i] = results[i].arrivals.size();
        running += done[i] ? 0 : 1;
      }
    }
    if (running_at_first_hold < 0) running_at_first_hold = running;
    held_stages.emplace_back(stage);
    const absl::Time bound = absl::Now() + absl::Seconds(60);
    while (absl::Now() < bound) {
      bool progressed = true;
      {
        std::lock_guard<std::mutex> lock(results_mu);
        for (int i = 0; i < kStreams; ++i) {
          if (!done[i] && results[i].arrivals.size() < seen[i] + 2) progressed = false;
        }
      }
      if (progressed) return;
      absl::SleepFor(absl::Milliseconds(2));
    }
    ADD_FAILURE() << "streams stalled while the load was held at its " << stage << " stage";
  };
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string(), 0, false, hold);
  ASSERT_NE(inst, nullptr);
  root.Write("a", 21);
  ASSERT_TRUE(inst->Load("a", "a").ok());
  // A large adapter (64 experts of rank 64 on 8 sites: 67 MB of fp32) with its digest.
  root.Write("big", 22, /*experts=*/64, /*rank=*/64);
  const std::string digest = ShellDigest(root.path / "big");
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      pb::GenerateRequest req = Greedy(i % 2 == 0 ? "a" : "", absl::StrCat("stream ", i), kTokens);
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
      auto reader = inst->stub->Generate(&ctx, req);
      pb::GenerateResponse msg;
      bool first = true;
      while (reader->Read(&msg)) {
        {
          std::lock_guard<std::mutex> lock(results_mu);
          results[i].ids.insert(results[i].ids.end(), msg.token_ids().begin(),
                                msg.token_ids().end());
          results[i].arrivals.push_back(absl::Now());
        }
        if (first) ++started;
        first = false;
      }
      grpc::Status status = reader->Finish();
      std::lock_guard<std::mutex> lock(results_mu);
      results[i].status = status;
      done[i] = true;
    });
  }
  while (started.load() < kStreams) absl::SleepFor(absl::Milliseconds(1));
  armed = true;
  grpc::Status loaded = inst->Load("big", "big", false, digest);
  armed = false;
  ASSERT_TRUE(loaded.ok()) << loaded.error_message();
  for (std::thread& t : threads) t.join();
  EXPECT_THAT(held_stages, ::testing::ElementsAre("inspect", "read", "attach"));
  EXPECT_GT(running_at_first_hold, 0) << "every stream ended before the load began";
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids.size(), kTokens) << i;
  }
  // The new adapter serves.
  GenResult big = RunGenerate(*inst->stub, Greedy("big", "Hello", 4));
  EXPECT_TRUE(big.status.ok()) << big.status.error_message();
  EXPECT_EQ(big.ids.size(), 4u);
}

// How an upload misbehaves (UploadDir).
struct UploadFaults {
  bool flip_a_byte = false;        // corrupt one byte of the first data chunk (header sha kept)
  std::string sha256;              // a header sha256 other than the files' digest
  bool cancel_midway = false;      // send the header, one file header and one chunk, then cancel
  bool data_before_file = false;   // a data message before any file message
  bool one_byte_too_many = false;  // the first file's data one byte longer than declared
};

// Uploads the files of `dir` (any directory, not under the root) as adapter `name` through
// AdapterAdmin.UploadAdapter, in chunks of `chunk` bytes.
grpc::Status UploadDir(Instance& inst, const std::string& name, const fs::path& dir, bool replace,
                       const UploadFaults& faults = {}, pb::LoadAdapterResponse* out = nullptr,
                       size_t chunk = 64 << 10) {
  std::vector<fs::path> files;
  uint64_t total = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    files.push_back(e.path());
    total += e.file_size();
  }
  std::sort(files.begin(), files.end());
  pb::LoadAdapterResponse resp;
  auto ctx = inst.AdminContext();
  auto writer = inst.admin->UploadAdapter(ctx.get(), out != nullptr ? out : &resp);
  pb::UploadAdapterRequest msg;
  pb::UploadHeader* h = msg.mutable_header();
  h->set_name(name);
  h->set_sha256(faults.sha256.empty() ? ShellDigest(dir) : faults.sha256);
  h->set_total_bytes(total);
  h->set_num_files(static_cast<uint32_t>(files.size()));
  h->set_replace(replace);
  bool ok = writer->Write(msg);
  if (faults.data_before_file) {
    msg.Clear();
    msg.set_data("x");
    ok = ok && writer->Write(msg);
  }
  bool first_chunk = true;
  for (const fs::path& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (faults.one_byte_too_many && first_chunk) bytes.push_back('!');
    msg.Clear();
    msg.mutable_file()->set_path(fs::relative(f, dir).generic_string());
    msg.mutable_file()->set_size(fs::file_size(f));
    ok = ok && writer->Write(msg);
    for (size_t at = 0; ok && at < bytes.size(); at += chunk) {
      msg.Clear();
      msg.set_data(bytes.substr(at, chunk));
      if (faults.flip_a_byte && first_chunk) (*msg.mutable_data())[0] ^= 0x01;
      first_chunk = false;
      ok = writer->Write(msg);
      if (faults.cancel_midway) {
        ctx->TryCancel();
        return writer->Finish();
      }
    }
  }
  if (ok) writer->WritesDone();
  return writer->Finish();
}

// The entries of root/.uploads/<sub> (empty when it does not exist).
std::vector<std::string> UploadEntries(const fs::path& root, const std::string& sub) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root / ".uploads" / sub, ec)) {
    out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A client-side adapter directory (not under the adapter root), removed at the end.
struct ClientDir {
  fs::path path;
  explicit ClientDir(const std::string& tag) {
    path = fs::path(::testing::TempDir()) / absl::StrCat("moleserve_upload_", tag, "_", getpid());
    fs::remove_all(path);
  }
  ~ClientDir() { fs::remove_all(path); }
};

TEST(AdminTest, UploadsLoadReplaceWhileOldRequestsFinishAndFailuresLeaveNothing) {
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  ClientDir v1("v1"), v2("v2");
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(v1.path.string(), 61).empty());
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(v2.path.string(), 62).empty());
  const std::string d1 = ShellDigest(v1.path), d2 = ShellDigest(v2.path);
  ASSERT_NE(d1, d2);

  pb::LoadAdapterResponse resp;
  grpc::Status st = UploadDir(*inst, "m", v1.path, false, {}, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.adapter().info().version(), 1u);
  EXPECT_EQ(resp.adapter().sha256(), d1);
  EXPECT_EQ(resp.adapter().path(), ".uploads/m/" + d1);
  EXPECT_THAT(UploadEntries(root.path, "m"), ::testing::ElementsAre(d1));
  // Retried: the same files already serve, a no-op (idempotent), with or without replace.
  ASSERT_TRUE(UploadDir(*inst, "m", v1.path, false, {}, &resp).ok());
  EXPECT_EQ(resp.adapter().info().version(), 1u);
  // Without replace, other files are refused and leave nothing.
  EXPECT_EQ(UploadDir(*inst, "m", v2.path, false).error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_THAT(UploadEntries(root.path, "m"), ::testing::ElementsAre(d1));

  // Replace while a request of v1 runs: it finishes on v1, new requests get v2.
  const GenResult v1_tokens = RunGenerate(*inst->stub, Greedy("m", "Hello, world", 300));
  ASSERT_TRUE(v1_tokens.status.ok());
  GenResult old_run;
  std::atomic<bool> old_started{false};
  std::thread old_thread([&] {
    grpc::ClientContext ctx;
    auto reader = inst->stub->Generate(&ctx, Greedy("m", "Hello, world", 300));
    pb::GenerateResponse msg;
    while (reader->Read(&msg)) {
      old_run.ids.insert(old_run.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
      old_started = true;
    }
    old_run.status = reader->Finish();
  });
  while (!old_started) absl::SleepFor(absl::Milliseconds(1));
  st = UploadDir(*inst, "m", v2.path, true, {}, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.adapter().info().version(), 2u);
  old_thread.join();
  ASSERT_TRUE(old_run.status.ok()) << old_run.status.error_message();
  EXPECT_EQ(old_run.ids, v1_tokens.ids) << "the request that started on v1 ends on v1";
  const GenResult v2_tokens = RunGenerate(*inst->stub, Greedy("m", "Hello, world", 300));
  ASSERT_TRUE(v2_tokens.status.ok());
  EXPECT_NE(v2_tokens.ids, v1_tokens.ids);
  // The replaced upload's files are gone; only v2's remain.
  EXPECT_THAT(UploadEntries(root.path, "m"), ::testing::ElementsAre(d2));

  // Refused uploads: each leaves v2 serving, no staging directory and no other files.
  const std::string wrong(64, 'a');
  struct Case {
    const char* what;
    UploadFaults faults;
    grpc::StatusCode code;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {"corrupted chunk",
            {.flip_a_byte = true},
            grpc::StatusCode::INVALID_ARGUMENT,
            "sha256 mismatch"},
           {"wrong sha256",
            {.sha256 = wrong},
            grpc::StatusCode::INVALID_ARGUMENT,
            "sha256 mismatch"},
           {"data before a file",
            {.data_before_file = true},
            grpc::StatusCode::INVALID_ARGUMENT,
            "before the file's header"},
           {"more bytes than declared",
            {.one_byte_too_many = true},
            grpc::StatusCode::INVALID_ARGUMENT,
            "more bytes than"},
           {"interrupted", {.cancel_midway = true}, grpc::StatusCode::CANCELLED, ""}}) {
    SCOPED_TRACE(c.what);
    st = UploadDir(*inst, "m", v1.path, true, c.faults);
    EXPECT_EQ(st.error_code(), c.code) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(c.message));
    // The server sees an interrupted stream end a little after the client cancels it: wait
    // (bounded) for its staging directory to go.
    for (int i = 0; i < 3000 && !UploadEntries(root.path, ".staging").empty(); ++i) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    EXPECT_THAT(UploadEntries(root.path, ".staging"), ::testing::IsEmpty());
    EXPECT_THAT(UploadEntries(root.path, "m"), ::testing::ElementsAre(d2));
    absl::StatusOr<pb::AdapterStatus> now = inst->Get("m");
    ASSERT_TRUE(now.ok());
    EXPECT_EQ(now->info().version(), 2u);
    EXPECT_EQ(now->sha256(), d2);
  }
  // Bad headers are refused before anything is written.
  EXPECT_EQ(UploadDir(*inst, ".staging", v1.path, false).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(UploadDir(*inst, "../x", v1.path, false).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  {
    std::lock_guard<std::mutex> lock(inst->audit_mu);
    const AdminAuditEntry& last = inst->audit.back();
    EXPECT_EQ(last.method, "UploadAdapter");
    EXPECT_TRUE(last.authenticated);
  }
  // Unloading the name removes its uploaded files.
  pb::UnloadAdapterResponse unloaded;
  ASSERT_TRUE(inst->Unload("m", false, 5, &unloaded).ok());
  EXPECT_THAT(UploadEntries(root.path, "m"), ::testing::IsEmpty());
  EXPECT_FALSE(fs::exists(root.path / ".uploads" / "m"));
}

TEST(AdminTest, AHundredMegabyteUploadWhileSixteenStreamsDecodeStallsNone) {
  constexpr int kStreams = 16;
  constexpr uint32_t kTokens = 400;
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  // A small adapter with 100 MB of other files beside it (an optimizer state, say): all of it
  // is streamed, written and hashed; only the adapter is parsed.
  ClientDir big("big");
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(big.path.string(), 63).empty());
  {
    std::ofstream f(big.path / "optimizer.bin", std::ios::binary);
    std::string block(1 << 20, '\0');
    for (int mb = 0; mb < 100; ++mb) {
      for (size_t i = 0; i < block.size(); i += 8) block[i] = static_cast<char>(mb * 31 + i);
      f.write(block.data(), static_cast<std::streamsize>(block.size()));
    }
  }
  std::vector<GenResult> results(kStreams);
  std::mutex mu;
  std::vector<bool> done(kStreams, false);
  std::atomic<int> started{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
      auto reader = inst->stub->Generate(&ctx, Greedy("", absl::StrCat("stream ", i), kTokens));
      pb::GenerateResponse msg;
      bool first = true;
      while (reader->Read(&msg)) {
        std::lock_guard<std::mutex> lock(mu);
        results[i].ids.insert(results[i].ids.end(), msg.token_ids().begin(), msg.token_ids().end());
        if (first) ++started;
        first = false;
      }
      grpc::Status status = reader->Finish();
      std::lock_guard<std::mutex> lock(mu);
      results[i].status = status;
      done[i] = true;
    });
  }
  while (started.load() < kStreams) absl::SleepFor(absl::Milliseconds(1));
  std::vector<size_t> before(kStreams);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < kStreams; ++i) before[i] = results[i].ids.size();
  }
  pb::LoadAdapterResponse resp;
  grpc::Status st = UploadDir(*inst, "big", big.path, false, {}, &resp, 1 << 20);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_GE(resp.adapter().disk_bytes(), 100u << 20);
  // Every stream still running when the upload ended made progress during it.
  int progressed = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < kStreams; ++i) {
      if (done[i]) continue;
      EXPECT_GE(results[i].ids.size(), before[i] + 2) << "stream " << i << " stalled";
      ++progressed;
    }
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].ids.size(), kTokens) << i;
  }
  GenResult served = RunGenerate(*inst->stub, Greedy("big", "Hello", 4));
  EXPECT_TRUE(served.status.ok()) << served.status.error_message();
  EXPECT_EQ(UploadEntries(root.path, "big").size(), 1u);
  RecordProperty("streams_running_through_the_upload", progressed);
}

TEST(AdminTest, UnloadDrainsInFlightRequestsOrCancelsThemWithForce) {
  AdapterRoot root;
  auto inst = Instance::Start(root.path.string());
  ASSERT_NE(inst, nullptr);
  root.Write("a", 31);
  ASSERT_TRUE(inst->Load("a", "a").ok());
  for (const bool force : {false, true}) {
    SCOPED_TRACE(force ? "force" : "drain");
    constexpr int kStreams = 4;
    const uint32_t kTokens = force ? 1500 : 200;
    std::vector<GenResult> results(kStreams);
    std::vector<std::thread> threads;
    for (int i = 0; i < kStreams; ++i) {
      threads.emplace_back(
          [&, i] { results[i] = RunGenerate(*inst->stub, Greedy("a", "long one", kTokens)); });
    }
    // Wait until all four are in flight.
    for (int i = 0; i < 5000; ++i) {
      absl::StatusOr<pb::AdapterStatus> st = inst->Get("a");
      if (st.ok() && st->in_flight() == kStreams) break;
      absl::SleepFor(absl::Milliseconds(2));
    }
    std::atomic<bool> draining_seen{false};
    std::thread watcher;
    if (!force) {
      watcher = std::thread([&] {
        for (int i = 0; i < 2000 && !draining_seen; ++i) {
          absl::StatusOr<pb::AdapterStatus> st = inst->Get("a");
          if (st.ok() && st->info().state() == pb::ADAPTER_STATE_DRAINING) {
            draining_seen = true;
            // New requests are refused while it drains.
            GenResult refused = RunGenerate(*inst->stub, Greedy("a", "late", 2));
            EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
          }
          absl::SleepFor(absl::Milliseconds(1));
        }
      });
    }
    pb::UnloadAdapterResponse un;
    grpc::Status st = inst->Unload("a", force, 60, &un);
    ASSERT_TRUE(st.ok()) << st.error_message();
    for (std::thread& t : threads) t.join();
    if (watcher.joinable()) watcher.join();
    if (force) {
      EXPECT_EQ(un.cancelled(), static_cast<uint64_t>(kStreams));
      EXPECT_EQ(un.drained(), 0u);
      for (const GenResult& r : results) {
        EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
        EXPECT_THAT(r.status.error_message(), HasSubstr("'a' was unloaded"));
        EXPECT_LT(r.ids.size(), kTokens);
      }
    } else {
      EXPECT_TRUE(draining_seen.load());
      EXPECT_EQ(un.drained(), static_cast<uint64_t>(kStreams));
      EXPECT_EQ(un.cancelled(), 0u);
      for (const GenResult& r : results) {
        EXPECT_TRUE(r.status.ok()) << r.status.error_message();
        EXPECT_EQ(r.ids.size(), kTokens);
      }
    }
    // Gone: unknown to the admin API and to requests, and its experts left the device pool.
    EXPECT_TRUE(absl::IsNotFound(inst->Get("a").status()));
    EXPECT_EQ(RunGenerate(*inst->stub, Greedy("a", "hi", 2)).status.error_code(),
              grpc::StatusCode::NOT_FOUND);
    for (int i = 0; i < 500 && inst->List().cache().resident_experts() != 0; ++i) {
      absl::SleepFor(absl::Milliseconds(5));
    }
    EXPECT_EQ(inst->List().cache().resident_experts(), 0u);
    ASSERT_TRUE(inst->Load("a", "a").ok());  // for the next round
  }
}

TEST(AdminTest, TwoHundredAdaptersThroughAPoolThatHoldsTen) {
  AdapterRoot root;
  constexpr int kAdapters = 200;
  // One demo adapter: 8 sites x 4 experts x (4 A rows + 4 Bt rows) of 256 fp32 = 256 KiB.
  constexpr int64_t kAdapterExpertBytes = 8 * 4 * 8 * 256 * 4;
  auto small = Instance::Start(root.path.string(), 10 * kAdapterExpertBytes,
                               /*with_metrics=*/true);
  auto reference = Instance::Start(root.path.string());  // unbounded pool
  ASSERT_NE(small, nullptr);
  ASSERT_NE(reference, nullptr);
  for (int i = 0; i < kAdapters; ++i) {
    const std::string name = absl::StrCat("m", i);
    root.Write(name, 1000 + i);
    ASSERT_TRUE(small->Load(name, name).ok()) << name;
    ASSERT_TRUE(reference->Load(name, name).ok()) << name;
  }
  pb::ListAdaptersResponse list = small->List();
  ASSERT_EQ(list.adapters_size(), kAdapters);
  EXPECT_LE(list.cache().capacity_bytes(), static_cast<uint64_t>(10 * kAdapterExpertBytes));

  // Requests spread over all 200, eight at a time, each compared with the unbounded server.
  constexpr int kThreads = 8;
  std::vector<std::vector<uint32_t>> got(kAdapters), want(kAdapters);
  std::vector<grpc::Status> status(kAdapters);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = t; i < kAdapters; i += kThreads) {
        const pb::GenerateRequest req =
            Greedy(absl::StrCat("m", (i * 37) % kAdapters), absl::StrCat("prompt ", i), 6);
        GenResult a = RunGenerate(*small->stub, req);
        status[i] = a.status;
        got[i] = a.ids;
        want[i] = RunGenerate(*reference->stub, req).ids;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kAdapters; ++i) {
    ASSERT_TRUE(status[i].ok()) << i << ": " << status[i].error_message();
    ASSERT_EQ(got[i].size(), 6u) << i;
    EXPECT_EQ(got[i], want[i]) << "request " << i;
  }
  list = small->List();
  EXPECT_GT(list.cache().misses(), 0u);
  EXPECT_GT(list.cache().evictions(), 0u);
  EXPECT_LE(list.cache().resident_experts(), 10u * 32);
  // The metrics show the cache working (no adapter label anywhere).
  std::map<std::string, double> m;
  for (int i = 0; i < 3000; ++i) {  // a hang guard: 30 s
    m = test_util::ParsePrometheus(test_util::HttpGetMetrics(small->metrics->port()));
    if (m[R"(moleserve_expert_cache_lookups_total{result="miss",tier="device"})"] > 0) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GT((m[R"(moleserve_expert_cache_lookups_total{result="miss",tier="device"})"]), 0);
  EXPECT_GT((m[R"(moleserve_expert_cache_lookups_total{result="hit",tier="host"})"]), 0);
  EXPECT_GT((m[R"(moleserve_expert_cache_evictions_total{reason="lru"})"]), 0);
  EXPECT_GT(m["moleserve_expert_cache_bytes_to_device_total"], 0);
  EXPECT_EQ(m["moleserve_adapter_loads_total"], kAdapters);
  EXPECT_GT((m[R"(moleserve_expert_cache_pages{width="256"})"]), 0);
  EXPECT_GT(m["moleserve_request_expert_wait_seconds_count"], 0);
  // Adapter labels are bounded whatever the number of adapters: only the per-adapter series carry
  // one, for at most the --metrics-top-adapters (10) most active adapters plus "(other)".
  std::set<std::string> labelled;
  for (const auto& [series, value] : m) {
    const size_t at = series.find("adapter=\"");
    if (at == std::string::npos) continue;
    EXPECT_TRUE(absl::StartsWith(series, "moleserve_adapter_requests{") ||
                absl::StartsWith(series, "moleserve_adapter_tokens_total{"))
        << series;
    labelled.insert(series.substr(at, series.find('"', at + 9) - at));
  }
  EXPECT_LE(labelled.size(), 11u);
  EXPECT_GT(labelled.size(), 0u);  // the server did report per-adapter activity
}

}  // namespace
}  // namespace moleserve::server
