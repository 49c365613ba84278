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
#include "engine/core/check.h"
#include "engine/core/file_io.h"
#include "engine/core/json_depth.h"
#include "engine/core/status_macros.h"
#include "engine/tokenizer/bpe.h"
#include "engine/tokenizer/components.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// Byte length of the whitespace run at the start of `s`.
size_t LeadingWhitespace(std::string_view s) {
  size_t i = 0;
  char32_t cp;
  while (i < s.size()) {
    const size_t len = DecodeCodePoint(s, i, &cp);
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
    if (DecodeCodePoint(s, start, &cp) != end - start || !IsUnicodeWhitespace(cp)) break;
    end = start;
  }
  return end;
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

const Json& Member(const Json& obj, const char* key) {
  static const Json kNull = nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? kNull : *it;
}

// The parts of model (type BPE) that BpeModel::Create needs, plus what ToJson writes back.
struct ParsedModel {
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  BpeModel::Options options;
  std::optional<double> dropout;
};

absl::StatusOr<ParsedModel> ParseModel(const Json& model) {
  if (!model.is_object()) return Invalid("'model' must be an object");
  const auto type = model.find("type");
  if (type != model.end() ? TypeOf(model) != "BPE" : !model.contains("merges")) {
    return Unsupported(absl::StrCat("model type ", type != model.end() ? TypeOf(model) : "?",
                                    " is not supported (only BPE)"));
  }
  ParsedModel parsed;
  const Json& merges = Member(model, "merges");
  if (!merges.is_null()) {
    if (!merges.is_array()) return Invalid("model.merges must be an array");
    parsed.merges.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const Json& m = merges[rank];
      if (m.is_string()) {
        // Legacy "left right": exactly one space (HF rejects anything else).
        const std::string& line = m.get_ref<const std::string&>();
        const size_t space = line.find(' ');
        if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
          return Invalid(absl::StrCat("model.merges[", rank, "] '", line,
                                      "' is not two tokens separated by one space"));
        }
        parsed.merges.emplace_back(line.substr(0, space), line.substr(space + 1));
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        parsed.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      } else {
        return Invalid(absl::StrCat("model.merges[", rank, "] = ", m.dump(),
                                    " is neither \"a b\" nor [\"a\", \"b\"]"));
      }
    }
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const Json& affix = Member(model, key);
    if (!affix.is_null() && affix != "") {
      return Unsupported(absl::StrCat("model.", key, " ", affix.dump(), " is not supported"));
    }
  }
  const Json& dropout = Member(model, "dropout");
  if (!dropout.is_null()) {
    if (!dropout.is_number()) return Invalid("model.dropout must be a number or null");
    parsed.dropout = dropout.get<double>();
    // Dropout randomizes merges at encode time (a training aid); without merges it is a no-op.
    if (*parsed.dropout > 0 && !parsed.merges.empty()) {
      return Unsupported(
          absl::StrCat("model.dropout ", dropout.dump(), " is not supported (only null or 0)"));
    }
  }
  const Json& unk = Member(model, "unk_token");
  if (!unk.is_null()) {
    if (!unk.is_string()) return Invalid("model.unk_token must be a string or null");
    parsed.options.unk_token = unk.get<std::string>();
  }
  ASSIGN_OR_RETURN(parsed.options.fuse_unk, BoolMember(model, "fuse_unk", false, "model"));
  ASSIGN_OR_RETURN(parsed.options.byte_fallback,
                   BoolMember(model, "byte_fallback", false, "model"));
  ASSIGN_OR_RETURN(parsed.options.ignore_merges,
                   BoolMember(model, "ignore_merges", false, "model"));

  const Json& vocab = Member(model, "vocab");
  if (!vocab.is_object()) return Invalid("model.vocab must be an object");
  parsed.vocab.reserve(vocab.size());
  for (const auto& [piece, id_json] : vocab.items()) {
    int32_t id;
    if (!JsonToId(id_json, &id)) {
      return Invalid(absl::StrCat("model.vocab['", piece, "'] = ", id_json.dump(),
                                  " is not an id in [0, ", kMaxTokenizerVocabSize, ")"));
    }
    parsed.vocab.emplace_back(piece, id);
  }
  return parsed;
}

