#include "engine/tokenizer/utf8.h"

#include <cstdint>

namespace moleserve::engine {
namespace {

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Well-formed UTF-8 byte sequences (Unicode Table 3-7): the total length announced by `lead`
// and the allowed range of the *second* byte; later bytes are always 80..BF. Length 0 marks a
// byte that cannot start a sequence (continuation bytes, C0, C1, F5..FF).
struct LeadInfo {
  int length;
  uint8_t second_lo;
  uint8_t second_hi;
};

constexpr LeadInfo Lead(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b < 0xC2) return {0, 0, 0};
  if (b < 0xE0) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};  // Excludes overlongs.
  if (b == 0xED) return {3, 0x80, 0x9F};  // Excludes surrogates.
  if (b < 0xF0) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};  // Excludes overlongs.
  if (b < 0xF4) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};  // Excludes > U+10FFFF.
  return {0, 0, 0};
}

// Number of bytes of `s` starting at `i` that form a valid prefix of the sequence led by s[i]
// (1 when only the lead is valid, info.length when the sequence is complete). Requires a valid
// lead byte at `i`.
int ValidPrefixLength(std::string_view s, size_t i, const LeadInfo& info) {
  int n = 1;
  while (n < info.length && i + n < s.size()) {
    const uint8_t b = static_cast<uint8_t>(s[i + n]);
    const uint8_t lo = n == 1 ? info.second_lo : 0x80;
    const uint8_t hi = n == 1 ? info.second_hi : 0xBF;
    if (b < lo || b > hi) break;
    ++n;
  }
  return n;
}

}  // namespace

size_t CompleteUtf8Prefix(std::string_view bytes) {
  const size_t n = bytes.size();
  // Find the last non-continuation byte among the final 3; an incomplete sequence can only start
  // there (a 4-byte sequence missing at least one byte has at most 3 bytes present).
  for (size_t k = 1; k <= 3 && k <= n; ++k) {
    const size_t i = n - k;
    const uint8_t b = static_cast<uint8_t>(bytes[i]);
    if ((b & 0xC0) == 0x80) continue;  // Continuation byte: keep looking back.
    const LeadInfo info = Lead(b);
    if (info.length == 0 || static_cast<size_t>(info.length) <= k) return n;
    // Hold back only if every byte after the lead is a valid continuation.
    return ValidPrefixLength(bytes, i, info) == static_cast<int>(k) ? i : n;
  }
  return n;
}

bool IsValidUtf8(std::string_view bytes) {
  size_t i = 0;
  while (i < bytes.size()) {
    const LeadInfo info = Lead(static_cast<uint8_t>(bytes[i]));
    if (info.length == 0) return false;
    if (ValidPrefixLength(bytes, i, info) != info.length) return false;
    i += info.length;
  }
  return true;
}

size_t DecodeCodePoint(std::string_view bytes, size_t i, char32_t* cp) {
  const uint8_t b0 = static_cast<uint8_t>(bytes[i]);
  const LeadInfo info = Lead(b0);
  if (info.length == 0 || ValidPrefixLength(bytes, i, info) != info.length) return 0;
  static constexpr uint8_t kLeadMask[] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  char32_t value = b0 & kLeadMask[info.length];
  for (int k = 1; k < info.length; ++k) {
    value = (value << 6) | (static_cast<uint8_t>(bytes[i + k]) & 0x3F);
  }
  *cp = value;
  return static_cast<size_t>(info.length);
}

void AppendCodePoint(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsUnicodeWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

std::string SanitizeUtf8(std::string_view bytes) {
  if (IsValidUtf8(bytes)) return std::string(bytes);
  std::string out;
  out.reserve(bytes.size() + 8);
  size_t i = 0;
  while (i < bytes.size()) {
    const LeadInfo info = Lead(static_cast<uint8_t>(bytes[i]));
    if (info.length == 0) {
      out.append(kReplacement);
      ++i;
      continue;
    }
    const int valid = ValidPrefixLength(bytes, i, info);
    if (valid == info.length) {
      out.append(bytes.substr(i, valid));
    } else {
      // The lead plus its valid continuations form one maximal subpart: one U+FFFD, then resume
      // at the first byte that broke the sequence.
      out.append(kReplacement);
    }
    i += valid;
  }
  return out;
}

}  // namespace moleserve::engine
