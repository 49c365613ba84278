// The token sampler on the device (params.h SampleParams): one block per row. Nothing is sorted:
// the per-element math is sampling_math.h's (shared with the CPU twin), and every cut of the
// candidate order (the top_k-th candidate, the end of the top_p prefix, the drawn token) is found
// by bisection over the 64-bit order keys, each probe one pass over the row and one block sum.
// Sums are per-thread strided partials combined by cub::BlockReduce in a fixed order, so a row's
// result depends only on its inputs.

#include <cub/block/block_reduce.cuh>

#include "kernels/common/sampling_math.h"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {
namespace {

namespace sm = sampling_math;

constexpr int kThreads = 256;
using Key = unsigned long long;

struct MaxOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a < b ? a : b;
  }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

struct Shared {
  union {
    cub::BlockReduce<double, kThreads>::TempStorage d;
    cub::BlockReduce<float, kThreads>::TempStorage f;
    cub::BlockReduce<Key, kThreads>::TempStorage k;
    cub::BlockReduce<int, kThreads>::TempStorage i;
  } tmp;
  double d;
  float f;
  Key k;
  int i;
};

// The block-wide reduction of every thread's v, returned to every thread.
template <typename T, typename Op, typename Storage>
__device__ T BlockAll(T v, Op op, Storage& tmp, T* slot) {
  const T r = cub::BlockReduce<T, kThreads>(tmp).Reduce(v, op);
  if (threadIdx.x == 0) *slot = r;
  __syncthreads();
  const T all = *slot;
  __syncthreads();  // tmp and slot are reused by the next reduction
  return all;
}

// The largest key t with pred(t) (pred monotone: true up to some key, false after); 0 when
// pred(1) is false. Every thread of the block calls it with the same pred.
template <typename Pred>
__device__ Key Bisect(Pred pred) {
  Key t = 0;
  for (int bit = 63; bit >= 0; --bit) {
    const Key c = t | (Key{1} << bit);
    if (pred(c)) t = c;
  }
  return t;
}