absl::StatusOr<std::vector<Tokenizer::AddedToken>> ParseAddedTokens(const Json& root) {
  std::vector<Tokenizer::AddedToken> added;
  const Json& list = Member(root, "added_tokens");
  if (list.is_null()) return added;
  if (!list.is_array()) return Invalid("'added_tokens' must be an array");
  for (const Json& entry : list) {
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
    ASSIGN_OR_RETURN(t.special, BoolMember(entry, "special", false, where));
    ASSIGN_OR_RETURN(t.single_word, BoolMember(entry, "single_word", false, where));
    ASSIGN_OR_RETURN(t.lstrip, BoolMember(entry, "lstrip", false, where));
    ASSIGN_OR_RETURN(t.rstrip, BoolMember(entry, "rstrip", false, where));
    // Hugging Face: special tokens are not normalized unless the file says so.
    ASSIGN_OR_RETURN(t.normalized, BoolMember(entry, "normalized", !t.special, where));
    if (t.single_word) {
      return Unsupported(absl::StrCat(where, " uses single_word=true, which is not supported"));
    }
    added.push_back(std::move(t));
  }
  return added;
}

// The content of the special token a TemplateProcessing post-processor puts first in a single
// sequence (searched inside Sequence post-processors too). `found` tells whether a
// TemplateProcessing exists at all.
std::optional<int32_t> TemplateBos(const Json& processor, bool* found) {
  const std::string type = TypeOf(processor);
  if (type == "Sequence") {
    for (const Json& child : Member(processor, "processors")) {
      std::optional<int32_t> bos = TemplateBos(child, found);
      if (*found) return bos;
    }
    return std::nullopt;
  }
  if (type != "TemplateProcessing") return std::nullopt;
  *found = true;
  const Json& single = Member(processor, "single");
  if (!single.is_array() || single.empty() || !single[0].is_object()) return std::nullopt;
  const Json& special = Member(single[0], "SpecialToken");
  if (!special.is_object() || !Member(special, "id").is_string()) return std::nullopt;
  const Json& tokens = Member(processor, "special_tokens");
  if (!tokens.is_object()) return std::nullopt;
  const Json& entry = Member(tokens, special["id"].get_ref<const std::string&>().c_str());
  const Json& ids = Member(entry, "ids");
  int32_t id;
  if (!ids.is_array() || ids.size() != 1 || !JsonToId(ids[0], &id)) return std::nullopt;
  return id;
}

