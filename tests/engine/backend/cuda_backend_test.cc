// The CUDA backend's scaffolding: memory, copies, an op through the op table, error mapping.
// Skipped without a CUDA device (ctest label `gpu`).

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
  // Ops without a CUDA kernel yet say so instead of computing something wrong.
  EXPECT_EQ(b.Gemm({}).code(), absl::StatusCode::kUnimplemented);
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
