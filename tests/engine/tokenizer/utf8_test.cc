#include "engine/tokenizer/utf8.h"

#include <string>
#include <string_view>

#include "gtest/gtest.h"

namespace moleserve::engine {
namespace {

constexpr std::string_view kFffd = "\xEF\xBF\xBD";

std::string Fffd(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s += kFffd;
  return s;
}

TEST(CompleteUtf8PrefixTest, EmptyAndAscii) {
  EXPECT_EQ(CompleteUtf8Prefix(""), 0u);
  EXPECT_EQ(CompleteUtf8Prefix("hello"), 5u);
}

// Every code point length, cut after every byte, behind an ASCII prefix and behind a complete
// multi-byte character.
TEST(CompleteUtf8PrefixTest, HoldsBackEverySplitOfAValidCodePoint) {
  for (std::string_view cp :
       {"\xC3\xA9", "\xE2\x82\xAC", "\xED\x9F\xBF", "\xF0\x9F\x98\x80", "\xF4\x8F\xBF\xBF"}) {
    for (std::string_view prefix : {"", "ab", "\xE4\xBD\xA0"}) {
      const std::string full = std::string(prefix) + std::string(cp);
      EXPECT_EQ(CompleteUtf8Prefix(full), full.size()) << "complete: " << full;
      for (size_t cut = 1; cut < cp.size(); ++cut) {
        const std::string partial = std::string(prefix) + std::string(cp.substr(0, cut));
        EXPECT_EQ(CompleteUtf8Prefix(partial), prefix.size())
            << "code point " << cp.size() << " bytes, cut after " << cut;
      }
    }
  }
}

struct PrefixCase {
  const char* name;
  std::string_view bytes;
  size_t expected;
};

class CompleteUtf8PrefixInvalidTest : public testing::TestWithParam<PrefixCase> {};

TEST_P(CompleteUtf8PrefixInvalidTest, NeverHoldsBackBytesThatCannotBecomeValid) {
  EXPECT_EQ(CompleteUtf8Prefix(GetParam().bytes), GetParam().expected);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CompleteUtf8PrefixInvalidTest,
    testing::Values(
        PrefixCase{"LoneContinuation", "a\x80", 2},
        PrefixCase{"ThreeContinuations", "\x80\x80\x80", 3}, PrefixCase{"C0Lead", "a\xC0", 2},
        PrefixCase{"C1Lead", "\xC1", 1}, PrefixCase{"F5Lead", "\xF5", 1},
        PrefixCase{"FFByte", "\xFF", 1}, PrefixCase{"OverlongE0", "\xE0\x80", 2},
        PrefixCase{"OverlongF0", "\xF0\x8F", 2}, PrefixCase{"SurrogateStart", "\xED\xA0", 2},
        PrefixCase{"AboveMax", "\xF4\x90", 2},
        PrefixCase{"BrokenThenAscii",
                   "\xE2\x82"
                   "a",
                   3},
        PrefixCase{"ValidE0Start", "x\xE0\xA0", 1}, PrefixCase{"ValidF4Start", "x\xF4\x8F\xBF", 1}),
    [](const testing::TestParamInfo<PrefixCase>& info) { return info.param.name; });

struct SanitizeCase {
  const char* name;
  std::string_view input;
  std::string expected;
};

class SanitizeUtf8Test : public testing::TestWithParam<SanitizeCase> {};

TEST_P(SanitizeUtf8Test, ReplacesMaximalSubparts) {
  const std::string out = SanitizeUtf8(GetParam().input);
  EXPECT_EQ(out, GetParam().expected);
  EXPECT_TRUE(IsValidUtf8(out));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SanitizeUtf8Test,
    testing::Values(SanitizeCase{"Empty", "", ""}, SanitizeCase{"Ascii", "hello", "hello"},
                    SanitizeCase{"ValidMixed", "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80",
                                 "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"},
                    SanitizeCase{"OverlongTwoByte", "\xC0\xAF", Fffd(2)},
                    SanitizeCase{"OverlongThreeByte", "\xE0\x80\xAF", Fffd(3)},
                    SanitizeCase{"OverlongFourByte", "\xF0\x80\x80\xAF", Fffd(4)},
                    SanitizeCase{"Surrogate", "\xED\xA0\x80", Fffd(3)},
                    SanitizeCase{"AboveMax", "\xF4\x90\x80\x80", Fffd(4)},
                    SanitizeCase{"F5Lead", "\xF5\x80", Fffd(2)},
                    SanitizeCase{"LoneContinuation",
                                 "a\x80"
                                 "b",
                                 "a" + Fffd(1) + "b"},
                    SanitizeCase{"TruncatedAtEnd3", "a\xE2\x82", "a" + Fffd(1)},
                    SanitizeCase{"TruncatedAtEnd4", "a\xF0\x9F\x98", "a" + Fffd(1)},
                    SanitizeCase{"TruncatedBeforeAscii",
                                 "\xE2\x82"
                                 "a",
                                 Fffd(1) + "a"},
                    SanitizeCase{"TruncatedBeforeLead", "\xE2\x82\xC3\xA9", Fffd(1) + "\xC3\xA9"},
                    // Unicode 15 section 3.9, Table 3-8.
                    SanitizeCase{"UnicodeTable3_8",
                                 "\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64",
                                 "a" + Fffd(3) + "b" + Fffd(1) + "c" + Fffd(2) + "d"}),
    [](const testing::TestParamInfo<SanitizeCase>& info) { return info.param.name; });

TEST(IsValidUtf8Test, Basics) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("\xF4\x8F\xBF\xBF"));  // U+10FFFF
  EXPECT_TRUE(IsValidUtf8("\xEE\x80\x80"));      // U+E000, just past the surrogates
  EXPECT_FALSE(IsValidUtf8("\xED\xBF\xBF"));     // U+DFFF
  EXPECT_FALSE(IsValidUtf8("\xC3"));
}

TEST(CodePointTest, DecodeAndAppendRoundTrip) {
  for (char32_t cp : {U'\0', U'A', U'\u00E9', U'\u0800', U'\uFFFD', U'\U0001F600', U'\U0010FFFF'}) {
    std::string s;
    AppendCodePoint(cp, &s);
    EXPECT_TRUE(IsValidUtf8(s));
    char32_t back = 0;
    EXPECT_EQ(DecodeCodePoint(s, 0, &back), s.size());
    EXPECT_EQ(back, cp);
  }
  char32_t cp = 0;
  EXPECT_EQ(DecodeCodePoint("a\xC3\xA9", 1, &cp), 2u);
  EXPECT_EQ(cp, U'\u00E9');
  // Not well-formed: truncated, overlong, surrogate, lone continuation.
  for (std::string_view bad : {"\xC3", "\xC0\x80", "\xED\xA0\x80", "\x80"}) {
    EXPECT_EQ(DecodeCodePoint(bad, 0, &cp), 0u) << testing::PrintToString(bad);
  }
}

TEST(CodePointTest, UnicodeWhitespace) {
  for (char32_t cp :
       {U'\t', U'\n', U'\r', U' ', U'\u0085', U'\u00A0', U'\u2003', U'\u2028', U'\u3000'}) {
    EXPECT_TRUE(IsUnicodeWhitespace(cp)) << static_cast<uint32_t>(cp);
  }
  for (char32_t cp : {U'a', U'\u200B', U'\u180E', U'\uFEFF', U'\0'}) {
    EXPECT_FALSE(IsUnicodeWhitespace(cp)) << static_cast<uint32_t>(cp);
  }
}

}  // namespace
}  // namespace moleserve::engine
