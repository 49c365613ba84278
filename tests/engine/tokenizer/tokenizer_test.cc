#include "engine/tokenizer/tokenizer.h"

#include <atomic>
#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer/utf8.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr int32_t kBos = 256;
constexpr int32_t kEos = 257;
constexpr int32_t kPad = 258;

std::vector<int32_t> Bytes(std::string_view s) {
  std::vector<int32_t> ids;
  for (char c : s) ids.push_back(static_cast<uint8_t>(c));
  return ids;
}

// The demo tokenizer.json, parsed for editing.
Json DemoJson() { return Json::parse(Tokenizer::ByteLevelDemo()->ToJson()); }

// Adds an added token to a tokenizer.json.
void AddToken(Json* j, int32_t id, const std::string& content, bool special,
              bool normalized = false, bool lstrip = false, bool rstrip = false) {
  (*j)["added_tokens"].push_back({{"id", id},
                                  {"content", content},
                                  {"single_word", false},
                                  {"lstrip", lstrip},
                                  {"rstrip", rstrip},
                                  {"normalized", normalized},
                                  {"special", special}});
}

std::unique_ptr<Tokenizer> FromJson(const Json& j) {
  auto tok = Tokenizer::FromJsonString(j.dump());
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? std::move(*tok) : nullptr;
}

TEST(TokenizerDemoTest, Vocabulary) {
  auto tok = Tokenizer::ByteLevelDemo();
  EXPECT_EQ(tok->vocab_size(), 260);
  EXPECT_EQ(tok->bos_id(), kBos);
  EXPECT_THAT(tok->eos_ids(), ElementsAre(kEos));
  EXPECT_EQ(tok->Piece('A'), "A");
  EXPECT_EQ(tok->Piece(' '), "\xC4\xA0");   // Ġ
  EXPECT_EQ(tok->Piece('\n'), "\xC4\x8A");  // Ċ
  EXPECT_EQ(tok->Piece(0), "\xC4\x80");     // Ā
  EXPECT_EQ(tok->Piece(0xAD), "\xC5\x83");  // Soft hyphen is not printable: Ń
  EXPECT_EQ(tok->Piece(0xFF), "\xC3\xBF");  // ÿ maps to itself
  EXPECT_EQ(tok->Piece(kBos), "<|begin_of_text|>");
  EXPECT_EQ(tok->Piece(kEos), "<|end_of_text|>");
  EXPECT_EQ(tok->Piece(kPad), "<|pad|>");
  EXPECT_EQ(tok->Piece(259), "<|unk|>");
  EXPECT_EQ(tok->Piece(260), "");
  EXPECT_EQ(tok->Piece(-1), "");
  EXPECT_TRUE(tok->IsSpecial(kBos));
  EXPECT_TRUE(tok->IsSpecial(259));
  EXPECT_FALSE(tok->IsSpecial('a'));
  EXPECT_FALSE(tok->IsSpecial(1000));
  EXPECT_EQ(tok->TokenToId("\xC4\xA0"), ' ');
  EXPECT_EQ(tok->TokenToId("<|pad|>"), kPad);
  EXPECT_EQ(tok->TokenToId("nope"), std::nullopt);
}

struct TextCase {
  const char* name;
  std::string text;
};

class TokenizerRoundTripTest : public testing::TestWithParam<TextCase> {};

TEST_P(TokenizerRoundTripTest, OneTokenPerByteAndBack) {
  auto tok = Tokenizer::ByteLevelDemo();
  const std::string& text = GetParam().text;
  const std::vector<int32_t> ids = tok->Encode(text, /*add_bos=*/false);
  EXPECT_EQ(ids, Bytes(text));
  // Decode is valid UTF-8 (HF's from_utf8_lossy); the streamed bytes are the input bytes.
  EXPECT_EQ(tok->Decode(ids), SanitizeUtf8(text));
  std::string streamed;
  for (int32_t id : ids) streamed += tok->DecodeToken(id);
  EXPECT_EQ(streamed, text);

  std::vector<int32_t> with_bos = tok->Encode(text, /*add_bos=*/true);
  ASSERT_FALSE(with_bos.empty());
  EXPECT_EQ(with_bos[0], kBos);
  with_bos.erase(with_bos.begin());
  EXPECT_EQ(with_bos, ids);
}

INSTANTIATE_TEST_SUITE_P(
    Texts, TokenizerRoundTripTest,
    testing::Values(TextCase{"Empty", ""}, TextCase{"Ascii", "Hello, world!\n\tx = 1;"},
                    TextCase{"Spaces", "  leading and trailing  "},
                    TextCase{"Cjk", "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C"},
                    TextCase{"Emoji", "\xF0\x9F\x98\x80 \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD"},
                    TextCase{"Controls", std::string("\0\x01\x7F\x80\xFF", 5)},
                    TextCase{"AngleBracketsNotSpecial", "<|begin_of_tex|> <| |> <|end_of_text"}),
    [](const testing::TestParamInfo<TextCase>& info) { return info.param.name; });

TEST(TokenizerDemoTest, SpecialTokensInsideText) {
  auto tok = Tokenizer::ByteLevelDemo();
  EXPECT_THAT(tok->Encode("a<|end_of_text|>b", false), ElementsAre('a', kEos, 'b'));
  EXPECT_THAT(tok->Encode("<|begin_of_text|><|begin_of_text|>", false), ElementsAre(kBos, kBos));
  EXPECT_THAT(tok->Encode("<|begin_of_text|>hi", true), ElementsAre(kBos, kBos, 'h', 'i'));
  EXPECT_THAT(tok->Encode("x <|pad|>\xE4\xBD\xA0<|unk|>", false),
              ElementsAre('x', ' ', kPad, 0xE4, 0xBD, 0xA0, 259));
  // Special tokens decode to nothing (skip_special_tokens).
  EXPECT_EQ(tok->Decode(tok->Encode("a<|end_of_text|>b", true)), "ab");
  EXPECT_EQ(tok->DecodeToken(kEos), "");
  EXPECT_EQ(tok->DecodeToken(-5), "");
  EXPECT_EQ(tok->DecodeToken(99999), "");
}

