#pragma once

// ExpertCache: the device tier of the paged LoRA-expert cache (DESIGN.md section 4).
//
// Host memory holds every attached adapter's LoRA stacks (Adapter, fp32) and, per stack, an image
// of its A and B^T rows in the backend's compute dtype, converted once when the owner is added
// (in page-locked memory while `pinned_host_bytes` allows, so the device copies from it directly;
// with an fp32 compute dtype the image is the stack itself). The device holds a bounded working
// set of the experts in pools of pages; a page is one rank row (one vector of a module's input or
// output width), and there is one pool per distinct width, so experts of mixed ranks never
// fragment a pool and evicting an expert frees exactly the pages it took. A miss is one batch of
// copies on the backend's copy stream with no conversion: consecutive pages take consecutive image
// rows in one copy, so an expert whose pages are consecutive arrives in two copies (A, B^T).
// Kernels reach the rows through the row pointers Acquire hands out (SgmvShrink/SgmvExpandRows row
// tables), so residency changes never move another expert.
//
//   cache.AddOwner(slot, {&stack_q, &stack_v});     // when an adapter is attached
//   cache.Acquire(&stack_q, e, &a_rows, &b_rows);   // pins expert e; copies it in on a miss
//   ... SgmvShrink / SgmvExpandRows over a_rows / b_rows ...
//   cache.Release(&stack_q, e);                     // idle again: evictable, LRU
//   cache.RemoveOwner(slot);                        // when the adapter is detached
//
// Sizing: with capacity_bytes == 0 the pools grow to hold every registered expert (nothing is
// ever evicted for room); on a host backend computing in fp32 there are no pools at all then
// (ExpertCacheOptions::host_backend: the rows are read where the stacks hold them). Otherwise the
// capacity is split between the widths in proportion to the registered experts' rows of each width,
// each pool holding at least the largest single expert's rows of its width (so one expert always
// fits; AddOwner refuses an adapter that would break this). A pool is a list of backend allocations
// (chunks); growing adds a chunk, shrinking drops whole chunks from the tail (evicting their
// experts) and adds one back up to the target.
//
// A pinned expert is never evicted. Acquire fails with kResourceExhausted only when the pool
// cannot make room because every other expert holding pages of the needed width is pinned; the
// caller then releases what it holds and retries with fewer experts (AdapterExecutor splits its
// segmented GEMM), so a step never fails for lack of room.
//
// Thread safety: every method may be called from any thread (one internal mutex; copies of a
// miss run under it). Device memory: owned; the pools are freed with the cache.

#include <cstdint>
#include <list>
#include <map>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "engine/adapters/adapter.h"
#include "engine/backend/backend.h"
#include "engine/core/mutex.h"

namespace moleserve::engine {

struct ExpertCacheOptions {
  // Device bytes for expert pages over all pools; 0 = unbounded.
  int64_t capacity_bytes = 0;
  // Host bytes of page-locked memory for the compute-dtype images (Backend::AllocateHost);
  // images beyond it are kept in ordinary memory (copied through the backend's staging).
  int64_t pinned_host_bytes = int64_t{8} << 30;
  // The backend computes on host memory (the CPU backend). With capacity_bytes == 0 and fp32
  // pages, the pages are then the stacks' own rows: every expert is resident from AddOwner on,
  // nothing is copied and no pool is allocated, so an adapter's experts take their raw bytes
  // once. Ignored otherwise.
  bool host_backend = false;
};

struct ExpertCacheStats {
  int64_t hits = 0;               // Acquire found the expert resident
  int64_t misses = 0;             // Acquire copied it in from host memory
  int64_t prefetched = 0;         // experts copied in by Prefetch
  int64_t evicted_lru = 0;        // evicted to make room
  int64_t evicted_unload = 0;     // pages returned when their adapter was detached
  int64_t evicted_resize = 0;     // evicted because their pool shrank
  int64_t bytes_to_device = 0;    // host -> device bytes (misses and prefetch)
  int64_t copies_to_device = 0;   // contiguous host -> device copies those bytes took
  double copy_seconds = 0;        // time spent copying experts in
  int64_t resident_experts = 0;   // experts with pages now
  int64_t pinned_experts = 0;     // experts pinned now
  int64_t step_experts = 0;       // distinct experts acquired in the current step
  int64_t capacity_bytes = 0;     // bytes of all pools now
  int64_t host_image_bytes = 0;   // compute-dtype images held besides the fp32 stacks
  int64_t host_pinned_bytes = 0;  // of which page-locked
  struct Pool {
    int64_t width = 0;  // elements per page
    int64_t pages = 0;
    int64_t free_pages = 0;
  };
  std::vector<Pool> pools;  // ascending width
};

class ExpertCache {
 public:
  ExpertCache(Backend* backend, ExpertCacheOptions options);
  ~ExpertCache();
  ExpertCache(const ExpertCache&) = delete;
  ExpertCache& operator=(const ExpertCache&) = delete;

  // Registers the LoRA stacks of `owner` (host memory that must outlive the registration) and
  // resizes the pools. kResourceExhausted when a bounded capacity cannot hold one expert of every
  // width next to the experts already registered; kAlreadyExists for a known owner.
  absl::Status AddOwner(int32_t owner, const std::vector<const LoraStack*>& stacks);
  // Frees the owner's pages and forgets its stacks (its experts must not be pinned).
  void RemoveOwner(int32_t owner);

