#include "engine/adapters/adapter_files.h"

#include <openssl/evp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/adapters/adapter_path.h"
#include "engine/core/file_io.h"
#include "engine/core/quote.h"

namespace moleserve::engine {
namespace {

using DigestContext = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;

std::string Hex(const unsigned char* bytes, unsigned int n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < n; ++i) {
    out.push_back(kDigits[bytes[i] >> 4]);
    out.push_back(kDigits[bytes[i] & 15]);
  }
  return out;
}

absl::StatusOr<std::string> Sha256Hex(const std::filesystem::path& file,
                                      const std::function<absl::Status()>& keep_going) {
  DigestContext ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("sha256: cannot initialise a digest");
  }
  absl::StatusOr<UniqueFd> fd = OpenRegularFile(file.string());
  if (!fd.ok()) return fd.status();
  std::vector<char> buf(1 << 20);
  for (int64_t chunk = 1;; ++chunk) {
    if (keep_going && chunk % 64 == 0) {
      if (absl::Status st = keep_going(); !st.ok()) return st;
    }
    const ssize_t n = ::read(fd->get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("error reading '", file.string(), "'"));
    if (n == 0) break;
    EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n));
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &len);
  return Hex(md, len);
}

std::string Sha256Hex(const std::string& text) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(text.data(), text.size(), md, &len, EVP_sha256(), nullptr);
  return Hex(md, len);
}

}  // namespace

absl::StatusOr<AdapterFiles> InspectAdapterFiles(const std::string& dir,
                                                 const AdapterFileLimits& limits, bool digest,
                                                 const std::function<absl::Status()>& keep_going) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::pair<std::string, fs::path>> files;  // "./relative", path
  fs::recursive_directory_iterator it(dir, fs::directory_options::follow_directory_symlink, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list '", dir, "': ", ec.message()));
  AdapterFiles out;
  const fs::path root = limits.confine_to;
  int64_t entries = 0;
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) break;
    if (it.depth() > 8) {
      return absl::InvalidArgumentError("adapter directory nests deeper than 8 levels");
    }
    if (++entries > limits.max_entries) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter directory has more than ", limits.max_entries, " entries"));
    }
    if (keep_going && entries % 256 == 0) {
      if (absl::Status st = keep_going(); !st.ok()) return st;
    }
    if (!root.empty()) {
      // Checked before the iterator descends into a symlinked directory.
      const fs::path target = fs::weakly_canonical(it->path(), ec);
      if (ec || !IsWithin(root, target)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "adapter entry ", Quote(it->path().lexically_relative(dir).generic_string()),
            " links outside the adapter root"));
      }
    }
    if (!fs::is_regular_file(it->path(), ec)) continue;  // follows symlinks
    const int64_t size = static_cast<int64_t>(fs::file_size(it->path(), ec));
    if (ec) break;
    const std::string rel = "./" + fs::relative(it->path(), dir, ec).generic_string();
    if (size > limits.max_file_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("adapter file ", Quote(rel.substr(2)), " is ",
                                                     size, " bytes; the limit per file is ",
                                                     limits.max_file_bytes));
    }
    out.total_bytes += size;
    ++out.num_files;
    if (out.total_bytes > limits.max_total_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter files exceed ", limits.max_total_bytes, " bytes, the limit per adapter"));
    }
    files.emplace_back(rel, it->path());
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list '", dir, "': ", ec.message()));
  if (!digest) return out;
  std::sort(files.begin(), files.end());
  std::string listing;
  for (const auto& [rel, path] : files) {
    if (keep_going) {
      if (absl::Status st = keep_going(); !st.ok()) return st;
    }
    absl::StatusOr<std::string> h = Sha256Hex(path, keep_going);
    if (!h.ok()) return h.status();
    absl::StrAppend(&listing, *h, "  ", rel, "\n");
  }
  out.sha256 = Sha256Hex(listing);
  return out;
}

}  // namespace moleserve::engine
