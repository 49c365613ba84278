#pragma once

// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors):
//
//   [8 bytes]  N, little-endian uint64: length of the JSON header
//   [N bytes]  JSON object, UTF-8, optionally padded with trailing spaces:
//                {"__metadata__": {"key": "value", ...},            (optional, string -> string)
//                 "<tensor name>": {"dtype": "F32",
//                                   "shape": [d0, d1, ...],
//                                   "data_offsets": [begin, end]}, ...}
//   [rest]     data region; a tensor's bytes are data[begin, end), row-major, little-endian.
//
// Usage:
//
//   ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
//   std::vector<float> w(4096 * 4096);
//   RETURN_IF_ERROR(file->ReadF32("model.layers.0.mlp.up_proj.weight", {4096, 4096}, w.data()));

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace moleserve::engine {

// Largest JSON header Open() accepts (the reference implementation uses the same limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1024 * 1024;

// One tensor of an open SafetensorsFile. `data` points into the file's read-only mapping and is
// valid for the lifetime of the SafetensorsFile; it has no alignment guarantee beyond 1 byte.
struct SafetensorsTensor {
  std::string name;
  // One of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL.
  std::string dtype;
  // Row-major dimensions, each >= 0. Empty for a scalar (one element).
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  // Equals NumElements(shape) * DtypeSize(dtype).
  size_t bytes = 0;
};

// A safetensors file, memory-mapped read-only and fully validated by Open().
//
// Lifecycle: Open() maps and validates the whole header; the object is immutable afterwards and
// the destructor unmaps the file (invalidating every SafetensorsTensor::data pointer).
//
// Thread safety: immutable after Open(); all const methods may be called concurrently.
//
// Status codes returned by Open():
//   kNotFound / kPermissionDenied / ... : the file cannot be opened (mapped from errno).
//   kDataLoss        : the file is shorter than its header says (fewer than 8 bytes, header
//                      length past the end of the file, or a tensor's data_offsets past the end
//                      of the data region), i.e. a truncated download.
//   kInvalidArgument : any other malformed content (header over kMaxSafetensorsHeaderBytes, not a
//                      JSON object, unknown dtype, negative dimension, size/shape mismatch,
//                      overlapping tensors, ...).
// Every message starts with the file path and names the offending tensor, e.g.
//   "model.safetensors: tensor 'lm_head.weight' data_offsets [0, 64] exceed the data region of
//   32 bytes".
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  // All tensors, in the order of their data offsets.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }

  // The tensor called `name`, or nullptr.
  const SafetensorsTensor* Find(std::string_view name) const;

  // The "__metadata__" entries (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  const std::string& path() const { return path_; }

  // Copies tensor `name` into `out` as fp32, converting from F32, F16 or BF16.
  // `out` must hold NumElements(expected_shape) floats.
  // Errors (all kInvalidArgument): the tensor is missing ("missing tensor 'x' in <path>"), its
  // shape differs from `expected_shape` ("tensor 'x' has shape [a, b], expected [c, d]"), or its
  // dtype is not one of F32/F16/BF16.
  absl::Status ReadF32(std::string_view name, absl::Span<const int64_t> expected_shape,
                       float* out) const;

 private:
  SafetensorsFile(std::string path, const uint8_t* base, size_t size)
      : path_(std::move(path)), base_(base), size_(size) {}

  // Parses and validates the header of the already mapped file.
  absl::Status ParseHeader();

  std::string path_;
  // The read-only mapping of the whole file: [base_, base_ + size_).
  const uint8_t* base_;
  size_t size_;
  std::vector<SafetensorsTensor> tensors_;
  // Tensor name -> index into tensors_.
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// A tensor to write: `data` holds NumElements(shape) fp32 values, row-major. It may be null only
// when the tensor has no elements.
struct SafetensorsWriteTensor {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};

// Writes `tensors` (in the given order, packed back to back) to `path`, converting each to
// `dtype`: "F32" (bit-exact) or "BF16" (round to nearest even; NaN stays NaN). The header is
// padded with spaces so that the data region starts at a multiple of 8 bytes. `metadata` becomes
// "__metadata__" when non-empty.
// Errors: kInvalidArgument for an unsupported dtype, an empty, duplicate or reserved
// ("__metadata__") name, a negative dimension, or null data for a non-empty tensor; an
// errno-derived code when the file cannot be written.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteTensor>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              std::string_view dtype = "F32");

// Size in bytes of one element of `dtype`, or 0 when `dtype` is not a safetensors dtype this
// reader knows.
size_t SafetensorsDtypeSize(std::string_view dtype);

// Scalar conversions used by ReadF32 and WriteSafetensors. The widening conversions are exact for
// every input: subnormals, signed zeros, infinities and NaN payloads are preserved.
float Bf16ToFloat(uint16_t bits);
float Fp16ToFloat(uint16_t bits);
// Round to nearest, ties to even. NaN maps to a quiet NaN with the same sign.
uint16_t FloatToBf16(float value);

}  // namespace moleserve::engine
