#pragma once

// MOLE_CHECK: invariants (programmer errors) only, never input validation. Crashes with the
// condition, file and line. Abseil 2022-06 has no ABSL_CHECK yet; this is its stand-in.

#include "absl/base/internal/raw_logging.h"

#define MOLE_CHECK(cond) ABSL_RAW_CHECK(cond, #cond)
#define MOLE_CHECK_MSG(cond, msg) ABSL_RAW_CHECK(cond, msg)
#ifdef NDEBUG
#define MOLE_DCHECK(cond) \
  do {                    \
  } while (false && (cond))
#else
#define MOLE_DCHECK(cond) MOLE_CHECK(cond)
#endif
