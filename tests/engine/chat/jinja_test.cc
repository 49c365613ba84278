// engine/chat/jinja.h on its own: Jinja2 semantics the parity corpus (tests/chat_template) does
// not reach, written here with the output Python's jinja2 gives, and how it fails: constructs
// it does not support are named at Parse or Render with their line, raise_exception's message
// reaches the caller, and runaway templates stop.

#include "engine/chat/jinja.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "engine/chat/chat_template.h"

namespace moleserve::engine::jinja {
namespace {

using Json = nlohmann::ordered_json;

std::string Render(const std::string& source, const Json& context = Json::object()) {
  absl::StatusOr<Template> t = Template::Parse(source);
  if (!t.ok()) return "PARSE: " + std::string(t.status().message());
  absl::StatusOr<std::string> out = t->Render(context);
  if (!out.ok()) return "RENDER: " + std::string(out.status().message());
  return *out;
}

TEST(JinjaTest, ExpressionsFollowPython) {
  EXPECT_EQ(Render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1.0 }}"),
            "3 -4 2 3.5 1024 1.0");
  EXPECT_EQ(Render("{{ 'a' if x else 'b' }}{{ 'c' if not x }}", {{"x", false}}), "bc");
  EXPECT_EQ(Render("{{ x or 'fallback' }} {{ y and 'both' }}", {{"x", ""}, {"y", 1}}),
            "fallback both");
  EXPECT_EQ(Render("{{ 'lo' in 'hello' }} {{ 3 not in [1, 2] }} {{ 'k' in {'k': 1} }}"),
            "true true true");
  EXPECT_EQ(Render("{{ [1, 2, 3, 4, 5][1:4:2] | tojson }} {{ 'hello'[::-1] }} {{ [1, 2][-1] }}"),
            "[2, 4] olleh 2");
  EXPECT_EQ(Render("{{ m.missing is defined }} {{ m.a is number }} {{ none is none }}",
                   {{"m", {{"a", 1}}}}),
            "false true true");
}

// Found by chat_template_fuzz: a literal of more digits than int64 holds once threw out of the
// parser. It is a syntax error naming it; a float literal past the range is infinite, as in
// JavaScript (@huggingface/jinja); the largest int64 still parses.
TEST(JinjaTest, NumericLiteralsPastTheirRange) {
  EXPECT_EQ(Render("{{ 1 != 44444444444444444444444444444444 }}"),
            "PARSE: chat template line 1: integer literal out of range: "
            "44444444444444444444444444444444");
  EXPECT_EQ(Render("{{ 9223372036854775807 }}"), "9223372036854775807");
  EXPECT_EQ(Render("{{ 1" + std::string(400, '0') + ".0 > 1.0 }}"), "true");  // infinity
}

TEST(JinjaTest, WhitespaceControlAndBlocks) {
  // trim_blocks and lstrip_blocks as Hugging Face sets them; `-` strips across newlines.
  EXPECT_EQ(Render("  {% if true %}\nA\n  {% endif %}\nB"), "A\nB");
  EXPECT_EQ(Render("x   {{- 'y' -}}   z"), "xyz");
  EXPECT_EQ(Render("{# note #}a{#- note -#}  b"), "ab");
  EXPECT_EQ(Render("{% set greeting %}Hi {{ name }}{% endset %}[{{ greeting }}]", {{"name", "Al"}}),
            "[Hi Al]");
}

