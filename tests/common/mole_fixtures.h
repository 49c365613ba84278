#pragma once

// The MoLE family fixtures shared by the CPU end-to-end tests (mole_families_test, against
// torch references) and the CUDA forward tests (cuda_forward_test, CUDA against CPU): a tiny
// random Llama written by tests/reference/make_tiny_checkpoints.py, seeded adapters of every
// family in its PUBLIC format (tests/mole/make_public_adapters.py) and their mole/1 conversions
// (tools/mole_convert.py).
//
// They are written once per build tree and version of those scripts: ctest runs every test case
// as its own process, and writing them takes tens of seconds. A process writes into a private
// directory and renames it into place; a concurrent writer that loses the race drops its copy.
// MOLESERVE_TEST_FIXTURES, when set, names a directory holding fixtures written elsewhere (a
// GPU host without the Debian Python runs them from the packed build).

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tests/common/run_command.h"

namespace moleserve::test_util {

struct FamilyCase {
  std::string name;               // sub-directory written by make_public_adapters.py
  std::string family;             // --family of the converter and the reference
  bool convert = true;            // PEFT LoRA and native mole/1 load directly
  std::string convert_args = "";  // more converter flags
};

inline std::ostream& operator<<(std::ostream& os, const FamilyCase& c) { return os << c.name; }

inline const std::vector<FamilyCase>& MoleFamilyCases() {
  static const auto* cases = new std::vector<FamilyCase>{
      {"peft_lora", "peft_lora", false},
      {"peft_lora_all_linear", "peft_lora", false},
      {"mixlora", "mixlora"},
      {"mixlora_legacy", "mixlora"},
      {"mixlora_dynamic", "mixlora"},
      {"mixlora_dynamic_temp", "mixlora"},
      {"mixlora_switch", "mixlora"},
      {"moepeft_mola", "mola"},
      {"moepeft_loramoe", "loramoe"},
      {"moepeft_dynmole", "dynmole"},
      {"mola_original", "mola_original"},
      {"xlora_peft", "xlora"},
      {"xlora_peft_topk", "xlora"},
      {"xlora_mistralrs", "xlora"},
      {"flylora", "flylora"},
      {"sora", "sora"},
      {"nola", "nola", true, "--nola-device cpu"},  // the fixture's bases come from the CPU
      {"randlora", "randlora"},
      {"randlora_sparse", "randlora"},
      {"mos", "mos"},
      {"mos_materialized", "mos"},            // bases regenerated from the PRNG key
      {"smora", "smora", false},              // native mole/1: no public format exists
      {"mor", "mor", false},                  // likewise
      {"output_gate", "output_gate", false},  // likewise
  };
  return *cases;
}

// The tiny base checkpoint every adapter is made for.
inline constexpr const char* kMoleFixtureBase = "llama_rope_linear_fp32";

// Writes the fixtures if needed and returns their root; on failure returns "" and sets *error.
inline std::string MoleFixturesRoot(std::string* error) {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("MOLESERVE_TEST_FIXTURES"); env != nullptr && *env != 0) {
    if (fs::exists(std::string(env) + "/complete")) return env;
    *error = absl::StrCat("MOLESERVE_TEST_FIXTURES=", env, " holds no complete fixtures");
    return "";
  }
  const std::string py = MOLESERVE_PYTHON;
  const std::string src = MOLESERVE_SOURCE_DIR;
  size_t version = 0;
  for (const char* script : {"/tests/reference/make_tiny_checkpoints.py",
                             "/tests/mole/make_public_adapters.py", "/tools/mole_convert.py"}) {
    std::ifstream in(src + script);
    std::stringstream text;
    text << in.rdbuf();
    version = version * 31 + std::hash<std::string>()(text.str());
  }
  const std::string root =
      absl::StrCat(MOLESERVE_BINARY_DIR, "/test_fixtures/mole_", absl::Hex(version));
  if (fs::exists(root + "/complete")) return root;
  const std::string tmp = absl::StrCat(root, ".tmp.", getpid());
  fs::remove_all(tmp);
  int rc = 0;
  std::string out = RunCommand(
      absl::StrCat(py, " ", src, "/tests/reference/make_tiny_checkpoints.py ", tmp, " 2>&1"), &rc);
  if (rc != 0) {
    *error = "make_tiny_checkpoints.py failed:\n" + out;
    return "";
  }
  out = RunCommand(absl::StrCat(py, " ", src, "/tests/mole/make_public_adapters.py ", tmp, "/",
                                kMoleFixtureBase, " ", tmp, "/public 2>&1"),
                   &rc);
  if (rc != 0) {
    *error = "make_public_adapters.py failed:\n" + out;
    return "";
  }
  for (const FamilyCase& c : MoleFamilyCases()) {
    if (!c.convert) continue;
    out = RunCommand(
        absl::StrCat(py, " ", src, "/tools/mole_convert.py ", tmp, "/public/", c.name, " ", tmp,
                     "/mole/", c.name, " --family ", c.family, " ", c.convert_args, " 2>&1"),
        &rc);
    if (rc != 0) {
      *error = absl::StrCat("mole_convert.py ", c.name, " failed:\n", out);
      return "";
    }
  }
  std::ofstream(tmp + "/complete") << "ok\n";
  std::error_code ec;
  fs::rename(tmp, root, ec);
  if (ec) fs::remove_all(tmp);  // another process finished first; its copy is identical
  if (!fs::exists(root + "/complete")) {
    *error = "cannot place fixtures at " + root;
    return "";
  }
  return root;
}

// Where the adapter of `c` loads from: its mole/1 conversion, or the public files.
inline std::string MoleFixtureAdapterDir(const std::string& root, const FamilyCase& c) {
  return c.convert ? root + "/mole/" + c.name : root + "/public/" + c.name;
}

}  // namespace moleserve::test_util
