// Segmented GEMM (SGMV shrink / expand) and the row-owned weighted gather-add, fp32.
//
// Two paths per segment, chosen by its pair count and rank (UseGemm):
// - direct (decode, light prefill, low ranks): register-tiled dot products (shrink) and axpys
//   (expand) straight from the row tables, no copies. Shrink work units own disjoint rank rows, so
//   each expert row is read from memory once per call; expand work units own disjoint column
//   blocks of y, so pairs that add into the same y row never race.
// - GEMM (many pairs on one expert, rank >= 16): gather the pairs' rows and call OpenBLAS sgemm
//   on the calling thread; the expert's rows are used in place when the row table points at one
//   contiguous [rank, width] block, and y is written in place when the pairs' rows are consecutive.
// The micro-kernels have an AVX2+FMA build chosen at run time and a portable one.

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <vector>

#include "kernels/cpu/ops.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOLESERVE_SGMV_X86 1
#define MOLESERVE_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace moleserve::kernels::cpu {
namespace {

// A segment goes through sgemm when it has at least kGemmMinPairs pairs, rank >= kGemmMinRank
// and pairs x rank >= kGemmMinPairsTimesRank (see UseGemm).
constexpr int32_t kGemmMinPairs = 8;
constexpr int32_t kGemmMinRank = 16;
constexpr int64_t kGemmMinPairsTimesRank = 256;
constexpr int32_t kShrinkRowBlock = 8;  // rank rows per shrink work unit
constexpr int64_t kColBlock = 256;      // y columns per expand / gather-add work unit
// Below this many multiply-adds a call runs on the calling thread: waking the pool costs tens of
// microseconds, about what 1M FMAs take on one core.
constexpr int64_t kMinParallelFma = 1 << 21;

// ---- micro-kernels ---------------------------------------------------------------------------

// out[p * nr + r] = dot(x[p][0..n), a[r][0..n)), np <= 2, nr <= 8 / np.
using DotTileFn = void (*)(const float* const* x, int np, const float* const* a, int nr, int64_t n,
                           float* out);
// y[p][c0..c1) += sum_i coef[p * r + i] * b[i][c0..c1), np <= 2.
using AxpyRowsFn = void (*)(float* const* y, int np, const float* coef, const float* const* b,
                            int r, int64_t c0, int64_t c1);
// y[0..n) += alpha * x[0..n)
using AxpyFn = void (*)(float* y, float alpha, const float* x, int64_t n);

void DotTileGeneric(const float* const* x, int np, const float* const* a, int nr, int64_t n,
                    float* out) {
  for (int p = 0; p < np; ++p) {
    for (int r = 0; r < nr; ++r) {
      float s = 0.0f;
      for (int64_t k = 0; k < n; ++k) s += x[p][k] * a[r][k];
      out[p * nr + r] = s;
    }
  }
}

void AxpyRowsGeneric(float* const* y, int np, const float* coef, const float* const* b, int r,
                     int64_t c0, int64_t c1) {
  for (int p = 0; p < np; ++p) {
    for (int i = 0; i < r; ++i) {
      const float c = coef[p * r + i];
      const float* bi = b[i];
      float* yp = y[p];
      for (int64_t j = c0; j < c1; ++j) yp[j] += c * bi[j];
    }
  }
}

void AxpyGeneric(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

#ifdef MOLESERVE_SGMV_X86

MOLESERVE_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// P x R accumulators of 8 lanes: every x and a vector loaded once feeds R (resp. P) FMAs.
template <int P, int R>
MOLESERVE_AVX2 inline void DotTileAvx2T(const float* const* x, const float* const* a, int64_t n,
                                        float* out) {
  __m256 acc[P][R];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[p][r] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    __m256 av[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) av[r] = _mm256_loadu_ps(a[r] + k);
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      const __m256 xv = _mm256_loadu_ps(x[p] + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[p][r] = _mm256_fmadd_ps(xv, av[r], acc[p][r]);
    }
  }
  for (int p = 0; p < P; ++p) {
    for (int r = 0; r < R; ++r) {
      float s = HorizontalSum(acc[p][r]);
      for (int64_t t = k; t < n; ++t) s += x[p][t] * a[r][t];
      out[p * R + r] = s;
    }
  }
}

MOLESERVE_AVX2 void DotTileAvx2(const float* const* x, int np, const float* const* a, int nr,
                                int64_t n, float* out) {
  if (np == 2) {
    switch (nr) {
      case 1:
        return DotTileAvx2T<2, 1>(x, a, n, out);
      case 2:
        return DotTileAvx2T<2, 2>(x, a, n, out);
      case 3:
        return DotTileAvx2T<2, 3>(x, a, n, out);
      default:
        return DotTileAvx2T<2, 4>(x, a, n, out);
    }
  }
  switch (nr) {
    case 1:
      return DotTileAvx2T<1, 1>(x, a, n, out);
    case 2:
      return DotTileAvx2T<1, 2>(x, a, n, out);
    case 3:
      return DotTileAvx2T<1, 3>(x, a, n, out);
    case 4:
      return DotTileAvx2T<1, 4>(x, a, n, out);
    case 5:
      return DotTileAvx2T<1, 5>(x, a, n, out);
    case 6:
      return DotTileAvx2T<1, 6>(x, a, n, out);
    case 7:
      return DotTileAvx2T<1, 7>(x, a, n, out);
    default:
      return DotTileAvx2T<1, 8>(x, a, n, out);
  }
}

// y[p][c .. c + 8 NV) += sum_i coef[p * r + i] * b[i][c ..]: P x NV accumulators held in
// registers across the whole rank loop, each b vector loaded once for P pairs.
template <int P, int NV>
MOLESERVE_AVX2 inline void AxpyTileAvx2T(float* const* y, const float* coef, const float* const* b,
                                         int r, int64_t c) {
  __m256 acc[P][NV];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[p][v] = _mm256_loadu_ps(y[p] + c + 8 * v);
  }
  for (int i = 0; i < r; ++i) {
    __m256 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b[i] + c + 8 * v);
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      const __m256 cv = _mm256_broadcast_ss(coef + p * r + i);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[p][v] = _mm256_fmadd_ps(cv, bv[v], acc[p][v]);
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(y[p] + c + 8 * v, acc[p][v]);
  }
}

