#include "engine/expert_cache/expert_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "engine/core/status_macros.h"
#include "kernels/common/bf16.h"

namespace moleserve::engine {

struct ExpertCache::Pool {
  struct Chunk {
    DeviceBuffer buf;
    int32_t first = 0;  // first page id
    int32_t pages = 0;
  };
  int64_t width = 0;
  int32_t pages = 0;
  std::vector<Chunk> chunks;  // ascending page ids, contiguous
  std::vector<int32_t> free;  // free page ids
};

int64_t ExpertCache::ExpertBytes(const LoraStack& s) const {
  return int64_t{s.rank} * (s.in + s.out) * elem_bytes_;
}

void ExpertCache::ToDtype(const float* src, int64_t n, char* dst) const {
  if (dtype_ == ScalarType::kBF16) {
    auto* out = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = kernels::F32ToBf16(src[i]);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  }
}

ExpertCache::ExpertCache(Backend* backend, ExpertCacheOptions options)
    : backend_(backend),
      options_(options),
      dtype_(backend->compute_dtype()),
      elem_bytes_(static_cast<int64_t>(ScalarTypeSize(dtype_))),
      zero_copy_(options.host_backend && options.capacity_bytes == 0 &&
                 dtype_ == ScalarType::kF32) {}
ExpertCache::~ExpertCache() = default;

ExpertCache::Pool& ExpertCache::PoolFor(int64_t width) {
  Pool& pool = pools_[width];
  pool.width = width;
  return pool;
}

void* ExpertCache::PagePtr(const Pool& pool, int32_t page) const {
  // The chunk whose first page is the last one <= page (chunks are sorted and contiguous).
  auto it = std::upper_bound(pool.chunks.begin(), pool.chunks.end(), page,
                             [](int32_t p, const Pool::Chunk& c) { return p < c.first; });
  if (it == pool.chunks.begin()) return nullptr;  // unreachable: pages come from the chunks
  const Pool::Chunk& c = *std::prev(it);
  return c.buf.as<char>() + int64_t{page - c.first} * pool.width * elem_bytes_;
}

ExpertCache::HostImage ExpertCache::MakeImage(const LoraStack& s, int64_t* pinned_left) const {
  HostImage image;
  if (dtype_ == ScalarType::kF32) {  // the stack is already in the page dtype
    image.a = reinterpret_cast<const char*>(s.a.data());
    image.bt = reinterpret_cast<const char*>(s.bt.data());
    return image;
  }
  const int64_t a_elems = static_cast<int64_t>(s.a.size());
  const int64_t bt_elems = static_cast<int64_t>(s.bt.size());
  image.bytes = (a_elems + bt_elems) * elem_bytes_;
  char* base = nullptr;
  if (image.bytes <= *pinned_left) {
    // Page-locked memory may run out before the budget does: ordinary memory then.
    if (absl::StatusOr<DeviceBuffer> buf = backend_->AllocateHost(image.bytes); buf.ok()) {
      image.pinned = std::move(*buf);
      image.is_pinned = true;
      base = image.pinned.as<char>();
      *pinned_left -= image.bytes;
    }
  }
  if (base == nullptr) {
    image.pageable.resize(static_cast<size_t>(image.bytes));
    base = image.pageable.data();
  }
  ToDtype(s.a.data(), a_elems, base);
  ToDtype(s.bt.data(), bt_elems, base + a_elems * elem_bytes_);
  image.a = base;
  image.bt = base + a_elems * elem_bytes_;
  return image;
}

absl::Status ExpertCache::AddOwner(int32_t owner, const std::vector<const LoraStack*>& stacks) {
  auto known = [&] {
    return absl::AlreadyExistsError(absl::StrCat("expert cache: owner ", owner, " is registered"));
  };
  // The images are converted outside the lock, against a reservation of the pinned budget.
  int64_t reserved = 0;
  {
    MutexLock lock(&mu_);
    if (owners_.count(owner)) return known();
    int64_t want = 0;
    for (const LoraStack* s : stacks) want += int64_t{s->num_experts} * ExpertBytes(*s);
    reserved = std::clamp<int64_t>(options_.pinned_host_bytes - pinned_bytes_, 0, want);
    pinned_bytes_ += reserved;
  }
  int64_t pinned_left = reserved;
  std::vector<HostImage> images;
  for (const LoraStack* s : stacks) images.push_back(MakeImage(*s, &pinned_left));
  MutexLock lock(&mu_);
  pinned_bytes_ -= pinned_left;  // what the images did not take
  if (owners_.count(owner)) {
    for (const HostImage& image : images) pinned_bytes_ -= image.is_pinned ? image.bytes : 0;
    return known();
  }
  for (size_t i = 0; i < stacks.size(); ++i) {
    const LoraStack* s = stacks[i];
    StackInfo& info = stacks_[s];
    info.owner = owner;
    info.image = std::move(images[i]);
    info.experts.resize(s->num_experts);
    for (int32_t e = 0; e < s->num_experts; ++e) {
      Entry& entry = info.experts[e];
      entry.stack = s;
      entry.owner = owner;
      entry.expert = e;
      if (zero_copy_) {  // its rows are the stack's: resident for as long as it is registered
        entry.resident = true;
        lru_.push_front(&entry);
        entry.lru = lru_.begin();
        resident_bytes_[owner] += ExpertBytes(*s);
        ++stats_.resident_experts;
      }
    }
  }
  owners_[owner] = stacks;
  for (const LoraStack* s : stacks) Account(*s, +1);
  if (absl::Status fits = Repartition(/*check_only=*/true); !fits.ok()) {
    for (const LoraStack* s : stacks) {
      Account(*s, -1);
      const HostImage& image = stacks_.at(s).image;
      if (image.is_pinned) pinned_bytes_ -= image.bytes;
      stacks_.erase(s);
    }
    owners_.erase(owner);
    return fits;
  }
  return Repartition(/*check_only=*/false);
}

void ExpertCache::Account(const LoraStack& s, int sign) {
  const StackInfo& info = stacks_.at(&s);
  image_bytes_ += sign * info.image.bytes;
  const int64_t rows = int64_t{s.num_experts} * s.rank;
  auto count = [&](int64_t width, int64_t expert_rows) {
    Demand& d = demand_[width];
    d.rows += sign * rows;
    int32_t& n = d.expert_rows[expert_rows];
    n += sign;
    if (n == 0) d.expert_rows.erase(expert_rows);
    if (d.expert_rows.empty()) demand_.erase(width);
  };
  if (s.in == s.out) {  // one expert takes 2 x rank rows of the one width
    demand_[s.in].rows += sign * rows;
    count(s.in, 2 * int64_t{s.rank});
  } else {
    count(s.in, s.rank);
    count(s.out, s.rank);
  }
}

void ExpertCache::RemoveOwner(int32_t owner) {
  MutexLock lock(&mu_);
  auto it = owners_.find(owner);
  if (it == owners_.end()) return;
  for (const LoraStack* s : it->second) {
    for (Entry& e : stacks_.at(s).experts) {
      if (e.resident) Evict(&e, &stats_.evicted_unload);
    }
    Account(*s, -1);
    const HostImage& image = stacks_.at(s).image;
    if (image.is_pinned) pinned_bytes_ -= image.bytes;
    stacks_.erase(s);
  }
  owners_.erase(it);
  resident_bytes_.erase(owner);
  Repartition(/*check_only=*/false).IgnoreError();  // shrinking needs no new memory
}

absl::Status ExpertCache::Repartition(bool check_only) {
  // Rows of each width: all registered experts (demand) and the largest single expert (minimum),
  // kept up to date by Account: O(widths), whatever the number of owners.
  std::map<int64_t, int64_t> demand, minimum;
  for (const auto& [w, d] : demand_) {
    demand[w] = d.rows;
    minimum[w] = d.expert_rows.rbegin()->first;
  }
  std::map<int64_t, int64_t> target = demand;
  if (options_.capacity_bytes > 0) {
    int64_t min_bytes = 0, extra_bytes = 0;
    for (const auto& [w, rows] : minimum) {
      min_bytes += rows * w * elem_bytes_;
      extra_bytes += (demand[w] - rows) * w * elem_bytes_;
    }
    if (min_bytes > options_.capacity_bytes) {
      std::vector<std::string> parts;
      for (const auto& [w, rows] : minimum) parts.push_back(absl::StrCat(rows, " rows of ", w));
      return absl::ResourceExhaustedError(absl::StrCat(
          "expert cache of ", options_.capacity_bytes, " bytes (--expert-cache-bytes) cannot hold ",
          "the largest expert of every row width (", absl::StrJoin(parts, ", "), " elements of ",
          elem_bytes_, " bytes = ", min_bytes, " bytes)"));
    }
    const double spare = static_cast<double>(options_.capacity_bytes - min_bytes);
    for (auto& [w, rows] : target) {
      const int64_t extra = demand[w] - minimum[w];
      int64_t share = 0;
      if (extra_bytes > 0) {
        share = static_cast<int64_t>(
            spare *
            (static_cast<double>(extra * w * elem_bytes_) / static_cast<double>(extra_bytes)) /
            static_cast<double>(w * elem_bytes_));
      }
      rows = std::min(demand[w], minimum[w] + share);
    }
  }
  if (check_only || zero_copy_) return absl::OkStatus();
  // Pools whose width nobody uses any more go away; shrink before growing.
  for (auto& [w, pool] : pools_) {
    if (!target.count(w)) target[w] = 0;
  }
  for (const bool grow : {false, true}) {
    for (const auto& [w, pages] : target) {
      Pool& pool = PoolFor(w);
      if (pages == pool.pages || (pages > pool.pages) != grow) continue;
      RETURN_IF_ERROR(ResizePool(&pool, pages));
    }
  }
  for (auto it = pools_.begin(); it != pools_.end();) {
    it = it->second.pages == 0 ? pools_.erase(it) : std::next(it);
  }
  return absl::OkStatus();
}

absl::Status ExpertCache::ResizePool(Pool* pool, int64_t pages) {
  // Drop whole chunks from the tail while they are above the target, evicting their experts.
  while (!pool->chunks.empty() && pool->pages > pages) {
    const Pool::Chunk& last = pool->chunks.back();
    const int32_t lo = last.first, hi = last.first + last.pages;
    auto in_chunk = [&](const std::vector<int32_t>& p) {
      return std::any_of(p.begin(), p.end(), [&](int32_t id) { return id >= lo && id < hi; });
    };
    std::vector<Entry*> victims;
    bool pinned = false;
    for (Entry* e : lru_) {
      const bool uses = (e->stack->in == pool->width && in_chunk(e->a_pages)) ||
                        (e->stack->out == pool->width && in_chunk(e->b_pages));
      if (!uses) continue;
      pinned = pinned || e->pins > 0;
      victims.push_back(e);
    }
    if (pinned) break;  // stays larger until its experts are released
    for (Entry* e : victims) Evict(e, &stats_.evicted_resize);
    std::erase_if(pool->free, [&](int32_t id) { return id >= lo && id < hi; });
    pool->pages -= last.pages;
    pool->chunks.pop_back();
  }
  if (pool->pages < pages) {
    Pool::Chunk chunk;
    chunk.first = pool->pages;
    chunk.pages = static_cast<int32_t>(pages - pool->pages);
    ASSIGN_OR_RETURN(chunk.buf,
                     backend_->Allocate(int64_t{chunk.pages} * pool->width * elem_bytes_));
    for (int32_t p = chunk.first + chunk.pages - 1; p >= chunk.first; --p) pool->free.push_back(p);
    pool->pages += chunk.pages;
    pool->chunks.push_back(std::move(chunk));
  }
  return absl::OkStatus();
}

void ExpertCache::Evict(Entry* entry, int64_t* counter) {
  if (!zero_copy_) {  // (zero-copy experts hold no pages)
    Pool& pa = pools_.at(entry->stack->in);
    Pool& pb = pools_.at(entry->stack->out);
    // Reversed, so that the next expert takes them in ascending order (consecutive pages, one
    // copy).
    pa.free.insert(pa.free.end(), entry->a_pages.rbegin(), entry->a_pages.rend());
    pb.free.insert(pb.free.end(), entry->b_pages.rbegin(), entry->b_pages.rend());
  }
  entry->a_pages.clear();
  entry->b_pages.clear();
  entry->resident = false;
  lru_.erase(entry->lru);
  resident_bytes_[entry->owner] -= ExpertBytes(*entry->stack);
  --stats_.resident_experts;
  ++*counter;
}

bool ExpertCache::MakeResident(Entry* entry, bool (*evictable)(const Entry&, int64_t step),
                               bool prefetch) {
  const LoraStack& s = *entry->stack;
  auto pa_it = pools_.find(s.in), pb_it = pools_.find(s.out);
  if (pa_it == pools_.end() || pb_it == pools_.end()) return false;
  Pool& pa = pa_it->second;
  Pool& pb = pb_it->second;
  const size_t need_a = s.in == s.out ? 2 * size_t(s.rank) : size_t(s.rank);
  const size_t need_b = s.in == s.out ? 0 : size_t(s.rank);
  auto short_a = [&] { return pa.free.size() < need_a; };
  auto short_b = [&] { return pb.free.size() < need_b; };
  if (short_a() || short_b()) {
    // Oldest first; only idle experts that hold pages of a width still short.
    std::vector<Entry*> candidates(lru_.rbegin(), lru_.rend());
    for (Entry* e : candidates) {
      if (!short_a() && !short_b()) break;
      if (e->pins > 0 || !evictable(*e, step_)) continue;
      const bool holds_a = e->stack->in == s.in || e->stack->out == s.in;
      const bool holds_b = e->stack->in == s.out || e->stack->out == s.out;
      if ((short_a() && holds_a) || (short_b() && holds_b)) Evict(e, &stats_.evicted_lru);
    }
    if (short_a() || short_b()) return false;
  }
  const absl::Time start = absl::Now();
  auto take = [](Pool& pool) {
    const int32_t page = pool.free.back();
    pool.free.pop_back();
    return page;
  };
  for (int32_t i = 0; i < s.rank; ++i) entry->a_pages.push_back(take(pa));
  for (int32_t i = 0; i < s.rank; ++i) entry->b_pages.push_back(take(pb));
  // The expert's rows from the stack's image, consecutive pages of consecutive rows in one copy.
  const HostImage& image = stacks_.at(&s).image;
  const int64_t row0 = int64_t{entry->expert} * s.rank;
  std::vector<Backend::HostToDevice> copies;
  auto add = [&](void* dst, const char* src, int64_t bytes) {
    if (!copies.empty()) {
      Backend::HostToDevice& last = copies.back();
      if (static_cast<char*>(last.dst) + last.bytes == dst &&
          static_cast<const char*>(last.src) + last.bytes == src) {
        last.bytes += static_cast<size_t>(bytes);
        return;
      }
    }
    copies.push_back({dst, src, static_cast<size_t>(bytes), image.is_pinned});
  };
  for (int32_t i = 0; i < s.rank; ++i) {
    add(PagePtr(pa, entry->a_pages[i]), image.a + (row0 + i) * s.in * elem_bytes_,
        s.in * elem_bytes_);
  }
  for (int32_t i = 0; i < s.rank; ++i) {
    add(PagePtr(pb, entry->b_pages[i]), image.bt + (row0 + i) * s.out * elem_bytes_,
        s.out * elem_bytes_);
  }
  const absl::Status copied = backend_->CopyToDeviceBulk(copies);
  entry->resident = true;
  lru_.push_front(entry);
  entry->lru = lru_.begin();
  resident_bytes_[entry->owner] += ExpertBytes(s);
  ++stats_.resident_experts;
  if (!copied.ok()) {  // a failed copy leaves nothing resident
    int64_t ignored = 0;
    Evict(entry, &ignored);
    return false;
  }
  stats_.bytes_to_device += ExpertBytes(s);
  stats_.copies_to_device += static_cast<int64_t>(copies.size());
  stats_.copy_seconds += absl::ToDoubleSeconds(absl::Now() - start);
  if (prefetch) ++stats_.prefetched;
  return true;
}

void ExpertCache::AppendRows(const Entry& entry, std::vector<const void*>* a_rows,
                             std::vector<const void*>* b_rows) {
  if (zero_copy_) {  // the stack's own rows
    const LoraStack& s = *entry.stack;
    const int64_t row0 = int64_t{entry.expert} * s.rank;
    for (int32_t i = 0; i < s.rank; ++i) a_rows->push_back(s.a.data() + (row0 + i) * s.in);
    for (int32_t i = 0; i < s.rank; ++i) b_rows->push_back(s.bt.data() + (row0 + i) * s.out);
    return;
  }
  const Pool& pa = pools_.at(entry.stack->in);
  const Pool& pb = pools_.at(entry.stack->out);
  for (int32_t p : entry.a_pages) a_rows->push_back(PagePtr(pa, p));
  for (int32_t p : entry.b_pages) b_rows->push_back(PagePtr(pb, p));
}

absl::Status ExpertCache::Acquire(const LoraStack* stack, int32_t expert,
                                  std::vector<const void*>* a_rows,
                                  std::vector<const void*>* b_rows) {
  MutexLock lock(&mu_);
  auto it = stacks_.find(stack);
  if (it == stacks_.end()) return absl::NotFoundError("expert cache: unknown LoRA stack");
  if (expert < 0 || expert >= stack->num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert cache: no expert ", expert));
  }
  Entry& entry = it->second.experts[expert];
  if (entry.resident) {
    ++stats_.hits;
    lru_.splice(lru_.begin(), lru_, entry.lru);
  } else {
    auto any_idle = [](const Entry&, int64_t) { return true; };
    if (!MakeResident(&entry, any_idle, /*prefetch=*/false)) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "expert cache: no room for an expert of rank ", stack->rank, " (", stack->in, " -> ",
          stack->out, ") while ", stats_.pinned_experts, " experts are pinned"));
    }
    ++stats_.misses;
  }
  if (entry.pins++ == 0) ++stats_.pinned_experts;
  entry.last_step = step_;
  MarkUsed(&entry);
  AppendRows(entry, a_rows, b_rows);
  return absl::OkStatus();
}

