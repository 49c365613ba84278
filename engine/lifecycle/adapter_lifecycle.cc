#include "engine/lifecycle/adapter_lifecycle.h"

#include <algorithm>
#include <filesystem>
#include <new>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/adapters/adapter_path.h"
#include "engine/core/background.h"
#include "engine/core/chunked_visit.h"
#include "engine/core/quote.h"

namespace moleserve::engine {

// One name's row. Guarded by AdapterLifecycle::mu_; a lease keeps it alive past an unload, so
// that the lease can still count itself out.
struct AdapterLifecycle::Entry {
  AdapterState state = AdapterState::kLoading;
  std::string error;  // FAILED: why; READY: the last failed reload's error, else empty
  std::string path;
  std::string sha256;
  int64_t disk_bytes = 0;
  // READY: the serving version and its slot.
  std::shared_ptr<const AdapterVersion> current;
  int32_t slot = -1;
  // DRAINING: the version being unloaded (no new request can resolve it) and its slot.
  std::weak_ptr<const AdapterVersion> draining;
  int32_t draining_slot = -1;
  // Replaced versions whose requests may still run (expired ones are pruned on each replace).
  std::vector<std::weak_ptr<const AdapterVersion>> retiring;
  int64_t in_flight = 0;  // leases of any version of this name
  bool busy = false;      // a Load or Unload of this name holds its turn
};

namespace {

// Why a load failed, for the load-failure metric.
std::string LoadFailureReason(const absl::Status& status, const char* stage) {
  if (absl::IsAlreadyExists(status)) return "already_exists";
  if (absl::IsResourceExhausted(status)) return "does_not_fit";
  if (absl::IsNotFound(status)) return "not_found";
  if (absl::IsFailedPrecondition(status)) return "disabled";
  if (absl::IsUnavailable(status)) return "shutdown";
  if (absl::IsDeadlineExceeded(status)) return "timeout";
  return stage;
}

// Shown by GetAdapter/ListAdapters: escaped and bounded, whatever file text reached it.
std::string ShownError(const absl::Status& status) {
  const absl::string_view message = status.message();
  return SanitizeMessage(std::string_view(message.data(), message.size()));
}

}  // namespace

const char* AdapterStateName(AdapterState s) {
  switch (s) {
    case AdapterState::kLoading:
      return "LOADING";
    case AdapterState::kReady:
      return "READY";
    case AdapterState::kDraining:
      return "DRAINING";
    case AdapterState::kFailed:
      return "FAILED";
  }
  return "UNKNOWN";
}

AdapterLifecycle::Lease::Lease(Lease&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)),
      entry_(std::move(other.entry_)),
      version_(std::move(other.version_)),
      slot_(std::exchange(other.slot_, -1)) {}

AdapterLifecycle::Lease& AdapterLifecycle::Lease::operator=(Lease&& other) noexcept {
  if (this != &other) {
    Release();
    owner_ = std::exchange(other.owner_, nullptr);
    entry_ = std::move(other.entry_);
    version_ = std::move(other.version_);
    slot_ = std::exchange(other.slot_, -1);
  }
  return *this;
}

AdapterLifecycle::Lease::~Lease() { Release(); }

void AdapterLifecycle::Lease::Release() {
  // The version goes first: an unload that stops waiting sees it expire with the count.
  version_.reset();
  if (owner_ != nullptr && entry_ != nullptr) owner_->EndLease(entry_.get());
  owner_ = nullptr;
  entry_.reset();
}

AdapterLifecycle::AdapterLifecycle(LifecycleOptions options, AdapterHost* host)
    : options_(std::move(options)),
      file_limits_{.max_file_bytes = options_.max_file_bytes,
                   .max_total_bytes = options_.max_adapter_bytes},
      host_(host) {}

AdapterLifecycle::~AdapterLifecycle() = default;

