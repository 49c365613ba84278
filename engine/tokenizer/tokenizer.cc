#include "engine/tokenizer/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <exception>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/core/check.h"
#include "engine/core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// Appends the UTF-8 encoding of `cp` (< 0x110000) to `out`.
void AppendUtf8(char32_t cp, std::string* out) {
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

// Decodes the code point starting at s[i]. Returns its length in bytes, or 0 when the bytes there
// are not well-formed UTF-8.
size_t DecodeUtf8(std::string_view s, size_t i, char32_t* cp) {
  const auto byte = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t b0 = byte(i);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  size_t len;
  char32_t value;
  char32_t min;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2, value = b0 & 0x1F, min = 0x80;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3, value = b0 & 0x0F, min = 0x800;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4, value = b0 & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (size_t k = 1; k < len; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
    value = (value << 6) | (byte(i + k) & 0x3F);
  }
  if (value < min || value > 0x10FFFF || (value >= 0xD800 && value <= 0xDFFF)) return 0;
  *cp = value;
  return len;
}

// Unicode White_Space, which is what Rust's regex `\s` (used by Hugging Face for lstrip/rstrip)
// matches.
bool IsUnicodeWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Byte length of the whitespace run at the start of `s`.
size_t LeadingWhitespace(std::string_view s) {
  size_t i = 0;
  char32_t cp;
  while (i < s.size()) {
    const size_t len = DecodeUtf8(s, i, &cp);
    if (len == 0 || !IsUnicodeWhitespace(cp)) break;
    i += len;
  }
  return i;
}

// Offset where the whitespace run at the end of `s` begins (s.size() when there is none).
size_t TrailingWhitespaceStart(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    // Step back over at most 3 continuation bytes to the start of the last code point.
    size_t start = end - 1;
    while (start > 0 && end - start < 4 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) {
      --start;
    }
    char32_t cp;
    if (DecodeUtf8(s, start, &cp) != end - start || !IsUnicodeWhitespace(cp)) break;
    end = start;
  }
  return end;
}

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100.. in byte order, so that every byte has a visible, non-whitespace symbol.
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

std::string ByteSymbol(uint8_t b) {
  std::string s;
  AppendUtf8(ByteToUnicode()[b], &s);
  return s;
}

// The ByteLevel decoder applied to one token string: each symbol back to its byte. A token with
// any character outside the byte alphabet (typically an added token) decodes to its own UTF-8.
std::string ByteLevelDecode(std::string_view token) {
  static const std::array<int, 324> inverse = [] {
    std::array<int, 324> inv;
    inv.fill(-1);
    for (int b = 0; b < 256; ++b) inv[ByteToUnicode()[b]] = b;
    return inv;
  }();
  std::string out;
  size_t i = 0;
  while (i < token.size()) {
    char32_t cp;
    const size_t len = DecodeUtf8(token, i, &cp);
    if (len == 0 || cp >= inverse.size() || inverse[cp] < 0) return std::string(token);
    out.push_back(static_cast<char>(inverse[cp]));
    i += len;
  }
  return out;
}

size_t CountCodePoints(std::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return n;
}

std::string TypeOf(const Json& j) {
  if (j.is_object()) {
    const auto it = j.find("type");
    if (it != j.end() && it->is_string()) return it->get<std::string>();
  }
  return j.is_null() ? "null" : j.dump();
}

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}
absl::Status Unsupported(std::string_view what) {
  return absl::UnimplementedError(std::string(what));
}

// Reads an optional boolean member; absent or null gives `fallback`.
absl::StatusOr<bool> OptionalBool(const Json& obj, const char* key, bool fallback,
                                  std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return Invalid(absl::StrCat(std::string(where), ": '", key, "' must be a boolean"));
  }
  return it->get<bool>();
}

