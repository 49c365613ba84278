#pragma once

// VisitInChunks: walks a mutex-guarded std::map in key order while holding the mutex for at most
// `chunk` entries at a time, so a listing of ten thousand entries never keeps the lock from the
// threads that need it for one lookup (admission, loads). Entries inserted or erased between
// chunks may or may not be seen; each one visited is seen whole, under the lock.
//
//   VisitInChunks(&mu_, records_, 256, [&](const std::string& name, const Record& r) { ... });

#include <cstddef>
#include <iterator>
#include <optional>

#include "engine/core/mutex.h"

namespace moleserve::engine {

// fn(key, value) runs with `mu` held and must not take it again.
template <typename Map, typename Fn>
void VisitInChunks(Mutex* mu, const Map& map, size_t chunk,
                   Fn&& fn) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  std::optional<typename Map::key_type> last;
  for (bool more = true; more;) {
    MutexLock lock(mu);
    auto it = last ? map.upper_bound(*last) : map.begin();
    size_t n = 0;
    for (; it != map.end() && n < chunk; ++it, ++n) fn(it->first, it->second);
    more = it != map.end() && n > 0;
    if (more) last = std::prev(it)->first;
  }
}

}  // namespace moleserve::engine
