#include "engine/model_io/safetensors.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moleserve::engine {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  return testing::TempDir() + "safetensors_test_" + name + ".safetensors";
}

void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadRaw(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// An 8-byte little-endian length, `header`, then `data`.
std::string MakeFile(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

uint32_t Bits(float f) { return std::bit_cast<uint32_t>(f); }

TEST(SafetensorsTest, RoundTripF32) {
  const std::string path = TempPath("roundtrip_f32");
  const std::vector<float> a = {1.5f, -2.0f, 0.0f, -0.0f, 1e-40f, 3.25f};
  const std::vector<float> b = {std::numeric_limits<float>::infinity(), 7.0f};
  const std::vector<float> scalar = {42.0f};
  const std::vector<SafetensorsWriteTensor> tensors = {
      {"model.layers.0.weight", {2, 3}, a.data()},
      {"a.bias", {2}, b.data()},
      {"scalar", {}, scalar.data()},
      {"empty", {0, 4}, nullptr},
  };
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"note", "x"}}).ok());

  // The data region starts at a multiple of 8.
  const std::string raw = ReadRaw(path);
  uint64_t header_len;
  std::memcpy(&header_len, raw.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + header_len + (6 + 2 + 1) * 4);

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsFile& f = **file;
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("note"), "x");
  ASSERT_EQ(f.tensors().size(), 4u);
  // Packed in the given order, so offset order is the given order.
  EXPECT_EQ(f.tensors()[0].name, "model.layers.0.weight");
  EXPECT_EQ(f.tensors()[1].name, "a.bias");
  EXPECT_EQ(f.tensors()[2].name, "scalar");
  EXPECT_EQ(f.tensors()[3].name, "empty");

  const SafetensorsTensor* t = f.Find("model.layers.0.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, "F32");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->bytes, 24u);
  EXPECT_EQ(f.Find("missing"), nullptr);

  std::vector<float> out(6);
  ASSERT_TRUE(f.ReadF32("model.layers.0.weight", {2, 3}, out.data()).ok());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(Bits(out[i]), Bits(a[i])) << i;
  ASSERT_TRUE(f.ReadF32("a.bias", {2}, out.data()).ok());
  EXPECT_EQ(out[0], b[0]);
  EXPECT_EQ(out[1], b[1]);
  ASSERT_TRUE(f.ReadF32("scalar", {}, out.data()).ok());
  EXPECT_EQ(out[0], 42.0f);
  EXPECT_TRUE(f.ReadF32("empty", {0, 4}, nullptr).ok());
}

TEST(SafetensorsTest, RoundTripBf16) {
  const std::string path = TempPath("roundtrip_bf16");
  // Exactly representable in bf16, then values that must round.
  const std::vector<float> exact = {1.0f, -2.5f, 0.0f, 65280.0f,
                                    std::numeric_limits<float>::infinity()};
  const std::vector<float> inexact = {1.00390625f /* 1 + 2^-8: tie, rounds to even 1.0 */,
                                      1.01171875f /* 1 + 3*2^-8: tie, rounds up */, 3.14159265f,
                                      std::nanf("")};
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"exact", {5}, exact.data()}, {"inexact", {4}, inexact.data()}}, {},
                               "BF16")
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
  EXPECT_EQ((*file)->Find("exact")->dtype, "BF16");
  EXPECT_EQ((*file)->Find("exact")->bytes, 10u);

  std::vector<float> out(5);
  ASSERT_TRUE((*file)->ReadF32("exact", {5}, out.data()).ok());
  for (size_t i = 0; i < exact.size(); ++i) EXPECT_EQ(Bits(out[i]), Bits(exact[i])) << i;
  ASSERT_TRUE((*file)->ReadF32("inexact", {4}, out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 1.015625f);
  EXPECT_EQ(Bits(out[2]), 0x40490000u);  // pi -> 3.140625
  EXPECT_TRUE(std::isnan(out[3]));
}

struct HalfCase {
  uint16_t bf16;
  uint32_t f32;
};