// Reads a token id: a JSON integer in [0, kMaxTokenizerVocabSize).
bool JsonToId(const Json& j, int32_t* id) {
  if (!j.is_number_integer()) return false;  // Also true for unsigned numbers.
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v >= static_cast<uint64_t>(kMaxTokenizerVocabSize)) return false;
    *id = static_cast<int32_t>(v);
    return true;
  }
  const int64_t v = j.get<int64_t>();
  if (v < 0 || v >= kMaxTokenizerVocabSize) return false;
  *id = static_cast<int32_t>(v);
  return true;
}

// Checks that the pre-tokenizer is ByteLevel and returns its flags.
absl::Status ParsePreTokenizer(const Json& root, bool* add_prefix_space, bool* use_regex) {
  const auto it = root.find("pre_tokenizer");
  if (it == root.end() || TypeOf(*it) != "ByteLevel") {
    return Unsupported(absl::StrCat("pre_tokenizer ", it == root.end() ? "missing" : TypeOf(*it),
                                    " is not supported (only ByteLevel)"));
  }
  // Hugging Face defaults: add_prefix_space true, use_regex true.
  ASSIGN_OR_RETURN(*add_prefix_space, OptionalBool(*it, "add_prefix_space", true, "pre_tokenizer"));
  ASSIGN_OR_RETURN(*use_regex, OptionalBool(*it, "use_regex", true, "pre_tokenizer"));
  return absl::OkStatus();
}