TEST(JinjaTest, LoopsScopesAndNamespaces) {
  // A set inside a loop does not leak; a namespace carries state out.
  EXPECT_EQ(Render("{% set n = 0 %}{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}"
                   "{% set n = n + i %}{% set ns.n = ns.n + i %}{% endfor %}{{ n }} {{ ns.n }}"),
            "0 6");
  EXPECT_EQ(Render("{% for i in range(10) %}{% if i == 3 %}{% break %}{% endif %}"
                   "{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}"),
            "02");
  EXPECT_EQ(Render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(Render("{% for k, v in d.items() %}{{ k }}={{ v }}{% if not loop.last %},{% endif %}"
                   "{% endfor %}",
                   {{"d", {{"b", 2}, {"a", 1}}}}),
            "b=2,a=1");  // insertion order
  EXPECT_EQ(Render("{% for x in [1, 2, 3, 4] if x is even %}{{ loop.index }}/{{ loop.length }}:"
                   "{{ x }} {% endfor %}"),
            "1/2:2 2/2:4 ");
  EXPECT_EQ(Render("{% macro tag(name, body='') %}<{{ name }}>{{ body }}</{{ name }}>{% endmacro %}"
                   "{{ tag('b') }}{{ tag('i', body='x') }}"),
            "<b></b><i>x</i>");
}

TEST(JinjaTest, FiltersAndMethods) {
  EXPECT_EQ(Render("{{ '  x  ' | trim }}|{{ 'a,b' .split(',') | join('+') }}|{{ 'ab' | upper }}"),
            "x|a+b|AB");
  EXPECT_EQ(
      Render("{{ x | default('d') }} {{ '' | default('e', true) }} {{ [3, 1] | sort | tojson }}",
             Json::object()),
      "d e [1, 3]");
  EXPECT_EQ(Render("{{ {'a': [1, {'b': 'é\"'}]} | tojson }}"), "{\"a\": [1, {\"b\": \"é\\\"\"}]}");
  EXPECT_EQ(Render("{{ 'Hello'.startswith(('x', 'He')) }} {{ '--a--'.strip('-') }} "
                   "{{ 'a b  c'.split() | length }} {{ 'aXbX'.replace('X', '.') }}"),
            "true a 3 a.b.");
  EXPECT_EQ(Render("{{ d.get('k', 'none') }} {{ d | length }}", {{"d", {{"j", 1}}}}), "none 1");
}

TEST(JinjaTest, FailuresNameWhatWentWrong) {
  EXPECT_EQ(Render("a\n{% include 'x' %}"),
            "PARSE: chat template line 2: unsupported statement 'include'");
  EXPECT_EQ(Render("{% if x %}open"), "PARSE: chat template line 1: 'if' without 'endif'");
  EXPECT_EQ(Render("{{ x | frobnicate }}"),
            "RENDER: chat template line 1: unsupported filter 'frobnicate'");
  EXPECT_EQ(Render("{{ x is frob }}"), "RENDER: chat template line 1: unsupported test 'frob'");
  EXPECT_EQ(Render("{{ raise_exception('Roles must alternate') }}"),
            "RENDER: chat template: Roles must alternate");
  EXPECT_EQ(Render("{{ nope() }}"), "RENDER: chat template line 1: 'nope' is not callable");
  EXPECT_EQ(Render("{{ 'unterminated }}"), "PARSE: chat template line 1: unterminated string");
  // Hostile nesting is refused at Parse, not recursed into.
  EXPECT_EQ(Render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}"),
            "PARSE: chat template line 1: expression nested too deep");
  EXPECT_EQ(Render("{{ " + std::string(5000, '-') + "1 }}"),
            "PARSE: chat template line 1: expression nested too deep");
  std::string blocks;
  for (int i = 0; i < 1000; ++i) blocks += "{% if true %}";
  EXPECT_EQ(Render(blocks), "PARSE: chat template line 1: blocks nested too deep");
  // Values that double in a loop stop at the bound.
  EXPECT_EQ(Render("{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                   "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}"),
            "RENDER: chat template line 1: a value grew too large");
  // Runaway templates stop instead of hanging or overflowing the stack.
  EXPECT_EQ(Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").rfind("RENDER: ", 0),
            0u);
  EXPECT_EQ(Render("{% for i in range(100000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}")
                .rfind("RENDER: ", 0),
            0u);
}