absl::StatusOr<bool> ExpertCache::AcquireAllIfRoom(const LoraStack* stack,
                                                   std::vector<const void*>* a_rows,
                                                   std::vector<const void*>* b_rows) {
  MutexLock lock(&mu_);
  auto it = stacks_.find(stack);
  if (it == stacks_.end()) return absl::NotFoundError("expert cache: unknown LoRA stack");
  std::vector<Entry>& experts = it->second.experts;
  // Enough free pages for the experts not resident? (Checked first: a copy that cannot finish
  // the stack would be wasted.)
  int64_t missing = 0;
  for (const Entry& entry : experts) missing += entry.resident ? 0 : 1;
  if (missing > 0) {
    const int64_t rows = missing * stack->rank;
    const int64_t free_a = static_cast<int64_t>(PoolFor(stack->in).free.size());
    const int64_t free_b = static_cast<int64_t>(PoolFor(stack->out).free.size());
    const bool fits =
        stack->in == stack->out ? free_a >= 2 * rows : free_a >= rows && free_b >= rows;
    if (!fits) return false;
  }
  auto evict_nothing = [](const Entry&, int64_t) { return false; };
  int64_t hits = 0, misses = 0;
  for (Entry& entry : experts) {
    if (entry.resident) {
      ++hits;
    } else if (MakeResident(&entry, evict_nothing, /*prefetch=*/false)) {
      ++misses;
    } else {
      stats_.misses += misses;  // what was copied in stays resident, unpinned
      return false;
    }
  }
  stats_.hits += hits;
  stats_.misses += misses;
  for (Entry& entry : experts) {
    lru_.splice(lru_.begin(), lru_, entry.lru);
    if (entry.pins++ == 0) ++stats_.pinned_experts;
    entry.last_step = step_;
    MarkUsed(&entry);
    AppendRows(entry, a_rows, b_rows);
  }
  return true;
}