// Checks that the BPE model is one this version reproduces exactly.
absl::Status CheckModel(const Json& model, std::vector<std::pair<std::string, int32_t>>* vocab,
                        bool* ignore_merges) {
  if (!model.is_object()) return Invalid("'model' must be an object");
  const auto type = model.find("type");
  if (type != model.end() ? TypeOf(model) != "BPE" : !model.contains("merges")) {
    return Unsupported(absl::StrCat("model type ", type != model.end() ? TypeOf(model) : "?",
                                    " is not supported (only BPE)"));
  }
  const auto merges = model.find("merges");
  if (merges != model.end() && !merges->is_null()) {
    if (!merges->is_array()) return Invalid("model.merges must be an array");
    if (!merges->empty()) {
      return Unsupported(absl::StrCat("model.merges has ", merges->size(),
                                      " entries; BPE merges are not supported yet (only an "
                                      "empty merges list, i.e. one token per byte)"));
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const auto it = model.find(key);
    if (it != model.end() && !it->is_null() && *it != "") {
      return Unsupported(absl::StrCat("model.", key, " ", it->dump(), " is not supported"));
    }
  }
  ASSIGN_OR_RETURN(*ignore_merges, OptionalBool(model, "ignore_merges", false, "model"));

  const auto v = model.find("vocab");
  if (v == model.end() || !v->is_object()) return Invalid("model.vocab must be an object");
  vocab->reserve(v->size());
  for (const auto& [piece, id_json] : v->items()) {
    int32_t id;
    if (!JsonToId(id_json, &id)) {
      return Invalid(absl::StrCat("model.vocab['", piece, "'] = ", id_json.dump(),
                                  " is not an id in [0, ", kMaxTokenizerVocabSize, ")"));
    }
    vocab->emplace_back(piece, id);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Tokenizer::AddedToken>> ParseAddedTokens(const Json& root) {
  std::vector<Tokenizer::AddedToken> added;
  const auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return added;
  if (!it->is_array()) return Invalid("'added_tokens' must be an array");
  for (const Json& entry : *it) {
    if (!entry.is_object()) return Invalid("added_tokens entries must be objects");
    Tokenizer::AddedToken t;
    const auto content = entry.find("content");
    if (content == entry.end() || !content->is_string() ||
        content->get_ref<const std::string&>().empty()) {
      return Invalid(absl::StrCat("added token ", entry.dump(), " has no non-empty 'content'"));
    }
    t.content = content->get<std::string>();
    const std::string where = absl::StrCat("added token '", t.content, "'");
    const auto id = entry.find("id");
    if (id == entry.end() || !JsonToId(*id, &t.id)) {
      return Invalid(
          absl::StrCat(where, " has no valid 'id' in [0, ", kMaxTokenizerVocabSize, ")"));
    }
    ASSIGN_OR_RETURN(t.special, OptionalBool(entry, "special", false, where));
    ASSIGN_OR_RETURN(t.single_word, OptionalBool(entry, "single_word", false, where));
    ASSIGN_OR_RETURN(t.lstrip, OptionalBool(entry, "lstrip", false, where));
    ASSIGN_OR_RETURN(t.rstrip, OptionalBool(entry, "rstrip", false, where));
    // Hugging Face: special tokens are not normalized unless the file says so.
    ASSIGN_OR_RETURN(t.normalized, OptionalBool(entry, "normalized", !t.special, where));
    if (t.single_word) {
      return Unsupported(absl::StrCat(where, " uses single_word=true, which is not supported"));
    }
    added.push_back(std::move(t));
  }
  return added;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonString(std::string_view json) {
  return ParseWithContext(json, "tokenizer.json");
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::ParseWithContext(std::string_view json,
                                                                       std::string_view context) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tok;
  // nlohmann reports type errors by throwing; none of them may escape.
  try {
    tok = ParseJson(json);
  } catch (const std::exception& e) {
    tok = Invalid(absl::StrCat("unexpected structure: ", e.what()));
  }
  if (!tok.ok()) {
    return absl::Status(tok.status().code(),
                        absl::StrCat(std::string(context), ": ", tok.status().message()));
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::ParseJson(std::string_view json) {
  Json root;
  try {
    root = Json::parse(json.begin(), json.end());
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return Invalid("top level is not a JSON object");

  const auto normalizer = root.find("normalizer");
  if (normalizer != root.end() && !normalizer->is_null()) {
    return Unsupported(
        absl::StrCat("normalizer ", TypeOf(*normalizer), " is not supported (only null)"));
  }
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  RETURN_IF_ERROR(ParsePreTokenizer(root, &tok->add_prefix_space_, &tok->use_regex_));
  const auto decoder = root.find("decoder");
  if (decoder == root.end() || TypeOf(*decoder) != "ByteLevel") {
    return Unsupported(absl::StrCat("decoder ",
                                    decoder == root.end() ? "missing" : TypeOf(*decoder),
                                    " is not supported (only ByteLevel)"));
  }
  const auto model = root.find("model");
  if (model == root.end()) return Invalid("no 'model'");
  std::vector<std::pair<std::string, int32_t>> vocab;
  bool ignore_merges = false;
  RETURN_IF_ERROR(CheckModel(*model, &vocab, &ignore_merges));
  if (ignore_merges) {
    // With ignore_merges a whole pre-token found in the vocabulary is one token, so
    // multi-symbol entries would need the GPT-2 regex split to reproduce.
    for (const auto& [piece, id] : vocab) {
      if (CountCodePoints(piece) > 1) {
        return Unsupported(
            absl::StrCat("ignore_merges=true with the multi-byte vocabulary "
                         "entry '",
                         piece, "' is not supported"));
      }
    }
  }
  ASSIGN_OR_RETURN(std::vector<AddedToken> added, ParseAddedTokens(root));
  RETURN_IF_ERROR(tok->Init(std::move(vocab), std::move(added)));
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    // ErrnoToStatus appends strerror.
    return absl::ErrnoToStatus(err != 0 ? err : ENOENT, absl::StrCat(path, ": cannot open"));
  }
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return ParseWithContext(contents.str(), path);
}

absl::Status Tokenizer::Init(std::vector<std::pair<std::string, int32_t>> vocab,
                             std::vector<AddedToken> added) {
  std::sort(vocab.begin(), vocab.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });
  int32_t max_id = -1;
  for (const auto& [piece, id] : vocab) max_id = std::max(max_id, id);
  for (const AddedToken& t : added) max_id = std::max(max_id, t.id);

  const size_t size = static_cast<size_t>(max_id + 1);
  pieces_.assign(size, "");
  decoded_.assign(size, "");
  special_.assign(size, false);
  std::vector<bool> used(size, false);
  for (const auto& [piece, id] : vocab) {
    if (used[id]) {
      return Invalid(absl::StrCat("model.vocab gives id ", id, " to both '", pieces_[id], "' and '",
                                  piece, "'"));
    }
    used[id] = true;
    pieces_[id] = piece;
    decoded_[id] = ByteLevelDecode(piece);
    piece_to_id_.emplace(piece, id);
  }
  std::set<std::string_view> added_contents;
  for (const AddedToken& t : added) {
    if (!added_contents.insert(t.content).second) {
      return Invalid(absl::StrCat("added token '", t.content, "' appears twice"));
    }
    if (used[t.id] && pieces_[t.id] != t.content) {
      return Invalid(absl::StrCat("added token '", t.content, "' has id ", t.id,
                                  ", which already belongs to '", pieces_[t.id], "'"));
    }
    used[t.id] = true;
    pieces_[t.id] = t.content;
    special_[t.id] = t.special;
    decoded_[t.id] = t.special ? "" : ByteLevelDecode(t.content);
    piece_to_id_[t.content] = t.id;  // Added tokens take precedence, as in Hugging Face.
  }
  for (int b = 0; b < 256; ++b) {
    const std::string symbol = ByteSymbol(static_cast<uint8_t>(b));
    const auto it = piece_to_id_.find(symbol);
    if (it == piece_to_id_.end()) {
      return Invalid(absl::StrFormat(
          "model.vocab has no token for byte 0x%02X (symbol '%s'); every byte needs one", b,
          symbol));
    }
    byte_to_id_[b] = it->second;
  }

  vocab_ = std::move(vocab);
  added_ = std::move(added);
  for (auto& set : match_sets_) {
    for (auto& bucket : set) bucket.clear();
  }
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& t = added_[i];
    match_sets_[t.normalized ? 1 : 0][static_cast<uint8_t>(t.content[0])].push_back(i);
  }
  for (auto& set : match_sets_) {
    for (auto& bucket : set) {
      std::stable_sort(bucket.begin(), bucket.end(), [&](size_t a, size_t b) {
        return added_[a].content.size() > added_[b].content.size();
      });
    }
  }

  static constexpr std::string_view kBosNames[] = {"<|begin_of_text|>", "<s>"};
  static constexpr std::string_view kEosNames[] = {"<|end_of_text|>", "</s>", "<|endoftext|>",
                                                   "<|im_end|>"};
  const auto find_added = [&](std::string_view name) -> std::optional<int32_t> {
    for (const AddedToken& t : added_) {
      if (t.content == name) return t.id;
    }
    return std::nullopt;
  };
  bos_id_.reset();
  for (std::string_view name : kBosNames) {
    if (auto id = find_added(name)) {
      bos_id_ = id;
      break;
    }
  }
  eos_ids_.clear();
  for (std::string_view name : kEosNames) {
    if (auto id = find_added(name)) eos_ids_.push_back(*id);
  }
  return absl::OkStatus();
}

std::unique_ptr<Tokenizer> Tokenizer::ByteLevelDemo() {
  std::vector<std::pair<std::string, int32_t>> vocab;
  for (int b = 0; b < 256; ++b) vocab.emplace_back(ByteSymbol(static_cast<uint8_t>(b)), b);
  std::vector<AddedToken> added;
  int32_t id = 256;
  for (const char* name : {"<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"}) {
    AddedToken t;
    t.id = id++;
    t.content = name;
    t.special = true;
    t.normalized = false;
    added.push_back(std::move(t));
  }
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  const absl::Status status = tok->Init(std::move(vocab), std::move(added));
  // The demo vocabulary is fixed; failing to build it is a bug in this file.
  MOLE_CHECK_MSG(status.ok(), "ByteLevelDemo vocabulary is inconsistent");
  return tok;
}

std::string Tokenizer::ToJson() const {
  OrderedJson added = OrderedJson::array();
  std::vector<const AddedToken*> sorted;
  for (const AddedToken& t : added_) sorted.push_back(&t);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const AddedToken* a, const AddedToken* b) { return a->id < b->id; });
  for (const AddedToken* t : sorted) {
    added.push_back({{"id", t->id},
                     {"content", t->content},
                     {"single_word", t->single_word},
                     {"lstrip", t->lstrip},
                     {"rstrip", t->rstrip},
                     {"normalized", t->normalized},
                     {"special", t->special}});
  }

  OrderedJson post_processor = nullptr;
  if (bos_id_.has_value() && *bos_id_ >= 0 && *bos_id_ < vocab_size() &&
      !pieces_[*bos_id_].empty()) {
    const std::string& bos = pieces_[*bos_id_];
    const auto special = [&](int type_id) {
      return OrderedJson{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
    };
    const auto sequence = [](const char* id, int type_id) {
      return OrderedJson{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
    };
    post_processor = {
        {"type", "TemplateProcessing"},
        {"single", OrderedJson::array({special(0), sequence("A", 0)})},
        {"pair", OrderedJson::array({special(0), sequence("A", 0), special(1), sequence("B", 1)})},
        {"special_tokens",
         {{bos,
           {{"id", bos},
            {"ids", OrderedJson::array({*bos_id_})},
            {"tokens", OrderedJson::array({bos})}}}}}};
  }

  OrderedJson vocab = OrderedJson::object();
  for (const auto& [piece, id] : vocab_) vocab[piece] = id;

  OrderedJson root = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", std::move(added)},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", add_prefix_space_},
        {"trim_offsets", true},
        {"use_regex", use_regex_}}},
      {"post_processor", std::move(post_processor)},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", std::move(vocab)},
        {"merges", OrderedJson::array()}}},
  };
  return root.dump(2);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() + 1);
  if (add_bos && bos_id_.has_value()) ids.push_back(*bos_id_);
  EncodePiece(text, 0, &ids);
  return ids;
}

