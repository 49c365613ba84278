#pragma once

// Checks on an adapter directory's files before anything is parsed: size limits per file and per
// adapter, and the adapter's content digest.
//
// Digest: SHA-256 over one line per file, "<sha256 of the file, hex>  ./<path relative to the
// directory>\n", files (regular, symlinks followed) in bytewise order of their paths. The
// coreutils one-liner that computes the same (for paths without whitespace):
//   cd DIR && find -L . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/statusor.h"

namespace moleserve::engine {

struct AdapterFileLimits {
  int64_t max_file_bytes = int64_t{8} << 30;    // any one file
  int64_t max_total_bytes = int64_t{32} << 30;  // all files of the adapter
  int64_t max_entries = 100000;                 // files, directories and links, at any depth
  // When set (a canonical directory), every entry at any depth, symlinks followed, must resolve
  // inside it: a link nested in a subdirectory cannot reach outside the adapter root.
  std::string confine_to;
};

struct AdapterFiles {
  int64_t num_files = 0;
  int64_t total_bytes = 0;
  std::string sha256;  // hex; empty unless asked for
};

// kInvalidArgument naming the file when a limit is exceeded or an entry leaves `confine_to`;
// kNotFound when `dir` cannot be read. `keep_going` (optional) is asked every 256 entries listed,
// before each file hashed and every 64 MiB hashed; a non-OK answer stops the inspection and is
// returned (a load's deadline or a drain).
absl::StatusOr<AdapterFiles> InspectAdapterFiles(
    const std::string& dir, const AdapterFileLimits& limits, bool digest,
    const std::function<absl::Status()>& keep_going = nullptr);

}  // namespace moleserve::engine
