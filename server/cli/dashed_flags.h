#pragma once

// Lets users write flags with dashes (--metrics-port) as well as absl's underscores
// (--metrics_port): rewrites the name part of every "--flag[=value]" argument before
// absl::ParseCommandLine sees it. Arguments after a bare "--" are left alone.

#include <string>
#include <vector>

namespace moleserve::server {

// Returns argv with dashed flag names rewritten; `storage` keeps the rewritten strings alive.
inline std::vector<char*> NormalizeDashedFlags(int argc, char** argv,
                                               std::vector<std::string>* storage) {
  storage->assign(argv, argv + argc);
  bool done = false;
  for (size_t i = 1; i < storage->size(); ++i) {
    std::string& arg = (*storage)[i];
    if (done || arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      done = done || arg == "--";
      continue;
    }
    const size_t end = arg.find('=');
    for (size_t j = 2; j < std::min(end, arg.size()); ++j) {
      if (arg[j] == '-') arg[j] = '_';
    }
  }
  std::vector<char*> out;
  for (std::string& s : *storage) out.push_back(s.data());
  return out;
}

}  // namespace moleserve::server
