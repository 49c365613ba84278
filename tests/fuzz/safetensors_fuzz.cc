// Fuzzes SafetensorsFile (engine/model_io/safetensors.h): the input is a whole .safetensors file.
// Every tensor that Open accepts is checked against its header contract and read through
// ReadF32 (F32/F16/BF16 must convert, every other dtype must be refused).

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "engine/model_io/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

namespace moleserve::fuzz {
namespace {

using engine::SafetensorsFile;
using engine::SafetensorsTensor;

void CheckTensor(const SafetensorsFile& file, const SafetensorsTensor& t, size_t data_region) {
  const size_t elem = engine::SafetensorsDtypeSize(t.dtype);
  FUZZ_CHECK_MSG(elem != 0, t.dtype);
  size_t n = 1;
  for (int64_t d : t.shape) {
    FUZZ_CHECK(d >= 0);
    // Open checked numel * elem for overflow; a zero dimension may follow a huge one.
    n = static_cast<size_t>(static_cast<uint64_t>(n) * static_cast<uint64_t>(d));
  }
  FUZZ_CHECK(t.bytes == n * elem || t.bytes == 0);
  FUZZ_CHECK(t.bytes <= data_region);
  FUZZ_CHECK(t.data != nullptr);
  FUZZ_CHECK(file.Find(t.name) == &t);

  // Touch every byte (ASan / SEGV if the pointer is outside the mapping).
  uint8_t x = 0;
  for (size_t i = 0; i < t.bytes; ++i) x ^= t.data[i];
  asm volatile("" : : "r"(x));

  const bool convertible = t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16";
  std::vector<float> out(t.bytes / elem + 1);
  const absl::Status st = file.ReadF32(t.name, t.shape, out.data());
  FUZZ_CHECK_MSG(st.ok() == convertible, st.ToString());
  if (convertible && t.dtype == "F32" && t.bytes > 0) {
    FUZZ_CHECK(std::memcmp(out.data(), t.data, t.bytes) == 0);
  }
  // A wrong expected shape is refused.
  std::vector<int64_t> wrong = t.shape;
  wrong.push_back(2);
  FUZZ_CHECK(!file.ReadF32(t.name, wrong, out.data()).ok());
}

}  // namespace
}  // namespace moleserve::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moleserve::fuzz;  // NOLINT(build/namespaces)
  static const std::string* path = new std::string(ScratchDir() + "/input.safetensors");
  WriteFileOrDie(*path, AsView(data, size));
  absl::StatusOr<std::unique_ptr<moleserve::engine::SafetensorsFile>> file =
      moleserve::engine::SafetensorsFile::Open(*path);
  if (!file.ok()) {
    FUZZ_CHECK(!file.status().message().empty());
    return 0;
  }
  uint64_t header_len = 0;
  FUZZ_CHECK(size >= 8);
  std::memcpy(&header_len, data, 8);
  FUZZ_CHECK(header_len <= size - 8);
  const size_t data_region = size - 8 - header_len;
  const auto& tensors = (*file)->tensors();
  for (size_t i = 0; i < tensors.size(); ++i) {
    CheckTensor(**file, tensors[i], data_region);
    // Sorted by offset and non-overlapping.
    if (i > 0 && tensors[i - 1].bytes > 0 && tensors[i].bytes > 0) {
      FUZZ_CHECK(tensors[i - 1].data + tensors[i - 1].bytes <= tensors[i].data);
    }
  }
  size_t metadata_bytes = 0;
  for (const auto& [key, value] : (*file)->metadata()) metadata_bytes += key.size() + value.size();
  FUZZ_CHECK(metadata_bytes <= size);
  FUZZ_CHECK((*file)->Find("__metadata__") == nullptr);
  return 0;
}
