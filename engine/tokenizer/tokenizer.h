#pragma once

// Tokenizer for Hugging Face `tokenizer.json` files: the byte-level BPE of Llama 3, Qwen2/3 and
// GPT-2 style models, and the SentencePiece-style BPE with byte fallback of Llama 2, Mistral and
// TinyLlama.
//
// Supported (anything else is rejected at load time with kUnimplemented naming it; see
// components.h for the details of each stage):
//   model          BPE: ranked merges (strings "a b" or pairs ["a", "b"]), ignore_merges,
//                  byte_fallback, unk_token, fuse_unk. continuing_subword_prefix and
//                  end_of_word_suffix only when null or "". dropout only when null or 0, or
//                  when there are no merges.
//   normalizer     null, Sequence, Prepend, Replace (String pattern), NFC.
//   pre_tokenizer  null, Sequence, ByteLevel (GPT-2 regex when use_regex), Split (a Regex or
//                  String pattern with any behavior), Metaspace, Digits.
//   decoder        null, Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace.
//   post_processor used only to find the BOS token: the leading special token of a
//                  TemplateProcessing "single" template (also inside a Sequence). Whether BOS is
//                  added is the caller's choice (Encode's add_bos).
//   added_tokens   any number; single_word=true is kUnimplemented.
//
// Encode() reproduces `tokenizers.Tokenizer.encode(text, add_special_tokens=False).ids`: added
// tokens are split out of the raw text first (normalized=false tokens, leftmost-longest,
// honouring lstrip/rstrip), each remaining piece is normalized, normalized=true added tokens are
// split out of that, the rest is pre-tokenized into words and each word goes through BPE.
//
// Decoding comes in two forms:
//   Decode(ids)       == `decode(ids, skip_special_tokens=True)` exactly: the whole decoder chain,
//                        including Llama 2's Strip of one leading space and U+FFFD for bytes that
//                        do not form valid UTF-8. Always valid UTF-8. Use it for whole texts.
//   DecodeToken(id)   the raw bytes one token adds when it is streamed after earlier tokens
//                        (generated continuation text): "▁Hello" -> " Hello" (the space is kept:
//                        nothing is stripped), "<0xE4>" -> the byte E4, "Ġ" -> " ". A token may
//                        end inside a UTF-8 character; concatenate and hold back the incomplete
//                        tail (CompleteUtf8Prefix / SanitizeUtf8 in utf8.h, OutputText).
// For ByteLevel tokenizers SanitizeUtf8(concat of DecodeToken) == Decode. For Metaspace ones
// (Llama 2) the concatenation keeps the space of the first "▁word" token that Decode strips:
// encoding "Hello world" gives "▁Hello▁world", streamed as " Hello world", decoded as
// "Hello world". Special tokens decode to "" in both forms.
//
// Input that is not valid UTF-8 is tokenized byte for byte by ByteLevel tokenizers without a
// normalizer; for all others its invalid sequences first become U+FFFD (HF accepts only valid
// strings).
//
// Usage:
//
//   ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tok, Tokenizer::FromJsonFile(json_path));
//   tok->set_eos_ids(eos_ids_from_generation_config);  // Before sharing the tokenizer.
//   std::vector<int32_t> ids = tok->Encode(prompt, /*add_bos=*/true);
//   std::string text = tok->Decode(ids);

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

class BpeModel;
class Decoder;
class Normalizer;
class PreTokenizer;