void Tokenizer::EncodePiece(std::string_view text, int pass, std::vector<int32_t>* out) const {
  if (text.empty()) return;
  if (pass == 2) {
    // ByteLevel pre-tokenizer + BPE without merges: one token per byte. The optional GPT-2
    // regex split only groups bytes into words, which cannot change ids without merges.
    if (add_prefix_space_ && text[0] != ' ') out->push_back(byte_to_id_[' ']);
    for (char c : text) out->push_back(byte_to_id_[static_cast<uint8_t>(c)]);
    return;
  }
  // Hugging Face AddedVocabulary::find_matches: leftmost-longest, non-overlapping matches;
  // lstrip/rstrip widen a match over adjacent whitespace, which is then dropped.
  const MatchSet& set = match_sets_[pass];
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (size_t index : set[static_cast<uint8_t>(text[pos])]) {
      const AddedToken& t = added_[index];
      if (text.substr(pos, t.content.size()) == t.content) {
        match = &t;
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + match->content.size();
    if (match->lstrip) {
      start = std::max(TrailingWhitespaceStart(text.substr(0, start)), start_offset);
    }
    if (match->rstrip) stop += LeadingWhitespace(text.substr(stop));
    if (start_offset < start) {
      EncodePiece(text.substr(start_offset, start - start_offset), pass + 1, out);
    }
    out->push_back(match->id);
    start_offset = stop;
    // The matcher resumes right after the matched text, not after the stripped whitespace.
    pos += match->content.size();
  }
  if (start_offset < text.size()) EncodePiece(text.substr(start_offset), pass + 1, out);
}

std::string Tokenizer::DecodeToken(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return decoded_[id];
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id >= 0 && id < vocab_size()) out += decoded_[id];
  }
  return out;
}

std::string Tokenizer::Piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return pieces_[id];
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view piece) const {
  const auto it = piece_to_id_.find(piece);
  if (it == piece_to_id_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

}  // namespace moleserve::engine
