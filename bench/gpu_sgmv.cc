// CUDA segmented LoRA GEMM at decode shapes: SgmvShrink + SgmvExpandRows (bf16, fp32 accumulation)
// over tokens x distinct experts x rank, each token routed to one expert (so the distinct expert
// count is exactly min(experts, tokens)), experts' rank rows scattered over a page pool as the
// expert cache places them. Reports, per point:
//   - time per shrink + expand pair (median of CUDA-event-timed batches of back-to-back calls);
//   - bytes the pair must move (expert rows read once, x read, y read and written, v written and
//     read) and the achieved bandwidth as a fraction of the device's measured copy bandwidth
//     (cudaMemcpy device to device of 1 GiB, counting read + write bytes).
// The torch baselines (a loop of per-expert matmuls; a gathered batched matmul) are measured by
// bench/gpu/torch_sgmv_baseline.py on the same machine and merged by bench/gpu/merge_sgmv.py,
// which prints their ratios to these times.
//
//   bench_gpu_sgmv [--out bench/results/gpu_sgmv_raw.json] [--hidden 4096]
//                  [--tokens 1,4,16,64,256] [--experts 1,4,16,64] [--ranks 16,64]

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "bench/gpu/copy_bandwidth.h"
#include "bench/list_flag.h"
#include "kernels/common/bf16.h"
#include "kernels/cuda/ops.h"

ABSL_FLAG(std::string, out, "", "Write results as JSON here");
ABSL_FLAG(int, hidden, 4096, "in = out features of the LoRA'd linear");
ABSL_FLAG(std::string, tokens, "1,4,16,64,256", "Comma-separated token counts");
ABSL_FLAG(std::string, experts, "1,4,16,64", "Comma-separated distinct expert counts");
ABSL_FLAG(std::string, ranks, "16,64", "Comma-separated LoRA ranks");
ABSL_FLAG(int, iters, 200, "Calls per timed batch");

namespace {

namespace kk = moleserve::kernels;
using moleserve::bench::ParseList;

#define CHECK_CUDA(expr)                                                                           \
  do {                                                                                             \
    cudaError_t err_ = (expr);                                                                     \
    if (err_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

template <typename T>
T* Upload(const std::vector<T>& host) {
  T* d = nullptr;
  CHECK_CUDA(
      cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(host.size() * sizeof(T), 16)));
  CHECK_CUDA(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<uint16_t> RandomBf16(size_t n, uint32_t seed, float scale) {
  std::vector<uint16_t> v(n);
  uint32_t state = seed * 2654435761u + 1;
  for (uint16_t& x : v) {
    state = state * 1664525u + 1013904223u;
    x = kk::F32ToBf16(scale * (static_cast<float>(state >> 8) * 0x1p-23f - 1.0f));
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t hidden = absl::GetFlag(FLAGS_hidden);
  const int iters = absl::GetFlag(FLAGS_iters);
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double copy_bw = moleserve::bench::MeasureCopyBandwidth();
  std::printf("device %s, measured copy bandwidth %.0f GB/s (read + write)\n", prop.name,
              copy_bw / 1e9);
  std::printf("%7s %7s %5s %10s %12s %10s\n", "tokens", "experts", "rank", "us/call", "MB moved",
              "frac bw");

  nlohmann::json points = nlohmann::json::array();
  const std::vector<int> ranks = ParseList(absl::GetFlag(FLAGS_ranks));
  const int max_rank = *std::max_element(ranks.begin(), ranks.end());
  const int max_experts = 64;
  // One pool of rank rows large enough for every point, shuffled page order.
  const int64_t pool_rows = int64_t{max_experts} * max_rank;
  std::vector<uint16_t> a_pool = RandomBf16(pool_rows * hidden, 1, 0.02f);
  std::vector<uint16_t> b_pool = RandomBf16(pool_rows * hidden, 2, 0.02f);
  uint16_t* d_a = Upload(a_pool);
  uint16_t* d_b = Upload(b_pool);
  std::vector<int64_t> page(pool_rows);
  std::iota(page.begin(), page.end(), 0);
  std::shuffle(page.begin(), page.end(), std::mt19937(3));
  const int max_tokens = 4096;
  uint16_t* d_x = Upload(RandomBf16(int64_t{max_tokens} * hidden, 3, 1.0f));
  uint16_t* d_y = Upload(RandomBf16(int64_t{max_tokens} * hidden, 4, 1.0f));
  float* d_v = nullptr;
  CHECK_CUDA(
      cudaMalloc(reinterpret_cast<void**>(&d_v), int64_t{max_tokens} * max_rank * sizeof(float)));
  // The backend's split scratch (CudaBackendOptions::split_workspace_bytes) and SM count.
  const int64_t scratch_floats = int64_t{16} << 20 >> 2;
  float* d_scratch = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&d_scratch), scratch_floats * sizeof(float)));
  int num_sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));

