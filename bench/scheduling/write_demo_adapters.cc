// Writes N random mole/1 adapters for the built-in demo model (top-2 routed q_proj and o_proj
// experts in every layer, tests/common/demo_mole_adapter.h) as DIR/a0 .. DIR/a{N-1}, for load
// tests with many adapters. Prints the working set: the expert bytes of all of them in the CPU
// backend's page dtype (fp32), which is what --expert-cache-bytes is compared with.
//
//   bench_write_demo_adapters --dir /tmp/adapters --count 100 --experts 8 --rank 8

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "tests/common/demo_mole_adapter.h"

ABSL_FLAG(std::string, dir, "", "Directory to write the adapters into (a0, a1, ...)");
ABSL_FLAG(int, count, 100, "Adapters to write");
ABSL_FLAG(int, experts, 8, "Experts per routed site");
ABSL_FLAG(int, rank, 8, "LoRA rank of each expert");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_dir);
  const int count = absl::GetFlag(FLAGS_count);
  const int experts = absl::GetFlag(FLAGS_experts);
  const int rank = absl::GetFlag(FLAGS_rank);
  if (dir.empty() || count < 1 || experts < 2 || rank < 1) {
    std::fprintf(stderr, "usage: --dir DIR --count N (>= 1) --experts E (>= 2) --rank R (>= 1)\n");
    return 2;
  }
  for (int i = 0; i < count; ++i) {
    const std::string path = absl::StrCat(dir, "/a", i);
    if (moleserve::test_util::WriteDemoMoleAdapter(path, 100 + i, experts, rank, 0.2f).empty()) {
      std::fprintf(stderr, "cannot write %s\n", path.c_str());
      return 1;
    }
  }
  // Demo model: 4 layers x 2 routed sites (q_proj, o_proj), hidden 256; an expert is `rank` A
  // rows and `rank` B^T rows of 256 fp32 values.
  const long long per_adapter = 4LL * 2 * experts * rank * (256 + 256) * 4;
  std::printf(
      "{\"adapters\": %d, \"expert_bytes_per_adapter\": %lld, \"working_set_bytes\": %lld}\n",
      count, per_adapter, per_adapter * count);
  return 0;
}
