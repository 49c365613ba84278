#include "engine/tokenizer/components.h"

#include <unicode/normalizer2.h>
#include <unicode/stringpiece.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"
#include "engine/tokenizer/regex.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

using Json = nlohmann::json;

// GPT-2's split pattern, used by ByteLevel when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// "▁" (U+2581), the default Metaspace replacement.
constexpr std::string_view kMetaspace = "\xE2\x96\x81";

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}

std::string TypeOf(const Json& j) {
  if (j.is_object()) {
    const auto it = j.find("type");
    if (it != j.end() && it->is_string()) return it->get<std::string>();
  }
  return j.is_null() ? "null" : j.dump();
}

absl::Status Unsupported(std::string_view stage, const Json& j, std::string_view supported) {
  return absl::UnimplementedError(
      absl::StrCat(std::string(stage), " ", TypeOf(j),
                   " is not supported (supported: ", std::string(supported), ")"));
}

absl::StatusOr<std::string> StringMember(const Json& obj, const char* key,
                                         std::optional<std::string_view> fallback,
                                         std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (fallback.has_value()) return std::string(*fallback);
    return Invalid(absl::StrCat(std::string(where), ": '", key, "' is missing"));
  }
  if (!it->is_string()) {
    return Invalid(absl::StrCat(std::string(where), ": '", key, "' must be a string"));
  }
  return it->get<std::string>();
}

absl::StatusOr<int> CountMember(const Json& obj, const char* key, std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || !it->is_number_integer() || it->get<int64_t>() < 0 ||
      it->get<int64_t>() > (1 << 20)) {
    return Invalid(
        absl::StrCat(std::string(where), ": '", key, "' must be a non-negative integer"));
  }
  return static_cast<int>(it->get<int64_t>());
}

// Reads {"String": s} (returned as is) or {"Regex": r} (kUnimplemented unless allow_regex, then
// returned with *is_regex set).
absl::StatusOr<std::string> PatternMember(const Json& obj, std::string_view where, bool allow_regex,
                                          bool* is_regex) {
  const auto it = obj.find("pattern");
  if (it == obj.end() || !it->is_object() || it->size() != 1) {
    return Invalid(absl::StrCat(std::string(where),
                                ": 'pattern' must be {\"String\": ...} or {\"Regex\": ...}"));
  }
  // it->begin() iterates the object itself: key() and value() refer into `obj`, which outlives
  // them (a binding into `*it->items().begin()` would dangle: that proxy is a temporary).
  const std::string& kind = it->begin().key();
  const Json& value = it->begin().value();
  if (!value.is_string()) {
    return Invalid(absl::StrCat(std::string(where), ": pattern.", kind, " must be a string"));
  }
  if (kind == "String") {
    if (value.get_ref<const std::string&>().empty()) {
      return Invalid(absl::StrCat(std::string(where), ": the pattern is empty"));
    }
    if (is_regex != nullptr) *is_regex = false;
    return value.get<std::string>();
  }
  if (kind == "Regex") {
    if (!allow_regex) {
      return absl::UnimplementedError(
          absl::StrCat(std::string(where), " with a Regex pattern is not supported (only String)"));
    }
    *is_regex = true;
    return value.get<std::string>();
  }
  return Invalid(absl::StrCat(std::string(where), ": unknown pattern kind '", kind, "'"));
}

// A single character (one code point) from `s`.
absl::Status CheckOneChar(std::string_view s, std::string_view where) {
  char32_t cp;
  if (s.empty() || DecodeCodePoint(s, 0, &cp) != s.size()) {
    return Invalid(
        absl::StrCat(std::string(where), ": '", std::string(s), "' must be exactly one character"));
  }
  return absl::OkStatus();
}

void ReplaceAll(std::string_view text, std::string_view pattern, std::string_view content,
                std::string* out) {
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(pattern, pos);
    if (hit == std::string_view::npos) break;
    out->append(text.substr(pos, hit - pos));
    out->append(content);
    pos = hit + pattern.size();
  }
  out->append(text.substr(pos));
}

std::string ReplaceAll(std::string_view text, std::string_view pattern, std::string_view content) {
  std::string out;
  out.reserve(text.size());
  ReplaceAll(text, pattern, content, &out);
  return out;
}

