#include "server/cli/dashed_flags.h"

#include <gtest/gtest.h>

#include "absl/flags/flag.h"

ABSL_FLAG(int, metrics_port, 0, "test flag");
ABSL_FLAG(bool, ignore_eos, false, "test flag");
ABSL_FLAG(std::string, text, "", "test flag");

namespace moleserve::server {
namespace {

std::vector<std::string> Normalize(std::vector<std::string> args,
                                   const std::vector<std::string>& list_flags = {}) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  std::vector<std::string> storage;
  std::vector<char*> out =
      NormalizeDashedFlags(static_cast<int>(argv.size()), argv.data(), &storage, list_flags);
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

TEST(DashedFlagsTest, RepeatedListFlagsAreFoldedIntoOne) {
  // Every spelling absl accepts: --f=v, --f v, -f=v, -f v; the folded flag takes the place of
  // the first occurrence, other arguments keep their order, nothing after "--" is touched.
  EXPECT_EQ(Normalize({"prog", "--port=1", "--adapter=a=/x", "--text", "hi", "--adapter", "b=/y",
                       "-adapter=c=/z", "-adapter", "d=/w", "--", "--adapter=e=/v"},
                      {"adapter"}),
            (std::vector<std::string>{"prog", "--port=1", "--adapter=a=/x,b=/y,c=/z,d=/w", "--text",
                                      "hi", "--", "--adapter=e=/v"}));
  // A bare flag before another flag has an empty value (reported by the caller), and does not
  // swallow that flag.
  EXPECT_EQ(Normalize({"prog", "--adapter", "--port=1", "--adapter=a=/x"}, {"adapter"}),
            (std::vector<std::string>{"prog", "--adapter=,a=/x", "--port=1"}));
  EXPECT_EQ(Normalize({"prog", "--port=1"}, {"adapter"}),
            (std::vector<std::string>{"prog", "--port=1"}));
}

}  // namespace
}  // namespace moleserve::server