  // Makes expert `expert` of `stack` resident and pins it; appends its `rank` A rows (`in`
  // elements each) to a_rows and its `rank` Bt rows (`out` each) to b_rows. Each Acquire needs
  // one Release. kResourceExhausted: no room while the pinned experts stay pinned (nothing was
  // pinned or appended). kNotFound: the stack is not registered.
  absl::Status Acquire(const LoraStack* stack, int32_t expert, std::vector<const void*>* a_rows,
                       std::vector<const void*>* b_rows);
  void Release(const LoraStack* stack, int32_t expert);
  // Pins every expert of `stack` (rows appended in expert order, each expert then needs one
  // Release) when each is resident or fits the free pages: nothing is evicted for it. Otherwise
  // pins nothing, appends nothing and returns false. (Device routing needs the whole stack; when
  // it would push other experts out, the caller routes on the host and copies in only the routed
  // experts.) kNotFound: the stack is not registered.
  absl::StatusOr<bool> AcquireAllIfRoom(const LoraStack* stack, std::vector<const void*>* a_rows,
                                        std::vector<const void*>* b_rows);

  // Starts a new step of the LRU clock (the engine loop calls it once per step).
  void BeginStep();
  // Copies in up to `max_bytes` of `owner`'s experts that are not resident, into free pages or
  // pages of experts not used in the current or previous step. Returns the bytes copied.
  int64_t Prefetch(int32_t owner, int64_t max_bytes);

  // Device bytes of the owner's resident experts, and of all its experts.
  int64_t ResidentBytes(int32_t owner) const;
  int64_t OwnerBytes(int32_t owner) const;
  // Device bytes of the free pages of all pools.
  int64_t FreeBytes() const;
  // Whether the capacity is bounded (else the pools grow to hold every registered expert).
  bool bounded() const { return options_.capacity_bytes > 0; }
  // Whether the pages are the stacks' own rows (ExpertCacheOptions::host_backend).
  bool zero_copy() const { return zero_copy_; }
  ExpertCacheStats stats() const;

 private:
  struct Pool;
  struct Entry {
    const LoraStack* stack = nullptr;
    int32_t owner = -1;
    int32_t expert = 0;
    int32_t pins = 0;
    int64_t last_step = -1;
    int64_t used_step = -1;  // last step that acquired it (not prefetch)
    bool resident = false;
    std::vector<int32_t> a_pages, b_pages;
    std::list<Entry*>::iterator lru;  // valid while resident; front = most recent
  };
  // A stack's rows in the page dtype, laid out as the stack's: [num_experts * rank, in] A rows,
  // [num_experts * rank, out] B^T rows.
  struct HostImage {
    DeviceBuffer pinned;         // AllocateHost memory, or
    std::vector<char> pageable;  // when over the pinned budget, or
    const char* a = nullptr;     // (the stack itself when the page dtype is fp32)
    const char* bt = nullptr;
    bool is_pinned = false;
    int64_t bytes = 0;  // held by the image (0 when it is the stack)
  };
  struct StackInfo {
    int32_t owner = -1;
    std::vector<Entry> experts;
    HostImage image;
  };

  Pool& PoolFor(int64_t width) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void* PagePtr(const Pool& pool, int32_t page) const;
  // Makes `entry` resident (evicting idle entries that satisfy `evictable`); false when it cannot.
  bool MakeResident(Entry* entry, bool (*evictable)(const Entry&, int64_t step), bool prefetch)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Evict(Entry* entry, int64_t* counter) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds (sign +1) or removes (-1) a registered stack's rows and image bytes in the running
  // totals Repartition and stats() read.
  void Account(const LoraStack& s, int sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Recomputes every pool's page count from the running totals and resizes the pools.
  absl::Status Repartition(bool check_only) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ResizePool(Pool* pool, int64_t pages) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks `entry` used by the current step (counts distinct experts per step).
  void MarkUsed(Entry* entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AppendRows(const Entry& entry, std::vector<const void*>* a_rows,
                  std::vector<const void*>* b_rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Device bytes of one expert of `s` (its A and B^T rows in the page dtype).
  int64_t ExpertBytes(const LoraStack& s) const;
  // n fp32 host values in the page dtype (the backend's compute dtype) at dst.
  void ToDtype(const float* src, int64_t n, char* dst) const;
  // The stack's image; pinned while `*pinned_left` allows (decremented by what it takes).
  HostImage MakeImage(const LoraStack& s, int64_t* pinned_left) const;

  Backend* backend_;  // not owned
  const ExpertCacheOptions options_;
  const ScalarType dtype_;    // of the pages: the backend's compute dtype
  const int64_t elem_bytes_;  // bytes per page element
  const bool zero_copy_;      // host backend, unbounded, fp32: no pools, rows read in place
  mutable Mutex mu_;
  std::map<int64_t, Pool> pools_ ABSL_GUARDED_BY(mu_);  // by width
  std::map<const LoraStack*, StackInfo> stacks_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, std::vector<const LoraStack*>> owners_ ABSL_GUARDED_BY(mu_);
  std::map<int32_t, int64_t> resident_bytes_ ABSL_GUARDED_BY(mu_);  // by owner
  std::list<Entry*> lru_ ABSL_GUARDED_BY(mu_);
  // Per page width: rows of every registered expert, and how many stacks have experts of each
  // size in rows (the largest is the pool's minimum).
  struct Demand {
    int64_t rows = 0;
    std::map<int64_t, int32_t> expert_rows;
  };
  std::map<int64_t, Demand> demand_ ABSL_GUARDED_BY(mu_);
  int64_t image_bytes_ ABSL_GUARDED_BY(mu_) = 0;   // of all images
  int64_t pinned_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // of all images
  int64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  ExpertCacheStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moleserve::engine
