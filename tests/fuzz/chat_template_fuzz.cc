// Fuzzes engine/chat/jinja.h: a chat template comes from a model directory's
// tokenizer_config.json or a --chat-template file (downloaded with a model), and it renders
// client messages. Input: the template's source; it is parsed and, when it parses, rendered with
// a conversation (system, user, assistant, a tool call) and once more with the input itself as
// the user's message.
//
// Invariants: Parse and Render return (no crash, no sanitizer report, bounded time and memory:
// nesting, loop iterations and value sizes are bounded); a rendering is at most the output bound;
// rendering twice gives the same result (no hidden state; templates reading the clock aside).

#include <cstdint>
#include <string>

#include "engine/chat/jinja.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

using Json = nlohmann::ordered_json;

Json Context(const std::string& user) {
  return Json{
      {"messages",
       Json::array(
           {{{"role", "system"}, {"content", "Be brief."}},
            {{"role", "user"}, {"content", user}},
            {{"role", "assistant"},
             {"content", ""},
             {"tool_calls",
              Json::array({{{"type", "function"},
                            {"function", {{"name", "f"}, {"arguments", {{"x", 1}}}}}}})}}})},
      {"tools", Json::array({{{"type", "function"}, {"function", {{"name", "f"}}}}})},
      {"add_generation_prompt", true},
      {"bos_token", "<s>"},
      {"eos_token", "</s>"}};
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moleserve;
  const std::string source(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<engine::jinja::Template> t = engine::jinja::Template::Parse(source);
  if (!t.ok()) return 0;
  for (const std::string& user : {std::string("Hello {{ there }} %} é"), source}) {
    const nlohmann::ordered_json context = fuzz::Context(user);
    absl::StatusOr<std::string> a = t->Render(context);
    absl::StatusOr<std::string> b = t->Render(context);
    // (strftime_now reads the clock: the same template may differ between two renderings.)
    if (source.find("strftime_now") == std::string::npos) {
      FUZZ_CHECK(a.ok() == b.ok());
      if (a.ok()) FUZZ_CHECK(*a == *b);
    }
    if (a.ok()) FUZZ_CHECK(a->size() <= (size_t{16} << 20));
  }
  return 0;
}
