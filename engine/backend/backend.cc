#include "engine/backend/backend.h"

#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace moleserve::engine {

size_t ScalarTypeSize(ScalarType t) {
  switch (t) {
    case ScalarType::kF32:
      return 4;
    case ScalarType::kBF16:
    case ScalarType::kF16:
      return 2;
  }
  return 0;
}

const char* ScalarTypeName(ScalarType t) {
  switch (t) {
    case ScalarType::kF32:
      return "float32";
    case ScalarType::kBF16:
      return "bfloat16";
    case ScalarType::kF16:
      return "float16";
  }
  return "unknown";
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    free_ = std::move(other.free_);
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr && free_) free_(data_);
  data_ = nullptr;
  bytes_ = 0;
}

absl::StatusOr<DeviceBuffer> Backend::AllocateHost(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  void* p = std::calloc(1, bytes);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of host memory allocating ", bytes, " bytes"));
  }
  return DeviceBuffer(p, bytes, [](void* q) { std::free(q); });
}

}  // namespace moleserve::engine
