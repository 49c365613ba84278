#include "engine/chat/chat_template.h"

#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/core/file_io.h"
#include "engine/core/json_depth.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {
namespace {

using Json = nlohmann::ordered_json;

// A special token as tokenizer_config.json writes it: a string or an AddedToken object.
std::string TokenText(const Json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) {
    return j["content"].get<std::string>();
  }
  return "";
}

}  // namespace

absl::StatusOr<ChatTemplate> ChatTemplate::FromModelDir(const std::string& dir,
                                                        const std::string& default_bos,
                                                        const std::string& default_eos) {
  const std::filesystem::path path = std::filesystem::path(dir) / "tokenizer_config.json";
  const std::filesystem::path jinja_path = std::filesystem::path(dir) / "chat_template.jinja";
  // A file's text, bounded and only from a regular file (model and adapter directories are
  // not trusted: a FIFO named like a template must not block the load); none when absent.
  auto read = [](const std::filesystem::path& p) -> absl::StatusOr<std::optional<std::string>> {
    absl::StatusOr<std::string> text = ReadRegularFile(p.string(), kMaxChatFileBytes);
    if (absl::IsNotFound(text.status())) return std::optional<std::string>();
    if (!text.ok()) return text.status();
    return std::optional<std::string>(*std::move(text));
  };
  Json config = Json::object();
  ASSIGN_OR_RETURN(std::optional<std::string> config_text, read(path));
  if (config_text) {
    if (JsonNestingDepth(*config_text) > kMaxJsonDepth) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), " nests deeper than ", kMaxJsonDepth, " levels"));
    }
    config = Json::parse(*config_text, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(path.string(), " is not a JSON object"));
    }
  }
  auto token = [&](const char* key, const std::string& fallback) {
    return config.contains(key) ? TokenText(config[key]) : fallback;
  };
  // Newer checkpoints keep the template in chat_template.jinja, which transformers prefers.
  ASSIGN_OR_RETURN(std::optional<std::string> jinja_text, read(jinja_path));
  if (jinja_text) {
    absl::StatusOr<ChatTemplate> t =
        FromSource(*jinja_text, token("bos_token", default_bos), token("eos_token", default_eos));
    if (!t.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(jinja_path.string(), ": ", t.status().message()));
    }
    return t;
  }
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError(absl::StrCat("no chat template in ", dir,
                                            " (chat_template.jinja, or chat_template in "
                                            "tokenizer_config.json)"));
  }
  ChatTemplate t;
  t.bos_token_ = token("bos_token", default_bos);
  t.eos_token_ = token("eos_token", default_eos);
  auto add = [&](const std::string& name, const Json& source) -> absl::Status {
    if (!source.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": chat template '", name, "' is not a string"));
    }
    absl::StatusOr<jinja::Template> parsed = jinja::Template::Parse(source.get<std::string>());
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path.string(), ": chat template '", name, "': ", parsed.status().message()));
    }
    t.templates_.emplace(name, *std::move(parsed));
    return absl::OkStatus();
  };
  if (it->is_string()) {
    RETURN_IF_ERROR(add("default", *it));
  } else if (it->is_array()) {
    for (const Json& named : *it) {
      if (!named.is_object() || !named.contains("name") || !named["name"].is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path.string(), ": chat_template entries need a name and a template"));
      }
      RETURN_IF_ERROR(add(named["name"].get<std::string>(), named.value("template", Json())));
    }
  }
  if (!t.templates_.count("default")) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.string(), ": chat_template has no 'default' template"));
  }
  return t;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromSource(const std::string& source,
                                                      std::string bos_token,
                                                      std::string eos_token) {
  absl::StatusOr<jinja::Template> parsed = jinja::Template::Parse(source);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", parsed.status().message()));
  }
  ChatTemplate t;
  t.templates_.emplace("default", *std::move(parsed));
  t.bos_token_ = std::move(bos_token);
  t.eos_token_ = std::move(eos_token);
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Apply(const Json& messages, const Json& tools,
                                                bool add_generation_prompt) const {
  const bool with_tools = tools.is_array() && !tools.empty();
  auto it = with_tools && templates_.count("tool_use") ? templates_.find("tool_use")
                                                       : templates_.find("default");
  Json context{{"messages", messages},
               {"add_generation_prompt", add_generation_prompt},
               {"bos_token", bos_token_},
               {"eos_token", eos_token_}};
  if (with_tools) context["tools"] = tools;
  return it->second.Render(context);
}

}  // namespace moleserve::engine
