#pragma once

// ChatTemplate: a model's chat template, as transformers' apply_chat_template uses it: the
// model directory's chat_template.jinja (where newer checkpoints keep it), else the
// `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default",
// and "tool_use" when tools are given and it exists), or a template file given by the operator,
// rendered by engine/chat/jinja.h with `messages`, `tools`, `add_generation_prompt`, `bos_token`
// and `eos_token`.
//
//   ASSIGN_OR_RETURN(ChatTemplate t, ChatTemplate::FromModelDir(dir));   // kNotFound: none
//   ASSIGN_OR_RETURN(std::string prompt, t.Apply(messages, tools, /*add_generation_prompt=*/true));
//
// The prompt already holds the template's special tokens (BOS included when the template writes
// it): tokenize it without adding a BOS.
//
// Thread safety: immutable after construction.

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "engine/chat/jinja.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {

class ChatTemplate {
 public:
  // From <dir>/chat_template.jinja, else <dir>/tokenizer_config.json's chat_template (special
  // tokens from tokenizer_config.json either way, else `default_bos` / `default_eos`: an
  // adapter directory may carry only a template). kNotFound when there is neither;
  // kInvalidArgument when a template does not parse, a file is larger than kMaxChatFileBytes or
  // its JSON nests deeper than kMaxJsonDepth (the file and construct named).
  static absl::StatusOr<ChatTemplate> FromModelDir(const std::string& dir,
                                                   const std::string& default_bos = "",
                                                   const std::string& default_eos = "");
  static constexpr int64_t kMaxChatFileBytes = int64_t{64} << 20;
  // From a template's source (a --chat-template file), with the special tokens' text.
  static absl::StatusOr<ChatTemplate> FromSource(const std::string& source, std::string bos_token,
                                                 std::string eos_token);

  // `messages`: OpenAI's list of {role, content, ...}; `tools`: null or OpenAI's list of tools.
  // kInvalidArgument when the template raises (roles out of order...) or fails.
  absl::StatusOr<std::string> Apply(const nlohmann::ordered_json& messages,
                                    const nlohmann::ordered_json& tools,
                                    bool add_generation_prompt) const;

 private:
  std::map<std::string, jinja::Template> templates_;  // by name; "default" always present
  std::string bos_token_, eos_token_;
};

}  // namespace moleserve::engine