AdapterSummary AdapterLifecycle::Summarize(const AdapterVersion& v) {
  const Adapter& a = *v.adapter;
  AdapterSummary sum{.name = a.name,
                     .family = a.source_family,
                     .format = a.format,
                     .version = v.version,
                     .source = v.source,
                     .num_experts = a.num_experts(),
                     .bytes = a.bytes};
  for (const GroupInfo& g : a.groups) {
    sum.max_experts = std::max(sum.max_experts, g.max_experts);
    sum.ranks.insert(sum.ranks.end(), g.ranks.begin(), g.ranks.end());
    sum.algorithms.push_back(g.algorithm);
  }
  std::sort(sum.ranks.begin(), sum.ranks.end());
  sum.ranks.erase(std::unique(sum.ranks.begin(), sum.ranks.end()), sum.ranks.end());
  return sum;
}

AdapterLifecycle::EntryPtr AdapterLifecycle::Acquire(const std::string& name, bool create) {
  MutexLock lock(&mu_);
  for (;;) {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      if (!create) return nullptr;
      it = entries_.emplace(name, std::make_shared<Entry>()).first;
    }
    EntryPtr e = it->second;
    if (!e->busy) {
      e->busy = true;
      return e;
    }
    // Another operation holds this name: wait for its turn to end, then look again (an unload
    // may have removed the row meanwhile).
    turn_cv_.WaitFor(&mu_, absl::InfiniteDuration(),
                     [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return !e->busy; });
  }
}

void AdapterLifecycle::Release(const EntryPtr& e) {
  MutexLock lock(&mu_);
  e->busy = false;
  turn_cv_.NotifyAll();
}

void AdapterLifecycle::EndLease(Entry* e) {
  MutexLock lock(&mu_);
  if (--e->in_flight == 0) drain_cv_.NotifyAll();
}

void AdapterLifecycle::StopLoads() {
  MutexLock lock(&mu_);
  stopped_ = true;
}