MOLESERVE_AVX2 void AxpyRowsAvx2(float* const* y, int np, const float* coef, const float* const* b,
                                 int r, int64_t c0, int64_t c1) {
  int64_t c = c0;
  if (np == 2) {
    for (; c + 32 <= c1; c += 32) AxpyTileAvx2T<2, 4>(y, coef, b, r, c);
    for (; c + 8 <= c1; c += 8) AxpyTileAvx2T<2, 1>(y, coef, b, r, c);
  } else {
    for (; c + 64 <= c1; c += 64) AxpyTileAvx2T<1, 8>(y, coef, b, r, c);
    for (; c + 8 <= c1; c += 8) AxpyTileAvx2T<1, 1>(y, coef, b, r, c);
  }
  if (c < c1) AxpyRowsGeneric(y, np, coef, b, r, c, c1);
}

MOLESERVE_AVX2 void AxpyAvx2(float* y, float alpha, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  }
  for (; j < n; ++j) y[j] += alpha * x[j];
}

#endif  // MOLESERVE_SGMV_X86

struct MicroKernels {
  DotTileFn dot;
  AxpyRowsFn axpy_rows;
  AxpyFn axpy;
};

const MicroKernels& Kernels() {
  static const MicroKernels k = [] {
#ifdef MOLESERVE_SGMV_X86
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return MicroKernels{DotTileAvx2, AxpyRowsAvx2, AxpyAvx2};
    }
#endif
    return MicroKernels{DotTileGeneric, AxpyRowsGeneric, AxpyGeneric};
  }();
  return k;
}

// ---- argument checks -------------------------------------------------------------------------

