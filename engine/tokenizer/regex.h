#pragma once

// Regex: a compiled PCRE2 pattern for the Split and ByteLevel pre-tokenizers of tokenizer.json.
//
// Hugging Face tokenizers compiles these patterns with Oniguruma. PCRE2 in UTF + UCP mode agrees
// with it on everything the Llama 3 / Qwen2 / GPT-2 patterns use: \p{L}, \p{N}, \s (Unicode
// White_Space: Z categories plus U+0009..U+000D and U+0085), (?i:...) with Unicode case folding,
// and lookahead such as `\s+(?!\S)`. Patterns are compiled once, JIT-compiled when the platform
// allows it, and matched with PCRE2_MATCH_INVALID_UTF so that text that is not valid UTF-8 is
// still searched (an invalid byte never matches).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, Regex::Create("\\p{N}{1,3}"));
//   for (const Regex::Match& m : re->FindAll("a 1234")) ...  // {2, 5}, {5, 6}
//
// Thread safety: immutable after Create(); FindAll may be called concurrently.

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace moleserve::engine {

class Regex {
 public:
  // Byte offsets [begin, end) of one match.
  struct Match {
    size_t begin = 0;
    size_t end = 0;
  };

  // Compiles `pattern` (PCRE2 syntax, UTF-8). A pattern PCRE2 rejects is kInvalidArgument with
  // PCRE2's message and the offset of the error.
  static absl::StatusOr<std::unique_ptr<Regex>> Create(std::string_view pattern);

  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping, non-empty matches in `text`, left to right (the iteration of Rust's
  // find_iter; empty matches are skipped because every tokenizer split drops empty pieces).
  [[nodiscard]] std::vector<Match> FindAll(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  struct Code;  // Owns the pcre2_code.

  Regex(std::string pattern, std::unique_ptr<Code> code);

  std::string pattern_;
  std::unique_ptr<Code> code_;
};

// `text` with every regex metacharacter escaped, so that the result matches `text` literally.
[[nodiscard]] std::string RegexEscape(std::string_view text);

}  // namespace moleserve::engine
