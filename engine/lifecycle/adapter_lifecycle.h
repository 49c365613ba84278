#pragma once

// AdapterLifecycle: every adapter name the engine knows, in one table, and the operations that
// move a name between its states: Load (first load or replace), Unload (drain or force),
// Resolve (a request takes a lease on the serving version) and the status views.
//
// A name's states (AdapterState) and what moves it:
//
//              Load                     read + attach + publish
//   (absent) ---------> LOADING -------------------------------------> READY (version v)
//                          |  any stage fails                           |  |
//                          v                                            |  | Load(replace) ok:
//                        FAILED --Load--> LOADING                       |  |   READY (v+1); v
//                          |                                            |  |   retires: its
//                          | Unload (forgets it)                        |  |   requests finish
//                          v                                            |  |   on it, then its
//                       (absent)                                        |  |   slot is freed
//                                                                       |  | Load(replace)
//                  last request ends, or drain_timeout (rest cancelled) |  | fails: READY (v),
//   (absent) <-------------------------------------- DRAINING <---------+  | error set
//                                                         Unload        +--+
//
// - Only READY resolves (LOADING, DRAINING and FAILED are kFailedPrecondition naming why, an
//   absent name kNotFound). A version is visible only after it is fully read, validated and
//   attached; it is published by one assignment under the table's lock.
// - Operations on one name (Load, Unload) are serialized; operations on different names run
//   at once (each reads and parses on its caller's thread).
// - A lease counts its request in the name's in-flight count until it is destroyed; Unload
//   waits on a condition for that count to reach 0 (old and new versions' requests alike).
// - A Load whose sha256 equals the serving version's is a no-op that returns it, so a retried
//   load (one replica of many, a dropped reply) is idempotent.
// - Lookups (Resolve, Status) hold the lock for one map lookup; listings take it 256 names at a
//   time (VisitInChunks), so admission never waits for a listing of 10,000 names.
//
// Thread safety: every method may be called from any thread. Leases must end before the
// lifecycle is destroyed (the engine stops its executor first).

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/adapters/adapter.h"
#include "engine/adapters/adapter_files.h"
#include "engine/adapters/adapter_version.h"
#include "engine/core/mutex.h"
#include "engine/lifecycle/adapter_status.h"
#include "engine/metrics_sink.h"

namespace moleserve::engine {

// What the lifecycle needs from the rest of the engine: engine.cc implements it over the model,
// the tokenizer and the executor; tests implement it with fakes.
class AdapterHost {
 public:
  virtual ~AdapterHost() = default;
  struct Read {
    std::shared_ptr<const Adapter> adapter;
    std::shared_ptr<const ChatTemplate> chat_template;  // null: the base model's
  };
  // Parses and validates the adapter directory `dir` (sizes already checked) as `name`.
  virtual absl::StatusOr<Read> ReadAdapter(const std::string& dir, const std::string& name) = 0;
  // Attaches `adapter` to the model (between engine steps) and returns its slot.
  virtual absl::StatusOr<int32_t> Attach(std::shared_ptr<const Adapter> adapter) = 0;
  // Frees `slot` once nothing references `version` any more.
  virtual void Retire(int32_t slot, std::weak_ptr<const AdapterVersion> version) = 0;
  // Ends every request (waiting or running) of `adapter` with `status`; returns how many.
  virtual int64_t CancelRequests(const Adapter* adapter, absl::Status status) = 0;
  // Device bytes the adapter in `slot` holds now.
  virtual int64_t DeviceBytes(int32_t slot, const Adapter& adapter) const = 0;
};

struct LifecycleOptions {
  // Directory that hot-loaded paths are confined to; empty = hot loads are refused.
  std::string adapter_root;
  int64_t max_file_bytes = int64_t{8} << 30;
  int64_t max_adapter_bytes = int64_t{32} << 30;
  absl::Duration max_load_time = absl::Minutes(10);
  // Nice value of the thread that reads, hashes and parses (0 = the caller's thread as is).
  int32_t load_nice = 10;
  // Called as each stage of a hot load begins ("inspect", "read", "attach"); for tests.
  std::function<void(std::string_view stage)> stage_hook;
  MetricsSink* metrics = nullptr;  // not owned
};

// What one Load asks for.
struct LoadSpec {
  std::string name;
  // Hot load: relative to the adapter root. Start-up (`startup`): a directory read as given.
  std::string path;
  bool replace = false;
  std::string sha256;  // "" or the files' digest (InspectAdapterFiles), checked before parsing
  // The caller has just checked that the files digest to `sha256` (an upload, in its own
  // directory): it is recorded without hashing the files again.
  bool sha256_checked = false;
  absl::Time deadline = absl::InfiniteFuture();
  // A start-up adapter: not confined to the root, no deadline, the name must be new.
  bool startup = false;
};

class AdapterLifecycle {
 private:
  struct Entry;  // one name's row of the table (adapter_lifecycle.cc)