  for (int rank : ranks) {
    for (int tokens : ParseList(absl::GetFlag(FLAGS_tokens))) {
      for (int experts : ParseList(absl::GetFlag(FLAGS_experts))) {
        if (experts > tokens || experts > max_experts || tokens > max_tokens) continue;
        // Token t goes to expert t % experts; segments in expert order.
        std::vector<int32_t> x_row, seg_start{0}, seg_rank;
        std::vector<float> weight;
        std::vector<int64_t> seg_off;
        std::vector<const void*> a_rows, b_rows;
        for (int e = 0; e < experts; ++e) {
          seg_off.push_back(static_cast<int64_t>(a_rows.size()));
          for (int i = 0; i < rank; ++i) {
            const int64_t p = page[int64_t{e} * max_rank + i];
            a_rows.push_back(d_a + p * hidden);
            b_rows.push_back(d_b + p * hidden);
          }
          for (int t = e; t < tokens; t += experts) {
            x_row.push_back(t);
            weight.push_back(0.5f);
          }
          seg_start.push_back(static_cast<int32_t>(x_row.size()));
          seg_rank.push_back(rank);
        }
        // Token t's one pair, for the row-owned expand.
        std::vector<int32_t> token_pair(tokens), token_count(tokens, 1);
        for (size_t q = 0; q < x_row.size(); ++q) token_pair[x_row[q]] = static_cast<int32_t>(q);
        int32_t* d_tpair = Upload(token_pair);
        int32_t* d_tcount = Upload(token_count);
        int32_t* d_xrow = Upload(x_row);
        int32_t* d_start = Upload(seg_start);
        int32_t* d_rank = Upload(seg_rank);
        int64_t* d_off = Upload(seg_off);
        float* d_w = Upload(weight);
        const void** d_arows = Upload(a_rows);
        const void** d_brows = Upload(b_rows);
        const kk::SgmvShrinkParams shrink{.x = d_x,
                                          .v = d_v,
                                          .x_row = d_xrow,
                                          .seg_start = d_start,
                                          .seg_rank = d_rank,
                                          .seg_row_offset = d_off,
                                          .a_rows = d_arows,
                                          .num_segments = experts,
                                          .in = hidden,
                                          .v_stride = rank,
                                          .dtype = kk::ScalarType::kBF16,
                                          // As the CUDA backend runs it: split-K scratch.
                                          .max_pairs = tokens,
                                          .split_workspace = d_scratch,
                                          .split_workspace_floats = scratch_floats,
                                          .num_sms = num_sms};
        const kk::SgmvExpandRowsParams expand{.v = d_v,
                                              .y = d_y,
                                              .token_pair = d_tpair,
                                              .count = d_tcount,
                                              .weight = d_w,
                                              .seg_start = d_start,
                                              .seg_rank = d_rank,
                                              .seg_row_offset = d_off,
                                              .b_rows = d_brows,
                                              .num_tokens = tokens,
                                              .pair_stride = 1,
                                              .num_segments = experts,
                                              .out = hidden,
                                              .v_stride = rank,
                                              .dtype = kk::ScalarType::kBF16};
        for (int w = 0; w < 10; ++w) {
          CHECK_CUDA(kk::cuda::SgmvShrink(shrink, nullptr));
          CHECK_CUDA(kk::cuda::SgmvExpandRows(expand, nullptr));
        }
        std::vector<float> per_call_us;
        for (int r = 0; r < 7; ++r) {
          CHECK_CUDA(cudaEventRecord(start));
          for (int i = 0; i < iters; ++i) {
            CHECK_CUDA(kk::cuda::SgmvShrink(shrink, nullptr));
            CHECK_CUDA(kk::cuda::SgmvExpandRows(expand, nullptr));
          }
          CHECK_CUDA(cudaEventRecord(stop));
          CHECK_CUDA(cudaEventSynchronize(stop));
          float ms = 0;
          CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
          per_call_us.push_back(ms * 1e3f / iters);
        }
        std::sort(per_call_us.begin(), per_call_us.end());
        const double us = per_call_us[per_call_us.size() / 2];
        const double bytes = 2.0 * experts * rank * hidden * 2  // A and B rows, bf16
                             + 2.0 * tokens * hidden            // x read
                             + 2.0 * 2 * tokens * hidden        // y read + written
                             + 2.0 * 4 * tokens * rank;         // v written + read
        const double frac = bytes / (us * 1e-6) / copy_bw;
        std::printf("%7d %7d %5d %10.2f %12.3f %10.3f\n", tokens, experts, rank, us, bytes / 1e6,
                    frac);
        points.push_back({{"tokens", tokens},
                          {"experts", experts},
                          {"rank", rank},
                          {"hidden", hidden},
                          {"us_per_call", us},
                          {"bytes", bytes},
                          {"fraction_of_copy_bandwidth", frac}});
        for (void* p :
             {static_cast<void*>(d_xrow), static_cast<void*>(d_start), static_cast<void*>(d_rank),
              static_cast<void*>(d_off), static_cast<void*>(d_w), static_cast<void*>(d_arows),
              static_cast<void*>(d_brows), static_cast<void*>(d_tpair),
              static_cast<void*>(d_tcount)}) {
          cudaFree(p);
        }
      }
    }
  }
  const nlohmann::json result = {{"bench", "gpu_sgmv"},
                                 {"device", prop.name},
                                 {"copy_bandwidth_bytes_per_s", copy_bw},
                                 {"dtype", "bf16"},
                                 {"points", points}};
  if (const std::string out = absl::GetFlag(FLAGS_out); !out.empty()) {
    std::ofstream(out) << result.dump(1) << "\n";
  }
  return 0;
}
