#include "engine/lifecycle/adapter_lifecycle.h"

#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

// A fake engine: an adapter directory holds one file, `content`; "bad" fails to parse. Attach
// hands out slots; Retire records what it was given; CancelRequests answers `cancel_answer`.
class FakeHost final : public AdapterHost {
 public:
  absl::StatusOr<Read> ReadAdapter(const std::string& dir, const std::string& name) override {
    if (read_hook) read_hook(name);
    std::ifstream in(fs::path(dir) / "content");
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (content == "bad") return absl::InvalidArgumentError("content: bad adapter");
    auto a = std::make_shared<Adapter>();
    a->name = name;
    a->source_family = content;
    a->format = "fake";
    a->bytes = static_cast<int64_t>(content.size());
    return Read{.adapter = std::move(a)};
  }
  absl::StatusOr<int32_t> Attach(std::shared_ptr<const Adapter> adapter) override {
    // Operations on one name are serialized: never two attaches of one name at once. (A test
    // with several loading threads puts its names in `attaching` before it starts them.)
    if (attaching[adapter->name].fetch_add(1) != 0) overlapping_attaches.fetch_add(1);
    std::this_thread::yield();
    attaching[adapter->name].fetch_sub(1);
    MutexLock lock(&mu);
    attached.insert(next_slot);
    return next_slot++;
  }
  void Retire(int32_t slot, std::weak_ptr<const AdapterVersion> version) override {
    MutexLock lock(&mu);
    retired.push_back({slot, std::move(version)});
  }
  int64_t CancelRequests(const Adapter* adapter, absl::Status status) override {
    MutexLock lock(&mu);
    cancelled.push_back(adapter->name + ": " + std::string(status.message()));
    return cancel_answer;
  }
  int64_t DeviceBytes(int32_t slot, const Adapter&) const override { return 1000 + slot; }

  std::function<void(const std::string&)> read_hook;
  std::map<std::string, std::atomic<int>> attaching;  // names set up before threads start
  std::atomic<int> overlapping_attaches{0};
  int64_t cancel_answer = 0;
  Mutex mu;
  int32_t next_slot ABSL_GUARDED_BY(mu) = 0;
  std::set<int32_t> attached ABSL_GUARDED_BY(mu);
  std::vector<std::pair<int32_t, std::weak_ptr<const AdapterVersion>>> retired ABSL_GUARDED_BY(mu);
  std::vector<std::string> cancelled ABSL_GUARDED_BY(mu);
};

