#pragma once

// Lets users write flags with dashes (--metrics-port) as well as absl's underscores
// (--metrics_port): rewrites the name part of a "--flag[=value]" argument when the underscored
// name is a registered flag (so values such as `--text --my-prompt` are left alone). Arguments
// after a bare "--" are left alone.
//
// List flags (`list_flags`, e.g. "adapter") may be repeated: absl keeps only the last value of a
// repeated flag, so every "--name=v" / "--name v" is folded into one "--name=v1,v2,...".

#include <algorithm>
#include <string>
#include <vector>

#include "absl/flags/reflection.h"

namespace moleserve::server {

// Returns argv with dashed flag names rewritten; `storage` keeps the rewritten strings alive.
inline std::vector<char*> NormalizeDashedFlags(int argc, char** argv,
                                               std::vector<std::string>* storage,
                                               const std::vector<std::string>& list_flags = {}) {
  storage->assign(argv, argv + argc);
  bool done = false;
  for (size_t i = 1; i < storage->size(); ++i) {
    std::string& arg = (*storage)[i];
    if (done || arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      done = done || arg == "--";
      continue;
    }
    const size_t end = std::min(arg.find('='), arg.size());
    std::string name = arg.substr(2, end - 2);
    std::replace(name.begin(), name.end(), '-', '_');
    // "--noflag" is absl's negation of a boolean flag.
    const bool known = absl::FindCommandLineFlag(name) != nullptr ||
                       (name.rfind("no", 0) == 0 && absl::FindCommandLineFlag(name.substr(2)));
    if (known) arg.replace(2, end - 2, name);
  }
  for (const std::string& flag : list_flags) {
    const std::string eq = "--" + flag + "=", bare = "--" + flag;
    std::string values;
    size_t first = storage->size();
    for (size_t i = 1; i < storage->size();) {
      std::string& arg = (*storage)[i];
      if (arg == "--") break;
      std::string value;
      size_t take = 0;
      if (arg.compare(0, eq.size(), eq) == 0) {
        value = arg.substr(eq.size());
        take = 1;
      } else if (arg == bare && i + 1 < storage->size()) {
        value = (*storage)[i + 1];
        take = 2;
      }
      if (take == 0) {
        ++i;
        continue;
      }
      if (!values.empty() && !value.empty()) values += ",";
      values += value;
      first = std::min(first, i);
      storage->erase(storage->begin() + i, storage->begin() + i + take);
    }
    if (first != storage->size() || !values.empty()) {
      storage->insert(storage->begin() + std::min(first, storage->size()), eq + values);
    }
  }
  std::vector<char*> out;
  for (std::string& s : *storage) out.push_back(s.data());
  return out;
}

}  // namespace moleserve::server
