// Fuzzes the adapter loaders (engine/adapters: LoadAdapter -> mole_loader.cc / peft_loader.cc,
// json_fields.cc, tensor_set.cc) against the demo model's config, through a real directory.
//
// Input: byte 0 picks the format ('P': PEFT, adapter_config.json + adapter_model.safetensors;
// anything else: mole/1, mole_config.json + model.safetensors); the rest is split at
// kPartSeparator (fuzz_util.h) into the config JSON, the first safetensors file and, when
// non-empty, a second one (mole/1: extra.safetensors; PEFT: ignored by the loader, so it tests
// that). InspectAdapterFiles (sizes and digest) runs first, as for a hot load.
// Invariants: errors are kInvalidArgument, kNotFound or kDataLoss with a message; an adapter that
// loads has one layer per base layer, its bytes within the limit, and accepts an empty routing
// override.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "engine/adapters/adapter.h"
#include "engine/adapters/adapter_files.h"
#include "engine/model/demo_model.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

const engine::ModelConfig& Base() {
  static const engine::ModelConfig* config = new engine::ModelConfig(engine::DemoModelConfig());
  return *config;
}

void Run(std::string_view input) {
  if (input.empty()) return;
  const bool peft = input[0] == 'P';
  input.remove_prefix(1);
  const std::vector<std::string_view> parts = SplitParts(input, 3);

  const std::string dir = ScratchDir() + "/adapter";
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directory(dir, ec);
  FUZZ_CHECK_MSG(!ec, ec.message());
  WriteFileOrDie(dir + (peft ? "/adapter_config.json" : "/mole_config.json"), parts[0]);
  WriteFileOrDie(dir + (peft ? "/adapter_model.safetensors" : "/model.safetensors"), parts[1]);
  if (!parts[2].empty()) WriteFileOrDie(dir + "/extra.safetensors", parts[2]);

  absl::StatusOr<engine::AdapterFiles> files =
      engine::InspectAdapterFiles(dir, {.max_file_bytes = 1 << 20, .max_total_bytes = 1 << 21},
                                  /*digest=*/true);
  FUZZ_CHECK_MSG(files.ok(), files.status().ToString());  // inputs are far below the limits
  FUZZ_CHECK(files->sha256.size() == 64);

  const engine::AdapterLimits limits{.max_rank = 64, .max_experts = 16, .max_bytes = 64 << 20};
  absl::StatusOr<std::shared_ptr<const engine::Adapter>> adapter =
      engine::LoadAdapter(dir, "fuzz", Base(), limits);
  if (!adapter.ok()) {
    const absl::StatusCode code = adapter.status().code();
    // kDataLoss: a truncated safetensors file (SafetensorsFile::Open's contract).
    FUZZ_CHECK_MSG(code == absl::StatusCode::kInvalidArgument ||
                       code == absl::StatusCode::kNotFound || code == absl::StatusCode::kDataLoss,
                   adapter.status().ToString());
    FUZZ_CHECK(!adapter.status().message().empty());
    return;
  }
  const engine::Adapter& a = **adapter;
  FUZZ_CHECK(a.name == "fuzz");
  FUZZ_CHECK(static_cast<int32_t>(a.layers.size()) == Base().num_layers);
  FUZZ_CHECK(a.bytes >= 0 && a.bytes <= limits.max_bytes);
  FUZZ_CHECK(a.num_experts() >= 0);
  const absl::Status routing = engine::ValidateRoutingOverride(a, {});
  FUZZ_CHECK_MSG(routing.ok(), routing.ToString());
  for (const engine::GroupInfo& g : a.groups) {
    FUZZ_CHECK(g.min_experts <= g.max_experts && g.max_experts <= limits.max_experts);
    for (int32_t r : g.ranks) FUZZ_CHECK(r >= 0 && r <= limits.max_rank);
  }
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moleserve::fuzz::Run(moleserve::fuzz::AsView(data, size));
  return 0;
}