TEST(TokenizerDemoTest, DecodeTokenYieldsRawBytesOfSplitCodePoints) {
  auto tok = Tokenizer::ByteLevelDemo();
  const std::vector<int32_t> ids = tok->Encode("\xF0\x9F\x98\x80", false);
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(tok->DecodeToken(ids[0]), "\xF0");
  std::string streamed = tok->DecodeToken(ids[0]) + tok->DecodeToken(ids[1]);
  EXPECT_EQ(streamed, "\xF0\x9F");
  EXPECT_EQ(CompleteUtf8Prefix(streamed), 0u);
  // Decode is Hugging Face's decode: from_utf8_lossy of the bytes, so valid UTF-8.
  EXPECT_EQ(tok->Decode({ids.data(), 2}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->Decode(ids), "\xF0\x9F\x98\x80");
}

TEST(TokenizerDemoTest, OverrideBosEos) {
  auto tok = Tokenizer::ByteLevelDemo();
  tok->set_bos_id(std::nullopt);
  tok->set_eos_ids({kEos, kPad});
  EXPECT_THAT(tok->Encode("a", true), ElementsAre('a'));
  EXPECT_THAT(tok->eos_ids(), ElementsAre(kEos, kPad));
  tok->set_bos_id(kPad);
  EXPECT_THAT(tok->Encode("a", true), ElementsAre(kPad, 'a'));
}

TEST(TokenizerJsonTest, ToJsonIsHuggingFaceShaped) {
  const Json j = DemoJson();
  EXPECT_EQ(j["version"], "1.0");
  EXPECT_TRUE(j["normalizer"].is_null());
  EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(j["pre_tokenizer"]["add_prefix_space"], false);
  EXPECT_EQ(j["pre_tokenizer"]["use_regex"], false);
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  EXPECT_EQ(j["model"]["type"], "BPE");
  EXPECT_TRUE(j["model"]["merges"].is_array());
  EXPECT_TRUE(j["model"]["merges"].empty());
  EXPECT_TRUE(j["model"]["dropout"].is_null());
  EXPECT_EQ(j["model"]["byte_fallback"], false);
  EXPECT_EQ(j["model"]["vocab"].size(), 256u);
  EXPECT_EQ(j["model"]["vocab"]["\xC4\xA0"], 32);
  ASSERT_EQ(j["added_tokens"].size(), 4u);
  EXPECT_EQ(j["added_tokens"][0]["id"], kBos);
  EXPECT_EQ(j["added_tokens"][0]["content"], "<|begin_of_text|>");
  EXPECT_EQ(j["added_tokens"][0]["special"], true);
  EXPECT_EQ(j["added_tokens"][0]["normalized"], false);
  for (const char* key : {"single_word", "lstrip", "rstrip"}) {
    EXPECT_EQ(j["added_tokens"][3][key], false) << key;
  }
  EXPECT_EQ(j["post_processor"]["type"], "TemplateProcessing");
  EXPECT_EQ(j["post_processor"]["special_tokens"]["<|begin_of_text|>"]["ids"][0], kBos);
}

TEST(TokenizerJsonTest, RoundTripEncodesIdentically) {
  auto demo = Tokenizer::ByteLevelDemo();
  auto tok = Tokenizer::FromJsonString(demo->ToJson());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), demo->vocab_size());
  EXPECT_EQ((*tok)->bos_id(), demo->bos_id());
  EXPECT_EQ((*tok)->eos_ids(), demo->eos_ids());
  for (int32_t id = 0; id < demo->vocab_size(); ++id) {
    EXPECT_EQ((*tok)->Piece(id), demo->Piece(id)) << id;
    EXPECT_EQ((*tok)->DecodeToken(id), demo->DecodeToken(id)) << id;
    EXPECT_EQ((*tok)->IsSpecial(id), demo->IsSpecial(id)) << id;
  }
  for (const std::string text :
       {"plain", "a<|end_of_text|>b<|pad|>", "\xE4\xBD\xA0\xF0\x9F\x98\x80", " <|unk|> "}) {
    EXPECT_EQ((*tok)->Encode(text, true), demo->Encode(text, true)) << text;
  }
  EXPECT_EQ((*tok)->ToJson(), demo->ToJson());
}

TEST(TokenizerJsonTest, FromJsonFile) {
  const std::string path = testing::TempDir() + "tokenizer_test_tokenizer.json";
  {
    std::ofstream out(path);
    out << Tokenizer::ByteLevelDemo()->ToJson();
  }
  auto tok = Tokenizer::FromJsonFile(path);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 260);

  const std::string missing = testing::TempDir() + "tokenizer_test_missing.json";
  auto err = Tokenizer::FromJsonFile(missing);
  EXPECT_EQ(err.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(err.status().message()), HasSubstr(missing));

  const std::string bad = testing::TempDir() + "tokenizer_test_bad.json";
  {
    std::ofstream out(bad);
    out << "{\"model\":";
  }
  err = Tokenizer::FromJsonFile(bad);
  EXPECT_EQ(err.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(err.status().message()), HasSubstr(bad));
}

