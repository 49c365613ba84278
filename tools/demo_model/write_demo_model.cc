// moleserve-write-demo: writes the built-in demo model (the one `moleserve` serves with no
// --model) as a Hugging Face-style directory that `moleserve --model DIR` loads back.
//
//   moleserve-write-demo --out /tmp/demo-model [--dtype F32|BF16]

#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "engine/model/demo_model.h"
#include "engine/model_io/weights.h"
#include "engine/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, out, "", "Directory to write (created if missing)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("moleserve-write-demo --out DIR");
  absl::ParseCommandLine(argc, argv);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cerr << "moleserve-write-demo: --out DIR is required\n";
    return 2;
  }
  using namespace moleserve::engine;
  const ModelConfig config = DemoModelConfig();
  absl::Status status = WriteModelDirectory(out, config, RandomLlamaWeights(config, kDemoModelSeed),
                                            Tokenizer::ByteLevelDemo()->ToJson());
  if (!status.ok()) {
    std::cerr << "moleserve-write-demo: " << status << "\n";
    return 1;
  }
  std::cout << "wrote the demo model to " << out << "\n";
  return 0;
}