// A model's template from tokenizer_config.json: a string, or named templates ("tool_use" when
// tools are given); special tokens as strings or AddedToken objects; missing and broken ones.
TEST(ChatTemplateTest, FromTokenizerConfig) {
  const std::string dir = ::testing::TempDir() + "/chat_template_model";
  std::filesystem::create_directories(dir);
  auto write = [&](const Json& config) {
    std::ofstream(dir + "/tokenizer_config.json") << config.dump();
  };
  const Json messages = Json::array({{{"role", "user"}, {"content", "hi"}}});
  const Json tools = Json::array({{{"type", "function"}, {"function", {{"name", "f"}}}}});
  write({{"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}}},
         {"eos_token", "</s>"},
         {"chat_template",
          "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}"
          "{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"}});
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Apply(messages, Json(), true), "<s>[hi]></s>");
  EXPECT_EQ(*t->Apply(messages, Json(), false), "<s>[hi]</s>");
  write({{"chat_template",
          Json::array({{{"name", "default"}, {"template", "plain"}},
                       {{"name", "tool_use"}, {"template", "tools={{ tools | length }}"}}})}});
  t = ChatTemplate::FromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Apply(messages, Json(), true), "plain");
  EXPECT_EQ(*t->Apply(messages, tools, true), "tools=1");
  write({{"eos_token", "</s>"}});
  EXPECT_TRUE(absl::IsNotFound(ChatTemplate::FromModelDir(dir).status()));
  EXPECT_TRUE(absl::IsNotFound(ChatTemplate::FromModelDir(dir + "/nowhere").status()));
  write({{"chat_template", "{% include 'x' %}"}});
  absl::Status broken = ChatTemplate::FromModelDir(dir).status();
  EXPECT_TRUE(absl::IsInvalidArgument(broken));
  EXPECT_NE(broken.message().find("unsupported statement 'include'"), std::string::npos) << broken;
  // chat_template.jinja wins over tokenizer_config.json (as in transformers), with its tokens.
  write({{"bos_token", "<s>"}, {"chat_template", "from the config"}});
  std::ofstream(dir + "/chat_template.jinja") << "{{ bos_token }}from the file\n";
  t = ChatTemplate::FromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Apply(messages, Json(), true), "<s>from the file");
  std::filesystem::remove(dir + "/tokenizer_config.json");
  t = ChatTemplate::FromModelDir(dir);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Apply(messages, Json(), true), "from the file");
  // Without tokenizer_config.json the caller's special tokens (an adapter's template uses the
  // base model's).
  std::ofstream(dir + "/chat_template.jinja") << "{{ bos_token }}|{{ eos_token }}";
  t = ChatTemplate::FromModelDir(dir, "<B>", "<E>");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Apply(messages, Json(), true), "<B>|<E>");
  std::ofstream(dir + "/chat_template.jinja") << "{% if %}";
  EXPECT_NE(ChatTemplate::FromModelDir(dir).status().message().find("chat_template.jinja"),
            std::string::npos);
  // Hostile files (an adapter directory is untrusted): deep nesting and size are refused.
  std::filesystem::remove(dir + "/chat_template.jinja");
  std::ofstream(dir + "/tokenizer_config.json")
      << "{\"x\": " << std::string(100000, '[') << std::string(100000, ']') << "}";
  absl::Status deep = ChatTemplate::FromModelDir(dir).status();
  EXPECT_TRUE(absl::IsInvalidArgument(deep));
  EXPECT_NE(deep.message().find("nests deeper"), std::string::npos) << deep;
  std::filesystem::remove(dir + "/tokenizer_config.json");
  {
    std::ofstream big(dir + "/chat_template.jinja");
    const std::string chunk(1 << 20, 'x');
    for (int64_t i = 0; i <= ChatTemplate::kMaxChatFileBytes >> 20; ++i) big << chunk;
  }
  absl::Status large = ChatTemplate::FromModelDir(dir).status();
  EXPECT_TRUE(absl::IsInvalidArgument(large));
  EXPECT_NE(large.message().find("limit"), std::string::npos) << large;
  // A FIFO named like a template is refused, not waited on.
  std::filesystem::remove(dir + "/chat_template.jinja");
  ASSERT_EQ(mkfifo((dir + "/chat_template.jinja").c_str(), 0600), 0);
  absl::Status fifo = ChatTemplate::FromModelDir(dir).status();
  EXPECT_TRUE(absl::IsInvalidArgument(fifo)) << fifo;
  EXPECT_NE(fifo.message().find("FIFO"), std::string::npos) << fifo;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moleserve::engine::jinja