__global__ void __launch_bounds__(kThreads) SampleKernel(SampleParams p) {
  __shared__ Shared sh;
  const int64_t r = blockIdx.x;
  const int32_t vocab = p.vocab;
  const int tid = threadIdx.x;
  const float* x = p.logits + r * vocab;
  float* w = p.work + r * vocab;
  const SampleRowParams rp = p.row_params[r];

  // Non-finite rows are reported, not sampled.
  int bad = 0;
  float m = -INFINITY;
  for (int32_t i = tid; i < vocab; i += kThreads) {
    const float v = x[i];
    if (!sm::IsFinite(v)) bad = 1;
    m = fmaxf(m, v);
  }
  if (BlockAll(bad, MaxOp(), sh.tmp.i, &sh.i) != 0) {
    if (tid == 0) p.out[r] = SampledRow();
    return;
  }
  m = BlockAll(m, MaxOp(), sh.tmp.f, &sh.f);
  double s = 0.0;
  for (int32_t i = tid; i < vocab; i += kThreads) s += expf(x[i] - m);
  const double lse = m + log(BlockAll(s, SumOp(), sh.tmp.d, &sh.d));

  // Alternatives from the raw logits, best first: each the largest key below the previous one.
  int32_t n = rp.num_top_logprobs < vocab ? rp.num_top_logprobs : vocab;
  if (n < 0 || p.top_ids == nullptr || p.top_logprobs == nullptr) n = 0;
  if (n > kMaxSampleTopLogprobs) n = kMaxSampleTopLogprobs;
  Key limit = ~Key{0};
  for (int32_t j = 0; j < n; ++j) {
    Key best = 0;
    for (int32_t i = tid; i < vocab; i += kThreads) {
      const Key k = sm::OrderKey(x[i], i);
      if (k < limit && k > best) best = k;
    }
    best = BlockAll(best, MaxOp(), sh.tmp.k, &sh.k);
    const int32_t id = sm::KeyId(best);
    if (tid == 0) {
      p.top_ids[r * kMaxSampleTopLogprobs + j] = id;
      p.top_logprobs[r * kMaxSampleTopLogprobs + j] = static_cast<float>(x[id] - lse);
    }
    limit = best;
  }

  // A scored row (a prompt position) keeps its given token.
  if (rp.forced_id >= 0 && rp.forced_id < vocab) {
    if (tid == 0) {
      SampledRow out;
      out.id = rp.forced_id;
      out.logprob = static_cast<float>(x[rp.forced_id] - lse);
      out.finite = 1;
      out.num_top = n;
      p.out[r] = out;
    }
    return;
  }

  // Penalties, then the logit bias, on the row's copy (entries are distinct ids: no two threads
  // write one element).
  for (int32_t i = tid; i < vocab; i += kThreads) w[i] = x[i];
  __syncthreads();
  for (int32_t e = rp.penalty_begin + tid; e < rp.penalty_end; e += kThreads) {
    const int32_t id = p.penalty_ids[e];
    if (id >= 0 && id < vocab) w[id] = sm::PenalizedLogit(x[id], p.penalty_counts[e], rp);
  }
  __syncthreads();
  for (int32_t e = rp.bias_begin + tid; e < rp.bias_end; e += kThreads) {
    const int32_t id = p.bias_ids[e];
    if (id >= 0 && id < vocab) w[id] += p.bias_values[e];
  }
  __syncthreads();

  int32_t chosen;
  if (rp.temperature < kSampleGreedyTemperature) {
    Key best = 0;
    for (int32_t i = tid; i < vocab; i += kThreads) {
      const Key k = sm::OrderKey(w[i], i);
      if (k > best) best = k;
    }
    chosen = sm::KeyId(BlockAll(best, MaxOp(), sh.tmp.k, &sh.k));
  } else {
    float mw = -INFINITY;
    for (int32_t i = tid; i < vocab; i += kThreads) mw = fmaxf(mw, w[i]);
    mw = BlockAll(mw, MaxOp(), sh.tmp.f, &sh.f);
    const double inv_t = 1.0 / rp.temperature;
    for (int32_t i = tid; i < vocab; i += kThreads) w[i] = sm::ScaledLogit(w[i], mw, inv_t);
    __syncthreads();
    // Candidates are the keys >= cut; probabilities exp(w) (the largest is exp(0) = 1).
    Key cut = 0;
    auto mass = [&](Key t) {
      const Key lo = t > cut ? t : cut;
      double part = 0.0;
      for (int32_t i = tid; i < vocab; i += kThreads) {
        if (sm::OrderKey(w[i], i) >= lo) part += expf(w[i]);
      }
      return BlockAll(part, SumOp(), sh.tmp.d, &sh.d);
    };
    if (rp.top_k > 0 && rp.top_k < vocab) {
      cut = Bisect([&](Key t) {
        int c = 0;
        for (int32_t i = tid; i < vocab; i += kThreads) c += sm::OrderKey(w[i], i) >= t ? 1 : 0;
        return BlockAll(c, SumOp(), sh.tmp.i, &sh.i) >= rp.top_k;
      });
    }
    double total = mass(0);
    if (rp.top_p < 1.0f) {
      const double need = static_cast<double>(rp.top_p);
      cut = Bisect([&](Key t) { return mass(t) / total >= need; });
      total = mass(0);
    }
    if (rp.min_p > 0.0f) {
      Key lowest = ~Key{0};
      for (int32_t i = tid; i < vocab; i += kThreads) {
        const Key k = sm::OrderKey(w[i], i);
        if (k >= cut && static_cast<double>(expf(w[i])) >= rp.min_p && k < lowest) lowest = k;
      }
      cut = BlockAll(lowest, MinOp(), sh.tmp.k, &sh.k);
      total = mass(0);
    }
    // The first candidate whose inclusive cumulative mass exceeds the target.
    const double target = rp.uniform * total;
    Key pick = Bisect([&](Key t) { return mass(t) > target; });
    if (pick == 0 || pick < cut) {  // rounding left none above the target: the last one
      Key lowest = ~Key{0};
      for (int32_t i = tid; i < vocab; i += kThreads) {
        const Key k = sm::OrderKey(w[i], i);
        if (k >= cut && k < lowest) lowest = k;
      }
      pick = BlockAll(lowest, MinOp(), sh.tmp.k, &sh.k);
    }
    chosen = sm::KeyId(pick);
  }
  if (tid == 0) {
    SampledRow out;
    out.id = chosen;
    out.logprob = static_cast<float>(x[chosen] - lse);
    out.finite = 1;
    out.num_top = n;
    p.out[r] = out;
  }
}

}  // namespace

cudaError_t Sample(const SampleParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.vocab < 1 || p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.logits == nullptr || p.work == nullptr || p.row_params == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  SampleKernel<<<static_cast<unsigned int>(p.rows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace moleserve::kernels::cuda