absl::Status AdapterLifecycle::KeepGoing(const char* stage, absl::Time deadline) const {
  {
    MutexLock lock(&mu_);
    if (stopped_) {
      return absl::UnavailableError(
          absl::StrCat("the server is shutting down; the load stopped in its ", stage, " stage"));
    }
  }
  if (absl::Now() > deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("the load passed its deadline in its ", stage, " stage (at most ",
                     absl::FormatDuration(options_.max_load_time), ", --max-adapter-load-time)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterSummary> AdapterLifecycle::Load(const LoadSpec& spec) {
  AdapterLoadMetrics m;
  // Start-up loads are not hot loads: they are not counted in the load metrics.
  auto fail = [&](absl::Status status, const char* stage) {
    m.failure_reason = LoadFailureReason(status, stage);
    if (options_.metrics != nullptr && !spec.startup) options_.metrics->OnAdapterLoad(m);
    return status;
  };
  if (spec.startup) {
    if (spec.name.empty()) return absl::InvalidArgumentError("adapter name is empty");
  } else {
    if (options_.adapter_root.empty()) {
      return fail(absl::FailedPreconditionError(
                      "hot loading is off: start the server with an adapter root"),
                  "disabled");
    }
    if (absl::Status st = ValidateAdapterName(spec.name); !st.ok()) {
      return fail(st, "invalid_name");
    }
  }
  if (absl::Status st = ValidateSha256(spec.sha256); !st.ok()) return fail(st, "invalid_name");

  const EntryPtr e = Acquire(spec.name, /*create=*/true);
  // What the row says before any work is done: an answer now, or nothing (go on and load).
  std::optional<absl::StatusOr<AdapterSummary>> early;
  {
    MutexLock lock(&mu_);
    const bool ready = e->state == AdapterState::kReady;
    if (spec.startup && e->state != AdapterState::kLoading) {  // a row we did not just create
      early = absl::InvalidArgumentError(
          absl::StrCat("adapter name ", Quote(spec.name), " is given twice"));
    } else if (ready && !spec.sha256.empty() && spec.sha256 == e->sha256) {
      early = Summarize(*e->current);  // already serving these files: an idempotent retry
    } else if (ready && !spec.replace) {
      early = absl::AlreadyExistsError(absl::StrCat(
          "adapter ", Quote(spec.name), " is already loaded; set replace to reload it"));
    } else if (!ready) {
      e->state = AdapterState::kLoading;
      e->error.clear();
      e->path = spec.path;
    }
  }
  if (early.has_value()) {
    Release(e);
    if (early->ok()) return *std::move(early);
    return fail(early->status(),
                absl::IsAlreadyExists(early->status()) ? "already_exists" : "invalid_name");
  }
  std::string stage = "invalid_adapter";
  absl::StatusOr<AdapterSummary> result = LoadLocked(spec, e, &m, &stage);
  if (!result.ok()) {
    // A failure leaves a first load FAILED and a reload READY on its previous version.
    MutexLock lock(&mu_);
    e->error = ShownError(result.status());
    if (e->state != AdapterState::kReady) {
      e->state = AdapterState::kFailed;
      e->path = spec.path;
    }
  }
  Release(e);
  if (!result.ok()) return fail(result.status(), stage.c_str());
  if (options_.metrics != nullptr && !spec.startup) options_.metrics->OnAdapterLoad(m);
  return result;
}

absl::StatusOr<AdapterSummary> AdapterLifecycle::LoadLocked(const LoadSpec& spec, const EntryPtr& e,
                                                            AdapterLoadMetrics* m,
                                                            std::string* stage) {
  const absl::Time deadline = spec.startup
                                  ? absl::InfiniteFuture()
                                  : std::min(spec.deadline, absl::Now() + options_.max_load_time);
  absl::Time t0 = absl::Now();
  auto fail_at = [&](absl::Status status, const char* why) {
    *stage = why;
    return status;
  };
  // Entering a stage: the test hook (hot loads), then the deadline and StopLoads.
  auto enter = [&](const char* name) -> absl::Status {
    if (options_.stage_hook && !spec.startup) options_.stage_hook(name);
    return KeepGoing(name, deadline);
  };
  // Reading, hashing and parsing of hot loads run at background priority (load_nice).
  const int nice = spec.startup ? 0 : options_.load_nice;

  // Inspect: where the files are, their sizes and digest, before anything is parsed.
  std::string dir = spec.path;
  AdapterFileLimits limits = file_limits_;
  if (!spec.startup) {
    if (absl::Status st = ValidateAdapterPath(spec.path); !st.ok()) {
      return fail_at(st, "invalid_path");
    }
    if (absl::Status st = enter("inspect"); !st.ok()) return fail_at(st, "timeout");
    absl::StatusOr<std::string> confined = ConfinedAdapterDir(options_.adapter_root, spec.path);
    if (!confined.ok()) return fail_at(confined.status(), "invalid_path");
    dir = *std::move(confined);
    std::error_code ec;
    limits.confine_to = std::filesystem::canonical(options_.adapter_root, ec).string();
  }
  absl::StatusOr<AdapterFiles> files = AtBackgroundPriority(nice, [&] {
    return InspectAdapterFiles(dir, limits, /*digest=*/!spec.sha256.empty() && !spec.sha256_checked,
                               [&] { return KeepGoing("inspect", deadline); });
  });
  if (!files.ok()) {
    const absl::Status& st = files.status();
    return fail_at(
        st, absl::IsDeadlineExceeded(st) || absl::IsUnavailable(st) ? "timeout" : "too_large");
  }
  if (!spec.sha256.empty() && !spec.sha256_checked && files->sha256 != spec.sha256) {
    return fail_at(absl::InvalidArgumentError(
                       absl::StrCat("sha256 mismatch: the files of ", Quote(spec.path),
                                    " digest to ", files->sha256, ", expected ", spec.sha256)),
                   "digest_mismatch");
  }

  // Read: parse and validate into host memory.
  if (absl::Status st = enter("read"); !st.ok()) return fail_at(st, "timeout");
  absl::StatusOr<AdapterHost::Read> read =
      AtBackgroundPriority(nice, [&]() -> absl::StatusOr<AdapterHost::Read> {
        try {
          return host_->ReadAdapter(dir, spec.name);
        } catch (const std::bad_alloc&) {
          return absl::ResourceExhaustedError("out of host memory reading the adapter");
        }
      });
  if (!read.ok()) return fail_at(read.status(), "invalid_adapter");
  m->read_seconds = absl::ToDoubleSeconds(absl::Now() - t0);

  // Attach: the engine loop takes it between steps.
  t0 = absl::Now();
  if (absl::Status st = enter("attach"); !st.ok()) return fail_at(st, "timeout");
  absl::StatusOr<int32_t> slot = host_->Attach(read->adapter);
  if (!slot.ok()) return fail_at(slot.status(), "invalid_adapter");
  m->attach_seconds = absl::ToDoubleSeconds(absl::Now() - t0);

  // Publish: one assignment under the lock; the replaced version retires.
  t0 = absl::Now();
  auto version = std::make_shared<AdapterVersion>();
  version->adapter = std::move(read->adapter);
  version->source = dir;
  version->loaded_at = absl::Now();
  version->chat_template = std::move(read->chat_template);
  std::shared_ptr<const AdapterVersion> old;
  int32_t old_slot = -1;
  {
    MutexLock lock(&mu_);
    version->version = ++last_version_[spec.name];
    old = std::exchange(e->current, version);
    old_slot = std::exchange(e->slot, *slot);
    e->state = AdapterState::kReady;
    e->error.clear();
    e->path = spec.path;
    e->sha256 = spec.sha256_checked ? spec.sha256 : files->sha256;
    e->disk_bytes = files->total_bytes;
    std::erase_if(e->retiring, [](const auto& w) { return w.expired(); });
    if (old != nullptr) e->retiring.push_back(old);
  }
  if (old != nullptr) host_->Retire(old_slot, old);
  m->publish_seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  return Summarize(*version);
}

absl::StatusOr<AdapterLifecycle::UnloadResult> AdapterLifecycle::Unload(
    const std::string& name, absl::Duration drain_timeout, bool force) {
  const EntryPtr e = Acquire(name, /*create=*/false);
  const absl::Status not_loaded =
      absl::NotFoundError(absl::StrCat("adapter ", Quote(name), " is not loaded"));
  if (e == nullptr) return not_loaded;
  std::shared_ptr<const AdapterVersion> version;
  std::vector<std::shared_ptr<const AdapterVersion>> retiring;
  int32_t slot = -1;
  int64_t in_flight = 0;
  {
    MutexLock lock(&mu_);
    if (e->state != AdapterState::kReady) {
      // FAILED (a LOADING row exists only while its load holds the turn): forget it.
      const bool failed = e->state == AdapterState::kFailed;
      if (failed) entries_.erase(name);
      e->busy = false;
      turn_cv_.NotifyAll();
      if (failed) return UnloadResult{};
      return not_loaded;
    }
    version = std::exchange(e->current, nullptr);
    slot = std::exchange(e->slot, -1);
    e->state = AdapterState::kDraining;
    e->draining = version;
    e->draining_slot = slot;
    for (const auto& w : e->retiring) {
      if (auto v = w.lock()) retiring.push_back(std::move(v));
    }
    in_flight = e->in_flight;
  }
  std::weak_ptr<const AdapterVersion> watch = version;
  const Adapter* adapter = version->adapter.get();
  version.reset();
  std::vector<const Adapter*> retiring_adapters;
  for (const auto& v : retiring) retiring_adapters.push_back(v->adapter.get());
  retiring.clear();  // only requests keep old versions alive now
  // Drain: wait until the last request of any of the name's versions has ended.
  bool still_running;
  {
    MutexLock lock(&mu_);
    if (!force) {
      drain_cv_.WaitFor(&mu_, drain_timeout,
                        [&]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return e->in_flight == 0; });
    }
    still_running = e->in_flight > 0;
  }
  UnloadResult result;
  if (still_running) {
    const absl::Status why =
        absl::CancelledError(absl::StrCat("adapter ", Quote(name), " was unloaded"));
    result.cancelled = host_->CancelRequests(adapter, why);
    for (const Adapter* old : retiring_adapters)
      result.cancelled += host_->CancelRequests(old, why);
  }
  result.drained = std::max<int64_t>(0, in_flight - result.cancelled);
  host_->Retire(slot, watch);
  MutexLock lock(&mu_);
  entries_.erase(name);
  e->busy = false;
  turn_cv_.NotifyAll();
  return result;
}

absl::StatusOr<AdapterLifecycle::Lease> AdapterLifecycle::Resolve(const std::string& name) {
  MutexLock lock(&mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrCat(
        "adapter ", Quote(name), " is not loaded; ListModels shows the loaded adapters"));
  }
  const EntryPtr& e = it->second;
  switch (e->state) {
    case AdapterState::kLoading:
      return absl::FailedPreconditionError(
          absl::StrCat("adapter ", Quote(name), " is still loading; retry when it is READY"));
    case AdapterState::kDraining:
      return absl::FailedPreconditionError(
          absl::StrCat("adapter ", Quote(name), " is being unloaded"));
    case AdapterState::kFailed:
      return absl::FailedPreconditionError(
          absl::StrCat("adapter ", Quote(name), " failed to load: ", e->error));
    case AdapterState::kReady:
      break;
  }
  ++e->in_flight;
  Lease lease;
  lease.owner_ = this;
  lease.entry_ = e;
  lease.version_ = e->current;
  lease.slot_ = e->slot;
  return lease;
}

