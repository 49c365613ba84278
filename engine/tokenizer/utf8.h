#pragma once

// UTF-8 helpers for streaming detokenization. Byte-level tokens can end in the middle of a code
// point, so a stream emits only CompleteUtf8Prefix() of its pending bytes and keeps the rest
// until the next token arrives; at the end of a stream (or for display) SanitizeUtf8() turns
// whatever is left into valid UTF-8.
//
//   pending += tokenizer.DecodeToken(id);
//   size_t n = CompleteUtf8Prefix(pending);
//   Emit(SanitizeUtf8(pending.substr(0, n)));
//   pending.erase(0, n);
//
// All functions are pure and thread-safe.

#include <cstddef>
#include <string>
#include <string_view>

namespace moleserve::engine {

// Length of the longest prefix of `bytes` that does not end inside an incomplete UTF-8 sequence
// that could still become a valid code point. At most 3 trailing bytes are held back, and only
// when they are a valid lead byte followed by valid continuation bytes, fewer than the lead
// announces (e.g. "\xE2\x82" is held back, "\xE0\x80" is not: it can never be valid). Invalid
// bytes are never held back; SanitizeUtf8 replaces them.
[[nodiscard]] size_t CompleteUtf8Prefix(std::string_view bytes);

// `bytes` with every maximal invalid subpart replaced by U+FFFD, following the Unicode
// "substitution of maximal subparts" practice (Unicode 15, section 3.9, Table 3-8; the same
// result as Rust's String::from_utf8_lossy and Python's bytes.decode(errors="replace")).
// Overlong forms, surrogates (U+D800..U+DFFF) and code points above U+10FFFF are invalid.
// Valid input is returned unchanged.
[[nodiscard]] std::string SanitizeUtf8(std::string_view bytes);

// True when `bytes` is entirely valid UTF-8.
[[nodiscard]] bool IsValidUtf8(std::string_view bytes);

// Decodes the code point that starts at bytes[i] into `*cp` and returns its length in bytes, or
// returns 0 when the bytes there are not a well-formed UTF-8 sequence. Requires i < bytes.size().
[[nodiscard]] size_t DecodeCodePoint(std::string_view bytes, size_t i, char32_t* cp);

// Appends the UTF-8 encoding of `cp` (a Unicode scalar value) to `out`.
void AppendCodePoint(char32_t cp, std::string* out);

// Unicode White_Space (what Rust's char::is_whitespace and regex `\s` accept).
[[nodiscard]] bool IsUnicodeWhitespace(char32_t cp);

}  // namespace moleserve::engine
