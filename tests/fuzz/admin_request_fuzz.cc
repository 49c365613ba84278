// Fuzzes the admin LoadAdapter request path up to the point where files are opened: ParseRequest
// (server/grpc/wire.h) into moleserve.v1.LoadAdapterRequest, then ValidateAdapterName /
// ValidateAdapterPath / ValidateSha256 and ConfinedAdapterDir (engine/adapters/adapter_path.h)
// against a small fixed adapter root. The same checks also run on the raw input split at 0xff bytes
// into name, path and sha256 (bytes the proto's UTF-8 check would refuse included).
//
// The root (created once):  root/good/{a.json, sub/}  root/file.txt  root/empty/
//                           root/out -> ../outside   root/leaky/{x -> ../../outside/secret}
//                           root/self -> .           outside/secret
// Invariants: each validator accepts exactly its documented language (checked by a reference
// implementation here); ConfinedAdapterDir accepts only directories whose canonical path is the
// root or inside it, never anything under `outside`.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/match.h"
#include "engine/adapters/adapter_path.h"
#include "google/protobuf/stubs/logging.h"
#include "moleserve/v1/admin.pb.h"
#include "server/grpc/wire.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

namespace fs = std::filesystem;

std::string* root = nullptr;     // canonical
std::string* outside = nullptr;  // canonical

bool NameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

bool RefName(std::string_view s) {
  if (s.empty() || s.size() > engine::kMaxAdapterNameBytes) return false;
  for (char c : s) {
    if (!NameChar(c)) return false;
  }
  return true;
}

bool RefPath(std::string_view s) {
  if (s.empty() || s.size() > engine::kMaxAdapterPathBytes || s.front() == '/') return false;
  for (char c : s) {
    if (!NameChar(c) && c != '/') return false;
  }
  size_t start = 0;
  while (true) {
    const size_t end = s.find('/', start);
    if (s.substr(start, end == std::string_view::npos ? end : end - start) == "..") return false;
    if (end == std::string_view::npos) return true;
    start = end + 1;
  }
}

bool RefSha(std::string_view s) {
  if (s.empty()) return true;
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return true;
}

void Check(std::string_view name, std::string_view path, std::string_view sha256) {
  const absl::Status n = engine::ValidateAdapterName(name);
  FUZZ_CHECK_MSG(n.ok() == RefName(name), n.ToString());
  const absl::Status s = engine::ValidateSha256(sha256);
  FUZZ_CHECK_MSG(s.ok() == RefSha(sha256), s.ToString());
  const absl::Status p = engine::ValidateAdapterPath(path);
  FUZZ_CHECK_MSG(p.ok() == RefPath(path), p.ToString());
  for (const absl::Status* st : {&n, &s, &p}) {
    FUZZ_CHECK(st->ok() ||
               (st->code() == absl::StatusCode::kInvalidArgument && !st->message().empty()));
  }
  if (!p.ok()) return;
  absl::StatusOr<std::string> dir = engine::ConfinedAdapterDir(*root, std::string(path));
  if (!dir.ok()) {
    const absl::StatusCode code = dir.status().code();
    FUZZ_CHECK_MSG(
        code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound,
        dir.status().ToString());
    return;
  }
  std::error_code ec;
  const fs::path canonical = fs::canonical(*dir, ec);
  FUZZ_CHECK_MSG(!ec && fs::is_directory(canonical, ec), *dir);
  const std::string c = canonical.string();
  FUZZ_CHECK_MSG(c == *root || absl::StartsWith(c, *root + "/"), c);
  FUZZ_CHECK_MSG(!absl::StartsWith(c, *outside), c);
  // The directory holding an entry that links outside is refused.
  FUZZ_CHECK_MSG(c != *root + "/leaky", c);
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  using namespace moleserve::fuzz;  // NOLINT(build/namespaces)
  google::protobuf::SetLogHandler(nullptr);
  const fs::path base = ScratchDir();
  const fs::path r = base / "root";
  const fs::path o = base / "outside";
  fs::create_directories(r / "good" / "sub");
  fs::create_directories(r / "empty");
  fs::create_directories(r / "leaky");
  fs::create_directories(o);
  WriteFileOrDie((r / "good" / "a.json").string(), "{}");
  WriteFileOrDie((r / "file.txt").string(), "x");
  WriteFileOrDie((o / "secret").string(), "s");
  fs::create_directory_symlink("../outside", r / "out");
  fs::create_symlink("../../outside/secret", r / "leaky" / "x");
  fs::create_directory_symlink(".", r / "self");
  root = new std::string(fs::canonical(r).string());
  outside = new std::string(fs::canonical(o).string());
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moleserve::fuzz;  // NOLINT(build/namespaces)
  moleserve::v1::LoadAdapterRequest request;
  const absl::Status parsed = moleserve::server::ParseRequest(AsView(data, size), &request);
  if (parsed.ok()) {
    Check(request.name(), request.path(), request.sha256());
  } else {
    FUZZ_CHECK_MSG(parsed.code() == absl::StatusCode::kInvalidArgument, parsed.ToString());
  }
  const std::string_view in = AsView(data, size);
  std::string_view fields[3];
  size_t start = 0;
  for (int i = 0; i < 3; ++i) {
    const size_t end = i < 2 ? in.find('\xff', start) : std::string_view::npos;
    fields[i] = in.substr(std::min(start, in.size()),
                          end == std::string_view::npos ? std::string_view::npos : end - start);
    if (end == std::string_view::npos) {
      start = in.size();
    } else {
      start = end + 1;
    }
  }
  Check(fields[0], fields[1], fields[2]);
  return 0;
}