TEST(HalfConversionTest, Bf16ToFloatKnownBits) {
  for (const HalfCase& c : {HalfCase{0x3F80, 0x3F800000},     // 1
                            HalfCase{0xC020, 0xC0200000},     // -2.5
                            HalfCase{0x0000, 0x00000000},     // +0
                            HalfCase{0x8000, 0x80000000},     // -0
                            HalfCase{0x0001, 0x00010000},     // smallest subnormal
                            HalfCase{0x807F, 0x807F0000},     // largest negative subnormal
                            HalfCase{0x7F7F, 0x7F7F0000},     // largest finite
                            HalfCase{0x7F80, 0x7F800000},     // +inf
                            HalfCase{0xFF80, 0xFF800000},     // -inf
                            HalfCase{0x7FC0, 0x7FC00000},     // quiet NaN
                            HalfCase{0xFF81, 0xFF810000}}) {  // NaN with payload
    EXPECT_EQ(Bits(Bf16ToFloat(c.bf16)), c.f32) << std::hex << c.bf16;
  }
}

TEST(HalfConversionTest, Fp16ToFloatKnownBits) {
  for (const HalfCase& c : {HalfCase{0x3C00, 0x3F800000},     // 1
                            HalfCase{0xC000, 0xC0000000},     // -2
                            HalfCase{0x3555, 0x3EAAA000},     // 0.333251953125
                            HalfCase{0x7BFF, 0x477FE000},     // 65504, largest finite
                            HalfCase{0x0400, 0x38800000},     // 2^-14, smallest normal
                            HalfCase{0x0001, 0x33800000},     // 2^-24, smallest subnormal
                            HalfCase{0x0002, 0x34000000},     // 2^-23
                            HalfCase{0x03FF, 0x387FC000},     // largest subnormal
                            HalfCase{0x8001, 0xB3800000},     // -2^-24
                            HalfCase{0x0000, 0x00000000},     // +0
                            HalfCase{0x8000, 0x80000000},     // -0
                            HalfCase{0x7C00, 0x7F800000},     // +inf
                            HalfCase{0xFC00, 0xFF800000},     // -inf
                            HalfCase{0x7E00, 0x7FC00000},     // quiet NaN
                            HalfCase{0x7C01, 0x7F802000}}) {  // signalling NaN keeps payload
    EXPECT_EQ(Bits(Fp16ToFloat(c.bf16)), c.f32) << std::hex << c.bf16;
  }
}

TEST(HalfConversionTest, FloatToBf16RoundsToNearestEven) {
  for (const HalfCase& c : {HalfCase{0x3F80, 0x3F800000},     // exact
                            HalfCase{0x3F80, 0x3F807FFF},     // below half: down
                            HalfCase{0x3F80, 0x3F808000},     // tie, even stays
                            HalfCase{0x3F81, 0x3F808001},     // above half: up
                            HalfCase{0x3F82, 0x3F818000},     // tie, odd rounds up to even
                            HalfCase{0x7F80, 0x7F7FFFFF},     // largest float rounds to inf
                            HalfCase{0x7F80, 0x7F800000},     // inf
                            HalfCase{0xFF80, 0xFF800000},     // -inf
                            HalfCase{0x8000, 0x80000000},     // -0
                            HalfCase{0x0001, 0x00010000},     // subnormal, exact
                            HalfCase{0x0000, 0x00008000},     // subnormal tie to even 0
                            HalfCase{0x7FC0, 0x7FC00000},     // quiet NaN
                            HalfCase{0x7FC0, 0x7F800001},     // sNaN must not become inf
                            HalfCase{0xFFC1, 0xFF810000}}) {  // NaN payload kept, quieted
    EXPECT_EQ(FloatToBf16(std::bit_cast<float>(c.f32)), c.bf16) << std::hex << c.f32;
  }
}