const std::array<char32_t, 256>& ByteToUnicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[b] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

// The ByteLevel decoder on one token: each symbol back to its byte. A token with any character
// outside the byte alphabet (typically an added token) contributes its own UTF-8, as in HF.
void AppendByteLevelDecoded(std::string_view token, std::string* out) {
  static const std::array<int, 324> inverse = [] {
    std::array<int, 324> inv;
    inv.fill(-1);
    for (int b = 0; b < 256; ++b) inv[ByteToUnicode()[b]] = b;
    return inv;
  }();
  const size_t mark = out->size();
  size_t i = 0;
  while (i < token.size()) {
    char32_t cp;
    const size_t len = DecodeCodePoint(token, i, &cp);
    if (len == 0 || cp >= inverse.size() || inverse[cp] < 0) {
      out->resize(mark);
      out->append(token);
      return;
    }
    out->push_back(static_cast<char>(inverse[cp]));
    i += len;
  }
}

// Byte value of a "<0xXX>" token (HF ByteFallback's test), or -1.
int ByteFallbackValue(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  int value = 0;
  for (char c : token.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') {
      digit = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      digit = c - 'a' + 10;
    } else if (c >= 'A' && c <= 'F') {
      digit = c - 'A' + 10;
    } else {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// Hugging Face's NFC (crate unicode-normalization-alignments 0.1.12) uses the Unicode 9.0
// tables; ICU has a newer Unicode. Normalization data of a character never changes once it is
// assigned, so HF's NFC is ICU's with every character assigned after Unicode 9.0 treated as
// unassigned: combining class 0, no decomposition, never composed.
struct NfcData {
  const icu::Normalizer2* nfc = nullptr;
  const icu::Normalizer2* nfd = nullptr;
};

const NfcData* Nfc9Data() {
  static const NfcData* const data = [] {
    UErrorCode status = U_ZERO_ERROR;
    auto* d = new NfcData;
    d->nfc = icu::Normalizer2::getNFCInstance(status);
    d->nfd = icu::Normalizer2::getNFDInstance(status);
    return U_SUCCESS(status) ? d : nullptr;
  }();
  return data;
}

bool AssignedInUnicode9(char32_t c) {
  UVersionInfo age;
  u_charAge(static_cast<UChar32>(c), age);
  return age[0] < 9 || (age[0] == 9 && age[1] == 0);
}

uint8_t CombiningClass9(char32_t c) {
  if (c < 0x300) return 0;
  return AssignedInUnicode9(c) ? u_getCombiningClass(static_cast<UChar32>(c)) : 0;
}

// Canonical decomposition, reordering and composition (UAX #15) with Unicode 9.0 data.
std::string SlowNfc9(std::string_view text) {
  const NfcData& data = *Nfc9Data();
  std::vector<char32_t> cps;
  cps.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    char32_t c;
    const size_t len = DecodeCodePoint(text, i, &c);
    if (len == 0) {  // Not reached: the input is valid UTF-8.
      c = 0xFFFD;
      ++i;
    } else {
      i += len;
    }
    icu::UnicodeString decomposition;
    if (c >= 0xC0 && AssignedInUnicode9(c) &&
        data.nfd->getDecomposition(static_cast<UChar32>(c), decomposition)) {
      for (int32_t k = 0; k < decomposition.length(); k = decomposition.moveIndex32(k, 1)) {
        cps.push_back(static_cast<char32_t>(decomposition.char32At(k)));
      }
    } else {
      cps.push_back(c);
    }
  }
  // Canonical ordering: stable sort of each run of non-starters by combining class.
  for (size_t start = 0; start < cps.size();) {
    if (CombiningClass9(cps[start]) == 0) {
      ++start;
      continue;
    }
    size_t end = start;
    while (end < cps.size() && CombiningClass9(cps[end]) != 0) ++end;
    std::stable_sort(cps.begin() + start, cps.begin() + end, [](char32_t a, char32_t b) {
      return CombiningClass9(a) < CombiningClass9(b);
    });
    start = end;
  }
  // Composition: a character combines with the last starter unless blocked by a character of
  // class 0 or of a class >= its own in between.
  std::vector<char32_t> out;
  out.reserve(cps.size());
  size_t starter = std::string::npos;
  int last_class = 0;
  for (char32_t c : cps) {
    const int cc = CombiningClass9(c);
    if (starter != std::string::npos &&
        (out.size() - 1 == starter || (last_class != 0 && last_class < cc))) {
      const UChar32 composite =
          data.nfc->composePair(static_cast<UChar32>(out[starter]), static_cast<UChar32>(c));
      if (composite >= 0 && AssignedInUnicode9(static_cast<char32_t>(composite))) {
        out[starter] = static_cast<char32_t>(composite);
        continue;
      }
    }
    if (cc == 0) starter = out.size();
    last_class = cc;
    out.push_back(c);
  }
  std::string result;
  result.reserve(text.size());
  for (char32_t c : out) AppendCodePoint(c, &result);
  return result;
}

std::string Nfc(std::string_view text) {
  // Fast path: text ICU calls NFC is also NFC under Unicode 9.0 rules (characters newer than
  // 9.0 only act as extra starters there, which can neither reorder nor compose anything).
  const icu::StringPiece piece(text.data(), static_cast<int32_t>(text.size()));
  UErrorCode status = U_ZERO_ERROR;
  if (Nfc9Data()->nfc->isNormalizedUTF8(piece, status) && U_SUCCESS(status)) {
    return std::string(text);
  }
  return SlowNfc9(text);
}

}  // namespace

