#pragma once

// The normalizer, pre-tokenizer and decoder stages of a Hugging Face tokenizer.json, each parsed
// from its JSON object and reproducing the Rust `tokenizers` crate's behaviour for the
// components listed below. Anything else is rejected by FromJson with kUnimplemented naming the
// component, so that an unsupported file fails at load time instead of tokenizing differently.
//
//   normalizer     null, Sequence, Prepend, Replace (String pattern), NFC
//   pre_tokenizer  null, Sequence, ByteLevel, Split (Regex or String pattern, every behavior,
//                  invert), Metaspace (prepend_scheme always/first/never or the older
//                  add_prefix_space, split), Digits
//   decoder        null, Sequence, ByteLevel, Replace (String pattern), ByteFallback, Fuse,
//                  Strip, Metaspace
//
// Thread safety: all three are immutable after FromJson; their const methods may be called
// concurrently.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace moleserve::engine {

// Reads an optional boolean member of a tokenizer.json object: absent or null gives `fallback`;
// any other non-boolean is kInvalidArgument naming `where` and `key`.
absl::StatusOr<bool> BoolMember(const nlohmann::json& obj, const char* key, bool fallback,
                                std::string_view where);

class Regex;

// GPT-2's bytes_to_unicode(): the printable character that stands for byte `b` in byte-level
// vocabularies ("Ġ" for the space byte), as UTF-8.
[[nodiscard]] const std::string& ByteLevelSymbol(uint8_t b);

// tokenizer.json "normalizer". Applied to each piece of input text that is not an added token.
class Normalizer {
 public:
  // `json` may be null (the identity).
  static absl::StatusOr<std::unique_ptr<Normalizer>> FromJson(const nlohmann::json& json);
  ~Normalizer();

  // True when Apply() returns its input unchanged for every input.
  [[nodiscard]] bool identity() const { return steps_.empty(); }
  // The normalized form of `text`, which must be valid UTF-8.
  [[nodiscard]] std::string Apply(std::string_view text) const;

 private:
  struct Step {
    enum class Kind { kPrepend, kReplace, kNfc };
    Kind kind;
    std::string pattern;  // kReplace: the literal to replace.
    std::string content;  // kPrepend: the prefix; kReplace: the replacement.
  };

  Normalizer() = default;
  static absl::Status Parse(const nlohmann::json& json, std::vector<Step>* steps);

  std::vector<Step> steps_;
};

// tokenizer.json "pre_tokenizer": splits a normalized piece into the words the model tokenizes.
class PreTokenizer {
 public:
  // `json` may be null (the whole piece is one word).
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> FromJson(const nlohmann::json& json);
  ~PreTokenizer();

  // Appends the non-empty words of `text` to `words`. `at_start` tells whether `text` begins at
  // offset 0 of the text passed to Encode (Metaspace prepend_scheme "first" uses it).
  void Split(std::string_view text, bool at_start, std::vector<std::string>* words) const;

  // True when the last step is ByteLevel: the words are byte symbols, so input bytes that are not
  // valid UTF-8 are tokenized faithfully.
  [[nodiscard]] bool byte_level() const;
  // True when some step is Metaspace.
  [[nodiscard]] bool metaspace() const;

 private:
  // One piece between steps: its text and whether it starts at offset 0 of the input.
  struct Piece {
    std::string text;
    bool at_start;
  };
  // How a Split step turns matches into pieces (HF SplitDelimiterBehavior).
  enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
  struct Step {
    enum class Kind { kSplit, kByteLevel, kMetaspace };
    Kind kind;
    // kSplit; kByteLevel with use_regex (the GPT-2 pattern), else null.
    std::shared_ptr<const Regex> regex;
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;  // kByteLevel
    // kMetaspace
    std::string replacement;
    enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;
    bool split = true;
  };

  PreTokenizer() = default;
  static absl::Status Parse(const nlohmann::json& json, std::vector<Step>* steps);
  static void ApplySplit(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& matches,
                         Behavior behavior, bool invert, std::vector<Piece>* out);
  static void ApplyStep(const Step& step, Piece piece, std::vector<Piece>* out);

  std::vector<Step> steps_;
};

// tokenizer.json "decoder": turns token strings back into text.
class Decoder {
 public:
  // `json` may be null (HF then joins the tokens with spaces).
  static absl::StatusOr<std::unique_ptr<Decoder>> FromJson(const nlohmann::json& json);
  ~Decoder();

  // Hugging Face's `decoder.decode(tokens)`: valid UTF-8.
  [[nodiscard]] std::string Decode(std::vector<std::string> tokens) const;

  // The bytes that `token` contributes when it is streamed after earlier text: the decoder chain
  // applied to this one token, except that nothing is stripped (Strip, Metaspace's first-token
  // rule) and byte tokens (ByteLevel symbols, <0xXX>) yield their raw byte even when it is part
  // of a multi-byte character. May therefore be invalid UTF-8 on its own. Without a decoder it
  // is the token itself (HF's join with spaces has no per-token equivalent).
  [[nodiscard]] std::string DecodeStreaming(std::string_view token) const;

 private:
  struct Step {
    enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace };
    Kind kind;
    std::string pattern;  // kReplace: the literal; kStrip: the character; kMetaspace: replacement.
    std::string content;  // kReplace: the replacement.
    int start = 0;        // kStrip
    int stop = 0;         // kStrip
    bool prepend = true;  // kMetaspace: prepend_scheme != never.
  };

  Decoder() = default;
  static absl::Status Parse(const nlohmann::json& json, std::vector<Step>* steps);
  static void Run(const Step& step, bool streaming, std::vector<std::string>* tokens);

  bool is_null_ = false;
  std::vector<Step> steps_;
};

}  // namespace moleserve::engine