// tokenizer.json of ByteLevelDemo() (without its post-processor, which ToJson adds).
std::string DemoJson() {
  OrderedJson added = OrderedJson::array();
  int32_t id = 256;
  for (const char* name : {"<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"}) {
    added.push_back({{"id", id++},
                     {"content", name},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  OrderedJson vocab = OrderedJson::object();
  for (int b = 0; b < 256; ++b) vocab[ByteLevelSymbol(static_cast<uint8_t>(b))] = b;
  const OrderedJson root = {
      {"added_tokens", std::move(added)},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", false},
        {"trim_offsets", true},
        {"use_regex", false}}},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model", {{"type", "BPE"}, {"vocab", std::move(vocab)}, {"merges", OrderedJson::array()}}},
  };
  return root.dump();
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

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
  if (JsonNestingDepth(json) > kMaxJsonDepth) {
    return Invalid(absl::StrCat("JSON nested deeper than ", kMaxJsonDepth, " levels"));
  }
  Json root;
  try {
    root = Json::parse(json.begin(), json.end());
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!root.is_object()) return Invalid("top level is not a JSON object");

  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  const Json& normalizer = Member(root, "normalizer");
  const Json& pre_tokenizer = Member(root, "pre_tokenizer");
  const Json& decoder = Member(root, "decoder");
  ASSIGN_OR_RETURN(tok->normalizer_, Normalizer::FromJson(normalizer));
  ASSIGN_OR_RETURN(tok->pre_tokenizer_, PreTokenizer::FromJson(pre_tokenizer));
  ASSIGN_OR_RETURN(tok->decoder_, Decoder::FromJson(decoder));
  tok->normalizer_json_ = normalizer.dump();
  tok->pre_tokenizer_json_ = pre_tokenizer.dump();
  tok->decoder_json_ = decoder.dump();
  tok->sanitize_input_ = !(tok->normalizer_->identity() && tok->pre_tokenizer_->byte_level());

  const auto model = root.find("model");
  if (model == root.end()) return Invalid("no 'model'");
  ASSIGN_OR_RETURN(ParsedModel parsed, ParseModel(*model));
  ASSIGN_OR_RETURN(std::vector<AddedToken> added, ParseAddedTokens(root));
  tok->dropout_ = parsed.dropout;
  // HF looks the unk token up in the model vocabulary only; a file whose unk token is an added
  // token would make HF fail on unknown characters. We use the added token's id instead.
  if (parsed.options.unk_token.has_value()) {
    for (const AddedToken& t : added) {
      if (t.content == *parsed.options.unk_token) parsed.options.unk_id = t.id;
    }
    for (const auto& [piece, id] : parsed.vocab) {
      if (piece == *parsed.options.unk_token) parsed.options.unk_id = id;
    }
  }
  ASSIGN_OR_RETURN(tok->model_,
                   BpeModel::Create(std::move(parsed.vocab), parsed.merges, parsed.options));
  RETURN_IF_ERROR(tok->Init(std::move(added)));

  bool has_template = false;
  const std::optional<int32_t> template_bos =
      TemplateBos(Member(root, "post_processor"), &has_template);
  if (has_template) {
    tok->bos_id_.reset();
    if (template_bos.has_value() && *template_bos < tok->vocab_size() &&
        !tok->pieces_[*template_bos].empty()) {
      tok->bos_id_ = template_bos;
    }
  }
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJsonFile(const std::string& path) {
  // The largest public tokenizer.json files are tens of MB; this bounds a hostile one.
  constexpr int64_t kMaxTokenizerBytes = int64_t{512} << 20;
  ASSIGN_OR_RETURN(std::string contents, ReadRegularFile(path, kMaxTokenizerBytes));
  return ParseWithContext(contents, path);
}

absl::Status Tokenizer::Init(std::vector<AddedToken> added) {
  const auto& vocab = model_->vocab();
  int32_t max_id = vocab.empty() ? -1 : vocab.back().second;
  for (const AddedToken& t : added) max_id = std::max(max_id, t.id);

  const size_t size = static_cast<size_t>(max_id + 1);
  pieces_.assign(size, "");
  decoded_.assign(size, "");
  special_.assign(size, false);
  std::vector<bool> used(size, false);
  for (const auto& [piece, id] : vocab) {
    used[id] = true;
    pieces_[id] = piece;
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
    added_to_id_[t.content] = t.id;
  }
  for (size_t id = 0; id < size; ++id) {
    if (used[id] && !special_[id]) decoded_[id] = decoder_->DecodeStreaming(pieces_[id]);
  }

  added_ = std::move(added);
  match_text_.clear();
  for (auto& set : match_sets_) {
    for (auto& bucket : set) bucket.clear();
  }
  for (size_t i = 0; i < added_.size(); ++i) {
    const AddedToken& t = added_[i];
    // HF matches normalized=true tokens by their normalized content.
    match_text_.push_back(t.normalized && !normalizer_->identity()
                              ? normalizer_->Apply(SanitizeUtf8(t.content))
                              : t.content);
    if (match_text_.back().empty()) continue;
    match_sets_[t.normalized ? 1 : 0][static_cast<uint8_t>(match_text_.back()[0])].push_back(i);
  }
  for (auto& set : match_sets_) {
    for (auto& bucket : set) {
      std::stable_sort(bucket.begin(), bucket.end(), [&](size_t a, size_t b) {
        return match_text_[a].size() > match_text_[b].size();
      });
    }
  }

  static constexpr std::string_view kBosNames[] = {"<|begin_of_text|>", "<s>"};
  static constexpr std::string_view kEosNames[] = {"<|end_of_text|>", "</s>", "<|endoftext|>",
                                                   "<|im_end|>"};
  const auto find_added = [&](std::string_view name) -> std::optional<int32_t> {
    const auto it = added_to_id_.find(name);
    if (it == added_to_id_.end()) return std::nullopt;
    return it->second;
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
  auto tok = FromJsonString(DemoJson());
  // The demo vocabulary is fixed; failing to build it is a bug in this file.
  MOLE_CHECK_MSG(tok.ok(), "ByteLevelDemo vocabulary is inconsistent");
  return std::move(*tok);
}

std::string Tokenizer::ToJson() const {
  Json added = Json::array();
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

  Json post_processor = nullptr;
  if (bos_id_.has_value() && *bos_id_ >= 0 && *bos_id_ < vocab_size() &&
      !pieces_[*bos_id_].empty()) {
    const std::string& bos = pieces_[*bos_id_];
    const auto special = [&](int type_id) {
      return Json{{"SpecialToken", {{"id", bos}, {"type_id", type_id}}}};
    };
    const auto sequence = [](const char* id, int type_id) {
      return Json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
    };
    post_processor = {
        {"type", "TemplateProcessing"},
        {"single", Json::array({special(0), sequence("A", 0)})},
        {"pair", Json::array({special(0), sequence("A", 0), special(1), sequence("B", 1)})},
        {"special_tokens",
         {{bos, {{"id", bos}, {"ids", Json::array({*bos_id_})}, {"tokens", Json::array({bos})}}}}}};
  } else {
    // A template that adds nothing: with null, loading this back would take <s> or
    // <|begin_of_text|> as BOS by name.
    const auto sequence = [](const char* id, int type_id) {
      return Json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
    };
    post_processor = {{"type", "TemplateProcessing"},
                      {"single", Json::array({sequence("A", 0)})},
                      {"pair", Json::array({sequence("A", 0), sequence("B", 1)})},
                      {"special_tokens", Json::object()}};
  }

  // Plain (key-sorted) JSON objects: nlohmann's ordered_json inserts in linear time.
  Json vocab = Json::object();
  for (const auto& [piece, id] : model_->vocab()) vocab[piece] = id;
  Json merges = Json::array();
  for (const auto& [left, right] : model_->MergesByRank()) {
    merges.push_back(Json::array({pieces_[left], pieces_[right]}));
  }
  const BpeModel::Options& options = model_->options();

  Json root = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", std::move(added)},
      {"normalizer", Json::parse(normalizer_json_)},
      {"pre_tokenizer", Json::parse(pre_tokenizer_json_)},
      {"post_processor", std::move(post_processor)},
      {"decoder", Json::parse(decoder_json_)},
      {"model",
       {{"type", "BPE"},
        {"dropout", dropout_.has_value() ? Json(*dropout_) : Json(nullptr)},
        {"unk_token", options.unk_token.has_value() ? Json(*options.unk_token) : Json(nullptr)},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", options.fuse_unk},
        {"byte_fallback", options.byte_fallback},
        {"ignore_merges", options.ignore_merges},
        {"vocab", std::move(vocab)},
        {"merges", std::move(merges)}}},
  };
  return root.dump(2);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (add_bos && bos_id_.has_value()) ids.push_back(*bos_id_);
  std::string sanitized;
  if (sanitize_input_ && !IsValidUtf8(text)) {
    sanitized = SanitizeUtf8(text);
    text = sanitized;
  }
  EncodePiece(text, 0, /*at_start=*/true, &ids);
  return ids;
}

void Tokenizer::EncodePiece(std::string_view text, int pass, bool at_start,
                            std::vector<int32_t>* out) const {
  if (text.empty()) return;
  // Hands a piece that is not an added token to the next stage.
  const auto next = [&](std::string_view piece, bool piece_at_start) {
    if (pass == 0) {
      if (normalizer_->identity()) {
        EncodePiece(piece, 1, piece_at_start, out);
      } else {
        EncodePiece(normalizer_->Apply(piece), 1, piece_at_start, out);
      }
      return;
    }
    std::vector<std::string> words;
    pre_tokenizer_->Split(piece, piece_at_start, &words);
    for (const std::string& word : words) model_->Tokenize(word, out);
  };

  // Hugging Face AddedVocabulary::find_matches: leftmost-longest, non-overlapping matches;
  // lstrip/rstrip widen a match over adjacent whitespace, which is then dropped.
  const MatchSet& set = match_sets_[pass];
  size_t start_offset = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    size_t match_size = 0;
    for (size_t index : set[static_cast<uint8_t>(text[pos])]) {
      const std::string& m = match_text_[index];
      if (text.substr(pos, m.size()) == m) {
        match = &added_[index];
        match_size = m.size();
        break;
      }
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + match_size;
    if (match->lstrip) {
      start = std::max(TrailingWhitespaceStart(text.substr(0, start)), start_offset);
    }
    if (match->rstrip) stop += LeadingWhitespace(text.substr(stop));
    if (start_offset < start) {
      next(text.substr(start_offset, start - start_offset), at_start && start_offset == 0);
    }
    out->push_back(match->id);
    start_offset = stop;
    // The matcher resumes right after the matched text, not after the stripped whitespace.
    pos += match_size;
  }
  if (start_offset < text.size()) {
    next(text.substr(start_offset), at_start && start_offset == 0);
  }
}

std::string Tokenizer::DecodeToken(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return decoded_[id];
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size() || special_[id] || pieces_[id].empty()) continue;
    tokens.push_back(pieces_[id]);
  }
  return decoder_->Decode(std::move(tokens));
}

std::string Tokenizer::Piece(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  return pieces_[id];
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view piece) const {
  // Added tokens take precedence, as in Hugging Face.
  const auto it = added_to_id_.find(piece);
  if (it != added_to_id_.end()) return it->second;
  return model_->PieceToId(piece);
}

bool Tokenizer::IsSpecial(int32_t id) const { return id >= 0 && id < vocab_size() && special_[id]; }

}  // namespace moleserve::engine
