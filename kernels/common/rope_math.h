#pragma once

// RoPE's angles, written once for the host and the device (kernels/cpu Rope / KvWrite and their
// CUDA twins). The angle is position x inverse frequency multiplied in fp32, as Hugging Face's
// rotary embedding computes it (inv_freq @ position_ids in float32); its cosine and sine are
// evaluated in double from that fp32 angle and rounded, so host and device agree.

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define MOLESERVE_ROPE_HD __host__ __device__
#else
#define MOLESERVE_ROPE_HD
#endif

namespace moleserve::kernels::rope_math {

MOLESERVE_ROPE_HD inline void CosSin(int32_t position, float inv_freq, float* cos_out,
                                     float* sin_out) {
#if defined(__CUDA_ARCH__)
  const float angle = __fmul_rn(static_cast<float>(position), inv_freq);  // no FMA contraction
  double s, c;
  sincos(static_cast<double>(angle), &s, &c);
#else
  const float angle = static_cast<float>(position) * inv_freq;
  const double c = cos(static_cast<double>(angle)), s = sin(static_cast<double>(angle));
#endif
  *cos_out = static_cast<float>(c);
  *sin_out = static_cast<float>(s);
}

}  // namespace moleserve::kernels::rope_math