struct Segments {
  const int32_t* start;
  const int32_t* rank;
  const int64_t* row_offset;
  int32_t num;
  int32_t v_stride;
};

// Checks the segment tables; sets *num_pairs. Everything the kernels index is checked here, before
// any output is written, so a refused call leaves its outputs untouched.
KernelStatus CheckSegments(const Segments& s, const void* const* rows, int64_t* num_pairs) {
  *num_pairs = 0;
  if (s.num < 0 || s.v_stride < 0) return KernelStatus::kInvalidShape;
  if (s.num == 0) return KernelStatus::kOk;
  if (s.start == nullptr || s.rank == nullptr || s.row_offset == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  if (s.start[0] != 0) return KernelStatus::kInvalidArgument;
  for (int32_t g = 0; g < s.num; ++g) {
    if (s.start[g + 1] < s.start[g]) return KernelStatus::kInvalidArgument;
    if (s.rank[g] < 0 || s.rank[g] > s.v_stride) return KernelStatus::kInvalidShape;
    if (s.row_offset[g] < 0) return KernelStatus::kInvalidArgument;
    if (s.start[g + 1] == s.start[g] || s.rank[g] == 0) continue;
    if (rows == nullptr) return KernelStatus::kInvalidArgument;
    for (int32_t i = 0; i < s.rank[g]; ++i) {
      if (rows[s.row_offset[g] + i] == nullptr) return KernelStatus::kInvalidArgument;
    }
  }
  *num_pairs = s.start[s.num];
  return KernelStatus::kOk;
}

KernelStatus CheckRowIndices(const int32_t* row, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    if (row[q] < 0) return KernelStatus::kInvalidArgument;
  }
  return KernelStatus::kOk;
}

// Output rows must be distinct (each is owned by one reduction) and not negative.
KernelStatus CheckDistinctRows(const int32_t* row, int64_t n) {
  if (KernelStatus s = CheckRowIndices(row, n); s != KernelStatus::kOk) return s;
  std::vector<int32_t> sorted(row, row + n);
  std::sort(sorted.begin(), sorted.end());
  return std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()
             ? KernelStatus::kOk
             : KernelStatus::kInvalidArgument;
}

// sgemm pays for its gather / scatter copies only on segments with many pairs and a rank wide
// enough for its blocking; the direct kernels win below that (measured by bench_cpu_sgmv).
bool UseGemm(int32_t pairs, int32_t rank, int64_t width) {
  return pairs >= kGemmMinPairs && rank >= kGemmMinRank &&
         int64_t{pairs} * rank >= kGemmMinPairsTimesRank && width <= INT_MAX;
}

// The expert's rows as one [rank, width] matrix when the row table points at consecutive rows of
// one block (the stacked layout); nullptr when they are scattered (a paged cache).
const float* ContiguousRows(const void* const* rows, int32_t rank, int64_t width) {
  const auto* first = static_cast<const float*>(rows[0]);
  for (int32_t i = 1; i < rank; ++i) {
    if (static_cast<const float*>(rows[i]) != first + i * width) return nullptr;
  }
  return first;
}

// Grows a per-thread scratch buffer of the calling thread (kept for the next call).
float* Scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Runs fn(u) for u in [0, n), handing units out one at a time from a shared counter to the
// calling thread and the pool's workers (when `work`, in FMAs, is worth waking them). Dynamic
// rather than static chunks: on a loaded machine, or while OpenBLAS's workers spin after a GEMM, a
// worker that the OS does not schedule delays the call by at most the units it already took.
template <typename Fn>
void ParallelUnits(ThreadPool* pool, int64_t n, int64_t work, Fn&& fn) {
  if (n <= 0) return;
  const int64_t threads =
      pool == nullptr || work < kMinParallelFma ? 1 : std::min<int64_t>(pool->num_threads(), n);
  if (threads <= 1) {
    for (int64_t u = 0; u < n; ++u) fn(u);
    return;
  }
  std::atomic<int64_t> next{0};
  ParallelFor(pool, threads, [&](int64_t, int64_t) {
    for (int64_t u = next.fetch_add(1, std::memory_order_relaxed); u < n;
         u = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(u);
    }
  });
}