absl::StatusOr<bool> BoolMember(const nlohmann::json& obj, const char* key, bool fallback,
                                std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return Invalid(absl::StrCat(std::string(where), ": '", key, "' must be a boolean"));
  }
  return it->get<bool>();
}

const std::string& ByteLevelSymbol(uint8_t b) {
  static const std::array<std::string, 256> symbols = [] {
    std::array<std::string, 256> s;
    for (int i = 0; i < 256; ++i) AppendCodePoint(ByteToUnicode()[i], &s[i]);
    return s;
  }();
  return symbols[b];
}

// ---------------------------------------------------------------------------------------------
// Normalizer

Normalizer::~Normalizer() = default;

absl::StatusOr<std::unique_ptr<Normalizer>> Normalizer::FromJson(const Json& json) {
  auto normalizer = std::unique_ptr<Normalizer>(new Normalizer());
  RETURN_IF_ERROR(Parse(json, &normalizer->steps_));
  return normalizer;
}

absl::Status Normalizer::Parse(const Json& json, std::vector<Step>* steps) {
  if (json.is_null()) return absl::OkStatus();
  const std::string type = TypeOf(json);
  constexpr std::string_view kSupported = "Sequence, Prepend, Replace, NFC";
  if (type == "Sequence") {
    const auto it = json.find("normalizers");
    if (it == json.end() || !it->is_array()) {
      return Invalid("normalizer Sequence: 'normalizers' must be an array");
    }
    for (const Json& child : *it) RETURN_IF_ERROR(Parse(child, steps));
  } else if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prepend,
                     StringMember(json, "prepend", std::nullopt, "normalizer Prepend"));
    steps->push_back({Step::Kind::kPrepend, "", std::move(prepend)});
  } else if (type == "Replace") {
    ASSIGN_OR_RETURN(std::string pattern, PatternMember(json, "normalizer Replace",
                                                        /*allow_regex=*/false, nullptr));
    ASSIGN_OR_RETURN(std::string content,
                     StringMember(json, "content", std::nullopt, "normalizer Replace"));
    steps->push_back({Step::Kind::kReplace, std::move(pattern), std::move(content)});
  } else if (type == "NFC") {
    if (Nfc9Data() == nullptr) {
      return absl::InternalError("normalizer NFC: ICU's NFC data is not available");
    }
    steps->push_back({Step::Kind::kNfc, "", ""});
  } else {
    return Unsupported("normalizer", json, kSupported);
  }
  return absl::OkStatus();
}

