#pragma once

// jinja: the subset of Jinja2 that Hugging Face chat templates use (issue 18), rendering as
// Hugging Face's own engines do (`@huggingface/jinja`, transformers' jinja2 environment with
// trim_blocks and lstrip_blocks): the template's final newline is dropped, a block tag's line
// indentation and the newline after it are removed.
//
//   ASSIGN_OR_RETURN(jinja::Template t, jinja::Template::Parse(source));
//   ASSIGN_OR_RETURN(std::string prompt, t.Render(context));   // context: a JSON object
//
// Supported: {{ }}, {% %}, {# #} with whitespace control (-); if/elif/else, for (loop.index,
// index0, first, last, length, revindex, revindex0, previtem, nextitem; `else`; an `if` filter;
// unpacking `a, b`), set (names, namespace attributes, `set x %}...{% endset`), macro with
// defaults, break/continue; literals (strings, numbers, true/false/none, lists, dicts, tuples),
// attribute and item access, slices, calls, filters, tests, `a if b else c`, and, or, not, in,
// not in, is, is not, comparisons, + - * / // % ~. Filters: trim, tojson (indent), length/count,
// upper, lower, title, capitalize, default/d, join, items, string, first, last, reverse, list,
// int, float, abs, round, replace, unique, map(attribute=), select/reject(test), selectattr,
// rejectattr, indent, sort, safe, e/escape (none: chat templates do not escape). Tests: defined,
// undefined, none, string, number, integer, float, boolean, mapping, iterable, sequence, callable,
// true, false, odd, even, eq/equalto, ne, lt, le, gt, ge, in. String methods: strip, lstrip,
// rstrip, startswith, endswith, split, upper, lower, title, capitalize, replace, find, count,
// format is not. Dict methods: items, keys, values, get. Globals: namespace(), range(),
// raise_exception(), strftime_now(). Anything else fails at Parse (unknown statement) or at Render
// (unknown filter, test, method or undefined call) with the construct named.
//
// Thread safety: a parsed Template is immutable; Render may run on many threads.

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine::jinja {

struct Node;

class Template {
 public:
  // kInvalidArgument naming the line and what is wrong or unsupported.
  static absl::StatusOr<Template> Parse(std::string_view source);
  // kInvalidArgument for a raise_exception (its message), an unknown filter / test / method, a
  // type error or a template that loops or nests too deep.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;

 private:
  std::shared_ptr<const Node> root_;
};

}  // namespace moleserve::engine::jinja
