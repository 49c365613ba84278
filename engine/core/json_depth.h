#pragma once

// Nesting depth of a JSON text, found by a linear scan (no recursion, strings and escapes
// respected). Files we parse (config.json, tokenizer.json, safetensors headers) are checked
// against kMaxJsonDepth first: nlohmann::json parses any depth, but dump() and our recursive
// readers would overflow the stack on a hostile file nested a million levels deep.

#include <string_view>

namespace moleserve::engine {

inline constexpr int kMaxJsonDepth = 64;

inline int JsonNestingDepth(std::string_view text) {
  int depth = 0, max_depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > max_depth) max_depth = depth;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

}  // namespace moleserve::engine