TEST(TokenizerJsonTest, BosEosFromConventionalNames) {
  Json j = DemoJson();
  j["added_tokens"] = Json::array();
  AddToken(&j, 256, "<s>", true);
  AddToken(&j, 257, "</s>", true);
  AddToken(&j, 258, "<|im_end|>", true);
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), 256);
  EXPECT_THAT(tok->eos_ids(), ElementsAre(257, 258));

  j["added_tokens"] = Json::array();
  AddToken(&j, 300, "<|endoftext|>", true);
  j["post_processor"] = nullptr;
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  EXPECT_THAT(tok->eos_ids(), ElementsAre(300));
  EXPECT_EQ(tok->vocab_size(), 301);
  EXPECT_EQ(tok->Piece(280), "");  // A gap in the ids.
  EXPECT_THAT(tok->Encode("a", true), ElementsAre('a'));
}

// Hugging Face matches added tokens with normalized=false first, then normalized=true ones in
// what is left, each pass leftmost-longest.
TEST(TokenizerJsonTest, AddedTokenMatchingOrder) {
  Json j = DemoJson();
  AddToken(&j, 260, "<|x|>", true);
  AddToken(&j, 261, "<|x|>y", true);
  AddToken(&j, 262, "cd", false, /*normalized=*/false);
  AddToken(&j, 263, "bcd", false, /*normalized=*/true);
  AddToken(&j, 264, "hello world", false, /*normalized=*/true);
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("<|x|>yz", false), ElementsAre(261, 'z'));
  EXPECT_THAT(tok->Encode("<|x|>z", false), ElementsAre(260, 'z'));
  // "cd" (non-normalized) wins over the longer, earlier-starting "bcd" (normalized).
  EXPECT_THAT(tok->Encode("bcd", false), ElementsAre('b', 262));
  EXPECT_THAT(tok->Encode("bce", false), ElementsAre('b', 'c', 'e'));
  EXPECT_THAT(tok->Encode("say hello world", false), ElementsAre('s', 'a', 'y', ' ', 264));
  // Non-special added tokens decode to their content (not byte-level symbols: the space).
  EXPECT_EQ(tok->DecodeToken(264), "hello world");
  EXPECT_EQ(tok->DecodeToken(262), "cd");
  EXPECT_FALSE(tok->IsSpecial(262));
}

TEST(TokenizerJsonTest, LstripRstrip) {
  Json j = DemoJson();
  AddToken(&j, 260, "<l>", true, false, /*lstrip=*/true, /*rstrip=*/false);
  AddToken(&j, 261, "<r>", true, false, /*lstrip=*/false, /*rstrip=*/true);
  AddToken(&j, 262, "<b>", true, false, /*lstrip=*/true, /*rstrip=*/true);
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("a  <l> b", false), ElementsAre('a', 260, ' ', 'b'));
  EXPECT_THAT(tok->Encode("a <r>\t b", false), ElementsAre('a', ' ', 261, 'b'));
  EXPECT_THAT(tok->Encode("a <b> b", false), ElementsAre('a', 262, 'b'));
  // U+3000 IDEOGRAPHIC SPACE is Unicode whitespace; U+00A0 too.
  EXPECT_THAT(tok->Encode("a\xE3\x80\x80<l>", false), ElementsAre('a', 260));
  EXPECT_THAT(tok->Encode("<r>\xC2\xA0z", false), ElementsAre(261, 'z'));
  // A previous token's rstrip already consumed the whitespace.
  EXPECT_THAT(tok->Encode("<r> <l>", false), ElementsAre(261, 260));
  // Whitespace only: the token consumes all of it.
  EXPECT_THAT(tok->Encode("   <b>   ", false), ElementsAre(262));
}

TEST(TokenizerJsonTest, AddPrefixSpace) {
  Json j = DemoJson();
  j["pre_tokenizer"]["add_prefix_space"] = true;
  j["pre_tokenizer"]["use_regex"] = true;
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hi", false), ElementsAre(' ', 'h', 'i'));
  EXPECT_THAT(tok->Encode(" hi", false), ElementsAre(' ', 'h', 'i'));
  // Each piece between added tokens gets its own prefix space.
  EXPECT_THAT(tok->Encode("a<|pad|>b", false), ElementsAre(' ', 'a', kPad, ' ', 'b'));
  EXPECT_THAT(tok->Encode("", false), ElementsAre());
  EXPECT_THAT(tok->Encode("<|pad|>", false), ElementsAre(kPad));
}

struct RejectCase {
  const char* name;
  // Edits the demo tokenizer.json (or replaces it, for text cases).
  std::function<std::string()> make;
  absl::StatusCode code;
  std::string mention;
};

std::string Edited(const std::function<void(Json&)>& edit) {
  Json j = DemoJson();
  edit(j);
  return j.dump();
}