void ExpertCache::Release(const LoraStack* stack, int32_t expert) {
  MutexLock lock(&mu_);
  auto it = stacks_.find(stack);
  if (it == stacks_.end() || expert < 0 || expert >= stack->num_experts) return;
  Entry& entry = it->second.experts[expert];
  if (entry.pins > 0 && --entry.pins == 0) --stats_.pinned_experts;
}

void ExpertCache::MarkUsed(Entry* entry) {
  if (entry->used_step == step_) return;
  entry->used_step = step_;
  ++stats_.step_experts;
}

void ExpertCache::BeginStep() {
  MutexLock lock(&mu_);
  ++step_;
  stats_.step_experts = 0;
}

int64_t ExpertCache::Prefetch(int32_t owner, int64_t max_bytes) {
  MutexLock lock(&mu_);
  auto it = owners_.find(owner);
  if (it == owners_.end()) return 0;
  // Experts of the running batch were used this step or the previous one: never evicted here.
  auto cold = [](const Entry& e, int64_t step) { return e.last_step < step - 1; };
  int64_t copied = 0;
  for (const LoraStack* s : it->second) {
    for (Entry& e : stacks_.at(s).experts) {
      if (e.resident) continue;
      if (copied + ExpertBytes(*s) > max_bytes) return copied;
      if (!MakeResident(&e, cold, /*prefetch=*/true)) return copied;
      e.last_step = step_;
      copied += ExpertBytes(*s);
    }
  }
  return copied;
}

