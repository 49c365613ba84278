#include "engine/lifecycle/adapter_upload.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/adapters/adapter_files.h"
#include "engine/adapters/adapter_path.h"
#include "engine/core/background.h"
#include "engine/core/quote.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

// Debian's Abseil has its own string_view.
absl::string_view Absl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

fs::path UploadsDir(const std::string& root) {
  return fs::path(root) / std::string(AdapterUpload::kUploadsDir);
}

absl::Status ErrnoStatus(int err, std::string_view what) {
  const std::string message = absl::StrCat(Absl(what), ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

// The admin path rule, and no empty or `.` component: each path names one file exactly once.
absl::Status ValidateUploadPath(std::string_view path) {
  if (absl::Status st = ValidateAdapterPath(path); !st.ok()) return st;
  for (absl::string_view part : absl::StrSplit(Absl(path), '/')) {
    if (part.empty() || part == ".") {
      return absl::InvalidArgumentError(
          absl::StrCat("file path ", Quote(path), " has an empty or '.' component"));
    }
  }
  return absl::OkStatus();
}

std::string RandomSuffix() {
  std::random_device rd;
  return absl::StrFormat("%08x%08x", rd(), rd());
}

}  // namespace

AdapterUpload::AdapterUpload(std::string root, UploadSpec spec, UploadLimits limits,
                             std::string staging)
    : root_(std::move(root)),
      spec_(std::move(spec)),
      limits_(limits),
      staging_(std::move(staging)) {}

AdapterUpload::~AdapterUpload() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

absl::StatusOr<std::unique_ptr<AdapterUpload>> AdapterUpload::Begin(const std::string& root,
                                                                    const UploadSpec& spec,
                                                                    const UploadLimits& limits) {
  if (root.empty()) {
    return absl::FailedPreconditionError(
        "hot loading is off: start the server with an adapter root");
  }
  if (absl::Status st = ValidateAdapterName(spec.name); !st.ok()) return st;
  if (spec.name[0] == '.') {  // .uploads/.staging is the staging area
    return absl::InvalidArgumentError("an uploaded adapter's name may not start with '.'");
  }
  if (spec.sha256.empty()) {
    return absl::InvalidArgumentError("an upload needs the sha256 of its files");
  }
  if (absl::Status st = ValidateSha256(spec.sha256); !st.ok()) return st;
  if (spec.num_files < 1 || spec.num_files > limits.max_files) {
    return absl::InvalidArgumentError(absl::StrCat("an upload has 1 to ", limits.max_files,
                                                   " files; the header says ", spec.num_files));
  }
  if (spec.total_bytes < 0 || spec.total_bytes > limits.max_total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the upload's ", spec.total_bytes, " bytes exceed the limit of ",
                     limits.max_total_bytes, " bytes per adapter (--max-adapter-bytes)"));
  }
  std::error_code ec;
  const fs::path staging_root = UploadsDir(root) / ".staging";
  fs::create_directories(staging_root, ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot create the upload staging directory under the adapter root: ", ec.message()));
  }
  const fs::space_info space = fs::space(staging_root, ec);
  if (!ec && static_cast<uintmax_t>(spec.total_bytes) > space.available) {
    return absl::ResourceExhaustedError(absl::StrCat("the upload needs ", spec.total_bytes,
                                                     " bytes; the adapter root's file system has ",
                                                     space.available, " free"));
  }
  const fs::path staging = staging_root / absl::StrCat(spec.name, ".", RandomSuffix());
  if (!fs::create_directory(staging, ec) || ec) {
    return absl::InternalError(absl::StrCat("cannot create a staging directory: ", ec.message()));
  }
  return std::unique_ptr<AdapterUpload>(new AdapterUpload(root, spec, limits, staging.string()));
}

absl::Status AdapterUpload::CloseFile() {
  if (fd_ < 0) return absl::OkStatus();
  const int fd = std::exchange(fd_, -1);
  if (file_written_ != file_size_) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat("file ", Quote(file_path_), " ended after ",
                                                   file_written_, " of its ", file_size_,
                                                   " bytes"));
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoStatus(err, absl::StrCat("writing ", Quote(file_path_)));
  }
  if (::close(fd) != 0) return ErrnoStatus(errno, absl::StrCat("writing ", Quote(file_path_)));
  return absl::OkStatus();
}

