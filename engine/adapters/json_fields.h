#pragma once

// Typed, error-reporting accessors for the adapter config files (nlohmann::json never throws
// through these: every type is checked first). Internal to engine/adapters.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine::adapter_json {

using Json = nlohmann::json;

// Parses the file at `path` (size and nesting limited). kNotFound when it does not exist,
// kInvalidArgument when it is not a JSON object.
absl::StatusOr<Json> ParseFile(const std::string& path);

// Each getter: `def` when the key is absent or null (kInvalidArgument "missing key" when there is
// no default), kInvalidArgument naming `ctx.key` on a wrong type.
absl::StatusOr<double> Number(const Json& obj, const std::string& key, std::optional<double> def,
                              const std::string& ctx);
absl::StatusOr<int64_t> Int(const Json& obj, const std::string& key, std::optional<int64_t> def,
                            const std::string& ctx);
absl::StatusOr<bool> Bool(const Json& obj, const std::string& key, std::optional<bool> def,
                          const std::string& ctx);
absl::StatusOr<std::string> String(const Json& obj, const std::string& key,
                                   std::optional<std::string> def, const std::string& ctx);
// A number, or a list of numbers with one entry per layer; returns num_layers values.
absl::StatusOr<std::vector<double>> PerLayer(const Json& obj, const std::string& key,
                                             std::optional<double> def, int32_t num_layers,
                                             const std::string& ctx);
// A list of strings (a single string is a one-element list).
absl::StatusOr<std::vector<std::string>> StringList(const Json& obj, const std::string& key,
                                                    const std::string& ctx);

}  // namespace moleserve::engine::adapter_json