int64_t ExpertCache::ResidentBytes(int32_t owner) const {
  MutexLock lock(&mu_);
  auto it = resident_bytes_.find(owner);
  return it == resident_bytes_.end() ? 0 : it->second;
}

int64_t ExpertCache::OwnerBytes(int32_t owner) const {
  MutexLock lock(&mu_);
  auto it = owners_.find(owner);
  if (it == owners_.end()) return 0;
  int64_t bytes = 0;
  for (const LoraStack* s : it->second) bytes += ExpertBytes(*s) * s->num_experts;
  return bytes;
}

int64_t ExpertCache::FreeBytes() const {
  MutexLock lock(&mu_);
  int64_t bytes = 0;
  for (const auto& [width, pool] : pools_) {
    bytes += static_cast<int64_t>(pool.free.size()) * width * elem_bytes_;
  }
  return bytes;
}

ExpertCacheStats ExpertCache::stats() const {
  MutexLock lock(&mu_);
  ExpertCacheStats s = stats_;
  s.capacity_bytes = 0;
  s.host_image_bytes = image_bytes_;
  s.host_pinned_bytes = pinned_bytes_;
  for (const auto& [w, pool] : pools_) {
    s.pools.push_back({w, pool.pages, static_cast<int64_t>(pool.free.size())});
    s.capacity_bytes += int64_t{pool.pages} * w * elem_bytes_;
  }
  return s;
}

}  // namespace moleserve::engine
