#include "engine/tokenizer/tokenizer.h"

#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

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
  EXPECT_EQ(tok->Decode(ids), text);
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
  const std::string partial = tok->Decode({ids.data(), 2});
  EXPECT_EQ(CompleteUtf8Prefix(partial), 0u);
  EXPECT_EQ(SanitizeUtf8(partial), "\xEF\xBF\xBD");
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
      {"Merges",
       [] { return Edited([](Json& j) {
              j["model"]["merges"] = {"\xC4\xA0 t", "h e"};
            }); },
       C::kUnimplemented, "model.merges has 2 entries"},
      {"MergesAsPairs",
       [] {
         return Edited([](Json& j) {
           j["model"]["merges"] = Json::array({Json::array({"h", "e"})});
         });
       },
       C::kUnimplemented, "merges"},
      {"Unigram", [] { return Edited([](Json& j) { j["model"]["type"] = "Unigram"; }); },
       C::kUnimplemented, "Unigram"},
      {"WordPiece", [] { return Edited([](Json& j) { j["model"]["type"] = "WordPiece"; }); },
       C::kUnimplemented, "WordPiece"},
      {"NoModel", [] { return Edited([](Json& j) { j.erase("model"); }); }, C::kInvalidArgument,
       "model"},
      {"Normalizer", [] { return Edited([](Json& j) {
                            j["normalizer"] = {{"type", "NFC"}};
                          }); },
       C::kUnimplemented, "NFC"},
      {"Metaspace",
       [] {
         return Edited([](Json& j) {
           j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}};
         });
       },
       C::kUnimplemented, "Metaspace"},
      {"SequencePreTokenizer",
       [] {
         return Edited([](Json& j) {
           j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", Json::array()}};
         });
       },
       C::kUnimplemented, "Sequence"},
      {"NullPreTokenizer", [] { return Edited([](Json& j) { j["pre_tokenizer"] = nullptr; }); },
       C::kUnimplemented, "pre_tokenizer null"},
      {"WordPieceDecoder",
       [] { return Edited([](Json& j) {
              j["decoder"] = {{"type", "WordPiece"}};
            }); },
       C::kUnimplemented, "decoder WordPiece"},
      {"SubwordPrefix",
       [] { return Edited([](Json& j) { j["model"]["continuing_subword_prefix"] = "##"; }); },
       C::kUnimplemented, "continuing_subword_prefix"},
      {"IgnoreMergesWithWords",
       [] {
         return Edited([](Json& j) {
           j["model"]["ignore_merges"] = true;
           j["model"]["vocab"]["hi"] = 300;
         });
       },
       C::kUnimplemented, "ignore_merges"},
      {"MissingByte", [] { return Edited([](Json& j) { j["model"]["vocab"].erase("A"); }); },
       C::kInvalidArgument, "0x41"},
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

}  // namespace
}  // namespace moleserve::engine