// Runs fn(c0, c1) over column blocks of [0, cols) (see ParallelUnits).
template <typename Fn>
void ParallelColumns(ThreadPool* pool, int64_t cols, int64_t work, Fn&& fn) {
  ParallelUnits(pool, (cols + kColBlock - 1) / kColBlock, work,
                [&](int64_t blk) { fn(blk * kColBlock, std::min(cols, (blk + 1) * kColBlock)); });
}

}  // namespace

KernelStatus SgmvShrink(const SgmvShrinkParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.in < 0 || (p.in == 0 && p.num_segments > 0)) return KernelStatus::kInvalidShape;
  const Segments seg{p.seg_start, p.seg_rank, p.seg_row_offset, p.num_segments, p.v_stride};
  int64_t num_pairs = 0;
  if (KernelStatus s = CheckSegments(seg, p.a_rows, &num_pairs); s != KernelStatus::kOk) return s;
  if (num_pairs == 0) return KernelStatus::kOk;
  if (p.x == nullptr || p.v == nullptr || p.x_row == nullptr) return KernelStatus::kInvalidArgument;
  if (KernelStatus s = CheckRowIndices(p.x_row, num_pairs); s != KernelStatus::kOk) return s;

  const auto* x = static_cast<const float*>(p.x);
  const int64_t in = p.in;
  const MicroKernels& mk = Kernels();

  // Direct segments: one unit per (segment, block of rank rows).
  struct Unit {
    int32_t segment;
    int32_t row0;
  };
  std::vector<Unit> units;
  int64_t direct_work = 0;
  for (int32_t g = 0; g < p.num_segments; ++g) {
    const int32_t pairs = p.seg_start[g + 1] - p.seg_start[g];
    if (pairs == 0 || p.seg_rank[g] == 0 || (UseGemm(pairs, p.seg_rank[g], in) && in > 0)) continue;
    for (int32_t i0 = 0; i0 < p.seg_rank[g]; i0 += kShrinkRowBlock) {
      units.push_back({g, i0});
      direct_work += int64_t{pairs} * std::min(kShrinkRowBlock, p.seg_rank[g] - i0) * in;
    }
  }
  ParallelUnits(pool, static_cast<int64_t>(units.size()), direct_work, [&](int64_t u) {
    const int32_t g = units[u].segment, i0 = units[u].row0;
    const int32_t rows = std::min(kShrinkRowBlock, p.seg_rank[g] - i0);
    const float* a[kShrinkRowBlock];
    for (int32_t i = 0; i < rows; ++i) {
      a[i] = static_cast<const float*>(p.a_rows[p.seg_row_offset[g] + i0 + i]);
    }
    float out[kShrinkRowBlock];
    for (int32_t q = p.seg_start[g]; q < p.seg_start[g + 1];) {
      const int np = p.seg_start[g + 1] - q >= 2 ? 2 : 1;
      const float* xs[2] = {x + int64_t{p.x_row[q]} * in,
                            np == 2 ? x + int64_t{p.x_row[q + 1]} * in : nullptr};
      const int tile_rows = kShrinkRowBlock / np;
      for (int32_t r0 = 0; r0 < rows; r0 += tile_rows) {
        const int nr = std::min(tile_rows, rows - r0);
        mk.dot(xs, np, a + r0, nr, in, out);
        for (int pp = 0; pp < np; ++pp) {
          float* vq = p.v + int64_t{q + pp} * p.v_stride + i0 + r0;
          for (int r = 0; r < nr; ++r) vq[r] = out[pp * nr + r];
        }
      }
      q += np;
    }
  });

  // GEMM segments: V[pairs, rank] = X_gathered[pairs, in] * A[rank, in]^T, all on the calling
  // thread and OpenBLAS's threads (the pool would fight OpenBLAS's spinning workers for the cores).
  thread_local std::vector<float> x_pack, a_pack;
  for (int32_t g = 0; g < p.num_segments; ++g) {
    const int32_t start = p.seg_start[g], pairs = p.seg_start[g + 1] - start;
    const int32_t rank = p.seg_rank[g];
    if (pairs == 0 || rank == 0 || !UseGemm(pairs, rank, in) || in == 0) continue;
    const int32_t* rows_idx = p.x_row + start;
    const float* xs = x + int64_t{rows_idx[0]} * in;
    bool x_contiguous = true;
    for (int32_t q = 1; q < pairs && x_contiguous; ++q)
      x_contiguous = rows_idx[q] == rows_idx[0] + q;
    if (!x_contiguous) {
      float* packed = Scratch(x_pack, int64_t{pairs} * in);
      for (int32_t q = 0; q < pairs; ++q) {
        std::memcpy(packed + int64_t{q} * in, x + int64_t{rows_idx[q]} * in, sizeof(float) * in);
      }
      xs = packed;
    }
    const void* const* a_rows = p.a_rows + p.seg_row_offset[g];
    const float* a = ContiguousRows(a_rows, rank, in);
    if (a == nullptr) {
      float* packed = Scratch(a_pack, int64_t{rank} * in);
      for (int32_t i = 0; i < rank; ++i) {
        std::memcpy(packed + int64_t{i} * in, a_rows[i], sizeof(float) * in);
      }
      a = packed;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, pairs, rank, static_cast<int>(in), 1.0f,
                xs, static_cast<int>(in), a, static_cast<int>(in), 0.0f,
                p.v + int64_t{start} * p.v_stride, p.v_stride);
  }
  return KernelStatus::kOk;
}