std::shared_ptr<const AdapterVersion> AdapterLifecycle::Find(const std::string& name) const {
  MutexLock lock(&mu_);
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : it->second->current;
}

AdapterLifecycle::Snapshot AdapterLifecycle::SnapshotOf(const std::string& name,
                                                        const Entry& e) const {
  const bool draining = e.state == AdapterState::kDraining;
  Snapshot snap{.status = {.name = name,
                           .state = e.state,
                           .error = e.error,
                           .path = e.path,
                           .sha256 = e.sha256,
                           .disk_bytes = e.disk_bytes,
                           .in_flight = e.in_flight},
                .version = draining ? e.draining.lock() : e.current,
                .slot = draining ? e.draining_slot : e.slot};
  for (const auto& w : e.retiring) snap.status.retiring_versions += w.expired() ? 0 : 1;
  return snap;
}

AdapterStatus AdapterLifecycle::Fill(Snapshot snap) const {
  AdapterStatus& st = snap.status;
  if (const std::shared_ptr<const AdapterVersion>& v = snap.version; v != nullptr) {
    st.has_version = true;
    st.summary = Summarize(*v);
    st.host_bytes = v->adapter->bytes;
    st.device_bytes = host_->DeviceBytes(snap.slot, *v->adapter);
    st.loaded_at = v->loaded_at;
  }
  return std::move(st);
}

