#pragma once

// Seeded random inputs shared by the kernel tests (CPU against naive references, CUDA against the
// CPU twins): the same seed gives the same data on both sides.

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace moleserve::kernels::test_util {

// n values ~ N(0, scale^2) from a std::mt19937 seeded with `seed`.
inline std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

}  // namespace moleserve::kernels::test_util