 public:
  AdapterLifecycle(LifecycleOptions options, AdapterHost* host);
  ~AdapterLifecycle();
  AdapterLifecycle(const AdapterLifecycle&) = delete;
  AdapterLifecycle& operator=(const AdapterLifecycle&) = delete;

  // A request's hold on the serving version of a name: counted in flight until destroyed.
  class Lease {
   public:
    Lease() = default;
    Lease(Lease&& other) noexcept;
    Lease& operator=(Lease&& other) noexcept;
    ~Lease();
    const std::shared_ptr<const AdapterVersion>& version() const { return version_; }
    int32_t slot() const { return slot_; }
    explicit operator bool() const { return version_ != nullptr; }

   private:
    friend class AdapterLifecycle;
    void Release();
    AdapterLifecycle* owner_ = nullptr;
    std::shared_ptr<Entry> entry_;  // the row it counts in (kept alive past an unload)
    std::shared_ptr<const AdapterVersion> version_;
    int32_t slot_ = -1;
  };

  // Hot load (or, with spec.startup, a start-up load). Errors, after which a previous version
  // keeps serving: kFailedPrecondition (no adapter root), kAlreadyExists (loaded, no replace),
  // kInvalidArgument (bad name, path, sha256 or content; sha256 mismatch; too large),
  // kNotFound (no such directory), kResourceExhausted (does not fit the expert cache),
  // kDeadlineExceeded (past the deadline at a stage boundary), kUnavailable (StopLoads).
  absl::StatusOr<AdapterSummary> Load(const LoadSpec& spec);

  struct UnloadResult {
    int64_t drained = 0;    // in-flight requests that finished normally during the drain
    int64_t cancelled = 0;  // cancelled (force, or still running at the drain timeout)
  };
  // READY -> DRAINING -> absent (see above); FAILED -> absent. kNotFound when unknown.
  absl::StatusOr<UnloadResult> Unload(const std::string& name, absl::Duration drain_timeout,
                                      bool force);

  // A lease on the serving version of `name`: kNotFound (unknown) or kFailedPrecondition
  // (LOADING, DRAINING or FAILED, the message says which).
  absl::StatusOr<Lease> Resolve(const std::string& name);
  // The serving version without a lease (chat templates), or null.
  std::shared_ptr<const AdapterVersion> Find(const std::string& name) const;

  absl::StatusOr<AdapterStatus> Status(const std::string& name) const;  // kNotFound
  std::vector<AdapterStatus> Statuses() const;                          // by name
  std::vector<AdapterSummary> Summaries() const;                        // READY names, by name
  // Loads in progress stop at their next stage boundary with kUnavailable; later ones are
  // refused the same way (drain, shutdown).
  void StopLoads();

  static AdapterSummary Summarize(const AdapterVersion& v);

 private:
  using EntryPtr = std::shared_ptr<Entry>;
  // Takes the name's operation turn (waiting for one in progress); creates a LOADING entry when
  // `create` and the name is absent; null when absent and not `create`.
  EntryPtr Acquire(const std::string& name, bool create);
  void Release(const EntryPtr& e);
  // Stage boundary: kUnavailable after StopLoads, kDeadlineExceeded past `deadline`.
  absl::Status KeepGoing(const char* stage, absl::Time deadline) const;
  // Load's stages, holding the name's turn; on failure `stage` names the failure reason.
  absl::StatusOr<AdapterSummary> LoadLocked(const LoadSpec& spec, const EntryPtr& e,
                                            AdapterLoadMetrics* m, std::string* stage);
  void EndLease(Entry* e);
  // A name's status as far as the table knows it, with the version it shows (the draining one
  // while DRAINING) and that version's slot: copied under the lock, completed by Fill after it.
  struct Snapshot {
    AdapterStatus status;
    std::shared_ptr<const AdapterVersion> version;
    int32_t slot = -1;
  };
  Snapshot SnapshotOf(const std::string& name, const Entry& e) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The version's summary and sizes (the host's device bytes), outside the lock.
  AdapterStatus Fill(Snapshot snap) const;

  const LifecycleOptions options_;
  // Size limits; a hot load adds confinement to the root (resolved per load).
  const AdapterFileLimits file_limits_;
  AdapterHost* const host_;

  mutable Mutex mu_;
  CondVar turn_cv_;   // an operation on a name ended (its turn is free)
  CondVar drain_cv_;  // a name's in-flight count reached 0
  std::map<std::string, EntryPtr> entries_ ABSL_GUARDED_BY(mu_);
  // The last version number of every name ever published, kept after an unload so that a
  // name's versions never repeat (anything keyed on (name, version) stays correct).
  std::map<std::string, uint64_t> last_version_ ABSL_GUARDED_BY(mu_);
  bool stopped_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace moleserve::engine
