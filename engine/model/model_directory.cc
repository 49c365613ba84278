#include "engine/model/model_directory.h"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "engine/core/file_io.h"
#include "engine/core/json_depth.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

namespace fs = std::filesystem;

// config.json and generation_config.json are a few KB; this bounds a hostile one.
constexpr int64_t kMaxConfigBytes = 16 << 20;

absl::StatusOr<std::string> ReadFile(const fs::path& path) {
  return ReadRegularFile(path.string(), kMaxConfigBytes);
}

}  // namespace

absl::StatusOr<ModelDirectory> OpenModelDirectory(const std::string& dir) {
  const fs::path root(dir);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  }
  ModelDirectory out;
  ASSIGN_OR_RETURN(std::string config_text, ReadFile(root / "config.json"));
  absl::StatusOr<ModelConfig> config = ParseHfConfig(config_text);
  if (!config.ok()) {
    return absl::Status(config.status().code(), absl::StrCat(dir, "/", config.status().message()));
  }
  out.config = *std::move(config);
  if (fs::exists(root / "generation_config.json", ec)) {
    ASSIGN_OR_RETURN(std::string gen_text, ReadFile(root / "generation_config.json"));
    nlohmann::json gen = JsonNestingDepth(gen_text) > kMaxJsonDepth
                             ? nlohmann::json(nlohmann::json::value_t::discarded)
                             : nlohmann::json::parse(gen_text, nullptr, /*allow_exceptions=*/false);
    if (gen.is_discarded() || !gen.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, "/generation_config.json is not a JSON object"));
    }
    if (auto it = gen.find("eos_token_id"); it != gen.end() && !it->is_null()) {
      absl::StatusOr<std::vector<int32_t>> eos = ReadTokenIds(*it, "eos_token_id");
      if (!eos.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, "/generation_config.json: ", eos.status().message()));
      }
      if (!eos->empty()) out.config.eos_token_ids = *eos;
    }
    GenerationDefaults& d = out.generation_defaults;
    auto number = [&](const char* key, auto* field) -> absl::Status {
      auto it = gen.find(key);
      if (it == gen.end() || it->is_null()) return absl::OkStatus();
      using T = typename std::decay_t<decltype(*field)>::value_type;
      const bool integral_ok =
          !std::is_integral_v<T> ||
          (it->is_number_integer() && it->get<int64_t>() >= 0 && it->get<int64_t>() <= INT32_MAX);
      if (!it->is_number() || !integral_ok) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, "/generation_config.json: '", key, "' must be a ",
                         std::is_integral_v<T> ? "non-negative 32-bit integer" : "number"));
      }
      *field = it->get<typename std::decay_t<decltype(*field)>::value_type>();
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(number("temperature", &d.temperature));
    RETURN_IF_ERROR(number("top_p", &d.top_p));
    RETURN_IF_ERROR(number("top_k", &d.top_k));
    RETURN_IF_ERROR(number("min_p", &d.min_p));
    RETURN_IF_ERROR(number("repetition_penalty", &d.repetition_penalty));
    RETURN_IF_ERROR(out.config.Validate());
  }

  std::vector<std::string> shards;
  if (fs::exists(root / "model.safetensors", ec)) {
    shards.push_back((root / "model.safetensors").string());
  } else if (fs::exists(root / "model.safetensors.index.json", ec)) {
    ASSIGN_OR_RETURN(std::string index_text, ReadFile(root / "model.safetensors.index.json"));
    nlohmann::json index = JsonNestingDepth(index_text) > kMaxJsonDepth
                               ? nlohmann::json(nlohmann::json::value_t::discarded)
                               : nlohmann::json::parse(index_text, nullptr, false);
    auto map = index.is_object() ? index.find("weight_map") : index.end();
    if (index.is_discarded() || map == index.end() || !map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, "/model.safetensors.index.json has no 'weight_map' object"));
    }
    std::set<std::string> files;
    for (const auto& [name, file] : map->items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat("weight_map entry '", name, "' is not a file name"));
      }
      const std::string f = file.get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "..") {
        return absl::InvalidArgumentError(
            absl::StrCat("weight_map entry '", name, "' names a file outside the directory: ", f));
      }
      files.insert(f);
    }
    for (const std::string& f : files) shards.push_back((root / f).string());
  } else {
    return absl::NotFoundError(
        absl::StrCat("model directory ", dir,
                     " has neither model.safetensors nor model.safetensors.index.json"));
  }
  ASSIGN_OR_RETURN(out.weights, SafetensorsWeightSource::Open(shards));
  out.tokenizer_path = (root / "tokenizer.json").string();
  if (!fs::exists(out.tokenizer_path, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " has no tokenizer.json"));
  }
  return out;
}

}  // namespace moleserve::engine
