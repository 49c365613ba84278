// Fuzzes config.json and generation_config.json parsing: ParseHfConfig on the first part, then
// OpenModelDirectory on a directory holding config.json, generation_config.json (when the second
// part is non-empty) and model.safetensors.index.json (when the third part is non-empty); there is
// no weight file, so a directory whose JSON is accepted ends in kNotFound for a missing shard.
// Parts are separated by kPartSeparator (fuzz_util.h).
// Invariants: a config ParseHfConfig accepts passes Validate() and survives the ToHfConfigJson
// round trip; errors are kInvalidArgument, or kNotFound for the missing files.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/model_directory.h"
#include "engine/model_io/model_config.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

bool SameShape(const engine::ModelConfig& a, const engine::ModelConfig& b) {
  return a.architecture == b.architecture && a.num_layers == b.num_layers &&
         a.hidden_size == b.hidden_size && a.vocab_size == b.vocab_size &&
         a.max_position_embeddings == b.max_position_embeddings &&
         a.eos_token_ids == b.eos_token_ids;
}

void Run(std::string_view input) {
  const std::vector<std::string_view> parts = SplitParts(input, 3);
  // Debian's Abseil has its own string_view type.
  absl::StatusOr<engine::ModelConfig> config =
      engine::ParseHfConfig(absl::string_view(parts[0].data(), parts[0].size()));
  if (config.ok()) {
    FUZZ_CHECK_MSG(config->Validate().ok(), config->Validate().ToString());
    const std::string json = engine::ToHfConfigJson(*config);
    absl::StatusOr<engine::ModelConfig> again = engine::ParseHfConfig(json);
    FUZZ_CHECK_MSG(again.ok(), again.status().ToString() + "\n" + json);
    FUZZ_CHECK_MSG(SameShape(*config, *again), json);
    (void)engine::RopeInverseFrequencies(*config);
  } else {
    FUZZ_CHECK_MSG(config.status().code() == absl::StatusCode::kInvalidArgument,
                   config.status().ToString());
  }

  const std::string& dir = ScratchDir();
  WriteFileOrDie(dir + "/config.json", parts[0]);
  const std::string gen = dir + "/generation_config.json";
  const std::string index = dir + "/model.safetensors.index.json";
  if (parts[1].empty()) {
    RemoveFile(gen);
  } else {
    WriteFileOrDie(gen, parts[1]);
  }
  if (parts[2].empty()) {
    RemoveFile(index);
  } else {
    WriteFileOrDie(index, parts[2]);
  }
  absl::StatusOr<engine::ModelDirectory> opened = engine::OpenModelDirectory(dir);
  FUZZ_CHECK(!opened.ok());  // there are no weights
  const absl::StatusCode code = opened.status().code();
  FUZZ_CHECK_MSG(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound,
                 opened.status().ToString());
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moleserve::fuzz::Run(moleserve::fuzz::AsView(data, size));
  return 0;
}