absl::StatusOr<AdapterStatus> AdapterLifecycle::Status(const std::string& name) const {
  Snapshot snap;
  {
    MutexLock lock(&mu_);
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      return absl::NotFoundError(absl::StrCat("adapter ", Quote(name), " is not known"));
    }
    snap = SnapshotOf(name, *it->second);
  }
  return Fill(std::move(snap));
}

std::vector<AdapterStatus> AdapterLifecycle::Statuses() const {
  std::vector<Snapshot> snaps;
  VisitInChunks(&mu_, entries_, 256, [&](const std::string& name, const EntryPtr& e) {
    snaps.push_back(SnapshotOf(name, *e));
  });
  std::vector<AdapterStatus> out;
  out.reserve(snaps.size());
  for (Snapshot& snap : snaps) out.push_back(Fill(std::move(snap)));
  return out;
}

std::vector<AdapterSummary> AdapterLifecycle::Summaries() const {
  std::vector<std::shared_ptr<const AdapterVersion>> versions;
  VisitInChunks(&mu_, entries_, 256, [&](const std::string&, const EntryPtr& e) {
    if (e->current != nullptr) versions.push_back(e->current);
  });
  std::vector<AdapterSummary> out;
  out.reserve(versions.size());
  for (const auto& v : versions) out.push_back(Summarize(*v));
  return out;
}

}  // namespace moleserve::engine
