#pragma once

// Per-element math of the token sampler (params.h SampleParams), written once for the host and
// the device: the CUDA kernel (kernels/cuda/sampling) and the CPU twin (kernels/cpu/sampling.cc)
// both penalise, scale and order logits with these functions, so the two agree on which token
// a row's parameters pick. The CPU twin is checked against engine/sampling's TokenSampler
// (tests/kernels/sampling_twin_test.cc), the CUDA kernel against the CPU twin.
//
// Order: a candidate comes before another when its value is larger, ties to the lower id.
// OrderKey packs (value, id) into one unsigned integer with that order, so the device can select
// thresholds (the k-th candidate, the end of a top-p prefix, the drawn token) by bisection over
// keys instead of sorting the vocabulary.

#include <math.h>

#include <cstdint>
#include <cstring>

#include "kernels/common/params.h"

#if defined(__CUDACC__)
#define MOLESERVE_HD __host__ __device__
#else
#define MOLESERVE_HD
#endif

namespace moleserve::kernels::sampling_math {

MOLESERVE_HD inline bool IsFinite(float x) { return x == x && x != INFINITY && x != -INFINITY; }

// The logit after the row's penalties (params.h SampleParams): `count` output occurrences of an
// id that the prompt or the output holds.
MOLESERVE_HD inline float PenalizedLogit(float logit, int32_t count, const SampleRowParams& rp) {
  float w = logit;
  if (rp.repetition_penalty != 1.0f) {
    w = w > 0 ? w / rp.repetition_penalty : w * rp.repetition_penalty;
  }
  if ((rp.frequency_penalty != 0.0f || rp.presence_penalty != 0.0f) && count > 0) {
#if defined(__CUDA_ARCH__)
    // Rounded like the host (no fused multiply-add): the same penalised logit on both sides.
    w = __fsub_rn(w, __fadd_rn(__fmul_rn(rp.frequency_penalty, static_cast<float>(count)),
                               rp.presence_penalty));
#else
    w -= rp.frequency_penalty * static_cast<float>(count) + rp.presence_penalty;
#endif
  }
  return w;
}

// (w - max) / temperature, in double then rounded: with temperature >= kSampleGreedyTemperature
// and finite logits nothing overflows, and the order of candidates is unchanged.
MOLESERVE_HD inline float ScaledLogit(float w, float max_w, double inv_temperature) {
  return static_cast<float>((static_cast<double>(w) - max_w) * inv_temperature);
}

// Unsigned image of a float that sorts like the float (finite values and infinities; -0 and +0
// are one value, as `Before` compares them).
MOLESERVE_HD inline uint32_t OrderedBits(float v) {
  if (v == 0.0f) v = 0.0f;  // -0 -> +0
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(v);
#else
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}

// Larger key = earlier candidate: value first, then the lower id.
MOLESERVE_HD inline uint64_t OrderKey(float v, int32_t id) {
  return (static_cast<uint64_t>(OrderedBits(v)) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}
MOLESERVE_HD inline int32_t KeyId(uint64_t key) {
  return static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu));
}

// "a before b" in the candidate order.
MOLESERVE_HD inline bool Before(float va, int32_t a, float vb, int32_t b) {
  return va > vb || (va == vb && a < b);
}

}  // namespace moleserve::kernels::sampling_math