// The expand segment by segment, for pairs whose y rows are pair_y (-1: no row takes the pair):
// y rows accumulate in place, in fp32. Direct segments run in parallel over column blocks (each
// block walks every direct pair, so pairs adding into one y row are serialised in a fixed order
// within the block that owns those columns); segments with many pairs go through sgemm.
void ExpandBySegment(const SgmvExpandRowsParams& p, const int32_t* pair_y, ThreadPool* pool) {
  auto* y = static_cast<float*>(p.y);
  const int64_t out = p.out;
  const int64_t ys = p.y_stride > 0 ? p.y_stride : out;  // elements between y rows
  const MicroKernels& mk = Kernels();

  // Direct segments, parallel over column blocks of y: each block walks every direct pair, so
  // pairs adding into one y row are serialised within the block that owns those columns.
  int64_t direct_work = 0;
  int32_t max_rank = 0;
  bool any_direct = false;
  for (int32_t g = 0; g < p.num_segments; ++g) {
    const int32_t pairs = p.seg_start[g + 1] - p.seg_start[g];
    if (pairs == 0 || p.seg_rank[g] == 0 || UseGemm(pairs, p.seg_rank[g], out)) continue;
    any_direct = true;
    direct_work += int64_t{pairs} * p.seg_rank[g] * out;
    max_rank = std::max(max_rank, p.seg_rank[g]);
  }
  if (any_direct) {
    ParallelColumns(pool, out, direct_work, [&](int64_t c0, int64_t c1) {
      constexpr int kInlineRank = 128;
      const float* b_inline[kInlineRank];
      float coef_inline[2 * kInlineRank];
      std::vector<const float*> b_heap;
      std::vector<float> coef_heap;
      const float** b = b_inline;
      float* coef = coef_inline;
      if (max_rank > kInlineRank) {
        b_heap.resize(max_rank);
        coef_heap.resize(2 * max_rank);
        b = b_heap.data();
        coef = coef_heap.data();
      }
      for (int32_t g = 0; g < p.num_segments; ++g) {
        const int32_t end = p.seg_start[g + 1], rank = p.seg_rank[g];
        if (end == p.seg_start[g] || rank == 0 || UseGemm(end - p.seg_start[g], rank, out))
          continue;
        for (int32_t i = 0; i < rank; ++i) {
          b[i] = static_cast<const float*>(p.b_rows[p.seg_row_offset[g] + i]);
        }
        for (int32_t q = p.seg_start[g]; q < end;) {
          if (pair_y[q] < 0) {  // no row names this pair
            ++q;
            continue;
          }
          // Two pairs share a tile only when they write different y rows.
          const int np = q + 1 < end && pair_y[q + 1] >= 0 && pair_y[q] != pair_y[q + 1] ? 2 : 1;
          float* yrow[2];
          for (int pp = 0; pp < np; ++pp) {
            yrow[pp] = y + int64_t{pair_y[q + pp]} * ys;
            const float* vq = p.v + int64_t{q + pp} * p.v_stride;
            for (int32_t i = 0; i < rank; ++i) coef[pp * rank + i] = p.weight[q + pp] * vq[i];
          }
          mk.axpy_rows(yrow, np, coef, b, rank, c0, c1);
          q += np;
        }
      }
    });
  }

  // GEMM segments: T[pairs, out] = (weight * V)[pairs, rank] * Bt[rank, out], then y rows += T
  // rows; straight into y (beta = 1) when the pairs' y rows are consecutive.
  thread_local std::vector<float> v_pack, b_pack, t_pack;
  for (int32_t g = 0; g < p.num_segments; ++g) {
    const int32_t start = p.seg_start[g], pairs = p.seg_start[g + 1] - start;
    const int32_t rank = p.seg_rank[g];
    if (pairs == 0 || rank == 0 || !UseGemm(pairs, rank, out)) continue;
    float* vs = Scratch(v_pack, int64_t{pairs} * rank);
    for (int32_t q = 0; q < pairs; ++q) {
      const float w = p.weight[start + q];
      const float* vq = p.v + int64_t{start + q} * p.v_stride;
      for (int32_t i = 0; i < rank; ++i) vs[int64_t{q} * rank + i] = w * vq[i];
    }
    const void* const* b_rows = p.b_rows + p.seg_row_offset[g];
    const float* bt = ContiguousRows(b_rows, rank, out);
    if (bt == nullptr) {
      float* packed = Scratch(b_pack, int64_t{rank} * out);
      for (int32_t i = 0; i < rank; ++i) {
        std::memcpy(packed + int64_t{i} * out, b_rows[i], sizeof(float) * out);
      }
      bt = packed;
    }
    const int32_t* rows_idx = pair_y + start;
    bool y_contiguous = rows_idx[0] >= 0;
    for (int32_t q = 1; q < pairs && y_contiguous; ++q)
      y_contiguous = rows_idx[q] == rows_idx[0] + q;
    if (y_contiguous) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pairs, static_cast<int>(out), rank,
                  1.0f, vs, rank, bt, static_cast<int>(out), 1.0f, y + int64_t{rows_idx[0]} * ys,
                  static_cast<int>(ys));
      continue;
    }
    float* t = Scratch(t_pack, int64_t{pairs} * out);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, pairs, static_cast<int>(out), rank, 1.0f,
                vs, rank, bt, static_cast<int>(out), 0.0f, t, static_cast<int>(out));
    for (int32_t q = 0; q < pairs; ++q) {
      if (rows_idx[q] >= 0) mk.axpy(y + int64_t{rows_idx[q]} * ys, 1.0f, t + int64_t{q} * out, out);
    }
  }
}

