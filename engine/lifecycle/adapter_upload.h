#pragma once

// AdapterUpload: an adapter's files arriving over the network (AdapterAdmin.UploadAdapter), for
// replicas that share no volume with the operator. They are written into a fresh staging
// directory under the adapter root and checked before anything is parsed:
//
//   Begin(root, {name, sha256, total_bytes, num_files}, limits)   header checked against limits
//   BeginFile(path, size); Write(bytes)...                         once per file, in any order
//   Finish()                                                       all bytes there, digest ==
//                                                                  sha256; moved into place
//
// Finish moves the directory to <root>/.uploads/<name>/<sha256> (kept while the name serves it,
// so a restart can name it with --adapter) and returns that path relative to the root, for the
// load. Destroying an upload that did not Finish removes its staging directory, so a refused,
// failed or interrupted upload leaves nothing behind. A crash mid-upload leaves only
// <root>/.uploads/.staging, which RemoveStaleStaging clears at start-up.
//
// Paths inside the adapter follow the admin path rule (adapter_path.h) with no empty or `.`
// component; a path given twice, a file over its declared size, a file or upload over the
// size limits (as for a path load), or a declared size that the upload then does not deliver
// is kInvalidArgument; more than the free disk is kResourceExhausted. Not thread-safe: one
// upload is one client stream.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace moleserve::engine {

struct UploadSpec {
  std::string name;
  std::string sha256;  // required: the digest of adapter_files.h
  int64_t total_bytes = 0;
  int64_t num_files = 0;
};

struct UploadLimits {
  int64_t max_file_bytes = int64_t{8} << 30;
  int64_t max_total_bytes = int64_t{32} << 30;
  int64_t max_files = 10000;
  // Nice value of the thread that hashes the files in Finish (0 = the caller's, as is).
  int32_t hash_nice = 0;
};

class AdapterUpload {
 public:
  // Where uploads live, under the adapter root.
  static constexpr std::string_view kUploadsDir = ".uploads";

  static absl::StatusOr<std::unique_ptr<AdapterUpload>> Begin(const std::string& root,
                                                              const UploadSpec& spec,
                                                              const UploadLimits& limits);
  ~AdapterUpload();
  AdapterUpload(const AdapterUpload&) = delete;
  AdapterUpload& operator=(const AdapterUpload&) = delete;

  // Starts the next file; the previous one must be complete.
  absl::Status BeginFile(std::string_view path, int64_t size);
  // The current file's next bytes.
  absl::Status Write(std::string_view bytes);
  // Checks that every declared byte arrived and that the files digest to the header's sha256
  // (`keep_going`, optional, is asked while hashing: a deadline or a drain), then moves them
  // into place. Returns the directory relative to the root.
  absl::StatusOr<std::string> Finish(const std::function<absl::Status()>& keep_going = nullptr);

  const UploadSpec& spec() const { return spec_; }
  int64_t received_bytes() const { return received_; }

  // Removes what uploads interrupted by a crash left (<root>/.uploads/.staging).
  static void RemoveStaleStaging(const std::string& root);
  // Removes the uploaded versions of `name` other than `keep_sha256` ("" = all of them).
  static void RemoveUploadedVersions(const std::string& root, const std::string& name,
                                     const std::string& keep_sha256);

 private:
  AdapterUpload(std::string root, UploadSpec spec, UploadLimits limits, std::string staging);
  absl::Status CloseFile();

  const std::string root_;
  const UploadSpec spec_;
  const UploadLimits limits_;
  const std::string staging_;  // absolute; removed by the destructor unless moved
  bool finished_ = false;
  int fd_ = -1;            // the current file
  std::string file_path_;  // its path in the adapter (for messages)
  int64_t file_size_ = 0;  // declared
  int64_t file_written_ = 0;
  int64_t files_ = 0;
  int64_t received_ = 0;
};

}  // namespace moleserve::engine
