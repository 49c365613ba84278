#include "engine/adapters/tensor_set.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/status_macros.h"
#include "engine/model_io/safetensors.h"

namespace moleserve::engine {

TensorSet::~TensorSet() = default;

absl::StatusOr<std::unique_ptr<TensorSet>> TensorSet::Open(const std::vector<std::string>& paths) {
  std::unique_ptr<TensorSet> set(new TensorSet());
  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    for (const SafetensorsTensor& t : file->tensors()) {
      auto [it, inserted] = set->index_.emplace(t.name, file.get());
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' appears in both ",
                                                       it->second->path(), " and ", path));
      }
    }
    set->files_.push_back(std::move(file));
  }
  return set;
}

std::optional<std::vector<int64_t>> TensorSet::Shape(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return std::nullopt;
  return it->second->Find(name)->shape;
}

absl::StatusOr<std::vector<float>> TensorSet::Read(const std::string& name,
                                                   absl::Span<const int64_t> shape) {
  auto it = index_.find(name);
  if (it == index_.end())
    return absl::InvalidArgumentError(absl::StrCat("missing tensor '", name, "'"));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> out(n);
  RETURN_IF_ERROR(it->second->ReadF32(name, shape, out.data()));
  for (float v : out) {
    if (!std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' contains NaN or Inf"));
    }
  }
  used_.insert(name);
  return out;
}

std::vector<std::string> TensorSet::Unused() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : index_) {
    if (!used_.count(name)) out.push_back(name);
  }
  return out;
}

int64_t TensorSet::TotalElements() const {
  constexpr int64_t kCap = std::numeric_limits<int64_t>::max() / 8;
  int64_t total = 0;
  for (const auto& [name, file] : index_) {
    int64_t n = 1;
    for (int64_t d : file->Find(name)->shape) n = d != 0 && n > kCap / d ? kCap : n * d;
    total = std::min(kCap, total + n);
  }
  return total;
}

std::vector<std::string> TensorSet::Names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : index_) out.push_back(name);
  return out;
}

absl::StatusOr<std::vector<std::string>> ListSafetensors(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".safetensors") out.push_back(entry.path().string());
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  std::sort(out.begin(), out.end());
  if (out.empty()) return absl::NotFoundError(absl::StrCat("no *.safetensors file in ", dir));
  return out;
}

}  // namespace moleserve::engine