KernelStatus SgmvExpandRows(const SgmvExpandRowsParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.out < 0 || p.num_tokens < 0 || p.pair_stride < 0 ||
      (p.y_stride != 0 && p.y_stride < p.out)) {
    return KernelStatus::kInvalidShape;
  }
  const Segments seg{p.seg_start, p.seg_rank, p.seg_row_offset, p.num_segments, p.v_stride};
  int64_t num_pairs = 0;
  if (KernelStatus s = CheckSegments(seg, p.b_rows, &num_pairs); s != KernelStatus::kOk) return s;
  if (p.num_tokens == 0 || p.out == 0) return KernelStatus::kOk;
  if (p.y == nullptr || p.token_pair == nullptr || p.count == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  if (p.y_row != nullptr) {
    if (KernelStatus s = CheckDistinctRows(p.y_row, p.num_tokens); s != KernelStatus::kOk) {
      return s;
    }
  }
  // Every pair a row names must exist, and belong to that row only (checked before anything is
  // written).
  std::vector<int32_t> pair_y(num_pairs, -1);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    if (p.active != nullptr && p.active[t] == 0) continue;
    if (p.count[t] < 0 || p.count[t] > p.pair_stride) return KernelStatus::kInvalidArgument;
    for (int32_t q = 0; q < p.count[t]; ++q) {
      const int32_t pair = p.token_pair[t * p.pair_stride + q];
      if (pair < 0 || pair >= num_pairs || pair_y[pair] >= 0) {
        return KernelStatus::kInvalidArgument;
      }
      pair_y[pair] = p.y_row != nullptr ? p.y_row[t] : static_cast<int32_t>(t);
    }
    if (p.count[t] > 0 && (p.v == nullptr || p.weight == nullptr)) {
      return KernelStatus::kInvalidArgument;
    }
  }
  // On the CPU (fp32 y) a row's pairs are added in place in segment order rather than q order:
  // a segment's pairs then share B loads, or go through sgemm. A fixed order all the same, so
  // the same bits on every run; the bf16 twin rounds y once, after the call.
  ExpandBySegment(p, pair_y.data(), pool);
  return KernelStatus::kOk;
}

