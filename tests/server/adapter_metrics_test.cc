// Per-adapter series of PrometheusMetrics: the most active adapters by name, the rest summed as
// "(other)", series removed when an adapter leaves the top, token counters never decreasing.

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "server/metrics/prometheus_metrics.h"
#include "tests/common/metrics_scrape.h"

namespace moleserve::server {
namespace {

using engine::AdapterActivity;

std::string Requests(const std::string& adapter, const std::string& state) {
  return "moleserve_adapter_requests{adapter=\"" + adapter + "\",state=\"" + state + "\"}";
}
std::string Tokens(const std::string& adapter, const std::string& kind) {
  return "moleserve_adapter_tokens_total{adapter=\"" + adapter + "\",kind=\"" + kind + "\"}";
}

TEST(AdapterMetricsTest, TopAdaptersByNameTheRestAsOther) {
  auto metrics = PrometheusMetrics::Create("127.0.0.1:0", /*top_adapters=*/2);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  PrometheusMetrics& m = **metrics;
  m.OnAdapterActivity(
      {{"a", 1, 0, 10, 1}, {"b", 5, 2, 40, 4}, {"c", 0, 1, 0, 0}, {"d", 3, 0, 7, 3}});
  std::map<std::string, double> s = test_util::ParsePrometheus(m.Text());
  // b (7 requests) and d (3) are named; a and c are summed.
  EXPECT_EQ(s[Requests("b", "running")], 5);
  EXPECT_EQ(s[Requests("b", "waiting")], 2);
  EXPECT_EQ(s[Requests("d", "running")], 3);
  EXPECT_EQ(s[Tokens("b", "prompt")], 40);
  EXPECT_EQ(s[Tokens("d", "generated")], 3);
  EXPECT_EQ(s.count(Requests("a", "running")), 0u);
  EXPECT_EQ(s.count(Requests("c", "waiting")), 0u);
  EXPECT_EQ(s[Requests(kOtherAdapters, "running")], 1);
  EXPECT_EQ(s[Requests(kOtherAdapters, "waiting")], 1);
  EXPECT_EQ(s[Tokens(kOtherAdapters, "prompt")], 10);
  EXPECT_EQ(s[Tokens(kOtherAdapters, "generated")], 1);

  // d goes idle (zeros), a becomes busy: a is named, d's series go away, its tokens from now on
  // would count in "(other)", and every counter only grows.
  m.OnAdapterActivity({{"a", 4, 4, 5, 2}, {"b", 5, 0, 0, 5}, {"d", 0, 0, 0, 0}});
  s = test_util::ParsePrometheus(m.Text());
  EXPECT_EQ(s[Requests("a", "running")], 4);
  EXPECT_EQ(s[Tokens("a", "prompt")], 5);  // a's series starts at its first named report
  EXPECT_EQ(s[Requests("b", "waiting")], 0);
  EXPECT_EQ(s[Tokens("b", "generated")], 9);
  EXPECT_EQ(s.count(Requests("d", "running")), 0u);
  EXPECT_EQ(s.count(Tokens("d", "generated")), 0u);
  EXPECT_EQ(s[Requests(kOtherAdapters, "running")], 0);
  EXPECT_EQ(s[Tokens(kOtherAdapters, "prompt")], 10);

  // No adapter named at all with top 0: everything is "(other)".
  auto none = PrometheusMetrics::Create("127.0.0.1:0", 0);
  ASSERT_TRUE(none.ok());
  (*none)->OnAdapterActivity({{"a", 1, 2, 3, 4}});
  s = test_util::ParsePrometheus((*none)->Text());
  EXPECT_EQ(s.count(Requests("a", "running")), 0u);
  EXPECT_EQ(s[Requests(kOtherAdapters, "waiting")], 2);
  EXPECT_EQ(s[Tokens(kOtherAdapters, "generated")], 4);
}

}  // namespace
}  // namespace moleserve::server
