#include "bench/molebench/workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moleserve::bench {
namespace {

// Independent RNG streams of one seed (see the header's "Randomness").
enum class Stream : uint64_t {
  kPromptLen = 1,
  kOutputLen,
  kPromptIds,
  kAdapters,
  kArrivals,
  kRanking,
};

std::mt19937_64 StreamRng(uint64_t seed, Stream stream) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(stream)};
  return std::mt19937_64(seq);
}

absl::Status BadLength(absl::string_view spec, absl::string_view why) {
  return absl::InvalidArgumentError(
      absl::StrCat("bad length distribution '", spec, "': ", why,
                   " (expected fixed:N, uniform:A:B or normal:MEAN:STD)"));
}

}  // namespace

absl::StatusOr<LengthDistribution> LengthDistribution::Parse(absl::string_view spec) {
  std::vector<absl::string_view> parts = absl::StrSplit(spec, ':');
  const absl::string_view kind = parts[0];
  const auto arity = [&](size_t n) { return parts.size() == n + 1; };
  if (kind == "fixed") {
    int n;
    if (!arity(1) || !absl::SimpleAtoi(parts[1], &n)) return BadLength(spec, "fixed takes one int");
    if (n < 1) return BadLength(spec, "N must be >= 1");
    return LengthDistribution(Kind::kFixed, n, 0);
  }
  if (kind == "uniform") {
    int a, b;
    if (!arity(2) || !absl::SimpleAtoi(parts[1], &a) || !absl::SimpleAtoi(parts[2], &b)) {
      return BadLength(spec, "uniform takes two ints");
    }
    if (a < 1 || b < a) return BadLength(spec, "need 1 <= A <= B");
    return LengthDistribution(Kind::kUniform, a, b);
  }
  if (kind == "normal") {
    double mean, stddev;
    if (!arity(2) || !absl::SimpleAtod(parts[1], &mean) || !absl::SimpleAtod(parts[2], &stddev)) {
      return BadLength(spec, "normal takes two numbers");
    }
    if (!std::isfinite(mean) || !std::isfinite(stddev) || stddev < 0) {
      return BadLength(spec, "need a finite MEAN and STD >= 0");
    }
    return LengthDistribution(Kind::kNormal, mean, stddev);
  }
  return BadLength(spec, absl::StrCat("unknown kind '", kind, "'"));
}

LengthDistribution LengthDistribution::Fixed(int n) {
  return LengthDistribution(Kind::kFixed, n, 0);
}

int LengthDistribution::Sample(std::mt19937_64& rng) const {
  switch (kind_) {
    case Kind::kFixed:
      return static_cast<int>(a_);
    case Kind::kUniform:
      return std::uniform_int_distribution<int>(static_cast<int>(a_), static_cast<int>(b_))(rng);
    case Kind::kNormal: {
      // std::normal_distribution requires stddev > 0.
      const double x = b_ > 0 ? std::normal_distribution<double>(a_, b_)(rng) : a_;
      return static_cast<int>(std::clamp(std::round(x), 1.0, 1e9));
    }
  }
  return 1;
}

std::string LengthDistribution::ToString() const {
  switch (kind_) {
    case Kind::kFixed:
      return absl::StrCat("fixed:", a_);
    case Kind::kUniform:
      return absl::StrCat("uniform:", a_, ":", b_);
    case Kind::kNormal:
      return absl::StrCat("normal:", a_, ":", b_);
  }
  return "";
}

absl::StatusOr<std::vector<std::string>> ParseAdapterList(absl::string_view spec) {
  spec = absl::StripAsciiWhitespace(spec);
  if (spec.empty()) return std::vector<std::string>{""};
  if (const size_t colon = spec.rfind(':');
      colon != absl::string_view::npos && spec.find(',') == absl::string_view::npos) {
    const absl::string_view prefix = spec.substr(0, colon);
    int n;
    if (!absl::SimpleAtoi(spec.substr(colon + 1), &n) || n < 1 || n > 1000000) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad --adapters '", spec, "': PREFIX:N needs an integer N in [1, 1e6]"));
    }
    std::vector<std::string> names;
    names.reserve(n);
    for (int i = 0; i < n; ++i) names.push_back(absl::StrCat(prefix, i));
    return names;
  }
  std::vector<std::string> names;
  for (absl::string_view name : absl::StrSplit(spec, ',')) {
    name = absl::StripAsciiWhitespace(name);
    if (name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad --adapters '", spec, "': empty name in the list"));
    }
    names.emplace_back(name);
  }
  return names;
}