absl::Status AdapterUpload::BeginFile(std::string_view path, int64_t size) {
  if (finished_) return absl::FailedPreconditionError("the upload is finished");
  if (absl::Status st = CloseFile(); !st.ok()) return st;
  if (files_ >= spec_.num_files) {
    return absl::InvalidArgumentError(
        absl::StrCat("more files than the header's ", spec_.num_files));
  }
  if (absl::Status st = ValidateUploadPath(path); !st.ok()) return st;
  if (size < 0 || size > limits_.max_file_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("file ", Quote(path), " declares ", size,
                                                   " bytes; the limit is ", limits_.max_file_bytes,
                                                   " per file (--max-adapter-file-bytes)"));
  }
  if (received_ + size > spec_.total_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("file ", Quote(path),
                                                   " would bring the upload past the header's ",
                                                   spec_.total_bytes, " bytes"));
  }
  const fs::path file = fs::path(staging_) / std::string(path);
  std::error_code ec;
  fs::create_directories(file.parent_path(), ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot create the directory of ", Quote(path), ": ", ec.message()));
  }
  fd_ = ::open(file.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0640);
  if (fd_ < 0) {
    if (errno == EEXIST) {
      return absl::InvalidArgumentError(absl::StrCat("file ", Quote(path), " is given twice"));
    }
    return ErrnoStatus(errno, absl::StrCat("creating ", Quote(path)));
  }
  file_path_ = std::string(path);
  file_size_ = size;
  file_written_ = 0;
  ++files_;
  return absl::OkStatus();
}

absl::Status AdapterUpload::Write(std::string_view bytes) {
  if (fd_ < 0) return absl::InvalidArgumentError("file data before the file's header");
  if (file_written_ + static_cast<int64_t>(bytes.size()) > file_size_) {
    return absl::InvalidArgumentError(
        absl::StrCat("more bytes than the ", file_size_, " declared for ", Quote(file_path_)));
  }
  while (!bytes.empty()) {
    const ssize_t n = ::write(fd_, bytes.data(), bytes.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, absl::StrCat("writing ", Quote(file_path_)));
    }
    bytes.remove_prefix(static_cast<size_t>(n));
    file_written_ += n;
    received_ += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> AdapterUpload::Finish(const std::function<absl::Status()>& keep_going) {
  if (finished_) return absl::FailedPreconditionError("the upload is finished");
  if (absl::Status st = CloseFile(); !st.ok()) return st;
  if (files_ != spec_.num_files || received_ != spec_.total_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("the upload ended after ", files_, " of ",
                                                   spec_.num_files, " files and ", received_,
                                                   " of ", spec_.total_bytes, " bytes"));
  }
  // The digest before anything is parsed (the load checks it again, from the placed files).
  const AdapterFileLimits limits{.max_file_bytes = limits_.max_file_bytes,
                                 .max_total_bytes = limits_.max_total_bytes,
                                 .confine_to = fs::canonical(staging_).string()};
  absl::StatusOr<AdapterFiles> files = AtBackgroundPriority(limits_.hash_nice, [&] {
    return InspectAdapterFiles(staging_, limits, /*digest=*/true, keep_going);
  });
  if (!files.ok()) return files.status();
  if (files->sha256 != spec_.sha256) {
    return absl::InvalidArgumentError(absl::StrCat("sha256 mismatch: the uploaded files digest to ",
                                                   files->sha256, ", the header says ",
                                                   spec_.sha256));
  }
  const fs::path parent = UploadsDir(root_) / spec_.name;
  const fs::path target = parent / spec_.sha256;
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", Quote(parent.string()), ": ", ec.message()));
  }
  // An earlier upload of the same files may still be there: the copy just checked replaces it,
  // so what is placed is always what was hashed (the load does not hash it again).
  fs::remove_all(target, ec);
  fs::rename(staging_, target, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot move the upload into place: ", ec.message()));
  }
  finished_ = true;
  return (fs::path(std::string(kUploadsDir)) / spec_.name / spec_.sha256).string();
}

void AdapterUpload::RemoveStaleStaging(const std::string& root) {
  if (root.empty()) return;
  std::error_code ec;
  fs::remove_all(UploadsDir(root) / ".staging", ec);
}

void AdapterUpload::RemoveUploadedVersions(const std::string& root, const std::string& name,
                                           const std::string& keep_sha256) {
  if (root.empty() || !ValidateAdapterName(name).ok() || name[0] == '.') return;
  const fs::path dir = UploadsDir(root) / name;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    if (e.path().filename() != keep_sha256) fs::remove_all(e.path(), ec);
  }
  if (keep_sha256.empty()) fs::remove(dir, ec);
}

}  // namespace moleserve::engine
