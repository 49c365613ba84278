#pragma once

// Runs a shell command (the Python references, fixture writers) and returns its stdout; *rc is
// pclose's status (0 on success, -1 when the command could not start).

#include <cstdio>
#include <string>

namespace moleserve::test_util {

inline std::string RunCommand(const std::string& cmd, int* rc) {
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  if (pipe == nullptr) {
    *rc = -1;
    return out;
  }
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  *rc = pclose(pipe);
  return out;
}

}  // namespace moleserve::test_util