std::vector<RejectCase> RejectCases() {
  using C = absl::StatusCode;
  return {
      {"NotJson", [] { return std::string("{\"model\": "); }, C::kInvalidArgument, "JSON"},
      {"NotObject", [] { return std::string("[1]"); }, C::kInvalidArgument, "object"},
      {"MergeOfUnknownToken",
       [] { return Edited([](Json& j) {
              j["model"]["merges"] = {"\xC4\xA0 t", "h e"};
            }); },
       C::kInvalidArgument, "model.merges[0]"},
      {"MergeNotTwoTokens",
       [] { return Edited([](Json& j) { j["model"]["merges"] = {"a b c"}; }); },
       C::kInvalidArgument, "model.merges[0] 'a b c'"},
      {"MergeWrongShape",
       [] {
         return Edited([](Json& j) { j["model"]["merges"] = Json::array({Json::array({"a"})}); });
       },
       C::kInvalidArgument, "model.merges[0]"},
      {"DropoutWithMerges",
       [] {
         return Edited([](Json& j) {
           j["model"]["vocab"]["ab"] = 300;
           j["model"]["merges"] = {"a b"};
           j["model"]["dropout"] = 0.1;
         });
       },
       C::kUnimplemented, "model.dropout"},
      {"Unigram", [] { return Edited([](Json& j) { j["model"]["type"] = "Unigram"; }); },
       C::kUnimplemented, "Unigram"},
      {"WordPiece", [] { return Edited([](Json& j) { j["model"]["type"] = "WordPiece"; }); },
       C::kUnimplemented, "WordPiece"},
      {"NoModel", [] { return Edited([](Json& j) { j.erase("model"); }); }, C::kInvalidArgument,
       "model"},
      {"NormalizerNfkc",
       [] { return Edited([](Json& j) {
              j["normalizer"] = {{"type", "NFKC"}};
            }); },
       C::kUnimplemented, "normalizer NFKC is not supported"},
      {"NormalizerInSequence",
       [] {
         return Edited([](Json& j) {
           j["normalizer"] = {{"type", "Sequence"},
                              {"normalizers", {{{"type", "NFC"}}, {{"type", "Lowercase"}}}}};
         });
       },
       C::kUnimplemented, "normalizer Lowercase"},
      {"ReplaceRegex",
       [] {
         return Edited([](Json& j) {
           j["normalizer"] = {
               {"type", "Replace"}, {"pattern", {{"Regex", " +"}}}, {"content", " "}};
         });
       },
       C::kUnimplemented, "Regex"},
      {"WhitespacePreTokenizer",
       [] { return Edited([](Json& j) {
              j["pre_tokenizer"] = {{"type", "Whitespace"}};
            }); },
       C::kUnimplemented, "pre_tokenizer Whitespace"},
      {"BadRegex",
       [] {
         return Edited([](Json& j) {
           j["pre_tokenizer"] = {
               {"type", "Split"}, {"pattern", {{"Regex", "(a"}}}, {"behavior", "Isolated"}};
         });
       },
       C::kInvalidArgument, "(a"},
      {"UnknownSplitBehavior",
       [] {
         return Edited([](Json& j) {
           j["pre_tokenizer"] = {
               {"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Sideways"}};
         });
       },
       C::kInvalidArgument, "Sideways"},
      {"MetaspaceBadScheme",
       [] {
         return Edited([](Json& j) {
           j["pre_tokenizer"] = {{"type", "Metaspace"}, {"prepend_scheme", "sometimes"}};
         });
       },
       C::kInvalidArgument, "sometimes"},
      {"WordPieceDecoder",
       [] { return Edited([](Json& j) {
              j["decoder"] = {{"type", "WordPiece"}};
            }); },
       C::kUnimplemented, "decoder WordPiece"},
      {"StripTwoCharacters",
       [] {
         return Edited([](Json& j) {
           j["decoder"] = {{"type", "Strip"}, {"content", "ab"}, {"start", 1}, {"stop", 0}};
         });
       },
       C::kInvalidArgument, "exactly one character"},
      {"SubwordPrefix",
       [] { return Edited([](Json& j) { j["model"]["continuing_subword_prefix"] = "##"; }); },
       C::kUnimplemented, "continuing_subword_prefix"},
      {"DuplicateVocabId", [] { return Edited([](Json& j) { j["model"]["vocab"]["hi"] = 65; }); },
       C::kInvalidArgument, "id 65"},
      {"NegativeId", [] { return Edited([](Json& j) { j["model"]["vocab"]["hi"] = -3; }); },
       C::kInvalidArgument, "'hi'"},
      {"HugeId", [] { return Edited([](Json& j) { j["model"]["vocab"]["hi"] = 2147483647; }); },
       C::kInvalidArgument, "'hi'"},
      {"StringId", [] { return Edited([](Json& j) { j["model"]["vocab"]["hi"] = "7"; }); },
       C::kInvalidArgument, "'hi'"},
      {"VocabNotObject", [] { return Edited([](Json& j) { j["model"]["vocab"] = 5; }); },
       C::kInvalidArgument, "vocab"},
      {"SingleWord",
       [] { return Edited([](Json& j) { j["added_tokens"][0]["single_word"] = true; }); },
       C::kUnimplemented, "single_word"},
      {"AddedTokenIdClash", [] { return Edited([](Json& j) { j["added_tokens"][0]["id"] = 65; }); },
       C::kInvalidArgument, "<|begin_of_text|>"},
      {"DuplicateAddedToken",
       [] { return Edited([](Json& j) { j["added_tokens"][1]["content"] = "<|pad|>"; }); },
       C::kInvalidArgument, "<|pad|>"},
      {"AddedTokenEmpty",
       [] { return Edited([](Json& j) { j["added_tokens"][1]["content"] = ""; }); },
       C::kInvalidArgument, "content"},
      {"AddedTokenBadFlag",
       [] { return Edited([](Json& j) { j["added_tokens"][1]["special"] = "yes"; }); },
       C::kInvalidArgument, "special"},
      {"AddedTokensNotArray", [] { return Edited([](Json& j) { j["added_tokens"] = 1; }); },
       C::kInvalidArgument, "added_tokens"},
      {"PreTokenizerBadFlag",
       [] { return Edited([](Json& j) { j["pre_tokenizer"]["use_regex"] = 1; }); },
       C::kInvalidArgument, "use_regex"},
  };
}

class TokenizerRejectTest : public testing::TestWithParam<RejectCase> {};

TEST_P(TokenizerRejectTest, RejectsWithClearError) {
  const RejectCase& c = GetParam();
  auto tok = Tokenizer::FromJsonString(c.make());
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), c.code) << tok.status();
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr(c.mention));
  EXPECT_THAT(std::string(tok.status().message()), HasSubstr("tokenizer.json"));
}

INSTANTIATE_TEST_SUITE_P(Cases, TokenizerRejectTest, testing::ValuesIn(RejectCases()),
                         [](const testing::TestParamInfo<RejectCase>& info) {
                           return info.param.name;
                         });

