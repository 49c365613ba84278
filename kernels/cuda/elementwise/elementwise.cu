#include <algorithm>

#include "kernels/cuda/elementwise/elementwise.cuh"
#include "kernels/cuda/ops.h"

namespace moleserve::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: enough blocks to fill any current GPU, no more.
unsigned int GridFor(int64_t n) { return std::min<unsigned int>(CeilDiv(n, kThreads), 65535u); }

}  // namespace

cudaError_t SiluMul(const SiluMulParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return cudaSuccess;
  if (p.cols <= 0 || (p.in_stride != 0 && p.in_stride < p.cols)) return cudaErrorInvalidValue;
  const int64_t in_stride = p.in_stride > 0 ? p.in_stride : p.cols;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    SiluMulKernel<T><<<GridFor(n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.gate), static_cast<const T*>(p.up), static_cast<T*>(p.out), n,
        p.cols, in_stride);
    return cudaGetLastError();
  });
}

cudaError_t Add(const AddParams& p, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    AddKernel<T><<<GridFor(p.n), kThreads, 0, stream>>>(
        static_cast<const T*>(p.a), static_cast<const T*>(p.b), static_cast<T*>(p.out), p.n);
    return cudaGetLastError();
  });
}

cudaError_t BiasAdd(const BiasAddParams& p, cudaStream_t stream) {
  const int64_t n = p.rows * p.cols;
  if (n == 0) return cudaSuccess;
  if (p.cols <= 0 || (p.bias == nullptr && !p.relu)) return cudaErrorInvalidValue;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    BiasAddKernel<T><<<GridFor(n), kThreads, 0, stream>>>(
        static_cast<T*>(p.x), static_cast<const T*>(p.bias), n, p.cols, p.relu);
    return cudaGetLastError();
  });
}

cudaError_t Embedding(const EmbeddingParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff ||
      (p.table_stride != 0 && p.table_stride < p.hidden)) {
    return cudaErrorInvalidValue;
  }
  const int64_t stride = p.table_stride > 0 ? p.table_stride : p.hidden;
  return DispatchFloat(p.dtype, [&]<typename T>() {
    EmbeddingKernel<T><<<static_cast<unsigned int>(p.num_tokens), kThreads, 0, stream>>>(
        p.ids, static_cast<const T*>(p.table), static_cast<T*>(p.out), p.hidden, stride);
    return cudaGetLastError();
  });
}

cudaError_t Rope(const RopeParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.num_tokens < 0 || p.num_tokens > 0x7fffffff || p.head_dim <= 0 || p.head_dim % 2 != 0 ||
      p.num_q_heads < 0 || p.num_kv_heads < 0) {
    return cudaErrorInvalidValue;
  }
  const int64_t q_width = int64_t{p.num_q_heads} * p.head_dim;
  const int64_t k_width = int64_t{p.num_kv_heads} * p.head_dim;
  if ((p.q_stride != 0 && p.q_stride < q_width) || (p.k_stride != 0 && p.k_stride < k_width)) {
    return cudaErrorInvalidValue;
  }
  return DispatchFloat(p.dtype, [&]<typename T>() {
    const int threads = std::min(128, std::max(32, p.head_dim / 2));
    RopeKernel<T><<<static_cast<unsigned int>(p.num_tokens), threads, 0, stream>>>(
        static_cast<T*>(p.q), static_cast<T*>(p.k), p.positions, p.inv_freq, p.num_q_heads,
        p.num_kv_heads, p.head_dim, p.q_stride > 0 ? p.q_stride : q_width,
        p.k_stride > 0 ? p.k_stride : k_width);
    return cudaGetLastError();
  });
}

cudaError_t Convert(const ConvertParams& p, cudaStream_t stream) {
  if (p.n < 0) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  auto size_of = [](ScalarType t) -> size_t {
    return t == ScalarType::kF32 ? 4 : (t == ScalarType::kBF16 ? 2 : 0);
  };
  const size_t src_bytes = static_cast<size_t>(p.n) * size_of(p.src_dtype);
  const size_t dst_bytes = static_cast<size_t>(p.n) * size_of(p.dst_dtype);
  if (src_bytes == 0 || dst_bytes == 0) return cudaErrorInvalidValue;
  if (p.src_dtype == p.dst_dtype && p.src == p.dst) return cudaSuccess;
  const auto* s0 = static_cast<const char*>(p.src);
  const auto* d0 = static_cast<const char*>(p.dst);
  if (s0 < d0 + dst_bytes && d0 < s0 + src_bytes) return cudaErrorInvalidValue;  // overlap
  if (p.src_dtype == p.dst_dtype) {
    return cudaMemcpyAsync(p.dst, p.src, src_bytes, cudaMemcpyDeviceToDevice, stream);
  }
  return DispatchFloat(p.src_dtype, [&]<typename From>() {
    return DispatchFloat(p.dst_dtype, [&]<typename To>() {
      ConvertKernel<From, To><<<GridFor(p.n), kThreads, 0, stream>>>(
          static_cast<const From*>(p.src), static_cast<To*>(p.dst), p.n);
      return cudaGetLastError();
    });
  });
}

}  // namespace moleserve::kernels::cuda
