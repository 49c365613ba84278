// CPU segmented LoRA GEMM: SgmvShrink + SgmvExpandRows against the per-expert loop of GEMMs a naive
// server runs (for each expert: gather its tokens, sgemm shrink, sgemm expand, weighted
// scatter-add with saxpy), over tokens x experts x rank with top-2 routing to random experts
// (top-1 when there is one expert). Both sides use the same stacked weights, OpenBLAS with the
// same thread count, and precomputed routing tables (not timed); the two are called alternately
// and each reports its median time per call. Prints a table with the speed-up
// baseline_time / sgmv_time and writes JSON.
//
//   bench_cpu_sgmv [--out bench/results/cpu_sgmv.json] [--threads 0] [--hidden 4096]
//                  [--tokens 1,8,64,256] [--experts 1,4,8,32] [--ranks 8,16,64]

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "bench/list_flag.h"
#include "kernels/cpu/ops.h"

ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(int, threads, 0, "CPU threads for the pool and OpenBLAS (0 = all)");
ABSL_FLAG(int, hidden, 4096, "in = out features of the LoRA'd linear");
ABSL_FLAG(std::string, tokens, "1,8,64,256", "Comma-separated token counts");
ABSL_FLAG(std::string, experts, "1,4,8,32", "Comma-separated expert counts");
ABSL_FLAG(std::string, ranks, "8,16,64", "Comma-separated LoRA ranks");
ABSL_FLAG(int, top_k, 2, "Experts per token (capped at the expert count)");
ABSL_FLAG(double, min_time_ms, 100.0, "Measure each method for at least this long per point");
ABSL_FLAG(int, repeats, 5, "Minimum calls of each method per point; the median is reported");

