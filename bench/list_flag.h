#pragma once

// "1,16,64" -> {1, 16, 64}: the comma-separated size lists the benchmarks take as flags.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace moleserve::bench {

// The integers of a comma-separated list; an entry that is not an integer ends the program with
// a message naming it (a benchmark's flags are typed by the person running it).
inline std::vector<int> ParseList(const std::string& s) {
  std::vector<int> v;
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    int x = 0;
    if (!absl::SimpleAtoi(part, &x)) {
      std::fprintf(stderr, "not an integer list: %s\n", s.c_str());
      std::exit(2);
    }
    v.push_back(x);
  }
  return v;
}

}  // namespace moleserve::bench
