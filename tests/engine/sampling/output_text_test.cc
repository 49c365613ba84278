// OutputText: stop strings across token boundaries, hold-back, UTF-8 safety.

#include "engine/sampling/output_text.h"

#include <gtest/gtest.h>

namespace moleserve::engine {
namespace {

// Feeds pieces; returns (streamed text, stopped, matched).
struct Result {
  std::string streamed;
  bool stopped = false;
  std::string matched;
  int stopped_at = -1;
};
Result Feed(std::vector<std::string> stops, const std::vector<std::string>& pieces) {
  OutputText t(std::move(stops));
  Result r;
  for (size_t i = 0; i < pieces.size(); ++i) {
    OutputText::Update u = t.Append(pieces[i]);
    r.streamed += u.delta;
    if (u.stopped) {
      r.stopped = true;
      r.matched = u.matched;
      r.stopped_at = static_cast<int>(i);
      return r;
    }
  }
  r.streamed += t.Flush();
  return r;
}

TEST(OutputTextTest, NoStopsStreamsEverything) {
  Result r = Feed({}, {"Hel", "lo", " wor", "ld"});
  EXPECT_EQ(r.streamed, "Hello world");
  EXPECT_FALSE(r.stopped);
}

TEST(OutputTextTest, StopSpanningTokensIsFoundAndExcluded) {
  Result r = Feed({"END"}, {"abc E", "N", "D more"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.streamed, "abc ");
  EXPECT_EQ(r.matched, "END");
  EXPECT_EQ(r.stopped_at, 2);
}

TEST(OutputTextTest, HeldBackPrefixIsReleasedWhenItDoesNotMatch) {
  OutputText t({"END"});
  EXPECT_EQ(t.Append("abc E").delta, "abc ");  // "E" may start "END"
  EXPECT_EQ(t.Append("N").delta, "");          // "EN" still may
  EXPECT_EQ(t.Append("x").delta, "ENx");       // resolved
  EXPECT_EQ(t.Flush(), "");
}

TEST(OutputTextTest, EarliestOfSeveralStopsWins) {
  Result r = Feed({"world", "lo w"}, {"hello world"});
  EXPECT_EQ(r.streamed, "hel");
  EXPECT_EQ(r.matched, "lo w");
}

TEST(OutputTextTest, StopInFirstTokenYieldsEmptyText) {
  Result r = Feed({"\n"}, {"\nabc"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.streamed, "");
}

TEST(OutputTextTest, Utf8CodePointSplitAcrossTokensIsNeverHalfSent) {
  // "é" = C3 A9, "😀" = F0 9F 98 80, fed one byte per token.
  OutputText t({});
  std::string all = "a\xC3\xA9\xF0\x9F\x98\x80z";
  std::string streamed;
  for (char c : all) {
    std::string d = t.Append(std::string(1, c)).delta;
    // Every chunk is complete UTF-8 on its own.
    for (size_t i = 0; i < d.size(); ++i) {
      unsigned char b = static_cast<unsigned char>(d[i]);
      if (b >= 0xF0)
        i += 3;
      else if (b >= 0xE0)
        i += 2;
      else if (b >= 0xC0)
        i += 1;
      ASSERT_LE(i, d.size() - 1) << "chunk ends inside a code point";
    }
    streamed += d;
  }
  streamed += t.Flush();
  EXPECT_EQ(streamed, all);
}

TEST(OutputTextTest, InvalidBytesBecomeReplacementCharacter) {
  OutputText t({});
  std::string s = t.Append(
                       "a\xFF"
                       "b")
                      .delta;
  s += t.Append("\xC3").delta;  // held: could become a code point
  s += t.Flush();               // never completed
  EXPECT_EQ(s,
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
}

TEST(OutputTextTest, MultibyteStopString) {
  Result r = Feed({"é!"}, {"ab\xC3", "\xA9", "!", "zz"});
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.streamed, "ab");
}

}  // namespace
}  // namespace moleserve::engine