absl::StatusOr<Popularity> ParsePopularity(absl::string_view name) {
  if (name == "uniform") return Popularity::kUniform;
  if (name == "zipf") return Popularity::kZipf;
  return absl::InvalidArgumentError(
      absl::StrCat("bad popularity '", name, "' (expected uniform or zipf)"));
}

absl::StatusOr<AdapterSampler> AdapterSampler::Create(std::vector<std::string> names,
                                                      Popularity popularity, double zipf_s,
                                                      uint64_t seed) {
  if (names.empty()) return absl::InvalidArgumentError("no adapters to draw from");
  if (!std::isfinite(zipf_s) || zipf_s < 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad Zipf exponent ", zipf_s, " (need >= 0)"));
  }
  AdapterSampler sampler;
  sampler.ranking_ = std::move(names);
  std::mt19937_64 rng = StreamRng(seed, Stream::kRanking);
  std::shuffle(sampler.ranking_.begin(), sampler.ranking_.end(), rng);
  const size_t n = sampler.ranking_.size();
  std::vector<double> weights(n, 1.0);
  if (popularity == Popularity::kZipf) {
    for (size_t k = 0; k < n; ++k) weights[k] = 1.0 / std::pow(static_cast<double>(k + 1), zipf_s);
  }
  double total = 0;
  for (double w : weights) total += w;
  double running = 0;
  for (double w : weights) {
    sampler.probabilities_.push_back(w / total);
    running += w / total;
    sampler.cumulative_.push_back(running);
  }
  sampler.cumulative_.back() = 1.0;  // no rounding gap above the last rank
  return sampler;
}

size_t AdapterSampler::SampleRank(std::mt19937_64& rng) const {
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  const auto it = std::upper_bound(cumulative_.begin(), cumulative_.end(), u);
  return std::min(static_cast<size_t>(it - cumulative_.begin()), cumulative_.size() - 1);
}

std::vector<double> PoissonArrivals(int n, double rate, uint64_t seed) {
  std::vector<double> offsets;
  offsets.reserve(std::max(n, 0));
  std::mt19937_64 rng = StreamRng(seed, Stream::kArrivals);
  std::exponential_distribution<double> gap(std::isinf(rate) ? 1.0 : rate);
  double t = 0;
  for (int i = 0; i < n; ++i) {
    if (i > 0 && !std::isinf(rate)) t += gap(rng);
    offsets.push_back(t);
  }
  return offsets;
}

namespace {

absl::Status BadLine(absl::string_view source, int line, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat(source, ":", line, ": ", why));
}

absl::StatusOr<DatasetEntry> ParseDatasetLine(absl::string_view text, absl::string_view source,
                                              int line) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return BadLine(source, line, "not valid JSON");
  if (!j.is_object()) return BadLine(source, line, "expected a JSON object");
  DatasetEntry entry;
  const bool has_text = j.contains("prompt");
  const bool has_ids = j.contains("prompt_ids");
  if (has_text == has_ids) {
    return BadLine(source, line, "needs exactly one of \"prompt\" and \"prompt_ids\"");
  }
  if (has_text) {
    const nlohmann::json& p = j["prompt"];
    if (!p.is_string()) return BadLine(source, line, "\"prompt\" must be a string");
    entry.prompt = p.get<std::string>();
    if (entry.prompt.empty()) return BadLine(source, line, "\"prompt\" is empty");
  } else {
    const nlohmann::json& ids = j["prompt_ids"];
    if (!ids.is_array() || ids.empty()) {
      return BadLine(source, line, "\"prompt_ids\" must be a non-empty array");
    }
    for (const nlohmann::json& id : ids) {
      if (!id.is_number_unsigned() || id.get<uint64_t>() > std::numeric_limits<uint32_t>::max()) {
        return BadLine(
            source, line,
            absl::StrCat("\"prompt_ids\" holds ", id.dump(), ", not a token id (uint32)"));
      }
      entry.prompt_ids.push_back(id.get<uint32_t>());
    }
  }
  if (j.contains("output_len")) {
    const nlohmann::json& o = j["output_len"];
    if (!o.is_number_unsigned() || o.get<uint64_t>() < 1 ||
        o.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int>::max())) {
      return BadLine(source, line, "\"output_len\" must be an integer >= 1");
    }
    entry.output_len = o.get<int>();
  }
  if (j.contains("adapter")) {
    const nlohmann::json& a = j["adapter"];
    if (!a.is_string()) return BadLine(source, line, "\"adapter\" must be a string");
    entry.adapter = a.get<std::string>();
  }
  return entry;
}

}  // namespace

