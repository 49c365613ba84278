// The CUDA backend: memory pool, staged and bulk copies and their ordering, ops through the op
// table (kernels and cuBLAS), error mapping.
// Skipped without a CUDA device (ctest label `gpu`).

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <vector>

#include "engine/backend/backend.h"

namespace moleserve::engine {
namespace {

TEST(CudaBackendTest, CreateFailsCleanlyWithoutDevice) {
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a device is present";
  auto backend = CreateCudaBackend({});
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  // The plugin (libmoleserve_cuda.so, built next to the tests) loaded and found no device; it did
  // not fail to load.
  EXPECT_NE(backend.status().message().find("no CUDA device is visible"), absl::string_view::npos)
      << backend.status();
}

TEST(CudaBackendTest, AllocateCopyAndRunAnOp) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto backend = CreateCudaBackend({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  Backend& b = **backend;
  EXPECT_EQ(b.name(), "cuda");
  std::vector<float> a = {1, 2, 3, 4}, c = {10, 20, 30, 40}, out(4);
  auto da = b.Allocate(16), dc = b.Allocate(16);
  ASSERT_TRUE(da.ok() && dc.ok());
  ASSERT_TRUE(b.CopyToDevice(da->data(), a.data(), 16).ok());
  ASSERT_TRUE(b.CopyToDevice(dc->data(), c.data(), 16).ok());
  ASSERT_TRUE(
      b.Add(
           {.a = da->data(), .b = dc->data(), .out = da->data(), .n = 4, .dtype = ScalarType::kF32})
          .ok());
  ASSERT_TRUE(b.CopyToHost(out.data(), da->data(), 16).ok());
  EXPECT_EQ(out, (std::vector<float>{11, 22, 33, 44}));
  // A dtype the kernel does not support is a clear InvalidArgument naming the op.
  absl::Status bad = b.Add(
      {.a = da->data(), .b = dc->data(), .out = da->data(), .n = 4, .dtype = ScalarType::kF16});
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("Add"), absl::string_view::npos);
  // cuBLAS GEMM through the op table: [[1,2],[3,4]] x [[1,0],[1,1]]^T.
  std::vector<float> w = {1, 0, 1, 1}, y(4);
  auto dw = b.Allocate(16), dy = b.Allocate(16);
  ASSERT_TRUE(dw.ok() && dy.ok());
  ASSERT_TRUE(b.CopyToDevice(dw->data(), w.data(), 16).ok());
  ASSERT_TRUE(b.CopyToDevice(da->data(), a.data(), 16).ok());
  ASSERT_TRUE(b.Gemm({.x = da->data(),
                      .w = dw->data(),
                      .y = dy->data(),
                      .m = 2,
                      .n = 2,
                      .k = 2,
                      .dtype = ScalarType::kF32})
                  .ok());
  ASSERT_TRUE(b.CopyToHost(y.data(), dy->data(), 16).ok());
  EXPECT_EQ(y, (std::vector<float>{1, 3, 3, 7}));
  // A GEMM dtype cuBLAS is not given is a clear InvalidArgument naming the op.
  absl::Status bad_gemm = b.Gemm({.m = 1, .n = 1, .k = 1, .dtype = ScalarType::kF16});
  EXPECT_EQ(bad_gemm.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_gemm.message().find("Gemm"), absl::string_view::npos);
}

// Bulk copies run on the copy stream, ordered after the ops before them and before the ops after
// them: a kernel that reads the old contents, a bulk copy over them, a kernel that reads the new.
TEST(CudaBackendTest, BulkCopiesAreOrderedWithTheComputeStream) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto backend = CreateCudaBackend({.staging_bytes = 1 << 16});
  ASSERT_TRUE(backend.ok()) << backend.status();
  Backend& b = **backend;
  const size_t n = 1 << 20;  // 4 MiB: larger than the staging buffer, straight copies
  std::vector<float> ones(n, 1.0f), twos(n, 2.0f), out(n);
  auto src = b.Allocate(n * 4), acc = b.Allocate(n * 4);
  ASSERT_TRUE(src.ok() && acc.ok());
  ASSERT_TRUE(b.CopyToDevice(src->data(), ones.data(), n * 4).ok());
  for (int round = 0; round < 20; ++round) {
    // acc += src (reads 1s), then src := 2s (bulk), then acc += src (reads 2s), then src := 1s.
    const kernels::AddParams add{.a = acc->data(),
                                 .b = src->data(),
                                 .out = acc->data(),
                                 .n = static_cast<int64_t>(n),
                                 .dtype = ScalarType::kF32};
    ASSERT_TRUE(b.Add(add).ok());
    ASSERT_TRUE(b.CopyToDeviceBulk({{src->data(), twos.data(), n * 4}}).ok());
    ASSERT_TRUE(b.Add(add).ok());
    // Small copies go through the pinned staging buffer; many of them wrap it.
    std::vector<Backend::HostToDevice> small;
    for (size_t off = 0; off < n; off += 4096)
      small.push_back({src->as<float>() + off, ones.data() + off, 4096 * 4});
    ASSERT_TRUE(b.CopyToDeviceBulk(small).ok());
  }
  ASSERT_TRUE(b.CopyToHost(out.data(), acc->data(), n * 4).ok());
  for (size_t i = 0; i < n; i += 4099) ASSERT_EQ(out[i], 60.0f) << "at " << i;
}

// The pool keeps what it reserved: allocating and freeing the same sizes again does not grow it.
TEST(CudaBackendTest, AllocationsAfterWarmUpComeFromThePool) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto backend = CreateCudaBackend({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  size_t free_before = 0, free_after = 0, total = 0;
  for (int round = 0; round < 3; ++round) {
    if (round == 1) {
      ASSERT_TRUE((*backend)->Synchronize().ok());
      cudaMemGetInfo(&free_before, &total);
    }
    std::vector<DeviceBuffer> bufs;
    for (size_t bytes : {size_t{1} << 20, size_t{64} << 20, size_t{3} << 10}) {
      auto buf = (*backend)->Allocate(bytes);
      ASSERT_TRUE(buf.ok());
      bufs.push_back(std::move(*buf));
    }
  }
  ASSERT_TRUE((*backend)->Synchronize().ok());
  cudaMemGetInfo(&free_after, &total);
  EXPECT_EQ(free_before, free_after);
}

// Kept apart: compute-sanitizer reports the (intended) failing cudaMalloc as an API error.
TEST(CudaBackendTest, OutOfMemoryIsResourceExhaustedAndLeavesNoStickyError) {
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  auto backend = CreateCudaBackend({});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto huge = (*backend)->Allocate(size_t{1} << 50);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kResourceExhausted);
  // The next op must not inherit the allocation error.
  auto buf = (*backend)->Allocate(64);
  ASSERT_TRUE(buf.ok());
  EXPECT_TRUE((*backend)
                  ->Add({.a = buf->data(),
                         .b = buf->data(),
                         .out = buf->data(),
                         .n = 16,
                         .dtype = ScalarType::kF32})
                  .ok());
  EXPECT_TRUE((*backend)->Synchronize().ok());
}

}  // namespace
}  // namespace moleserve::engine