class AdapterLifecycleTest : public ::testing::Test {
 protected:
  AdapterLifecycleTest() {
    root_ = fs::temp_directory_path() /
            ("lifecycle_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  ~AdapterLifecycleTest() override { fs::remove_all(root_); }

  void Write(const std::string& dir, const std::string& content) {
    fs::create_directories(root_ / dir);
    std::ofstream(root_ / dir / "content") << content;
  }
  AdapterLifecycle& Make(LifecycleOptions o = {}) {
    o.adapter_root = root_.string();
    o.load_nice = 0;
    lifecycle_ = std::make_unique<AdapterLifecycle>(std::move(o), &host_);
    return *lifecycle_;
  }
  AdapterState StateOf(const std::string& name) {
    absl::StatusOr<AdapterStatus> st = lifecycle_->Status(name);
    EXPECT_TRUE(st.ok()) << st.status();
    return st.ok() ? st->state : AdapterState::kFailed;
  }

  fs::path root_;
  FakeHost host_;
  std::unique_ptr<AdapterLifecycle> lifecycle_;
};

TEST_F(AdapterLifecycleTest, LoadReplaceUnloadAndVersionsThatNeverRepeat) {
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  Write("v2", "two");
  EXPECT_EQ(lc.Resolve("a").status().code(), absl::StatusCode::kNotFound);
  absl::StatusOr<AdapterSummary> s1 = lc.Load({.name = "a", .path = "v1"});
  ASSERT_TRUE(s1.ok()) << s1.status();
  EXPECT_EQ(s1->version, 1u);
  EXPECT_EQ(s1->family, "one");
  EXPECT_EQ(StateOf("a"), AdapterState::kReady);
  // Loaded without replace: kAlreadyExists, and v1 still serves.
  EXPECT_EQ(lc.Load({.name = "a", .path = "v2"}).status().code(), absl::StatusCode::kAlreadyExists);

  absl::StatusOr<AdapterLifecycle::Lease> old_lease = lc.Resolve("a");
  ASSERT_TRUE(old_lease.ok());
  EXPECT_EQ(old_lease->version()->version, 1u);
  absl::StatusOr<AdapterSummary> s2 = lc.Load({.name = "a", .path = "v2", .replace = true});
  ASSERT_TRUE(s2.ok()) << s2.status();
  EXPECT_EQ(s2->version, 2u);
  // The replaced version lives on for the request that holds it, and its slot is retired (the
  // host frees it once the version expires).
  absl::StatusOr<AdapterStatus> st = lc.Status("a");
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->summary.version, 2u);
  EXPECT_EQ(st->in_flight, 1);
  EXPECT_EQ(st->retiring_versions, 1);
  EXPECT_EQ(st->device_bytes, 1001);  // slot 1
  EXPECT_EQ(old_lease->version()->adapter->source_family, "one");
  {
    MutexLock lock(&host_.mu);
    ASSERT_EQ(host_.retired.size(), 1u);
    EXPECT_EQ(host_.retired[0].first, old_lease->slot());
    EXPECT_FALSE(host_.retired[0].second.expired());
  }
  *old_lease = AdapterLifecycle::Lease();
  {
    MutexLock lock(&host_.mu);
    EXPECT_TRUE(host_.retired[0].second.expired());
  }
  st = lc.Status("a");
  EXPECT_EQ(st->in_flight, 0);
  EXPECT_EQ(st->retiring_versions, 0);

  absl::StatusOr<AdapterLifecycle::UnloadResult> un = lc.Unload("a", absl::Seconds(5), false);
  ASSERT_TRUE(un.ok());
  EXPECT_EQ(un->drained, 0);
  EXPECT_EQ(lc.Status("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(lc.Unload("a", absl::Seconds(5), false).status().code(), absl::StatusCode::kNotFound);
  // Loaded again after the unload: version 3, never 1 again.
  absl::StatusOr<AdapterSummary> s3 = lc.Load({.name = "a", .path = "v1"});
  ASSERT_TRUE(s3.ok());
  EXPECT_EQ(s3->version, 3u);
}

TEST_F(AdapterLifecycleTest, AFailedFirstLoadIsFailedAndUnloadForgetsIt) {
  AdapterLifecycle& lc = Make();
  Write("bad", "bad");
  absl::StatusOr<AdapterSummary> s = lc.Load({.name = "a", .path = "bad"});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(StateOf("a"), AdapterState::kFailed);
  EXPECT_EQ(lc.Status("a")->error, "content: bad adapter");
  absl::StatusOr<AdapterLifecycle::Lease> r = lc.Resolve("a");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("failed to load: content: bad adapter"), std::string::npos);
  EXPECT_EQ(lc.Load({.name = "b", .path = "missing"}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(StateOf("b"), AdapterState::kFailed);
  EXPECT_EQ(lc.Statuses().size(), 2u);
  ASSERT_TRUE(lc.Unload("a", absl::ZeroDuration(), false).ok());
  EXPECT_EQ(lc.Status("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(lc.Summaries().empty());
  // A failed name can be loaded again.
  Write("good", "good");
  ASSERT_TRUE(lc.Load({.name = "b", .path = "good"}).ok());
  EXPECT_EQ(StateOf("b"), AdapterState::kReady);
  EXPECT_EQ(lc.Status("b")->error, "");
}

TEST_F(AdapterLifecycleTest, AFailedReloadKeepsThePreviousVersionServing) {
  AdapterLifecycle& lc = Make();
  Write("good", "good");
  Write("bad", "bad");
  ASSERT_TRUE(lc.Load({.name = "a", .path = "good"}).ok());
  EXPECT_FALSE(lc.Load({.name = "a", .path = "bad", .replace = true}).ok());
  absl::StatusOr<AdapterStatus> st = lc.Status("a");
  EXPECT_EQ(st->state, AdapterState::kReady);
  EXPECT_EQ(st->summary.version, 1u);
  EXPECT_EQ(st->error, "content: bad adapter");
  EXPECT_EQ(st->path, "good");
  absl::StatusOr<AdapterLifecycle::Lease> lease = lc.Resolve("a");
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(lease->version()->adapter->source_family, "good");
}

TEST_F(AdapterLifecycleTest, AnEqualSha256IsAnIdempotentRetryAndADifferentOneNeedsReplace) {
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  Write("v2", "two");
  // The digest of a directory holding one file `content` (adapter_files.h's definition).
  absl::StatusOr<AdapterFiles> f1 = InspectAdapterFiles((root_ / "v1").string(), {}, true);
  absl::StatusOr<AdapterFiles> f2 = InspectAdapterFiles((root_ / "v2").string(), {}, true);
  ASSERT_TRUE(f1.ok() && f2.ok());
  ASSERT_TRUE(lc.Load({.name = "a", .path = "v1", .sha256 = f1->sha256}).ok());
  absl::StatusOr<AdapterSummary> again = lc.Load({.name = "a", .path = "v1", .sha256 = f1->sha256});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->version, 1u);
  absl::StatusOr<AdapterSummary> replaced =
      lc.Load({.name = "a", .path = "v1", .replace = true, .sha256 = f1->sha256});
  ASSERT_TRUE(replaced.ok());
  EXPECT_EQ(replaced->version, 1u);  // nothing to replace: the same files already serve
  {
    MutexLock lock(&host_.mu);
    EXPECT_EQ(host_.attached.size(), 1u);
  }
  EXPECT_EQ(lc.Load({.name = "a", .path = "v2", .sha256 = f2->sha256}).status().code(),
            absl::StatusCode::kAlreadyExists);
  // The digest names the content: what serves already has it, whatever the path says.
  EXPECT_EQ(lc.Load({.name = "a", .path = "v2", .replace = true, .sha256 = f1->sha256})->version,
            1u);
  EXPECT_EQ(lc.Load({.name = "a", .path = "v2", .replace = true, .sha256 = std::string(64, 'e')})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);  // the files do not digest to it
  EXPECT_EQ(lc.Status("a")->error.find("sha256 mismatch"), 0u);
  absl::StatusOr<AdapterSummary> v2 =
      lc.Load({.name = "a", .path = "v2", .replace = true, .sha256 = f2->sha256});
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v2->version, 2u);
  EXPECT_EQ(lc.Status("a")->sha256, f2->sha256);
}

TEST_F(AdapterLifecycleTest, ANameIsLoadingUntilPublishedAndStopLoadsEndsALoadAtItsNextStage) {
  absl::Notification in_read, go_on;
  LifecycleOptions o;
  o.stage_hook = [&](std::string_view stage) {
    if (stage == "read") {
      in_read.Notify();
      go_on.WaitForNotification();
    }
  };
  AdapterLifecycle& lc = Make(std::move(o));
  Write("v1", "one");
  absl::StatusOr<AdapterSummary> result;
  std::thread loader([&] { result = lc.Load({.name = "a", .path = "v1"}); });
  in_read.WaitForNotification();
  EXPECT_EQ(StateOf("a"), AdapterState::kLoading);
  absl::StatusOr<AdapterLifecycle::Lease> r = lc.Resolve("a");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("still loading"), std::string::npos);
  EXPECT_TRUE(lc.Summaries().empty());
  lc.StopLoads();
  go_on.Notify();
  loader.join();
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(StateOf("a"), AdapterState::kFailed);
  MutexLock lock(&host_.mu);
  EXPECT_TRUE(host_.attached.empty());  // nothing half-loaded was attached
}

TEST_F(AdapterLifecycleTest, UnloadDrainsTheRequestsOfTheOldAndTheNewVersion) {
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  Write("v2", "two");
  ASSERT_TRUE(lc.Load({.name = "a", .path = "v1"}).ok());
  absl::StatusOr<AdapterLifecycle::Lease> on_v1 = lc.Resolve("a");
  ASSERT_TRUE(lc.Load({.name = "a", .path = "v2", .replace = true}).ok());
  absl::StatusOr<AdapterLifecycle::Lease> on_v2 = lc.Resolve("a");
  ASSERT_TRUE(on_v1.ok() && on_v2.ok());
  EXPECT_EQ(on_v2->version()->version, 2u);

  std::atomic<bool> done{false};
  absl::StatusOr<AdapterLifecycle::UnloadResult> result;
  std::thread unloader([&] {
    result = lc.Unload("a", absl::Hours(1), false);
    done = true;
  });
  while (StateOf("a") != AdapterState::kDraining) std::this_thread::yield();
  EXPECT_NE(lc.Resolve("a").status().message().find("is being unloaded"), std::string::npos);
  EXPECT_EQ(lc.Status("a")->summary.version, 2u);  // the version being unloaded
  EXPECT_EQ(lc.Status("a")->in_flight, 2);
  *on_v1 = AdapterLifecycle::Lease();  // the old version's request ends: still draining
  EXPECT_EQ(lc.Status("a")->in_flight, 1);
  EXPECT_FALSE(done);
  *on_v2 = AdapterLifecycle::Lease();  // the last one: the unload completes
  unloader.join();
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->drained, 2);
  EXPECT_EQ(result->cancelled, 0);
  EXPECT_EQ(lc.Status("a").status().code(), absl::StatusCode::kNotFound);
  MutexLock lock(&host_.mu);
  EXPECT_TRUE(host_.cancelled.empty());
  ASSERT_EQ(host_.retired.size(), 2u);  // v1 at the replace, v2 at the unload
  for (const auto& [slot, version] : host_.retired) EXPECT_TRUE(version.expired()) << slot;
}

TEST_F(AdapterLifecycleTest, ForceAndDrainTimeoutCancelWhatStillRuns) {
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  Write("v2", "two");
  for (bool force : {true, false}) {
    ASSERT_TRUE(lc.Load({.name = "a", .path = "v1"}).ok());
    absl::StatusOr<AdapterLifecycle::Lease> old = lc.Resolve("a");
    ASSERT_TRUE(lc.Load({.name = "a", .path = "v2", .replace = true}).ok());
    absl::StatusOr<AdapterLifecycle::Lease> cur = lc.Resolve("a");
    host_.cancel_answer = 1;  // each version's one request
    absl::StatusOr<AdapterLifecycle::UnloadResult> r =
        lc.Unload("a", force ? absl::Hours(1) : absl::Milliseconds(20), force);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->cancelled, 2) << force;
    EXPECT_EQ(r->drained, 0) << force;
    {
      MutexLock lock(&host_.mu);
      ASSERT_EQ(host_.cancelled.size(), 2u);
      EXPECT_EQ(host_.cancelled[0], "a: adapter 'a' was unloaded");
      host_.cancelled.clear();
    }
    // The leases of cancelled requests end after the row is gone: counted out harmlessly.
    *old = AdapterLifecycle::Lease();
    *cur = AdapterLifecycle::Lease();
    EXPECT_EQ(lc.Status("a").status().code(), absl::StatusCode::kNotFound);
  }
}

TEST_F(AdapterLifecycleTest, StartUpLoadsReadAnyDirectoryAndRefuseARepeatedName) {
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  const std::string dir = (root_ / "v1").string();  // absolute: start-up paths are read as given
  ASSERT_TRUE(lc.Load({.name = "s", .path = dir, .startup = true}).ok());
  EXPECT_EQ(lc.Status("s")->path, dir);
  EXPECT_EQ(lc.Load({.name = "s", .path = dir, .startup = true}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(lc.Load({.name = "", .path = dir, .startup = true}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // The same absolute path as a hot load is refused: hot loads stay inside the root.
  EXPECT_EQ(lc.Load({.name = "h", .path = dir}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Loads, replaces and unloads of one name from several threads, with requests resolving it all
// the while: operations on the name never overlap, every lease sees a published version, and
// every retired version is freed once its leases end.
TEST_F(AdapterLifecycleTest, ConcurrentLoadReplaceAndUnloadOfOneName) {
  AdapterLifecycle& lc = Make();
  host_.attaching["a"] = 0;
  Write("v1", "one");
  Write("v2", "two");
  Write("bad", "bad");
  std::atomic<bool> stop{false};
  std::atomic<int64_t> resolved{0}, refused{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 60; ++i) {
        switch (rng() % 4) {
          case 0:
            (void)lc.Load({.name = "a", .path = "v1"});
            break;
          case 1:
            (void)lc.Load({.name = "a", .path = "v2", .replace = true});
            break;
          case 2:
            (void)lc.Load({.name = "a", .path = "bad", .replace = true});
            break;
          default:
            (void)lc.Unload("a", absl::Milliseconds(rng() % 3), rng() % 2 == 0);
        }
      }
    });
  }
  std::thread requests([&] {
    std::vector<AdapterLifecycle::Lease> held;
    uint64_t last_seen = 0;
    while (!stop) {
      absl::StatusOr<AdapterLifecycle::Lease> l = lc.Resolve("a");
      if (!l.ok()) {
        ++refused;
        continue;
      }
      ++resolved;
      // A name's versions only go up, whatever was unloaded in between.
      EXPECT_GE(l->version()->version, last_seen);
      last_seen = l->version()->version;
      EXPECT_NE(l->version()->adapter->source_family, "bad");
      held.push_back(*std::move(l));
      if (held.size() > 3) held.erase(held.begin());
    }
  });
  for (std::thread& t : threads) t.join();
  stop = true;
  requests.join();
  EXPECT_EQ(host_.overlapping_attaches.load(), 0);
  EXPECT_GT(resolved + refused, 0);
  (void)lc.Unload("a", absl::ZeroDuration(), true);
  EXPECT_EQ(lc.Status("a").status().code(), absl::StatusCode::kNotFound);
  MutexLock lock(&host_.mu);
  for (const auto& [slot, version] : host_.retired) EXPECT_TRUE(version.expired()) << slot;
}

TEST_F(AdapterLifecycleTest, LoadsOfDifferentNamesRunAtOnce) {
  // Two loads of different names are both inside their read stage at the same time.
  std::atomic<int> reading{0};
  absl::Notification both;
  host_.read_hook = [&](const std::string&) {
    if (++reading == 2) both.Notify();
    EXPECT_TRUE(both.WaitForNotificationWithTimeout(absl::Seconds(60)));
  };
  host_.attaching["a"] = 0;
  host_.attaching["b"] = 0;
  AdapterLifecycle& lc = Make();
  Write("v1", "one");
  std::thread t1([&] { EXPECT_TRUE(lc.Load({.name = "a", .path = "v1"}).ok()); });
  std::thread t2([&] { EXPECT_TRUE(lc.Load({.name = "b", .path = "v1"}).ok()); });
  t1.join();
  t2.join();
  EXPECT_TRUE(both.HasBeenNotified());
  std::vector<AdapterStatus> all = lc.Statuses();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].name, "a");
  EXPECT_EQ(all[1].name, "b");
}

}  // namespace
}  // namespace moleserve::engine