std::string Normalizer::Apply(std::string_view text) const {
  std::string s(text);
  for (const Step& step : steps_) {
    switch (step.kind) {
      case Step::Kind::kPrepend:
        // HF prepends only to non-empty text.
        if (!s.empty()) s.insert(0, step.content);
        break;
      case Step::Kind::kReplace:
        if (s.find(step.pattern) != std::string::npos) {
          s = ReplaceAll(s, step.pattern, step.content);
        }
        break;
      case Step::Kind::kNfc:
        s = Nfc(s);
        break;
    }
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// PreTokenizer

PreTokenizer::~PreTokenizer() = default;

absl::StatusOr<std::unique_ptr<PreTokenizer>> PreTokenizer::FromJson(const Json& json) {
  auto pre = std::unique_ptr<PreTokenizer>(new PreTokenizer());
  RETURN_IF_ERROR(Parse(json, &pre->steps_));
  return pre;
}

absl::Status PreTokenizer::Parse(const Json& json, std::vector<Step>* steps) {
  if (json.is_null()) return absl::OkStatus();
  const std::string type = TypeOf(json);
  constexpr std::string_view kSupported = "Sequence, ByteLevel, Split, Metaspace, Digits";
  if (type == "Sequence") {
    const auto it = json.find("pretokenizers");
    if (it == json.end() || !it->is_array()) {
      return Invalid("pre_tokenizer Sequence: 'pretokenizers' must be an array");
    }
    for (const Json& child : *it) RETURN_IF_ERROR(Parse(child, steps));
  } else if (type == "ByteLevel") {
    Step step{Step::Kind::kByteLevel};
    // HF defaults: add_prefix_space true, use_regex true.
    ASSIGN_OR_RETURN(step.add_prefix_space,
                     BoolMember(json, "add_prefix_space", true, "pre_tokenizer"));
    ASSIGN_OR_RETURN(const bool use_regex, BoolMember(json, "use_regex", true, "pre_tokenizer"));
    if (use_regex) {
      static const absl::StatusOr<std::shared_ptr<const Regex>> gpt2 = Regex::Create(kGpt2Pattern);
      RETURN_IF_ERROR(gpt2.status());
      step.regex = *gpt2;
    }
    steps->push_back(std::move(step));
  } else if (type == "Split") {
    Step step{Step::Kind::kSplit};
    bool is_regex = false;
    ASSIGN_OR_RETURN(std::string pattern,
                     PatternMember(json, "pre_tokenizer Split", /*allow_regex=*/true, &is_regex));
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> regex,
                     Regex::Create(is_regex ? pattern : RegexEscape(pattern)));
    step.regex = std::move(regex);
    ASSIGN_OR_RETURN(const std::string behavior,
                     StringMember(json, "behavior", std::nullopt, "pre_tokenizer Split"));
    static constexpr std::pair<std::string_view, Behavior> kBehaviors[] = {
        {"Removed", Behavior::kRemoved},
        {"Isolated", Behavior::kIsolated},
        {"MergedWithPrevious", Behavior::kMergedWithPrevious},
        {"MergedWithNext", Behavior::kMergedWithNext},
        {"Contiguous", Behavior::kContiguous}};
    bool known = false;
    for (const auto& [name, value] : kBehaviors) {
      if (behavior == name) step.behavior = value, known = true;
    }
    if (!known) {
      return Invalid(absl::StrCat("pre_tokenizer Split: unknown behavior '", behavior, "'"));
    }
    ASSIGN_OR_RETURN(step.invert, BoolMember(json, "invert", false, "pre_tokenizer Split"));
    steps->push_back(std::move(step));
  } else if (type == "Digits") {
    // HF splits on char::is_numeric (\p{N}): each digit alone, or runs of digits.
    ASSIGN_OR_RETURN(const bool individual,
                     BoolMember(json, "individual_digits", false, "pre_tokenizer Digits"));
    Step step{Step::Kind::kSplit};
    ASSIGN_OR_RETURN(std::unique_ptr<Regex> regex,
                     Regex::Create(individual ? R"(\p{N})" : R"(\p{N}+)"));
    step.regex = std::move(regex);
    step.behavior = Behavior::kIsolated;
    steps->push_back(std::move(step));
  } else if (type == "Metaspace") {
    Step step{Step::Kind::kMetaspace};
    ASSIGN_OR_RETURN(step.replacement,
                     StringMember(json, "replacement", kMetaspace, "pre_tokenizer Metaspace"));
    RETURN_IF_ERROR(CheckOneChar(step.replacement, "pre_tokenizer Metaspace replacement"));
    ASSIGN_OR_RETURN(step.split, BoolMember(json, "split", true, "pre_tokenizer Metaspace"));
    // Newer files say prepend_scheme; older ones add_prefix_space (true meaning "always").
    ASSIGN_OR_RETURN(const bool add_prefix_space,
                     BoolMember(json, "add_prefix_space", true, "pre_tokenizer Metaspace"));
    step.prepend = add_prefix_space ? Step::Prepend::kAlways : Step::Prepend::kNever;
    const auto scheme = json.find("prepend_scheme");
    if (scheme != json.end() && !scheme->is_null()) {
      if (*scheme == "always") {
        step.prepend = Step::Prepend::kAlways;
      } else if (*scheme == "first") {
        step.prepend = Step::Prepend::kFirst;
      } else if (*scheme == "never") {
        step.prepend = Step::Prepend::kNever;
      } else {
        return Invalid(
            absl::StrCat("pre_tokenizer Metaspace: unknown prepend_scheme ", scheme->dump()));
      }
    }
    steps->push_back(std::move(step));
  } else {
    return Unsupported("pre_tokenizer", json, kSupported);
  }
  return absl::OkStatus();
}

bool PreTokenizer::byte_level() const {
  return !steps_.empty() && steps_.back().kind == Step::Kind::kByteLevel && !metaspace();
}

bool PreTokenizer::metaspace() const {
  for (const Step& step : steps_) {
    if (step.kind == Step::Kind::kMetaspace) return true;
  }
  return false;
}

void PreTokenizer::ApplySplit(const Piece& piece,
                              const std::vector<std::pair<size_t, size_t>>& matches,
                              Behavior behavior, bool invert, std::vector<Piece>* out) {
  // HF Pattern::find_matches: segments covering the text, each flagged as match or not.
  struct Segment {
    size_t begin;
    size_t end;
    bool match;
  };
  std::vector<Segment> segments;
  size_t prev = 0;
  for (const auto& [begin, end] : matches) {
    if (prev < begin) segments.push_back({prev, begin, false});
    segments.push_back({begin, end, true});
    prev = end;
  }
  if (prev < piece.text.size()) segments.push_back({prev, piece.text.size(), false});
  if (invert) {
    for (Segment& s : segments) s.match = !s.match;
  }

  // HF SplitDelimiterBehavior, fold for fold.
  std::vector<Segment> pieces;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const Segment& s : segments) {
        if (!s.match) pieces.push_back(s);
      }
      break;
    case Behavior::kIsolated:
      pieces = segments;
      break;
    case Behavior::kMergedWithPrevious:
      for (const Segment& s : segments) {
        if (s.match && !previous_match && !pieces.empty()) {
          pieces.back().end = s.end;
        } else {
          pieces.push_back(s);
        }
        previous_match = s.match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
        if (it->match && !previous_match && !pieces.empty()) {
          pieces.back().begin = it->begin;
        } else {
          pieces.push_back(*it);
        }
        previous_match = it->match;
      }
      std::reverse(pieces.begin(), pieces.end());
      break;
    case Behavior::kContiguous:
      for (const Segment& s : segments) {
        if (s.match == previous_match && !pieces.empty()) {
          pieces.back().end = s.end;
        } else {
          pieces.push_back(s);
        }
        previous_match = s.match;
      }
      break;
  }
  for (const Segment& s : pieces) {
    if (s.end > s.begin) {
      out->push_back({piece.text.substr(s.begin, s.end - s.begin), piece.at_start && s.begin == 0});
    }
  }
}

