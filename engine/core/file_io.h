#pragma once

// Opening files that come from outside (model and adapter directories, token files) without
// letting a special file block or fool the reader. A FIFO, socket or device named like a weight
// file would block open() or read() forever, or stream endless bytes; so files are opened with
// O_NONBLOCK (open() on a FIFO then returns at once), checked to be regular files with fstat()
// on the opened descriptor (not a racy stat() of the path first), and only then switched back to
// blocking reads.
//
//   ASSIGN_OR_RETURN(std::string text, ReadRegularFile(path, kMaxConfigBytes));
//
// Thread-safe (no state).

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace moleserve::engine {

// An open file descriptor, closed when it goes out of scope.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = other.release();
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// What a non-regular file is, for messages.
inline const char* FileKind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// `path` opened read-only, never blocking on open, and only if it is a regular file (checked on
// the descriptor). `*size` (optional) receives its size. kNotFound when it cannot be opened
// (with errno's text), kInvalidArgument naming what it is when it is not a regular file.
inline absl::StatusOr<UniqueFd> OpenRegularFile(const std::string& path, int64_t* size = nullptr) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY));
  if (fd.get() < 0) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot open"));
  }
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) {
    const int err = errno;  // before anything else can overwrite it
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot stat"));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is ", FileKind(st.st_mode), ", not a regular file"));
  }
  // Regular files never block; clearing O_NONBLOCK keeps read() semantics plain.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags >= 0) ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
  if (size != nullptr) *size = static_cast<int64_t>(st.st_size);
  return fd;
}

// The whole of the regular file `path`, at most `max_bytes` (kInvalidArgument beyond it;
// kDataLoss on a read error).
inline absl::StatusOr<std::string> ReadRegularFile(const std::string& path, int64_t max_bytes) {
  int64_t size = 0;
  absl::StatusOr<UniqueFd> fd = OpenRegularFile(path, &size);
  if (!fd.ok()) return fd.status();
  if (size > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is ", size, " bytes; the limit is ", max_bytes));
  }
  std::string out;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd->get(), buf, sizeof(buf));
    const int err = errno;
    if (n < 0 && err == EINTR) continue;
    if (n < 0) return absl::ErrnoToStatus(err, absl::StrCat(path, ": read failed"));
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    // The file may grow while it is read; the limit holds for what is read.
    if (static_cast<int64_t>(out.size()) > max_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, " is larger than the limit of ", max_bytes, " bytes"));
    }
  }
  return out;
}

}  // namespace moleserve::engine
