#include "engine/adapters/adapter_path.h"

#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/core/quote.h"

namespace moleserve::engine {
namespace {

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// "byte 0x0a (a control character) at offset 4".
std::string DescribeByte(std::string_view text, size_t offset) {
  const auto byte = static_cast<unsigned char>(text[offset]);
  const char* what = byte == 0      ? "NUL"
                     : byte < 0x20  ? "a control character"
                     : byte == 0x7f ? "DEL"
                     : byte >= 0x80 ? "a non-ASCII byte"
                     : byte == ' '  ? "a space"
                                    : "a character outside the allowed set";
  return absl::StrFormat("byte 0x%02x (%s) at offset %d", byte, what, offset);
}

}  // namespace

bool IsWithin(const std::filesystem::path& root, const std::filesystem::path& p) {
  auto r = root.begin();
  auto q = p.begin();
  for (; r != root.end(); ++r, ++q) {
    if (q == p.end() || *r != *q) return false;
  }
  return true;
}

absl::Status ValidateAdapterName(std::string_view name) {
  if (name.empty() || name.size() > kMaxAdapterNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("adapter name is ", name.size(),
                                                   " bytes; it must be 1-", kMaxAdapterNameBytes,
                                                   " characters of A-Z a-z 0-9 . _ -"));
  }
  const auto bad = std::find_if_not(name.begin(), name.end(), IsNameChar);
  if (bad != name.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter name ", Quote(name), " has ", DescribeByte(name, bad - name.begin()),
                     "; names are 1-", kMaxAdapterNameBytes, " characters of A-Z a-z 0-9 . _ -"));
  }
  return absl::OkStatus();
}

absl::Status ValidateAdapterPath(std::string_view path) {
  if (path.empty()) return absl::InvalidArgumentError("adapter path is empty");
  if (path.size() > kMaxAdapterPathBytes) {
    return absl::InvalidArgumentError(absl::StrCat("adapter path is ", path.size(),
                                                   " bytes; the limit is ", kMaxAdapterPathBytes));
  }
  const auto bad =
      std::find_if_not(path.begin(), path.end(), [](char c) { return IsNameChar(c) || c == '/'; });
  if (bad != path.end()) {
    return absl::InvalidArgumentError(absl::StrCat("adapter path ", Quote(path), " has ",
                                                   DescribeByte(path, bad - path.begin()),
                                                   "; paths are relative, of A-Z a-z 0-9 . _ - /"));
  }
  if (path.front() == '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter path ", Quote(path), " is absolute; give it relative to the adapter root"));
  }
  for (absl::string_view part : absl::StrSplit(absl::string_view(path.data(), path.size()), '/')) {
    if (part == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter path ", Quote(path), " has a '..' component; none is accepted"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSha256(std::string_view sha256) {
  if (sha256.empty()) return absl::OkStatus();
  if (sha256.size() != 64 || !std::all_of(sha256.begin(), sha256.end(), [](char c) {
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
      })) {
    return absl::InvalidArgumentError(
        absl::StrCat("sha256 ", Quote(sha256), " is not 64 lowercase hex digits"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ConfinedAdapterDir(const std::string& root,
                                               const std::string& relative) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path canonical_root = fs::canonical(root, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter root ", Quote(root), " is not usable: ", ec.message()));
  }
  const fs::path dir = fs::weakly_canonical(canonical_root / relative, ec);
  if (ec || !IsWithin(canonical_root, dir)) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter path ", Quote(relative), " leaves the adapter root"));
  }
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("adapter path ", Quote(relative),
                                            " is not a directory under the adapter root"));
  }
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const fs::path target = fs::weakly_canonical(entry.path(), ec);
    if (ec || !IsWithin(canonical_root, target)) {
      return absl::InvalidArgumentError(absl::StrCat("adapter file ",
                                                     Quote(entry.path().filename().string()),
                                                     " links outside the adapter root"));
    }
  }
  if (ec) {
    return absl::NotFoundError(absl::StrCat("cannot list ", Quote(relative), ": ", ec.message()));
  }
  return dir.string();
}

}  // namespace moleserve::engine
