#include "server/cli/dashed_flags.h"

#include <gtest/gtest.h>

#include "absl/flags/flag.h"

ABSL_FLAG(int, metrics_port, 0, "test flag");
ABSL_FLAG(bool, ignore_eos, false, "test flag");
ABSL_FLAG(std::string, text, "", "test flag");

namespace moleserve::server {
namespace {

std::vector<std::string> Normalize(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  std::vector<std::string> storage;
  std::vector<char*> out =
      NormalizeDashedFlags(static_cast<int>(argv.size()), argv.data(), &storage);
  return std::vector<std::string>(out.begin(), out.end());
}

TEST(DashedFlagsTest, RewritesRegisteredFlagNamesOnly) {
  EXPECT_EQ(Normalize({"prog", "--metrics-port=9", "--ignore-eos", "--noignore-eos", "--text",
                       "--my-prompt", "--unknown-flag", "pos-arg", "--", "--metrics-port"}),
            (std::vector<std::string>{"prog", "--metrics_port=9", "--ignore_eos", "--noignore_eos",
                                      "--text", "--my-prompt", "--unknown-flag", "pos-arg", "--",
                                      "--metrics-port"}));
}

TEST(DashedFlagsTest, ValueAfterEqualsIsUntouched) {
  EXPECT_EQ(Normalize({"prog", "--text=--a-b"}),
            (std::vector<std::string>{"prog", "--text=--a-b"}));
}

}  // namespace
}  // namespace moleserve::server
