#include "engine/adapters/json_fields.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/core/file_io.h"
#include "engine/core/json_depth.h"

namespace moleserve::engine::adapter_json {
namespace {

constexpr size_t kMaxConfigBytes = 16 << 20;

const Json* Find(const Json& obj, const std::string& key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::Status Missing(const std::string& ctx, const std::string& key) {
  return absl::InvalidArgumentError(absl::StrCat(ctx, ": missing key '", key, "'"));
}

absl::Status WrongType(const std::string& ctx, const std::string& key, const char* want) {
  return absl::InvalidArgumentError(absl::StrCat(ctx, ": '", key, "' must be ", want));
}

}  // namespace

absl::StatusOr<Json> ParseFile(const std::string& path) {
  absl::StatusOr<std::string> read = ReadRegularFile(path, kMaxConfigBytes);
  if (!read.ok()) {
    if (absl::IsInvalidArgument(read.status())) return read.status();
    return absl::NotFoundError(absl::StrCat("cannot read ", read.status().message()));
  }
  const std::string& text = *read;
  if (JsonNestingDepth(text) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": JSON nested too deeply"));
  }
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

absl::StatusOr<double> Number(const Json& obj, const std::string& key, std::optional<double> def,
                              const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (def) return *def;
    return Missing(ctx, key);
  }
  if (!v->is_number()) return WrongType(ctx, key, "a number");
  const double d = v->get<double>();
  if (!std::isfinite(d)) return WrongType(ctx, key, "finite");
  return d;
}

absl::StatusOr<int64_t> Int(const Json& obj, const std::string& key, std::optional<int64_t> def,
                            const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (def) return *def;
    return Missing(ctx, key);
  }
  if (!v->is_number_integer()) return WrongType(ctx, key, "an integer");
  return v->get<int64_t>();
}

absl::StatusOr<bool> Bool(const Json& obj, const std::string& key, std::optional<bool> def,
                          const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (def) return *def;
    return Missing(ctx, key);
  }
  if (!v->is_boolean()) return WrongType(ctx, key, "true or false");
  return v->get<bool>();
}

absl::StatusOr<std::string> String(const Json& obj, const std::string& key,
                                   std::optional<std::string> def, const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (def) return *def;
    return Missing(ctx, key);
  }
  if (!v->is_string()) return WrongType(ctx, key, "a string");
  return v->get<std::string>();
}

absl::StatusOr<std::vector<double>> PerLayer(const Json& obj, const std::string& key,
                                             std::optional<double> def, int32_t num_layers,
                                             const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v != nullptr && v->is_array()) {
    if (v->size() != static_cast<size_t>(num_layers)) {
      return absl::InvalidArgumentError(absl::StrCat(ctx, ": '", key, "' lists ", v->size(),
                                                     " values, the base model has ", num_layers,
                                                     " layers"));
    }
    std::vector<double> out;
    for (const Json& e : *v) {
      if (!e.is_number()) return WrongType(ctx, key, "a number or a list of numbers");
      out.push_back(e.get<double>());
      if (!std::isfinite(out.back())) return WrongType(ctx, key, "finite");
    }
    return out;
  }
  absl::StatusOr<double> one = Number(obj, key, def, ctx);
  if (!one.ok()) return one.status();
  return std::vector<double>(num_layers, *one);
}

absl::StatusOr<std::vector<std::string>> StringList(const Json& obj, const std::string& key,
                                                    const std::string& ctx) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return Missing(ctx, key);
  if (v->is_string()) return std::vector<std::string>{v->get<std::string>()};
  if (!v->is_array()) return WrongType(ctx, key, "a list of strings");
  std::vector<std::string> out;
  for (const Json& e : *v) {
    if (!e.is_string()) return WrongType(ctx, key, "a list of strings");
    out.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace moleserve::engine::adapter_json
