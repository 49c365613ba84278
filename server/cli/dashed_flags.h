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
    std::string values;
    bool seen = false;
    size_t first = 0;
    for (size_t i = 1; i < storage->size();) {
      const std::string& arg = (*storage)[i];
      if (arg == "--") break;
      // absl accepts "--name" and "-name", each as "=value" or followed by the value.
      const size_t dashes = arg.compare(0, 2, "--") == 0 ? 2 : arg.compare(0, 1, "-") == 0 ? 1 : 0;
      const std::string rest = arg.substr(dashes);
      std::string value;
      size_t take = 0;
      if (dashes > 0 && rest.compare(0, flag.size() + 1, flag + "=") == 0) {
        value = rest.substr(flag.size() + 1);
        take = 1;
      } else if (dashes > 0 && rest == flag) {
        // A bare flag takes the next argument unless that is another flag (then its value is
        // empty, which the caller reports).
        const bool has_value = i + 1 < storage->size() && (*storage)[i + 1].rfind("-", 0) != 0;
        if (has_value) value = (*storage)[i + 1];
        take = has_value ? 2 : 1;
      }
      if (take == 0) {
        ++i;
        continue;
      }
      if (seen) values += ",";
      values += value;
      if (!seen) first = i;
      seen = true;
      storage->erase(storage->begin() + i, storage->begin() + i + take);
    }
    if (seen) storage->insert(storage->begin() + first, "--" + flag + "=" + values);
  }
  std::vector<char*> out;
  for (std::string& s : *storage) out.push_back(s.data());
  return out;
}

}  // namespace moleserve::server