// A BPE tokenizer loaded from tokenizer.json (see the file comment for what is supported).
//
// Lifecycle: created by FromJsonString/FromJsonFile/ByteLevelDemo, optionally adjusted with
// set_bos_id()/set_eos_ids(), then used read-only.
//
// Thread safety: all const methods may be called concurrently (the BPE word cache inside is
// mutex-guarded). The setters are not thread-safe and must be called before the tokenizer is
// shared between threads.
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
  // added tokens, merges of unknown tokens, a regex that does not compile); kUnimplemented for
  // valid but unsupported features (model types other than BPE, other normalizers,
  // pre-tokenizers or decoders, single_word added tokens), naming the feature.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonString(std::string_view json);

  // FromJsonString on the contents of `path`; messages are prefixed with the path. A missing
  // file is kNotFound.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJsonFile(const std::string& path);

  // A self-contained tokenizer for tests and demos: ids 0..255 are the bytes (token string =
  // GPT-2 byte_to_unicode(b)), no merges, then the special tokens 256 <|begin_of_text|> (BOS),
  // 257 <|end_of_text|> (EOS), 258 <|pad|>, 259 <|unk|>. vocab_size() == 260.
  static std::unique_ptr<Tokenizer> ByteLevelDemo();

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // A Hugging Face compatible tokenizer.json that FromJsonString turns into a tokenizer that
  // encodes and decodes identically: the vocabulary, merges, added tokens, normalizer,
  // pre-tokenizer and decoder as loaded, and a TemplateProcessing post-processor that prepends
  // BOS when bos_id() names a token (one that prepends nothing otherwise, so that no BOS is
  // guessed from token names on reload).
  [[nodiscard]] std::string ToJson() const;

  // Token ids of `text` (arbitrary bytes; see the file comment about invalid UTF-8), preceded by
  // bos_id() when `add_bos` is true and a BOS token is known.
  [[nodiscard]] std::vector<int32_t> Encode(std::string_view text, bool add_bos) const;

  // The raw bytes token `id` contributes to streamed continuation text (see the file comment).
  // Special tokens and unknown ids decode to "".
  [[nodiscard]] std::string DecodeToken(int32_t id) const;

  // Hugging Face's decode(ids, skip_special_tokens=True), exactly; valid UTF-8. Unknown ids are
  // skipped.
  [[nodiscard]] std::string Decode(absl::Span<const int32_t> ids) const;

  // The token's vocabulary string, e.g. "Ġ" for the space byte, "▁Hello" or "<|end_of_text|>";
  // "" for an unknown id.
  [[nodiscard]] std::string Piece(int32_t id) const;

  // The id of vocabulary string `piece` (added tokens included), if any.
  [[nodiscard]] std::optional<int32_t> TokenToId(std::string_view piece) const;

  // Largest token id + 1 (model vocabulary and added tokens). Ids in [0, vocab_size()) that no
  // token uses are "unknown": empty Piece and DecodeToken.
  [[nodiscard]] int32_t vocab_size() const { return static_cast<int32_t>(pieces_.size()); }

  // BOS defaults to the leading special token of the post-processor's template, else to the
  // added token named <|begin_of_text|> or <s>. EOS defaults to the added tokens named
  // <|end_of_text|>, </s>, <|endoftext|>, <|im_end|> (all that exist). The engine overrides
  // them from config.json / generation_config.json.
  [[nodiscard]] std::optional<int32_t> bos_id() const { return bos_id_; }
  [[nodiscard]] const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  void set_bos_id(std::optional<int32_t> id) { bos_id_ = id; }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }

  // True for added tokens marked special (skipped by decoding, matched anywhere when
  // encoding).
  [[nodiscard]] bool IsSpecial(int32_t id) const;

  const std::vector<AddedToken>& added_tokens() const { return added_; }

 private:
  // Indices into added_ of the tokens whose match text starts with a given byte, longest first.
  using MatchSet = std::array<std::vector<size_t>, 256>;

  Tokenizer();

  // Derives the lookup tables from the parsed parts.
  absl::Status Init(std::vector<AddedToken> added);
  // Parses `json`; nlohmann type errors may throw out of it.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> ParseJson(std::string_view json);
  // ParseJson with every exception turned into a status and every message prefixed with
  // "`context`: ".
  static absl::StatusOr<std::unique_ptr<Tokenizer>> ParseWithContext(std::string_view json,
                                                                     std::string_view context);

  // Splits the added tokens of match_sets_[pass] out of `text` (pass 0: raw text, normalized ==
  // false tokens; pass 1: normalized text, normalized == true tokens) and hands every remaining
  // piece to the next stage. `at_start`: `text` begins at offset 0 of Encode's input.
  void EncodePiece(std::string_view text, int pass, bool at_start, std::vector<int32_t>* out) const;

  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  // The normalizer, pre_tokenizer and decoder objects as loaded (JSON text), for ToJson().
  std::string normalizer_json_ = "null";
  std::string pre_tokenizer_json_ = "null";
  std::string decoder_json_ = "null";
  std::optional<double> dropout_;
  // Encode() replaces invalid UTF-8 by U+FFFD first (all but plain ByteLevel pipelines).
  bool sanitize_input_ = true;

  std::vector<AddedToken> added_;
  // Text each added token is matched against: its content, normalized for normalized == true.
  std::vector<std::string> match_text_;
  // Indexed by token id, size vocab_size().
  std::vector<std::string> pieces_;
  std::vector<std::string> decoded_;
  std::vector<bool> special_;
  std::map<std::string, int32_t, std::less<>> added_to_id_;
  // [0]: added tokens with normalized == false; [1]: normalized == true (HF matches them in
  // this order).
  std::array<MatchSet, 2> match_sets_;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
};

}  // namespace moleserve::engine