absl::StatusOr<std::vector<DatasetEntry>> ParseDatasetJsonl(absl::string_view text,
                                                            absl::string_view source) {
  std::vector<DatasetEntry> entries;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);  // also a CRLF file's '\r'
    if (line.empty()) continue;
    absl::StatusOr<DatasetEntry> entry = ParseDatasetLine(line, source, line_number);
    if (!entry.ok()) return entry.status();
    entries.push_back(*std::move(entry));
  }
  return entries;
}

absl::StatusOr<std::vector<DatasetEntry>> LoadDatasetJsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read dataset ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  absl::StatusOr<std::vector<DatasetEntry>> entries = ParseDatasetJsonl(buffer.str(), path);
  if (entries.ok() && entries->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("dataset ", path, " has no requests"));
  }
  return entries;
}

absl::StatusOr<std::vector<PlannedRequest>> PlanWorkload(const WorkloadConfig& config) {
  int n = config.num_requests;
  if (n == 0 && !config.dataset.empty()) n = static_cast<int>(config.dataset.size());
  if (n < 1) return absl::InvalidArgumentError("the number of requests must be >= 1");
  if (config.token_id_min >= config.token_id_max) {
    return absl::InvalidArgumentError(absl::StrCat("empty token id range [", config.token_id_min,
                                                   ", ", config.token_id_max, ")"));
  }
  if (config.rate.has_value() && !(*config.rate > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request rate must be > 0 (or inf), got ", *config.rate));
  }
  absl::StatusOr<AdapterSampler> sampler =
      AdapterSampler::Create(config.adapters, config.popularity, config.zipf_s, config.seed);
  if (!sampler.ok()) return sampler.status();

  std::mt19937_64 prompt_len_rng = StreamRng(config.seed, Stream::kPromptLen);
  std::mt19937_64 output_len_rng = StreamRng(config.seed, Stream::kOutputLen);
  std::mt19937_64 ids_rng = StreamRng(config.seed, Stream::kPromptIds);
  std::mt19937_64 adapter_rng = StreamRng(config.seed, Stream::kAdapters);
  std::uniform_int_distribution<uint32_t> id_dist(config.token_id_min, config.token_id_max - 1);
  const std::vector<double> offsets = config.rate.has_value()
                                          ? PoissonArrivals(n, *config.rate, config.seed)
                                          : std::vector<double>(n, 0.0);

  std::vector<PlannedRequest> plan(n);
  for (int i = 0; i < n; ++i) {
    PlannedRequest& r = plan[i];
    r.index = i;
    r.send_offset_s = offsets[i];
    // Draw for every request, used or not, so that a dataset's own fields do not shift the draws
    // of the requests that follow.
    const std::string& drawn_adapter = sampler->Sample(adapter_rng);
    const int drawn_output_len = config.output_len.Sample(output_len_rng);
    if (config.dataset.empty()) {
      r.prompt_ids.resize(config.prompt_len.Sample(prompt_len_rng));
      for (uint32_t& id : r.prompt_ids) id = id_dist(ids_rng);
      r.output_len = drawn_output_len;
      r.adapter = drawn_adapter;
      continue;
    }
    const DatasetEntry& e = config.dataset[i % config.dataset.size()];
    if (e.prompt_ids.empty() && e.prompt.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("dataset entry ", i, " has no prompt"));
    }
    r.prompt_ids = e.prompt_ids;
    r.prompt_text = e.prompt;
    r.output_len = e.output_len.value_or(drawn_output_len);
    r.adapter = e.adapter.value_or(drawn_adapter);
  }
  return plan;
}

}  // namespace moleserve::bench