TEST(SafetensorsTest, ReadF32ConvertsF16AtUnalignedOffset) {
  const std::string path = TempPath("f16");
  // Header length 61 (odd) makes the data region start at an odd address.
  std::string header = R"({"h":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}})";
  header.append(61 - header.size(), ' ');
  const uint16_t halves[4] = {0x3C00, 0xC000, 0x0001, 0x7C00};
  WriteRaw(path, MakeFile(header, std::string(reinterpret_cast<const char*>(halves), 8)));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  float out[4];
  ASSERT_TRUE((*file)->ReadF32("h", {2, 2}, out).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
  EXPECT_EQ(out[3], std::numeric_limits<float>::infinity());
}

TEST(SafetensorsTest, ReadF32Errors) {
  const std::string path = TempPath("read_errors");
  const std::vector<float> w(6, 1.0f);
  ASSERT_TRUE(WriteSafetensors(path, {{"w", {2, 3}, w.data()}}, {}).ok());
  std::string ints_header = R"({"ids":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  const std::string ints_path = TempPath("read_errors_i32");
  WriteRaw(ints_path, MakeFile(ints_header, std::string(4, '\0')));

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> out(6);

  absl::Status s = (*file)->ReadF32("nope", {2, 3}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "missing tensor 'nope' in " + path);

  s = (*file)->ReadF32("w", {3, 2}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              AllOf(HasSubstr(path), HasSubstr("tensor 'w' has shape [2, 3], expected [3, 2]")));

  s = (*file)->ReadF32("w", {6}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  auto ints = SafetensorsFile::Open(ints_path);
  ASSERT_TRUE(ints.ok()) << ints.status();
  s = (*ints)->ReadF32("ids", {1}, out.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), AllOf(HasSubstr("'ids'"), HasSubstr("I32")));
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  auto file = SafetensorsFile::Open(TempPath("does_not_exist"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("does_not_exist"));
}

struct CorruptCase {
  const char* name;
  std::string contents;
  absl::StatusCode code;
  // Substrings the message must contain besides the path.
  std::vector<std::string> mentions;
};

std::string Tensor(const std::string& name, const std::string& dtype, const std::string& shape,
                   const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":" + offsets + "}";
}

std::vector<CorruptCase> CorruptCases() {
  const std::string w = "model.layers.0.mlp.up_proj.weight";
  std::string huge(8, '\0');
  const uint64_t huge_len = kMaxSafetensorsHeaderBytes + 1;
  std::memcpy(huge.data(), &huge_len, 8);
  std::string past_eof(8, '\0');
  const uint64_t past_len = 1000;
  std::memcpy(past_eof.data(), &past_len, 8);
  past_eof += "{}";
  return {
      {"Empty", "", absl::StatusCode::kDataLoss, {"0 bytes"}},
      {"ShorterThanLength",
       std::string("\x10\x00\x00", 3),
       absl::StatusCode::kDataLoss,
       {"3 bytes"}},
      {"HeaderPastEof", past_eof, absl::StatusCode::kDataLoss, {"1000", "past the end"}},
      {"HeaderTooLarge", huge + "{}", absl::StatusCode::kInvalidArgument, {"exceeds the limit"}},
      {"NotJson",
       MakeFile("{\"a\": [1, 2", ""),
       absl::StatusCode::kInvalidArgument,
       {"not valid JSON"}},
      {"JsonNotObject",
       MakeFile("[1, 2]", ""),
       absl::StatusCode::kInvalidArgument,
       {"not an object"}},
      {"EntryNotObject",
       MakeFile("{\"t\": 3}", ""),
       absl::StatusCode::kInvalidArgument,
       {"tensor 't'"}},
      {"OffsetsPastDataRegion",
       MakeFile("{" + Tensor(w, "F32", "[4]", "[0,16]") + "}", std::string(8, '\0')),
       absl::StatusCode::kDataLoss,
       {"tensor '" + w + "' data_offsets [0, 16] exceed the data region of 8 bytes"}},
      {"OffsetsReversed",
       MakeFile("{" + Tensor(w, "F32", "[0]", "[8,4]") + "}", std::string(8, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor '" + w + "'", "begin > end"}},
      {"OffsetsNegative",
       MakeFile("{" + Tensor(w, "F32", "[1]", "[-4,0]") + "}", std::string(8, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor '" + w + "'", "data_offsets"}},
      {"OffsetsMissing",
       MakeFile("{\"t\":{\"dtype\":\"F32\",\"shape\":[1]}}", std::string(4, 0)),
       absl::StatusCode::kInvalidArgument,
       {"tensor 't'", "data_offsets"}},
      {"Overlap",
       MakeFile("{" + Tensor("first", "F32", "[4]", "[0,16]") + "," +
                    Tensor("second", "F32", "[4]", "[8,24]") + "}",
                std::string(24, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"'second'", "overlap", "'first'"}},
      {"OverlapInsideEarlierTensor",
       MakeFile("{" + Tensor("big", "F32", "[8]", "[0,32]") + "," +
                    Tensor("small", "F32", "[1]", "[4,8]") + "," +
                    Tensor("after", "F32", "[1]", "[16,20]") + "}",
                std::string(32, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"overlap", "'big'"}},
      {"SizeShapeMismatch",
       MakeFile("{" + Tensor(w, "F32", "[2,3]", "[0,16]") + "}", std::string(16, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor '" + w + "'", "[2, 3]", "needs 24 bytes"}},
      {"ShapeOverflow",
       MakeFile("{" + Tensor("t", "F32", "[4294967296,4294967296]", "[0,4]") + "}",
                std::string(4, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor 't'", "overflow"}},
      {"UnknownDtype",
       MakeFile("{" + Tensor(w, "F8_E4M3", "[4]", "[0,4]") + "}", std::string(4, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor '" + w + "'", "unsupported dtype 'F8_E4M3'"}},
      {"MissingDtype",
       MakeFile("{\"t\":{\"shape\":[1],\"data_offsets\":[0,4]}}", std::string(4, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor 't'", "dtype"}},
      {"NegativeShape",
       MakeFile("{" + Tensor(w, "F32", "[-1,4]", "[0,16]") + "}", std::string(16, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor '" + w + "'", "invalid shape [-1,4]"}},
      {"FractionalShape",
       MakeFile("{" + Tensor("t", "F32", "[2.5]", "[0,8]") + "}", std::string(8, '\0')),
       absl::StatusCode::kInvalidArgument,
       {"tensor 't'", "invalid shape"}},
      {"MetadataNotString",
       MakeFile("{\"__metadata__\":{\"n\":3}}", ""),
       absl::StatusCode::kInvalidArgument,
       {"__metadata__", "'n'"}},
  };
}

class SafetensorsCorruptTest : public testing::TestWithParam<CorruptCase> {};

TEST_P(SafetensorsCorruptTest, RejectsWithCodeAndPathAndTensor) {
  const CorruptCase& c = GetParam();
  const std::string path = TempPath(std::string("corrupt_") + c.name);
  WriteRaw(path, c.contents);
  auto file = SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), c.code) << file.status();
  const std::string message(file.status().message());
  EXPECT_THAT(message, HasSubstr(path));
  for (const std::string& m : c.mentions) EXPECT_THAT(message, HasSubstr(m));
}

INSTANTIATE_TEST_SUITE_P(Cases, SafetensorsCorruptTest, testing::ValuesIn(CorruptCases()),
                         [](const testing::TestParamInfo<CorruptCase>& info) {
                           return info.param.name;
                         });

TEST(SafetensorsTest, AcceptsEmptyTensorAtSharedOffsetAndGaps) {
  const std::string path = TempPath("edge_ok");
  const std::string header = "{" + Tensor("z", "F32", "[0]", "[4,4]") + "," +
                             Tensor("a", "U8", "[4]", "[0,4]") + "," +
                             Tensor("b", "BOOL", "[2]", "[8,10]") + "}";
  WriteRaw(path, MakeFile(header, std::string(12, '\x01')));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 3u);
  EXPECT_EQ((*file)->Find("b")->bytes, 2u);
}

TEST(WriteSafetensorsTest, RejectsBadInput) {
  const float x = 1.0f;
  const std::string path = TempPath("write_errors");
  EXPECT_EQ(WriteSafetensors(path, {{"t", {1}, &x}}, {}, "F16").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"t", {1}, &x}, {"t", {1}, &x}}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"__metadata__", {1}, &x}}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"t", {-1}, &x}}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(path, {{"t", {2}, nullptr}}, {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WriteSafetensors(testing::TempDir() + "no/such/dir/x.safetensors", {{"t", {1}, &x}}, {})
                .code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace moleserve::engine