void PreTokenizer::ApplyStep(const Step& step, Piece piece, std::vector<Piece>* out) {
  switch (step.kind) {
    case Step::Kind::kSplit: {
      std::vector<std::pair<size_t, size_t>> matches;
      for (const Regex::Match& m : step.regex->FindAll(piece.text)) {
        matches.emplace_back(m.begin, m.end);
      }
      ApplySplit(piece, matches, step.behavior, step.invert, out);
      return;
    }
    case Step::Kind::kByteLevel: {
      if (step.add_prefix_space && (piece.text.empty() || piece.text[0] != ' ')) {
        piece.text.insert(0, " ");
      }
      const size_t first = out->size();
      if (step.regex != nullptr) {
        std::vector<std::pair<size_t, size_t>> matches;
        for (const Regex::Match& m : step.regex->FindAll(piece.text)) {
          matches.emplace_back(m.begin, m.end);
        }
        ApplySplit(piece, matches, Behavior::kIsolated, false, out);
      } else {
        out->push_back(std::move(piece));
      }
      for (size_t k = first; k < out->size(); ++k) {
        std::string mapped;
        mapped.reserve((*out)[k].text.size() * 2);
        for (char c : (*out)[k].text) mapped += ByteLevelSymbol(static_cast<uint8_t>(c));
        (*out)[k].text = std::move(mapped);
      }
      return;
    }
    case Step::Kind::kMetaspace: {
      std::string text = ReplaceAll(piece.text, " ", step.replacement);
      const bool starts = text.compare(0, step.replacement.size(), step.replacement) == 0;
      if (!starts && (step.prepend == Step::Prepend::kAlways ||
                      (step.prepend == Step::Prepend::kFirst && piece.at_start))) {
        text.insert(0, step.replacement);
      }
      Piece replaced{std::move(text), piece.at_start};
      if (!step.split) {
        out->push_back(std::move(replaced));
        return;
      }
      std::vector<std::pair<size_t, size_t>> matches;
      for (size_t pos = replaced.text.find(step.replacement); pos != std::string::npos;
           pos = replaced.text.find(step.replacement, pos + step.replacement.size())) {
        matches.emplace_back(pos, pos + step.replacement.size());
      }
      ApplySplit(replaced, matches, Behavior::kMergedWithNext, false, out);
      return;
    }
  }
}

