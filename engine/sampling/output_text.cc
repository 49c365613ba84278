#include "engine/sampling/output_text.h"

#include <algorithm>

#include "engine/tokenizer/utf8.h"

namespace moleserve::engine {

OutputText::OutputText(std::vector<std::string> stop_strings) : stops_(std::move(stop_strings)) {
  for (const std::string& s : stops_) max_stop_ = std::max(max_stop_, s.size());
}

size_t OutputText::HoldbackForStopPrefix() const {
  // Longest suffix of the unsent bytes that is a proper prefix of some stop string.
  const size_t unsent = bytes_.size() - sent_;
  size_t best = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, unsent); k > best; --k) {
      if (std::string_view(bytes_).substr(bytes_.size() - k) == std::string_view(s).substr(0, k)) {
        best = k;
        break;
      }
    }
  }
  return best;
}

OutputText::Update OutputText::Append(std::string_view bytes) {
  Update u;
  bytes_.append(bytes);
  if (!stops_.empty()) {
    // A match ending in the new bytes starts at most max_stop_ - 1 bytes before them.
    const size_t from = scanned_ >= max_stop_ ? scanned_ - (max_stop_ - 1) : 0;
    size_t best = std::string::npos;
    for (const std::string& s : stops_) {
      const size_t pos = bytes_.find(s, std::max(from, sent_));
      if (pos != std::string::npos && (best == std::string::npos || pos < best)) {
        best = pos;
        u.matched = s;
      }
    }
    scanned_ = bytes_.size();
    if (best != std::string::npos) {
      u.stopped = true;
      u.delta = SanitizeUtf8(std::string_view(bytes_).substr(sent_, best - sent_));
      sent_ = bytes_.size();
      sent_text_ += u.delta;
      return u;
    }
  }
  size_t end = bytes_.size() - HoldbackForStopPrefix();
  const std::string_view pending = std::string_view(bytes_).substr(sent_, end - sent_);
  end = sent_ + CompleteUtf8Prefix(pending);
  u.delta = SanitizeUtf8(std::string_view(bytes_).substr(sent_, end - sent_));
  sent_ = end;
  sent_text_ += u.delta;
  return u;
}

std::string OutputText::Flush() {
  std::string rest = SanitizeUtf8(std::string_view(bytes_).substr(sent_));
  sent_ = bytes_.size();
  sent_text_ += rest;
  return rest;
}

}  // namespace moleserve::engine
