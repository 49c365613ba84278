#pragma once

// Tokenizer for Hugging Face `tokenizer.json` files.
//
// Supported in this version (anything else is rejected at load time with an error naming it):
//   model          BPE with an EMPTY merges list: every byte is one token. Full BPE merges come
//                  later; a non-empty list is kUnimplemented.
//   normalizer     null.
//   pre_tokenizer  ByteLevel (GPT-2 byte-to-unicode mapping), add_prefix_space true or false,
//                  use_regex true or false (without merges the GPT-2 split cannot change ids).
//   decoder        ByteLevel.
//   post_processor anything; it is ignored: Encode(text, add_bos) decides about BOS.
//   added_tokens   any number; single_word=true is kUnimplemented.
// The vocabulary must contain the byte-level symbol of all 256 bytes.
//
// Encode() reproduces `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids` for such
// files: added tokens are split out of the text first (tokens with normalized=false in a first
// pass, then normalized=true ones, each pass leftmost-longest, honouring lstrip/rstrip), and every
// remaining piece is mapped byte by byte.
//
// Usage:
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromJsonFile(json_path));
//   tok->set_eos_ids(eos_ids_from_generation_config);  // Before sharing the tokenizer.
//   std::vector<int32_t> ids = tok->Encode(prompt, /*add_bos=*/true);
//   std::string text = tok->Decode(ids);  // Raw bytes; see SanitizeUtf8().

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moleserve::engine {

// Largest token id + 1 that FromJsonString accepts (guards against absurd ids in a file).
inline constexpr int32_t kMaxTokenizerVocabSize = 1 << 22;

// A byte-level BPE tokenizer (see the file comment for what is supported).
//
// Lifecycle: created by FromJsonString/FromJsonFile/ByteLevelDemo, optionally adjusted with
// set_bos_id()/set_eos_ids(), then used read-only.
//
// Thread safety: all const methods may be called concurrently. The setters are not thread-safe
// and must be called before the tokenizer is shared between threads.
class Tokenizer {
 public:
  // One entry of tokenizer.json's "added_tokens".
  struct AddedToken {
    int32_t id = 0;
    std::string content;
    bool single_word = false;
    bool lstrip = false;
    bool rstrip = false;
    bool normalized = false;
    bool special = false;
  };

  // Parses a tokenizer.json document.
  // Errors: kInvalidArgument for malformed JSON or inconsistent content (bad ids, duplicate
  // added tokens, missing byte symbols); kUnimplemented for valid but unsupported features
  // (merges, model types other than BPE, other normalizers, pre-tokenizers or decoders).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonString(std::string_view json);

  // FromJsonString on the contents of `path`; messages are prefixed with the path. A missing
  // file is kNotFound.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonFile(const std::string& path);

  // A self-contained tokenizer for tests and demos: ids 0..255 are the bytes (token string =
  // GPT-2 byte_to_unicode(b)), then the special tokens 256 <|begin_of_text|> (BOS),
  // 257 <|end_of_text|> (EOS), 258 <|pad|>, 259 <|unk|>. vocab_size() == 260.
  static std::unique_ptr<Tokenizer> ByteLevelDemo();

  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // A Hugging Face compatible tokenizer.json for this tokenizer (BPE, empty merges, ByteLevel
  // pre-tokenizer and decoder; a TemplateProcessing post-processor that prepends BOS when
  // bos_id() names a token). FromJsonString(ToJson()) encodes and decodes identically.
  [[nodiscard]] std::string ToJson() const;

  // Token ids of `text` (arbitrary bytes; need not be valid UTF-8), preceded by bos_id() when
  // `add_bos` is true and a BOS token is known.
  [[nodiscard]] std::vector<int32_t> Encode(std::string_view text, bool add_bos) const;

  // The raw bytes that token `id` stands for (ByteLevel-decoded; may be part of a multi-byte
  // code point). Special tokens and unknown ids decode to "" (skip_special_tokens semantics).
  [[nodiscard]] std::string DecodeToken(int32_t id) const;

  // Concatenation of DecodeToken over `ids`. The result may be invalid UTF-8 where the ids cut a
  // code point; SanitizeUtf8() of it equals Hugging Face's decode(ids, skip_special_tokens=True).
  [[nodiscard]] std::string Decode(absl::Span<const int32_t> ids) const;

  // The token's vocabulary string, e.g. "Ġ" for the space byte or "<|end_of_text|>"; "" for an
  // unknown id.
  [[nodiscard]] std::string Piece(int32_t id) const;

  // The id of vocabulary string `piece` (added tokens included), if any.
  [[nodiscard]] std::optional<int32_t> TokenToId(std::string_view piece) const;

  // Largest token id + 1 (model vocabulary and added tokens). Ids in [0, vocab_size()) that no
  // token uses are "unknown": empty Piece and DecodeToken.
  [[nodiscard]] int32_t vocab_size() const { return static_cast<int32_t>(pieces_.size()); }

  // BOS/EOS default to the added tokens named <|begin_of_text|> or <s> (BOS) and
  // <|end_of_text|>, </s>, <|endoftext|>, <|im_end|> (all that exist are EOS). The engine
  // overrides them from config.json / generation_config.json.
  [[nodiscard]] std::optional<int32_t> bos_id() const { return bos_id_; }
  [[nodiscard]] const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  void set_bos_id(std::optional<int32_t> id) { bos_id_ = id; }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }

  // True for added tokens marked special (never produced by decoding, matched anywhere when
  // encoding).
  [[nodiscard]] bool IsSpecial(int32_t id) const;

  const std::vector<AddedToken>& added_tokens() const { return added_; }

 private:
  // Indices into added_ of the tokens whose content starts with a given byte, longest first.
  using MatchSet = std::array<std::vector<size_t>, 256>;

  Tokenizer() = default;

  // Validates the model and derives the lookup tables. `vocab` is the model vocabulary.
  absl::Status Init(std::vector<std::pair<std::string, int32_t>> vocab,
                    std::vector<AddedToken> added);
  // Parses `json`; nlohmann type errors may throw out of it.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> ParseJson(std::string_view json);
  // ParseJson with every exception turned into a status and every message prefixed with
  // "`context`: ".
  static absl::StatusOr<std::unique_ptr<Tokenizer>> ParseWithContext(std::string_view json,
                                                                     std::string_view context);

  // Appends to `out` the ids of `text`, splitting out the added tokens of `sets[0]`, then of
  // `sets[1]` in the remaining pieces, and byte-mapping the rest.
  void EncodePiece(std::string_view text, int pass, std::vector<int32_t>* out) const;

  // Model vocabulary (without added tokens), in id order.
  std::vector<std::pair<std::string, int32_t>> vocab_;
  std::vector<AddedToken> added_;
  // Indexed by token id, size vocab_size().
  std::vector<std::string> pieces_;
  std::vector<std::string> decoded_;
  std::vector<bool> special_;
  std::map<std::string, int32_t, std::less<>> piece_to_id_;
  // Token id of each byte's byte-level symbol.
  std::array<int32_t, 256> byte_to_id_{};
  // [0]: added tokens with normalized == false; [1]: normalized == true (HF matches them in
  // this order).
  std::array<MatchSet, 2> match_sets_;
  bool add_prefix_space_ = false;
  bool use_regex_ = false;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
};

}  // namespace moleserve::engine
