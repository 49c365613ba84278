#pragma once

// TensorSet: the tensors of every *.safetensors file in an adapter directory, by name, with
// bookkeeping of which ones a loader consumed (so leftovers can be reported: a tensor nobody reads
// is a converter bug or a feature we do not support, never something to ignore silently).
//
// Thread safety: not thread-safe; one loader uses it.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moleserve::engine {

class SafetensorsFile;

class TensorSet {
 public:
  // Opens `paths` (each a safetensors file). kInvalidArgument when a file is corrupt or a name
  // appears in two files.
  static absl::StatusOr<std::unique_ptr<TensorSet>> Open(const std::vector<std::string>& paths);
  ~TensorSet();

  bool Has(const std::string& name) const { return index_.count(name) > 0; }
  std::optional<std::vector<int64_t>> Shape(const std::string& name) const;
  // Reads tensor `name` as fp32 and marks it used. kInvalidArgument when it is missing, has
  // another shape, or holds NaN or Inf.
  absl::StatusOr<std::vector<float>> Read(const std::string& name, absl::Span<const int64_t> shape);
  // Names never Read, sorted.
  std::vector<std::string> Unused() const;
  std::vector<std::string> Names() const;
  // Elements of all tensors (saturating at INT64_MAX / 8).
  int64_t TotalElements() const;

 private:
  TensorSet() = default;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> index_;
  std::set<std::string> used_;
};

// The *.safetensors files directly inside `dir`, sorted. kNotFound when there are none.
absl::StatusOr<std::vector<std::string>> ListSafetensors(const std::string& dir);

}  // namespace moleserve::engine
