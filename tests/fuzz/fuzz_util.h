#pragma once

// Helpers shared by the libFuzzer targets of tests/fuzz (no gtest, no engine types).
//
// Multi-file inputs: a target that needs several files (a config and its tensors, config.json and
// generation_config.json, ...) reads its input as parts separated by kPartSeparator; the
// dictionaries list the separator so that libFuzzer inserts it. Files go to one private temp
// directory per process (TMPDIR, else /dev/shm, else /tmp), removed at exit.
//
// FUZZ_CHECK is an invariant of the code under test: it aborts (a libFuzzer crash) with the
// condition and, optionally, a message.

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace moleserve::fuzz {

inline constexpr std::string_view kPartSeparator = "\n@@@@\n";

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (false)

#define FUZZ_CHECK_MSG(cond, msg)                                                           \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s: %s\n", __FILE__, __LINE__, #cond, \
                   std::string(msg).c_str());                                               \
      std::abort();                                                                         \
    }                                                                                       \
  } while (false)

inline std::string_view AsView(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

// `input` split at kPartSeparator into exactly `n` parts: missing parts are empty, separators
// after the (n-1)-th stay inside the last part.
inline std::vector<std::string_view> SplitParts(std::string_view input, size_t n) {
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < n) {
    const size_t at = input.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(input.substr(0, at));
    input.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(input);
  parts.resize(n);
  return parts;
}

// The process's private scratch directory (created on first use, removed at exit).
inline const std::string& ScratchDir() {
  static const std::string* dir = [] {
    std::string base = "/tmp";
    if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0') {
      base = t;
    } else if (std::filesystem::is_directory("/dev/shm")) {
      base = "/dev/shm";
    }
    std::string templ = base + "/moleserve-fuzz-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    auto* d = new std::string(templ);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(ScratchDir(), ec);
    });
    return d;
  }();
  return *dir;
}

// Writes `bytes` to `path` (truncating); aborts when it cannot (that is the harness, not a find).
inline void WriteFileOrDie(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::abort();
  }
}

// Removes `path` if it exists.
inline void RemoveFile(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove(path, ec);
}

}  // namespace moleserve::fuzz
