#pragma once

// Quoting untrusted text (adapter names, paths, routing algorithm names, header values) into
// error messages and log lines. Every string a client or a file controls goes through Quote()
// before it reaches a message: the result is one line of printable ASCII, so it cannot forge a
// log line, and it is short, so an error that names a 100 KB input stays a few hundred bytes
// (clients' default metadata limit is 8 KB, and a status message travels in metadata).
//
//   Quote("mix\nlora")        -> 'mix\nlora'             (the two characters \ and n)
//   Quote(std::string(5000, 'a')) -> 'aaaa...a'... (5000 bytes)   (the first kMaxQuotedBytes)

#include <algorithm>
#include <string>
#include <string_view>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace moleserve::engine {

// Bytes of an untrusted string quoted at most, before escaping.
inline constexpr size_t kMaxQuotedBytes = 64;

// `text` in single quotes with C escapes for quotes, backslashes, control characters and every
// byte outside printable ASCII (\n, \t, \x00, \xc3...); longer than `max_bytes`, the first
// `max_bytes` bytes, "..." and the total length.
inline std::string Quote(std::string_view text, size_t max_bytes = kMaxQuotedBytes) {
  // Debian's Abseil has its own string_view type.
  const absl::string_view head(text.data(), std::min(text.size(), max_bytes));
  if (text.size() <= max_bytes) return absl::StrCat("'", absl::CHexEscape(head), "'");
  return absl::StrCat("'", absl::CHexEscape(head), "'... (", text.size(), " bytes)");
}

// Bytes of a status message kept by SanitizeMessage.
inline constexpr size_t kMaxMessageBytes = 1024;

// A status message made safe to send and to log, whatever text reached it (an adapter file's
// tensor names, a parser's complaint): control characters, DEL and bytes outside ASCII become
// \xNN, and beyond `max_bytes` the message is cut with a note of its length. Printable ASCII,
// including the backslashes of Quote()'s escapes, is kept as it is. The gRPC boundary and stored
// errors (an adapter's last load error) go through it, so no message escapes unbounded.
inline std::string SanitizeMessage(std::string_view message, size_t max_bytes = kMaxMessageBytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(std::min(message.size(), max_bytes) + 16);
  for (size_t i = 0; i < message.size(); ++i) {
    if (out.size() >= max_bytes) {
      absl::StrAppend(&out, "... (message cut from ", message.size(), " bytes)");
      break;
    }
    const auto c = static_cast<unsigned char>(message[i]);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(static_cast<char>(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

}  // namespace moleserve::engine
