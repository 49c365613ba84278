#pragma once

// Grouped-query paged attention (launch_plan.h PlanGroupedAttention) and the fixed-order merge of
// its split-KV partial states. Same math as PagedAttentionKernel (fp32 online softmax); what
// changes is who reads what: a block owns one KV head of one token and every query head that
// shares it, a key row is read once with 16-byte loads, and short batches split the keys over
// several blocks.

#include "kernels/cuda/attention/paged_attention.cuh"

namespace moleserve::kernels::cuda {

// Block (t, kv head, z): the query heads kvh * group .. + group of token t over split z of its
// keys. Lanes form groups of L = head_dim / kVec lanes, one key row per lane group (lane part p
// holds elements p * kVec .. + kVec); a warp takes 32 / L keys per iteration and the block's
// kGqaWarps warps interleave. Each lane group keeps kGroup online-softmax states (query heads
// past the real group are zero queries whose results are dropped). At the end the lane groups'
// states are merged in shared memory in lane-group order; with one split the normalised output
// is written, otherwise the unnormalised output, the max and the sum go to `partial`
// [splits, num_tokens, num_q_heads, head_dim + 2] for MergeAttentionSplitsKernel.
template <typename T, int kVec, int kGroup>
__global__ void __launch_bounds__(32 * kGqaWarps)
    GroupedAttentionKernel(PagedKvLayout kv, const T* __restrict__ q, T* __restrict__ out,
                           const int32_t* __restrict__ token_seq,
                           const int32_t* __restrict__ positions, int32_t num_q_heads, float scale,
                           int32_t sliding_window, int64_t q_stride, float* __restrict__ partial) {
  constexpr int kMaxLaneGroups = kGqaWarps * 32;  // lane groups of one lane (head_dim == kVec)
  __shared__ float s_acc[kGroup * kGqaWarps * 32 * kVec];  // lane groups x head_dim per head
  __shared__ float s_m[kGroup * kMaxLaneGroups], s_l[kGroup * kMaxLaneGroups];
  const int64_t t = blockIdx.x;
  const int32_t kvh = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
  const int32_t d = kv.head_dim, lanes_per_key = d / kVec;
  const int32_t group = num_q_heads / kv.num_kv_heads;
  const int32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int32_t keys_per_warp = 32 / lanes_per_key;
  const int32_t sub = lane / lanes_per_key, part = lane % lanes_per_key;
  const int32_t num_lg = kGqaWarps * keys_per_warp, lg = warp * keys_per_warp + sub;
  const int32_t s = token_seq[t], pos = positions[t];
  const int32_t first = sliding_window > 0 ? max(0, pos - sliding_window + 1) : 0;
  int32_t key_begin, key_end;
  AttentionSplitRange(first, pos + 1, splits, z, &key_begin, &key_end);

  float qr[kGroup][kVec], acc[kGroup][kVec], m[kGroup], l[kGroup];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    const T* qh = q + t * q_stride + int64_t{kvh * group + g} * d + part * kVec;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      qr[g][e] = g < group ? ToFloat(qh[e]) * scale : 0.0f;
      acc[g][e] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  const T* kc = static_cast<const T*>(kv.k_cache);
  const T* vc = static_cast<const T*>(kv.v_cache);
  // The loop bound is uniform over the warp (every lane shuffles); a lane group past the end
  // loads nothing and keeps its state.
  for (int32_t j0 = key_begin + warp * keys_per_warp; j0 < key_end; j0 += num_lg) {
    const int32_t j = j0 + sub;
    const bool live = j < key_end;
    float kf[kVec], vf[kVec];
    if (live) {
      const int64_t row = KvRowOffset(kv, s, j) + int64_t{kvh} * d + part * kVec;
      LoadVec<T, kVec>(kc + row, kf);
      LoadVec<T, kVec>(vc + row, vf);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) kf[e] = vf[e] = 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      float dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) dot += qr[g][e] * kf[e];
      for (int offset = lanes_per_key / 2; offset > 0; offset /= 2) {
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);  // stays inside the lane group
      }
      if (live) {
        const float m_new = fmaxf(m[g], dot);
        const float correction = expf(m[g] - m_new);  // 0 on the first key (m = -inf)
        const float weight = expf(dot - m_new);
        l[g] = l[g] * correction + weight;
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[g][e] = acc[g][e] * correction + weight * vf[e];
        m[g] = m_new;
      }
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) s_acc[(g * num_lg + lg) * d + part * kVec + e] = acc[g][e];
    if (part == 0) {
      s_m[g * num_lg + lg] = m[g];
      s_l[g * num_lg + lg] = l[g];
    }
  }
  __syncthreads();
  for (int32_t idx = threadIdx.x; idx < group * d; idx += blockDim.x) {
    const int32_t g = idx / d, c = idx % d;
    float m_all = -INFINITY;
    for (int32_t i = 0; i < num_lg; ++i) m_all = fmaxf(m_all, s_m[g * num_lg + i]);
    float l_all = 0.0f, o = 0.0f;
    for (int32_t i = 0; i < num_lg; ++i) {
      const float mi = s_m[g * num_lg + i];
      if (mi == -INFINITY) continue;  // a lane group that saw no key
      const float f = expf(mi - m_all);
      l_all += s_l[g * num_lg + i] * f;
      o += s_acc[(g * num_lg + i) * d + c] * f;
    }
    const int32_t h = kvh * group + g;
    if (splits == 1) {
      out[(t * num_q_heads + h) * d + c] = FromFloat<T>(o / l_all);
    } else {
      float* state = partial + ((int64_t{z} * gridDim.x + t) * num_q_heads + h) * (d + 2);
      state[c] = o;
      if (c == 0) {
        state[d] = m_all;  // -inf for a split with no keys: weighted 0 by the merge
        state[d + 1] = l_all;
      }
    }
  }
}

// Block (t, h): the splits' states of query head h of token t, merged in split order.
template <typename T>
__global__ void MergeAttentionSplitsKernel(const float* __restrict__ partial, T* __restrict__ out,
                                           int32_t num_q_heads, int32_t head_dim, int32_t splits) {
  const int64_t t = blockIdx.x, num_tokens = gridDim.x;
  const int32_t h = blockIdx.y, d = head_dim;
  auto state = [&](int32_t z) {
    return partial + ((int64_t{z} * num_tokens + t) * num_q_heads + h) * (d + 2);
  };
  float m_all = -INFINITY;
  for (int32_t z = 0; z < splits; ++z) m_all = fmaxf(m_all, state(z)[d]);
  for (int32_t c = threadIdx.x; c < d; c += blockDim.x) {
    float l_all = 0.0f, o = 0.0f;
    for (int32_t z = 0; z < splits; ++z) {
      const float* st = state(z);
      if (st[d] == -INFINITY) continue;
      const float f = expf(st[d] - m_all);
      l_all += st[d + 1] * f;
      o += st[c] * f;
    }
    out[(t * num_q_heads + h) * d + c] = FromFloat<T>(o / l_all);
  }
}

}  // namespace moleserve::kernels::cuda
