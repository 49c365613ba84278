#pragma once

// Host-side bfloat16 conversions (the bit pattern as uint16_t), matching CUDA's
// __float2bfloat16 (round to nearest even) and __bfloat162float bit for bit on every non-NaN
// value; a NaN stays a NaN (CUDA returns the canonical 0x7fff, this keeps sign and payload). No
// CUDA headers.

#include <cstdint>
#include <cstring>

namespace moleserve::kernels {

inline uint16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    // NaN: truncate and force the quiet bit so a payload in the low bits cannot become Inf.
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  }
  // Round to nearest even; a carry out of the mantissa bumps the exponent (to Inf at the top).
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float Bf16ToF32(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace moleserve::kernels
