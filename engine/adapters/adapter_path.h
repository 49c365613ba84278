#pragma once

// What the admin API accepts as adapter names, adapter paths and content digests, and where a
// path may lead. These are the checks every AdapterAdmin request passes before any file is
// opened; the README's "Hot loading" section states the same rules for users.
//
// - Name: 1-128 bytes of A-Z a-z 0-9 . _ -
// - Path: relative to the adapter root, 1-1024 bytes of A-Z a-z 0-9 . _ - /, no component that
//   is `..` (so `good/../good` is refused too: the rule is lexical, stated in one line). NUL,
//   control characters, spaces, backslashes and non-ASCII bytes are refused with a message
//   naming the first offending byte and its offset.
// - sha256: empty, or 64 lowercase hex digits.
// - ConfinedAdapterDir: the path under the root with every symlink followed must stay inside the
//   root, be a directory, and every entry of that directory must resolve inside the root too.
//
// All functions are pure (ConfinedAdapterDir reads the file system) and thread-safe.

#include <filesystem>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moleserve::engine {

inline constexpr size_t kMaxAdapterNameBytes = 128;
inline constexpr size_t kMaxAdapterPathBytes = 1024;

// kInvalidArgument naming the rule that `name` breaks.
absl::Status ValidateAdapterName(std::string_view name);
// kInvalidArgument naming the rule that `path` breaks (see above).
absl::Status ValidateAdapterPath(std::string_view path);
// kInvalidArgument unless empty or 64 lowercase hex digits.
absl::Status ValidateSha256(std::string_view sha256);

// `relative` (already valid by ValidateAdapterPath) resolved under `root`: the canonical
// directory. kInvalidArgument when it or one of its entries resolves outside the root,
// kNotFound when it is not a directory, kFailedPrecondition when the root itself is unusable.
absl::StatusOr<std::string> ConfinedAdapterDir(const std::string& root,
                                               const std::string& relative);

// True when the canonical path `p` is the canonical path `root` or inside it.
bool IsWithin(const std::filesystem::path& root, const std::filesystem::path& p);

}  // namespace moleserve::engine