void PreTokenizer::Split(std::string_view text, bool at_start,
                         std::vector<std::string>* words) const {
  if (text.empty()) return;
  std::vector<Piece> pieces;
  pieces.push_back({std::string(text), at_start});
  std::vector<Piece> next;
  for (const Step& step : steps_) {
    next.clear();
    for (Piece& piece : pieces) ApplyStep(step, std::move(piece), &next);
    pieces.swap(next);
  }
  for (Piece& piece : pieces) {
    if (!piece.text.empty()) words->push_back(std::move(piece.text));
  }
}

// ---------------------------------------------------------------------------------------------
// Decoder

Decoder::~Decoder() = default;

absl::StatusOr<std::unique_ptr<Decoder>> Decoder::FromJson(const Json& json) {
  auto decoder = std::unique_ptr<Decoder>(new Decoder());
  decoder->is_null_ = json.is_null();
  RETURN_IF_ERROR(Parse(json, &decoder->steps_));
  return decoder;
}

absl::Status Decoder::Parse(const Json& json, std::vector<Step>* steps) {
  if (json.is_null()) return absl::OkStatus();
  const std::string type = TypeOf(json);
  constexpr std::string_view kSupported =
      "Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace";
  if (type == "Sequence") {
    const auto it = json.find("decoders");
    if (it == json.end() || !it->is_array()) {
      return Invalid("decoder Sequence: 'decoders' must be an array");
    }
    for (const Json& child : *it) RETURN_IF_ERROR(Parse(child, steps));
  } else if (type == "ByteLevel") {
    steps->push_back({Step::Kind::kByteLevel});
  } else if (type == "Replace") {
    Step step{Step::Kind::kReplace};
    ASSIGN_OR_RETURN(step.pattern,
                     PatternMember(json, "decoder Replace", /*allow_regex=*/false, nullptr));
    ASSIGN_OR_RETURN(step.content, StringMember(json, "content", std::nullopt, "decoder Replace"));
    steps->push_back(std::move(step));
  } else if (type == "ByteFallback") {
    steps->push_back({Step::Kind::kByteFallback});
  } else if (type == "Fuse") {
    steps->push_back({Step::Kind::kFuse});
  } else if (type == "Strip") {
    Step step{Step::Kind::kStrip};
    ASSIGN_OR_RETURN(step.pattern, StringMember(json, "content", std::nullopt, "decoder Strip"));
    RETURN_IF_ERROR(CheckOneChar(step.pattern, "decoder Strip content"));
    ASSIGN_OR_RETURN(step.start, CountMember(json, "start", "decoder Strip"));
    ASSIGN_OR_RETURN(step.stop, CountMember(json, "stop", "decoder Strip"));
    steps->push_back(std::move(step));
  } else if (type == "Metaspace") {
    Step step{Step::Kind::kMetaspace};
    ASSIGN_OR_RETURN(step.pattern,
                     StringMember(json, "replacement", kMetaspace, "decoder Metaspace"));
    RETURN_IF_ERROR(CheckOneChar(step.pattern, "decoder Metaspace replacement"));
    ASSIGN_OR_RETURN(step.prepend, BoolMember(json, "add_prefix_space", true, "decoder Metaspace"));
    const auto scheme = json.find("prepend_scheme");
    if (scheme != json.end() && !scheme->is_null()) {
      if (*scheme != "always" && *scheme != "first" && *scheme != "never") {
        return Invalid(absl::StrCat("decoder Metaspace: unknown prepend_scheme ", scheme->dump()));
      }
      step.prepend = *scheme != "never";
    }
    steps->push_back(std::move(step));
  } else {
    return Unsupported("decoder", json, kSupported);
  }
  return absl::OkStatus();
}