TEST(TokenizerJsonTest, AcceptsBenignVariants) {
  // Model without "type" (older files), use_regex absent, extra unknown keys, unk_token set,
  // dropout set (no merges to drop), a non-special added token whose id is in the vocabulary
  // with the same content (GPT-2 style).
  Json j = DemoJson();
  j["model"].erase("type");
  j["model"]["unk_token"] = "<|unk|>";
  j["model"]["dropout"] = 0.1;
  j["pre_tokenizer"].erase("use_regex");
  j["post_processor"] = {{"type", "ByteLevel"}, {"trim_offsets", true}};
  j["something_new"] = 42;
  AddToken(&j, 'A', "A", false);
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("BAB", false), ElementsAre('B', 'A', 'B'));
}

// ---------------------------------------------------------------------------------------------
// Full BPE pipelines on hand-written tokenizer.json files. Expected ids and texts for the
// Llama 2 style cases were checked against Hugging Face tokenizers 0.22 (tests/tokenizer_compat).

// A tokenizer.json with a BPE model over `pieces` (id = index) and `merges`, and no normalizer,
// pre-tokenizer, decoder or added tokens.
Json BpeJson(const std::vector<std::string>& pieces, Json merges = Json::array()) {
  Json vocab = Json::object();
  for (size_t i = 0; i < pieces.size(); ++i) vocab[pieces[i]] = i;
  return {{"added_tokens", Json::array()},
          {"normalizer", nullptr},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", nullptr},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

TEST(TokenizerBpeTest, MergesApplyLowestRankFirst) {
  const std::vector<std::string> pieces = {"a", "b", "c", "ab", "bc", "abc"};
  // "b c" outranks "a b", so "abc" becomes a + bc, then abc.
  auto tok = FromJson(BpeJson(pieces, {"b c", "a b", "a bc"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("abc", false), ElementsAre(5));
  // With "a b" first: ab + c, and no merge joins those.
  tok = FromJson(BpeJson(pieces, {"a b", "b c", "a bc"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("abc", false), ElementsAre(3, 2));
  // The newer ["a", "b"] form of merges means the same.
  tok = FromJson(BpeJson(pieces, Json::array({Json::array({"b", "c"}), Json::array({"a", "b"}),
                                              Json::array({"a", "bc"})})));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("abc", false), ElementsAre(5));
  EXPECT_THAT(tok->Encode("cab", false), ElementsAre(2, 3));
}

TEST(TokenizerBpeTest, EqualRanksMergeLeftmostFirst) {
  auto tok = FromJson(BpeJson({"a", "aa"}, {"a a"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("aaa", false), ElementsAre(1, 0));
  EXPECT_THAT(tok->Encode("aaaa", false), ElementsAre(1, 1));
  EXPECT_THAT(tok->Encode("aaaaa", false), ElementsAre(1, 1, 0));
}

TEST(TokenizerBpeTest, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  Json j = BpeJson({"a", "b", "c", "ab", "abc"}, {"a b"});
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("abc", false), ElementsAre(3, 2));
  j["model"]["ignore_merges"] = true;  // Llama 3.
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("abc", false), ElementsAre(4));
  EXPECT_THAT(tok->Encode("abcab", false), ElementsAre(3, 2, 3));
}

TEST(TokenizerBpeTest, UnknownCharactersWithoutUnkAreDropped) {
  auto tok = FromJson(BpeJson({"a", "b"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("axb\xE4\xBD\xA0", false), ElementsAre(0, 1));
}

constexpr char kSpm[] = "\xE2\x96\x81";  // "▁"
constexpr int32_t kSpmUnk = 0;
constexpr int32_t kSpmBos = 1;
constexpr int32_t kSpmEos = 2;
constexpr int32_t kSpmSpace = 259;  // "▁"
constexpr int32_t kSpmH = 260;
constexpr int32_t kSpmI = 261;
constexpr int32_t kSpmHi = 263;  // "▁hi"
int32_t SpmByte(uint8_t b) { return 3 + b; }

// A tiny Llama 2 style tokenizer.json: <unk> <s> </s>, the 256 <0xXX> byte tokens, "▁", "h",
// "i", "▁h", "▁hi"; normalizer Prepend("▁") + Replace(" ", "▁"); byte fallback; the
// Replace/ByteFallback/Fuse/Strip decoder.
Json SpmJson() {
  std::vector<std::string> pieces = {"<unk>", "<s>", "</s>"};
  for (int b = 0; b < 256; ++b) pieces.push_back(absl::StrFormat("<0x%02X>", b));
  for (const std::string p : {"", "h", "i"}) pieces.push_back(p.empty() ? kSpm : p);
  pieces.push_back(std::string(kSpm) + "h");
  pieces.push_back(std::string(kSpm) + "hi");
  Json j = BpeJson(pieces, {std::string(kSpm) + " h", std::string(kSpm) + "h i"});
  j["added_tokens"] = Json::array();
  AddToken(&j, kSpmUnk, "<unk>", true);
  AddToken(&j, kSpmBos, "<s>", true);
  AddToken(&j, kSpmEos, "</s>", true);
  j["normalizer"] = {{"type", "Sequence"},
                     {"normalizers",
                      {{{"type", "Prepend"}, {"prepend", kSpm}},
                       {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpm}}}}};
  j["decoder"] = {{"type", "Sequence"},
                  {"decoders",
                   {{{"type", "Replace"}, {"pattern", {{"String", kSpm}}}, {"content", " "}},
                    {{"type", "ByteFallback"}},
                    {{"type", "Fuse"}},
                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  j["model"]["unk_token"] = "<unk>";
  j["model"]["fuse_unk"] = true;
  j["model"]["byte_fallback"] = true;
  return j;
}

TEST(TokenizerSpmTest, VocabularyLayout) {
  auto tok = FromJson(SpmJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Piece(kSpmSpace), kSpm);
  EXPECT_EQ(tok->Piece(kSpmH), "h");
  EXPECT_EQ(tok->Piece(kSpmI), "i");
  EXPECT_EQ(tok->Piece(262), std::string(kSpm) + "h");
  EXPECT_EQ(tok->Piece(kSpmHi), std::string(kSpm) + "hi");
  EXPECT_EQ(tok->Piece(SpmByte(0x0A)), "<0x0A>");
  EXPECT_EQ(tok->bos_id(), kSpmBos);
  EXPECT_THAT(tok->eos_ids(), ElementsAre(kSpmEos));
}

TEST(TokenizerSpmTest, PrependNormalizerAndByteFallback) {
  auto tok = FromJson(SpmJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hi", false), ElementsAre(kSpmHi));
  EXPECT_THAT(tok->Encode("hi", true), ElementsAre(kSpmBos, kSpmHi));
  EXPECT_THAT(tok->Encode("hi hi", false), ElementsAre(kSpmHi, kSpmHi));
  EXPECT_THAT(tok->Encode(" hi", false), ElementsAre(kSpmSpace, kSpmHi));
  EXPECT_THAT(tok->Encode("", false), ElementsAre());
  // "é" is not in the vocabulary: its UTF-8 bytes.
  EXPECT_THAT(tok->Encode("h\xC3\xA9", false), ElementsAre(262, SpmByte(0xC3), SpmByte(0xA9)));
  // Every piece between added tokens is normalized on its own, so each gets its "▁".
  EXPECT_THAT(tok->Encode("a<s>b", false),
              ElementsAre(kSpmSpace, SpmByte('a'), kSpmBos, kSpmSpace, SpmByte('b')));
  EXPECT_THAT(tok->Encode("<s> hi", false), ElementsAre(kSpmBos, kSpmSpace, kSpmHi));
  // Invalid UTF-8 becomes U+FFFD first (its bytes EF BF BD by byte fallback).
  EXPECT_THAT(tok->Encode("\xFF", false),
              ElementsAre(kSpmSpace, SpmByte(0xEF), SpmByte(0xBF), SpmByte(0xBD)));
}

TEST(TokenizerSpmTest, UnknownCharactersBecomeUnk) {
  Json j = SpmJson();
  j["model"]["byte_fallback"] = false;
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  // fuse_unk: a run of unknown characters is one <unk>.
  EXPECT_THAT(tok->Encode("hxyz", false), ElementsAre(262, kSpmUnk));
  EXPECT_THAT(tok->Encode("xhx", false), ElementsAre(kSpmSpace, kSpmUnk, kSpmH, kSpmUnk));
  j["model"]["fuse_unk"] = false;
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hxyz", false), ElementsAre(262, kSpmUnk, kSpmUnk, kSpmUnk));
  j["model"]["unk_token"] = nullptr;
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hxyz", false), ElementsAre(262));
}

TEST(TokenizerSpmTest, DecodeStripsTheLeadingSpaceAndStreamingKeepsIt) {
  auto tok = FromJson(SpmJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({kSpmHi, kSpmHi}), "hi hi");
  EXPECT_EQ(tok->Decode({kSpmBos, kSpmHi, kSpmEos}), "hi");
  EXPECT_EQ(tok->Decode({kSpmSpace, kSpmSpace, kSpmHi}), "  hi");  // Only one space is stripped.
  EXPECT_EQ(tok->Decode({kSpmHi, SpmByte(0xC3), SpmByte(0xA9)}), "hi\xC3\xA9");
  // Streaming: "▁hi" continues earlier text with " hi"; byte tokens are raw bytes.
  EXPECT_EQ(tok->DecodeToken(kSpmHi), " hi");
  EXPECT_EQ(tok->DecodeToken(kSpmSpace), " ");
  EXPECT_EQ(tok->DecodeToken(SpmByte(0xC3)), "\xC3");
  EXPECT_EQ(tok->DecodeToken(kSpmBos), "");
  std::string streamed;
  for (int32_t id : tok->Encode("hi h\xC3\xA9 hi", false)) streamed += tok->DecodeToken(id);
  EXPECT_EQ(streamed, " hi h\xC3\xA9 hi");
}

// HF's ByteFallback decoder turns every byte token of an invalid run into U+FFFD; the streamed
// bytes, sanitized, follow the maximal-subpart rule instead (one U+FFFD for "E4 BD").
TEST(TokenizerSpmTest, InvalidByteRuns) {
  auto tok = FromJson(SpmJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({SpmByte(0xC3)}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->Decode({SpmByte(0xE4), SpmByte(0xBD)}), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(SanitizeUtf8(tok->DecodeToken(SpmByte(0xE4)) + tok->DecodeToken(SpmByte(0xBD))),
            "\xEF\xBF\xBD");
}

TEST(TokenizerSpmTest, AddedTokenStripAndNormalizedMatching) {
  Json j = SpmJson();
  j["added_tokens"][1]["rstrip"] = true;  // <s>
  j["added_tokens"][2]["lstrip"] = true;  // </s>
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("<s> hi", false), ElementsAre(kSpmBos, kSpmHi));
  EXPECT_THAT(tok->Encode("hi </s>", false), ElementsAre(kSpmHi, kSpmEos));
  EXPECT_THAT(tok->Encode("hi  </s> hi", false), ElementsAre(kSpmHi, kSpmEos, kSpmSpace, kSpmHi));

  // A normalized=true added token is matched by its normalized content ("▁hi") in the
  // normalized text.
  j = SpmJson();
  AddToken(&j, 264, "hi", /*special=*/false, /*normalized=*/true);
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hi hi", false), ElementsAre(264, 264));
  EXPECT_THAT(tok->Encode("hihi", false), ElementsAre(264, kSpmH, kSpmI));
  EXPECT_THAT(tok->Encode("h i", false), ElementsAre(262, kSpmSpace, kSpmI));
}

// The Metaspace pre-tokenizer replaces the Prepend/Replace normalizers in newer files.
Json MetaspaceJson(const std::string& scheme, bool split) {
  Json j = SpmJson();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", kSpm}, {"prepend_scheme", scheme}, {"split", split}};
  return j;
}

TEST(TokenizerSpmTest, MetaspacePrependSchemes) {
  auto first = FromJson(MetaspaceJson("first", false));
  auto always = FromJson(MetaspaceJson("always", false));
  auto never = FromJson(MetaspaceJson("never", false));
  ASSERT_NE(first, nullptr);
  ASSERT_NE(always, nullptr);
  ASSERT_NE(never, nullptr);
  EXPECT_THAT(first->Encode("hi hi", false), ElementsAre(kSpmHi, kSpmHi));
  EXPECT_THAT(first->Encode(" hi", false), ElementsAre(kSpmHi));  // Already starts with "▁".
  // "first": only the text's first piece gets "▁", not one after an added token.
  EXPECT_THAT(first->Encode("<s>hi", false), ElementsAre(kSpmBos, kSpmH, kSpmI));
  EXPECT_THAT(first->Encode("hi<s>hi", false), ElementsAre(kSpmHi, kSpmBos, kSpmH, kSpmI));
  EXPECT_THAT(always->Encode("<s>hi", false), ElementsAre(kSpmBos, kSpmHi));
  EXPECT_THAT(always->Encode("hi<s>hi", false), ElementsAre(kSpmHi, kSpmBos, kSpmHi));
  EXPECT_THAT(never->Encode("hi", false), ElementsAre(kSpmH, kSpmI));
  EXPECT_THAT(never->Encode("hi hi", false), ElementsAre(kSpmH, kSpmI, kSpmHi));

  // The older form: add_prefix_space true means "always".
  Json j = MetaspaceJson("always", false);
  j["pre_tokenizer"].erase("prepend_scheme");
  j["pre_tokenizer"]["add_prefix_space"] = true;
  auto legacy = FromJson(j);
  ASSERT_NE(legacy, nullptr);
  EXPECT_THAT(legacy->Encode("<s>hi", false), ElementsAre(kSpmBos, kSpmHi));
}

TEST(TokenizerSpmTest, MetaspaceSplitAndDecoder) {
  Json j = MetaspaceJson("always", true);
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", kSpm}, {"prepend_scheme", "always"}};
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("hi  hi", false), ElementsAre(kSpmHi, kSpmSpace, kSpmHi));
  // The Metaspace decoder drops "▁" in the first token only.
  EXPECT_EQ(tok->Decode({kSpmHi, kSpmHi}), "hi hi");
  EXPECT_EQ(tok->Decode({kSpmSpace, kSpmHi}), " hi");
  EXPECT_EQ(tok->Decode({kSpmSpace, kSpmSpace, kSpmHi}), "  hi");
  EXPECT_EQ(tok->Decode({kSpmH, kSpmHi}), "h hi");
  EXPECT_EQ(tok->DecodeToken(kSpmHi), " hi");
  j["decoder"]["prepend_scheme"] = "never";
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({kSpmHi, kSpmHi}), " hi hi");
}

// The demo's byte vocabulary plus whole words, with ignore_merges: a pre-token that is in the
// vocabulary is one token, so the tests can see how the pre-tokenizer split the text.
Json WordsJson(const Json& pre_tokenizer, const std::vector<std::string>& words) {
  Json j = DemoJson();
  j["pre_tokenizer"] = pre_tokenizer;
  j["model"]["ignore_merges"] = true;
  int32_t id = 300;
  for (const std::string& w : words) j["model"]["vocab"][w] = id++;
  return j;
}

// `rest` after "Ġ", the byte-level symbol of the space byte.
std::string G(const std::string& rest) { return "\xC4\xA0" + rest; }

TEST(TokenizerPreTokenizerTest, Gpt2Regex) {
  auto tok =
      FromJson(WordsJson({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}},
                         {"Hello", G("world"), "'s", G("123"), G(G(""))}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("Hello world's 123", false), ElementsAre(300, 301, 302, 303));
  // "\s+(?!\S)" leaves the last space of a run to the next word.
  EXPECT_THAT(tok->Encode("x   y", false), ElementsAre('x', 304, ' ', 'y'));
}

TEST(TokenizerPreTokenizerTest, Llama3SplitThenByteLevel) {
  const Json pre = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  auto tok = FromJson(WordsJson(pre, {"123", "456", "'S", G("don"), "'t"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("1234567", false), ElementsAre(300, 301, '7'));
  EXPECT_THAT(tok->Encode("IT'S don't", false), ElementsAre('I', 'T', 302, 303, 304));
  // Bytes that are not UTF-8 still reach the model one by one.
  EXPECT_THAT(tok->Encode("1234\xFF", false), ElementsAre(300, '4', 0xFF));
}

TEST(TokenizerPreTokenizerTest, SplitBehaviors) {
  const auto split = [](const char* behavior, bool invert) {
    return Json{{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Split"},
                   {"pattern", {{"String", "-"}}},
                   {"behavior", behavior},
                   {"invert", invert}},
                  {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  };
  const std::vector<std::string> words = {"a-", "-b", "--"};
  struct Case {
    const char* behavior;
    bool invert;
    std::string text;
    std::vector<int32_t> ids;
  };
  const Case cases[] = {
      {"Isolated", false, "a-b", {'a', '-', 'b'}},
      {"Isolated", false, "a--b", {'a', '-', '-', 'b'}},
      {"Removed", false, "a-b", {'a', 'b'}},
      {"MergedWithPrevious", false, "a-b", {300, 'b'}},
      {"MergedWithNext", false, "a-b", {'a', 301}},
      {"Contiguous", false, "a--b", {'a', 302, 'b'}},
      {"Removed", true, "a-b", {'-'}},
      {"MergedWithPrevious", true, "-b", {301}},
  };
  for (const Case& c : cases) {
    auto tok = FromJson(WordsJson(split(c.behavior, c.invert), words));
    ASSERT_NE(tok, nullptr);
    EXPECT_EQ(tok->Encode(c.text, false), c.ids) << c.behavior << " invert=" << c.invert;
  }
}

TEST(TokenizerPreTokenizerTest, Digits) {
  const auto digits = [](bool individual) {
    return Json{{"type", "Sequence"},
                {"pretokenizers",
                 {{{"type", "Digits"}, {"individual_digits", individual}},
                  {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  };
  auto tok = FromJson(WordsJson(digits(false), {"123", "x1"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("x123", false), ElementsAre('x', 300));
  tok = FromJson(WordsJson(digits(true), {"123", "x1"}));
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(tok->Encode("x123", false), ElementsAre('x', '1', '2', '3'));
}

// Qwen2's NFC normalizer, with Hugging Face's Unicode 9.0 normalization tables.
TEST(TokenizerNormalizerTest, Nfc) {
  Json j = DemoJson();
  j["normalizer"] = {{"type", "NFC"}};
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode(tok->Encode("e\xCC\x81", false)), "\xC3\xA9");  // e + U+0301 -> é
  // Hangul jamo compose into a syllable: U+1100 U+1161 U+11A8 -> U+AC01.
  EXPECT_EQ(tok->Decode(tok->Encode("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8", false)),
            "\xEA\xB0\x81");
  // Marks are put in canonical order (U+0323 below before U+0307 above), then composed:
  // a + U+0307 + U+0323 -> U+1EA1 (ạ) + U+0307.
  EXPECT_EQ(tok->Decode(tok->Encode("a\xCC\x87\xCC\xA3", false)), "\xE1\xBA\xA1\xCC\x87");
  // U+08D2 (class 220) is newer than Unicode 9.0: HF keeps it after U+0310 (class 230).
  EXPECT_EQ(tok->Decode(tok->Encode("x\xCC\x90\xE0\xA3\x92", false)), "x\xCC\x90\xE0\xA3\x92");
  // A normalizer needs characters: invalid UTF-8 becomes U+FFFD first.
  EXPECT_EQ(tok->Decode(tok->Encode("a\xFF", false)), "a\xEF\xBF\xBD");
}

TEST(TokenizerPostProcessorTest, BosFromTemplate) {
  Json j = SpmJson();
  const Json bos_template = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"</s>", {{"id", "</s>"}, {"ids", {kSpmEos}}, {"tokens", {"</s>"}}}}}}};
  j["post_processor"] = bos_template;
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), kSpmEos);
  // Inside a Sequence (Llama 3.1 style).
  j["post_processor"] = {{"type", "Sequence"},
                         {"processors", {{{"type", "ByteLevel"}}, bos_template}}};
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), kSpmEos);
  // A template that adds nothing in front: no BOS, even though <s> exists.
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                         {"special_tokens", Json::object()}};
  tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos_id(), std::nullopt);
  EXPECT_THAT(tok->Encode("hi", true), ElementsAre(kSpmHi));
}

// Found by tests/fuzz/tokenizer_fuzz: ToJson wrote a null post-processor for "no BOS", and loading
// that back took <s> as BOS by its name.
TEST(TokenizerJsonTest, RoundTripKeepsNoBos) {
  Json j = SpmJson();
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
                         {"special_tokens", Json::object()}};
  auto tok = FromJson(j);
  ASSERT_NE(tok, nullptr);
  ASSERT_EQ(tok->bos_id(), std::nullopt);
  auto copy = Tokenizer::FromJsonString(tok->ToJson());
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->bos_id(), std::nullopt);
  EXPECT_EQ((*copy)->Encode("hi", true), tok->Encode("hi", true));
}

TEST(TokenizerBpeTest, ToJsonKeepsMergesAndPipeline) {
  auto tok = FromJson(MetaspaceJson("first", true));
  ASSERT_NE(tok, nullptr);
  auto copy = Tokenizer::FromJsonString(tok->ToJson());
  ASSERT_TRUE(copy.ok()) << copy.status();
  for (const std::string text : {"hi hi", "<s>hi", "h\xC3\xA9  hi", "xyz"}) {
    EXPECT_EQ((*copy)->Encode(text, false), tok->Encode(text, false)) << text;
    EXPECT_EQ((*copy)->Decode(tok->Encode(text, false)), tok->Decode(tok->Encode(text, false)));
  }
}

// Encode is const and shared between request threads; the word cache inside must not change
// results.
TEST(TokenizerBpeTest, ConcurrentEncodeMatchesSequential) {
  auto tok = FromJson(SpmJson());
  ASSERT_NE(tok, nullptr);
  std::vector<std::string> texts;
  for (int i = 0; i < 64; ++i) {
    texts.push_back(absl::StrCat("hi h", i, " hi\xC3\xA9", std::string(i % 5, ' '), "hi"));
  }
  std::vector<std::vector<int32_t>> want;
  for (const std::string& t : texts) want.push_back(tok->Encode(t, false));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches = 0;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 50; ++round) {
        const size_t i = static_cast<size_t>(round * 7 + t) % texts.size();
        if (tok->Encode(texts[i], false) != want[i]) ++mismatches;
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace moleserve::engine
