// Fuzzes tokenizer.json loading (Tokenizer::FromJsonString) on arbitrary bytes. A tokenizer that
// loads is exercised a little: encoding a few fixed strings and the input itself (capped),
// decoding the ids, streaming them with DecodeToken, and the ToJson round trip, which must load
// and encode identically (Tokenizer::ToJson's contract).

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

using engine::Tokenizer;

void Exercise(const Tokenizer& tok, std::string_view input) {
  const int32_t vocab = tok.vocab_size();
  FUZZ_CHECK(vocab >= 0 && vocab <= engine::kMaxTokenizerVocabSize);
  std::vector<std::string> texts = {"Hello world", " x\n\ny 12345 ",
                                    "\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80", "\xff\xc3"};
  texts.emplace_back(input.substr(0, 256));
  for (const std::string& text : texts) {
    for (bool add_bos : {false, true}) {
      const std::vector<int32_t> ids = tok.Encode(text, add_bos);
      for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < vocab);
      const std::string decoded = tok.Decode(ids);
      FUZZ_CHECK(engine::IsValidUtf8(decoded));
      std::string streamed;
      for (int32_t id : ids) {
        streamed += tok.DecodeToken(id);
        (void)tok.Piece(id);
      }
      (void)engine::SanitizeUtf8(streamed);
    }
  }
  // Ids around the vocabulary's edges, including unknown ones.
  const std::vector<int32_t> edge = {0, 1, vocab / 2, vocab - 1, vocab, -1};
  FUZZ_CHECK(engine::IsValidUtf8(tok.Decode(edge)));
  for (int32_t id : edge) {
    (void)tok.DecodeToken(id);
    if (const std::optional<int32_t> back = tok.TokenToId(tok.Piece(id)); back.has_value()) {
      FUZZ_CHECK(*back >= 0 && *back < vocab);
    }
  }
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moleserve;  // NOLINT(build/namespaces)
  const std::string_view input = fuzz::AsView(data, size);
  absl::StatusOr<std::unique_ptr<engine::Tokenizer>> tok = engine::Tokenizer::FromJsonString(input);
  if (!tok.ok()) {
    const absl::StatusCode code = tok.status().code();
    FUZZ_CHECK_MSG(
        code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kUnimplemented,
        tok.status().ToString());
    return 0;
  }
  fuzz::Exercise(**tok, input);
  // ToJson round trip: loads, same vocabulary, same ids.
  const std::string json = (*tok)->ToJson();
  absl::StatusOr<std::unique_ptr<engine::Tokenizer>> again =
      engine::Tokenizer::FromJsonString(json);
  FUZZ_CHECK_MSG(again.ok(), again.status().ToString());
  FUZZ_CHECK((*again)->vocab_size() == (*tok)->vocab_size());
  for (std::string_view text : {std::string_view("Hello world  42"), input.substr(0, 128)}) {
    FUZZ_CHECK_MSG((*again)->Encode(text, true) == (*tok)->Encode(text, true), std::string(text));
  }
  return 0;
}