namespace {

namespace kc = moleserve::kernels::cpu;
using moleserve::bench::ParseList;
using moleserve::kernels::KernelStatus;

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Fast uniform fill in [-scale, scale): the weights' values do not matter for timing.
void Fill(std::vector<float>& v, uint32_t seed, float scale) {
  uint32_t state = seed * 2654435761u + 1;
  for (float& x : v) {
    state = state * 1664525u + 1013904223u;
    x = scale * (static_cast<float>(state >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median seconds per call of a and of b, called alternately (a, b, a, b, ...) for at least
// `min_time` each and `repeats` calls each, so that load from other processes and the state
// OpenBLAS leaves behind (its workers spin for a while after each call) hit both alike.
template <typename A, typename B>
std::pair<double, double> TimeAlternating(A&& a, B&& b, double min_time, int repeats) {
  a();  // warm-up: scratch buffers, OpenBLAS threads, caches
  b();
  std::vector<double> ta, tb;
  double sum_a = 0, sum_b = 0;
  while (static_cast<int>(ta.size()) < repeats || sum_a < min_time || sum_b < min_time) {
    const double t0 = NowSeconds();
    a();
    const double t1 = NowSeconds();
    b();
    const double t2 = NowSeconds();
    ta.push_back(t1 - t0);
    tb.push_back(t2 - t1);
    sum_a += t1 - t0;
    sum_b += t2 - t1;
    if (ta.size() >= 5000) break;
  }
  return {Median(ta), Median(tb)};
}

struct Problem {
  int tokens, experts, rank, k;
  std::vector<int32_t> pair_token, seg_start, seg_rank;
  std::vector<int64_t> seg_row_offset;
  std::vector<float> pair_weight;
};

Problem Route(int tokens, int experts, int rank, int k, int max_rank, std::mt19937& rng) {
  Problem p{tokens, experts, rank, k, {}, {}, {}, {}, {}};
  std::vector<std::vector<int32_t>> by_expert(experts);
  std::vector<std::vector<float>> weight_of(experts);
  std::vector<int32_t> order(experts);
  std::uniform_real_distribution<float> u(0.2f, 0.8f);
  for (int t = 0; t < tokens; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int j = 0; j < k; ++j) {
      by_expert[order[j]].push_back(t);
      weight_of[order[j]].push_back(u(rng) * 0.125f);  // gate weight x LoRA scale
    }
  }
  p.seg_start.push_back(0);
  for (int e = 0; e < experts; ++e) {
    for (size_t i = 0; i < by_expert[e].size(); ++i) {
      p.pair_token.push_back(by_expert[e][i]);
      p.pair_weight.push_back(weight_of[e][i]);
    }
    p.seg_start.push_back(static_cast<int32_t>(p.pair_token.size()));
    p.seg_rank.push_back(rank);
    p.seg_row_offset.push_back(int64_t{e} * max_rank);  // row table: max_rank entries per expert
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int threads = absl::GetFlag(FLAGS_threads) > 0
                          ? absl::GetFlag(FLAGS_threads)
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t hidden = absl::GetFlag(FLAGS_hidden);
  const std::vector<int> token_list = ParseList(absl::GetFlag(FLAGS_tokens));
  const std::vector<int> expert_list = ParseList(absl::GetFlag(FLAGS_experts));
  const std::vector<int> rank_list = ParseList(absl::GetFlag(FLAGS_ranks));
  const double min_time = absl::GetFlag(FLAGS_min_time_ms) / 1e3;
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  const int max_tokens = *std::max_element(token_list.begin(), token_list.end());
  const int max_experts = *std::max_element(expert_list.begin(), expert_list.end());
  const int max_rank = *std::max_element(rank_list.begin(), rank_list.end());
  const int max_k = std::min(absl::GetFlag(FLAGS_top_k), max_experts);

  kc::SetBlasThreads(threads);
  kc::ThreadPool pool(threads);

  // Stacked weights, [max_experts, max_rank, hidden] for A and for B^T (rank-major); a config of
  // rank r uses each expert's first r rows, still consecutive (the contiguous layout).
  std::vector<float> a_store(int64_t{max_experts} * max_rank * hidden);
  std::vector<float> b_store(int64_t{max_experts} * max_rank * hidden);
  Fill(a_store, 1, 1.0f / std::sqrt(static_cast<float>(hidden)));
  Fill(b_store, 2, 0.05f);
  std::vector<const void*> a_rows, b_rows;
  for (int64_t i = 0; i < int64_t{max_experts} * max_rank; ++i) {
    a_rows.push_back(a_store.data() + i * hidden);
    b_rows.push_back(b_store.data() + i * hidden);
  }
  std::vector<float> x(int64_t{max_tokens} * hidden);
  Fill(x, 3, 1.0f);
  std::vector<float> y_sgmv(int64_t{max_tokens} * hidden), y_base(y_sgmv.size());
  std::vector<float> v(int64_t{max_tokens} * max_k * max_rank);
  // Baseline buffers.
  std::vector<float> xg(int64_t{max_tokens} * hidden), vg(int64_t{max_tokens} * max_rank),
      tg(int64_t{max_tokens} * hidden);

  std::printf("SgmvShrink + SgmvExpandRows vs per-expert GEMM loop: in = out = %lld, %d threads\n",
              static_cast<long long>(hidden), threads);
  std::printf("%7s %8s %5s %6s %12s %12s %9s %10s\n", "tokens", "experts", "rank", "pairs",
              "sgmv us", "baseline us", "speedup", "max |diff|");
  nlohmann::json rows = nlohmann::json::array();
  std::mt19937 rng(42);
  std::vector<double> speedups;
  const double bench_start = NowSeconds();
  for (int tokens : token_list) {
    for (int experts : expert_list) {
      for (int rank : rank_list) {
        const int k = std::min(absl::GetFlag(FLAGS_top_k), experts);
        const Problem pr = Route(tokens, experts, rank, k, max_rank, rng);
        const int32_t num_pairs = pr.seg_start.back();
        // Each token's k pairs, in pair order, for the row-owned expand.
        std::vector<int32_t> token_pair(int64_t{tokens} * k, 0), token_count(tokens, 0);
        for (int32_t q = 0; q < num_pairs; ++q) {
          const int32_t t = pr.pair_token[q];
          token_pair[int64_t{t} * k + token_count[t]++] = q;
        }

        const moleserve::kernels::SgmvShrinkParams shrink{
            .x = x.data(),
            .v = v.data(),
            .x_row = pr.pair_token.data(),
            .seg_start = pr.seg_start.data(),
            .seg_rank = pr.seg_rank.data(),
            .seg_row_offset = pr.seg_row_offset.data(),
            .a_rows = a_rows.data(),
            .num_segments = experts,
            .in = hidden,
            .v_stride = rank};
        const moleserve::kernels::SgmvExpandRowsParams expand{
            .v = v.data(),
            .y = y_sgmv.data(),
            .token_pair = token_pair.data(),
            .count = token_count.data(),
            .weight = pr.pair_weight.data(),
            .seg_start = pr.seg_start.data(),
            .seg_rank = pr.seg_rank.data(),
            .seg_row_offset = pr.seg_row_offset.data(),
            .b_rows = b_rows.data(),
            .num_tokens = tokens,
            .pair_stride = k,
            .num_segments = experts,
            .out = hidden,
            .v_stride = rank};
        auto sgmv = [&] {
          if (kc::SgmvShrink(shrink, &pool) != KernelStatus::kOk ||
              kc::SgmvExpandRows(expand, &pool) != KernelStatus::kOk) {
            std::fprintf(stderr, "sgmv refused its arguments\n");
            std::exit(1);
          }
        };
        const int n_hidden = static_cast<int>(hidden);
        auto baseline = [&] {
          for (int e = 0; e < experts; ++e) {
            const int32_t start = pr.seg_start[e], n = pr.seg_start[e + 1] - start;
            if (n == 0) continue;
            for (int32_t q = 0; q < n; ++q) {
              std::memcpy(xg.data() + int64_t{q} * hidden,
                          x.data() + int64_t{pr.pair_token[start + q]} * hidden,
                          sizeof(float) * hidden);
            }
            const float* a = a_store.data() + int64_t{e} * max_rank * hidden;
            const float* bt = b_store.data() + int64_t{e} * max_rank * hidden;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, rank, n_hidden, 1.0f, xg.data(),
                        n_hidden, a, n_hidden, 0.0f, vg.data(), rank);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n_hidden, rank, 1.0f,
                        vg.data(), rank, bt, n_hidden, 0.0f, tg.data(), n_hidden);
            for (int32_t q = 0; q < n; ++q) {
              cblas_saxpy(n_hidden, pr.pair_weight[start + q], tg.data() + int64_t{q} * hidden, 1,
                          y_base.data() + int64_t{pr.pair_token[start + q]} * hidden, 1);
            }
          }
        };

        // One call of each from zero: both must produce the same y.
        std::fill(y_sgmv.begin(), y_sgmv.end(), 0.0f);
        std::fill(y_base.begin(), y_base.end(), 0.0f);
        sgmv();
        baseline();
        double diff = 0, scale = 0;
        for (int64_t i = 0; i < int64_t{tokens} * hidden; ++i) {
          diff = std::max(diff, static_cast<double>(std::fabs(y_sgmv[i] - y_base[i])));
          scale = std::max(scale, static_cast<double>(std::fabs(y_base[i])));
        }
        if (diff > 1e-4 * std::max(1.0, scale)) {
          std::fprintf(stderr, "results differ: max |diff| %g (scale %g)\n", diff, scale);
          return 1;
        }

        const auto [t_sgmv, t_base] = TimeAlternating(sgmv, baseline, min_time, repeats);
        const double speedup = t_base / t_sgmv;
        speedups.push_back(speedup);
        std::printf("%7d %8d %5d %6d %12.1f %12.1f %9.2f %10.2g\n", tokens, experts, rank,
                    num_pairs, t_sgmv * 1e6, t_base * 1e6, speedup, diff);
        std::fflush(stdout);
        rows.push_back({{"tokens", tokens},
                        {"experts", experts},
                        {"rank", rank},
                        {"top_k", k},
                        {"pairs", num_pairs},
                        {"sgmv_us", t_sgmv * 1e6},
                        {"baseline_us", t_base * 1e6},
                        {"speedup_vs_baseline", speedup},
                        {"max_abs_diff", diff}});
      }
    }
  }
  double log_sum = 0;
  for (double s : speedups) log_sum += std::log(s);
  const double geomean = std::exp(log_sum / speedups.size());
  std::printf("speed-up over the per-expert GEMM loop: geomean %.2f, min %.2f, max %.2f (%.0f s)\n",
              geomean, *std::min_element(speedups.begin(), speedups.end()),
              *std::max_element(speedups.begin(), speedups.end()), NowSeconds() - bench_start);

  nlohmann::json report;
  report["benchmark"] = "cpu_sgmv";
  report["date"] = absl::FormatTime("%Y-%m-%d", absl::Now(), absl::UTCTimeZone());
  report["threads"] = threads;
  report["backend"] = "cpu (fp32, OpenBLAS)";
  report["in_features"] = hidden;
  report["out_features"] = hidden;
  report["baseline"] =
      "per expert: gather tokens, cblas_sgemm shrink, cblas_sgemm expand, cblas_saxpy scatter-add";
  report["min_time_ms"] = absl::GetFlag(FLAGS_min_time_ms);
  report["repeats"] = repeats;
  report["speedup_geomean"] = geomean;
  report["results"] = rows;
  if (!absl::GetFlag(FLAGS_out).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_out)) << report.dump(2) << "\n";
    std::printf("wrote %s\n", absl::GetFlag(FLAGS_out).c_str());
  }
  return 0;
}