void Decoder::Run(const Step& step, bool streaming, std::vector<std::string>* tokens) {
  switch (step.kind) {
    case Step::Kind::kByteLevel: {
      // One token: the bytes of all tokens, made valid UTF-8 (from_utf8_lossy) when not streaming.
      std::string bytes;
      for (const std::string& t : *tokens) AppendByteLevelDecoded(t, &bytes);
      tokens->assign(1, streaming ? std::move(bytes) : SanitizeUtf8(bytes));
      return;
    }
    case Step::Kind::kReplace:
      for (std::string& t : *tokens) {
        if (t.find(step.pattern) != std::string::npos)
          t = ReplaceAll(t, step.pattern, step.content);
      }
      return;
    case Step::Kind::kByteFallback: {
      // Runs of <0xXX> tokens become their bytes when those are valid UTF-8, else one U+FFFD per
      // byte token (HF ByteFallback); streaming keeps the raw bytes.
      std::vector<std::string> out;
      std::string run;
      int run_tokens = 0;
      const auto flush = [&] {
        if (run_tokens == 0) return;
        if (streaming || IsValidUtf8(run)) {
          out.push_back(std::move(run));
        } else {
          for (int k = 0; k < run_tokens; ++k) out.emplace_back("\xEF\xBF\xBD");
        }
        run.clear();
        run_tokens = 0;
      };
      for (std::string& t : *tokens) {
        const int byte = ByteFallbackValue(t);
        if (byte >= 0) {
          run.push_back(static_cast<char>(byte));
          ++run_tokens;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      *tokens = std::move(out);
      return;
    }
    case Step::Kind::kFuse: {
      std::string fused;
      for (const std::string& t : *tokens) fused += t;
      tokens->assign(1, std::move(fused));
      return;
    }
    case Step::Kind::kStrip: {
      if (streaming) return;
      const std::string_view c = step.pattern;
      for (std::string& t : *tokens) {
        std::string_view s = t;
        for (int k = 0; k < step.start && s.substr(0, c.size()) == c; ++k)
          s.remove_prefix(c.size());
        for (int k = 0; k < step.stop && s.size() >= c.size() && s.substr(s.size() - c.size()) == c;
             ++k) {
          s.remove_suffix(c.size());
        }
        t = std::string(s);
      }
      return;
    }
    case Step::Kind::kMetaspace:
      // HF: in the first token every replacement character is dropped (when prepending is on);
      // elsewhere each becomes a space.
      for (size_t i = 0; i < tokens->size(); ++i) {
        std::string& t = (*tokens)[i];
        const bool drop = i == 0 && step.prepend && !streaming;
        if (t.find(step.pattern) != std::string::npos) {
          t = ReplaceAll(t, step.pattern, drop ? "" : " ");
        }
      }
      return;
  }
}

std::string Decoder::Decode(std::vector<std::string> tokens) const {
  std::string out;
  if (is_null_) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) out.push_back(' ');
      out += tokens[i];
    }
    return out;
  }
  for (const Step& step : steps_) Run(step, /*streaming=*/false, &tokens);
  for (const std::string& t : tokens) out += t;
  return out;
}

std::string Decoder::DecodeStreaming(std::string_view token) const {
  std::vector<std::string> tokens(1, std::string(token));
  for (const Step& step : steps_) Run(step, /*streaming=*/true, &tokens);
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace moleserve::engine