KernelStatus GatherAdd(const GatherAddParams& p, ThreadPool* pool) {
  if (p.dtype != ScalarType::kF32) return KernelStatus::kUnsupportedDtype;
  if (p.rows < 0 || p.cols < 0 || p.src_stride < 0 || p.x_rows < 0) {
    return KernelStatus::kInvalidShape;
  }
  if (p.rows == 0 || p.cols == 0) return KernelStatus::kOk;
  if (p.y == nullptr || p.y_row == nullptr || p.src == nullptr || p.count == nullptr) {
    return KernelStatus::kInvalidArgument;
  }
  if (KernelStatus s = CheckDistinctRows(p.y_row, p.rows); s != KernelStatus::kOk) return s;
  for (int64_t r = 0; r < p.rows; ++r) {
    if (p.count[r] < 0 || p.count[r] > p.src_stride) return KernelStatus::kInvalidArgument;
    for (int32_t q = 0; q < p.count[r]; ++q) {
      const int32_t i = p.src[r * p.src_stride + q];
      if (i < 0 || i >= p.x_rows) return KernelStatus::kInvalidArgument;
    }
    if (p.count[r] > 0 && p.x == nullptr) return KernelStatus::kInvalidArgument;
  }
  const auto* x = static_cast<const float*>(p.x);
  auto* y = static_cast<float*>(p.y);
  const MicroKernels& mk = Kernels();
  ParallelColumns(pool, p.cols, p.rows * p.src_stride * p.cols, [&](int64_t c0, int64_t c1) {
    thread_local std::vector<float> acc_buf;
    float* acc = Scratch(acc_buf, c1 - c0);
    for (int64_t r = 0; r < p.rows; ++r) {
      if (p.count[r] == 0) continue;
      std::fill(acc, acc + (c1 - c0), 0.0f);
      for (int32_t q = 0; q < p.count[r]; ++q) {
        const int32_t i = p.src[r * p.src_stride + q];
        const float w = p.weight == nullptr ? 1.0f : p.weight[i];
        mk.axpy(acc, w, x + int64_t{i} * p.cols + c0, c1 - c0);
      }
      float* row = y + int64_t{p.y_row[r]} * p.cols + c0;
      for (int64_t j = 0; j < c1 - c0; ++j) row[j] += acc[j];
    }
  });
  return KernelStatus::kOk;
}

}  // namespace moleserve::kernels::cpu
