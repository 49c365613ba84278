#pragma once

// molebench workload planning: what each request of a run sends and when. Pure logic (no gRPC, no
// clock), so a run's plan is a deterministic function of its flags and seed and can be tested
// without a server.
//
//   ASSIGN_OR_RETURN(LengthDistribution prompt, LengthDistribution::Parse("uniform:16:64"));
//   ASSIGN_OR_RETURN(std::vector<std::string> names, ParseAdapterList("mole:40"));
//   WorkloadConfig config{.num_requests = 500, .seed = 1, .prompt_len = prompt, ...};
//   ASSIGN_OR_RETURN(std::vector<PlannedRequest> plan, PlanWorkload(config));
//
// Randomness: every aspect (lengths, prompt ids, adapters, arrivals) draws from its own RNG
// stream derived from the seed, so changing e.g. --rate leaves the prompts and adapters of a run
// unchanged. The standard distributions used are implementation-defined, so plans are
// reproducible for one standard library build, not across them.

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moleserve::bench {

// A length distribution from a flag value:
//   "fixed:N"              always N (N >= 1)
//   "uniform:A:B"          integer uniform on [A, B] (1 <= A <= B)
//   "normal:MEAN:STD"      rounded normal sample, clamped to >= 1 (STD >= 0)
class LengthDistribution {
 public:
  enum class Kind { kFixed, kUniform, kNormal };

  // INVALID_ARGUMENT naming the accepted forms when `spec` is none of them.
  static absl::StatusOr<LengthDistribution> Parse(absl::string_view spec);
  // "fixed:n"; requires n >= 1.
  static LengthDistribution Fixed(int n);

  // A sample, always >= 1.
  [[nodiscard]] int Sample(std::mt19937_64& rng) const;
  // The spec it was parsed from, normalized ("uniform:16:64").
  [[nodiscard]] std::string ToString() const;
  [[nodiscard]] Kind kind() const { return kind_; }

 private:
  LengthDistribution(Kind kind, double a, double b) : kind_(kind), a_(a), b_(b) {}

  Kind kind_;
  double a_;  // N, A or MEAN
  double b_;  // unused, B or STD
};

// Adapter names from --adapters: "" -> {""} (the base model), "a,b,c" -> those names,
// "prefix:N" -> prefix0 .. prefix{N-1}. INVALID_ARGUMENT on an empty list element or a bad N.
absl::StatusOr<std::vector<std::string>> ParseAdapterList(absl::string_view spec);

enum class Popularity { kUniform, kZipf };
absl::StatusOr<Popularity> ParsePopularity(absl::string_view name);

// Draws the adapter of each request. The adapters are ranked by a seeded shuffle; rank k
// (1-based) is drawn with probability proportional to 1 (uniform) or 1 / k^s (Zipf), so under
// Zipf the top-ranked adapter gets 1 / H_{N,s} of the draws (H_{N,s} = sum_k 1/k^s).
// Immutable after Create; Sample is const but advances the caller's RNG.
class AdapterSampler {
 public:
  // INVALID_ARGUMENT when `names` is empty or zipf_s is negative or not finite.
  static absl::StatusOr<AdapterSampler> Create(std::vector<std::string> names,
                                               Popularity popularity, double zipf_s, uint64_t seed);

  // Index into ranking().
  [[nodiscard]] size_t SampleRank(std::mt19937_64& rng) const;
  [[nodiscard]] const std::string& Sample(std::mt19937_64& rng) const {
    return ranking_[SampleRank(rng)];
  }
  // The adapters, most popular first.
  [[nodiscard]] const std::vector<std::string>& ranking() const { return ranking_; }
  // Probability of each rank; sums to 1.
  [[nodiscard]] const std::vector<double>& probabilities() const { return probabilities_; }

 private:
  AdapterSampler() = default;

  std::vector<std::string> ranking_;
  std::vector<double> probabilities_;
  std::vector<double> cumulative_;  // cumulative_[k] = sum of probabilities_[0..k]
};

// Send offsets in seconds from the start of an open-loop run: the first request at 0, then
// exponential gaps of mean 1/rate (a Poisson process). rate = +inf sends everything at 0.
// Requires rate > 0.
std::vector<double> PoissonArrivals(int n, double rate, uint64_t seed);

// One line of a --dataset JSONL file:
//   {"prompt": "text"} or {"prompt_ids": [1, 2, 3]}, optionally "output_len": N (>= 1) and
//   "adapter": "name" (a name from outside --adapters is allowed; "" is the base model).
struct DatasetEntry {
  std::string prompt;                  // text input, when prompt_ids is empty
  std::vector<uint32_t> prompt_ids;    // token-id input
  std::optional<int> output_len;       // else drawn from --output-len
  std::optional<std::string> adapter;  // else drawn by the AdapterSampler
};

// Parses JSONL text; blank lines are skipped. INVALID_ARGUMENT "<source>:<line>: <why>" for the
// first bad line (not JSON, not an object, neither or both prompt forms, bad types or values).
absl::StatusOr<std::vector<DatasetEntry>> ParseDatasetJsonl(absl::string_view text,
                                                            absl::string_view source);
// Reads and parses a file (NOT_FOUND when it cannot be read; INVALID_ARGUMENT when it is empty).
absl::StatusOr<std::vector<DatasetEntry>> LoadDatasetJsonl(const std::string& path);

struct WorkloadConfig {
  int num_requests = 0;  // with a dataset, 0 means one request per dataset line
  uint64_t seed = 0;
  LengthDistribution prompt_len = LengthDistribution::Fixed(32);
  LengthDistribution output_len = LengthDistribution::Fixed(32);
  // When set, prompts (and any output_len / adapter) come from it, cycled in order.
  std::vector<DatasetEntry> dataset;
  std::vector<std::string> adapters = {""};
  Popularity popularity = Popularity::kUniform;
  double zipf_s = 1.0;
  // Random prompt ids are uniform on [token_id_min, token_id_max).
  uint32_t token_id_min = 10;
  uint32_t token_id_max = 250;
  // Open loop: Poisson send offsets at this rate (req/s, may be +inf). Closed loop: unset, every
  // offset is 0 and the driver paces by concurrency.
  std::optional<double> rate;
};

// What one request sends, and (open loop) when.
struct PlannedRequest {
  int index = 0;
  double send_offset_s = 0;  // from the start of the run
  std::string adapter;
  std::vector<uint32_t> prompt_ids;  // token-id input, or
  std::string prompt_text;           // text input (when prompt_ids is empty)
  int output_len = 0;                // max_new_tokens (>= 1)
};

// The whole run's plan. INVALID_ARGUMENT on an inconsistent config (no requests, an empty token
// id range, a non-positive rate, a dataset entry with empty input).
absl::StatusOr<std::vector<PlannedRequest>> PlanWorkload(const WorkloadConfig& config);

}  // namespace moleserve::bench
