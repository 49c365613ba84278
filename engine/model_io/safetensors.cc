#include "engine/model_io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/core/file_io.h"
#include "engine/core/json_depth.h"
#include "engine/core/status_macros.h"
#include "kernels/common/bf16.h"
#include "nlohmann/json.hpp"

namespace moleserve::engine {
namespace {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; big-endian hosts need byte swapping");

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// numel * elem_size with overflow detection. Returns false on overflow or a negative dimension.
bool ByteSize(absl::Span<const int64_t> shape, size_t elem_size, uint64_t* bytes) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  return !__builtin_mul_overflow(n, static_cast<uint64_t>(elem_size), bytes);
}

// Reads a non-negative JSON integer. Rejects floats, booleans and negatives.
bool JsonToU64(const nlohmann::json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

// Like absl::ErrnoToStatus, but never OK: a failure that left errno at 0 becomes kUnknown.
absl::Status ErrnoStatus(int err, const std::string& what) {
  if (err == 0) return absl::UnknownError(what);
  return absl::ErrnoToStatus(err, what);  // Appends strerror(err).
}

}  // namespace

size_t SafetensorsDtypeSize(std::string_view dtype) {
  static constexpr std::pair<std::string_view, size_t> kSizes[] = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1},
  };
  for (const auto& [name, size] : kSizes) {
    if (name == dtype) return size;
  }
  return 0;
}

float Bf16ToFloat(uint16_t bits) { return kernels::Bf16ToF32(bits); }

float Fp16ToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1f) {
    // Inf or NaN; the payload moves to the top of the fp32 mantissa.
    out = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    out = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    out = sign;
  } else {
    // Subnormal fp16 (mantissa * 2^-24) is a normal fp32: shift the leading one into the
    // implicit bit position, lowering the exponent once per shift.
    int32_t e = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    out = sign | (static_cast<uint32_t>(e) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(out);
}

uint16_t FloatToBf16(float value) { return kernels::F32ToBf16(value); }

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  // Non-blocking open and a regular-file check on the descriptor: a FIFO named like a weight
  // file is refused at once instead of blocking the loader (engine/core/file_io.h).
  int64_t file_size = 0;
  ASSIGN_OR_RETURN(UniqueFd fd, OpenRegularFile(path, &file_size));
  const size_t size = static_cast<size_t>(file_size);
  if (size < 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": file is ", size, " bytes, too short for the 8-byte header length"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  const int map_errno = errno;
  fd.reset();  // The mapping keeps its own reference to the file.
  if (map == MAP_FAILED) return ErrnoStatus(map_errno, absl::StrCat(path, ": cannot mmap"));

  std::unique_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, static_cast<const uint8_t*>(map), size));
  RETURN_IF_ERROR(file->ParseHeader());
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

absl::Status SafetensorsFile::ParseHeader() {
  uint64_t header_len;
  std::memcpy(&header_len, base_, sizeof(header_len));
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": header length ", header_len,
                                                   " exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_len > size_ - 8) {
    return absl::DataLossError(absl::StrCat(path_, ": header length ", header_len,
                                            " runs past the end of the file (", size_,
                                            " bytes); the file is truncated or not safetensors"));
  }
  const char* header_begin = reinterpret_cast<const char*>(base_ + 8);
  const uint64_t data_size = size_ - 8 - header_len;
  const uint8_t* data = base_ + 8 + header_len;

  if (JsonNestingDepth(std::string_view(header_begin, header_len)) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": header JSON is nested deeper than ", kMaxJsonDepth, " levels"));
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_len);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": header is JSON but not an object (", header.type_name(), ")"));
  }

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path_, ": __metadata__ must be an object of strings"));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(path_, ": __metadata__ entry '", key,
                                                         "' is ", value.type_name(),
                                                         ", expected a string"));
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat(path_, ": tensor '", name, "'");
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " entry is not a JSON object"));
    }

    SafetensorsTensor tensor;
    tensor.name = name;

    const auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no string 'dtype'"));
    }
    tensor.dtype = dtype_it->get<std::string>();
    const size_t elem_size = SafetensorsDtypeSize(tensor.dtype);
    if (elem_size == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " has unsupported dtype '", tensor.dtype,
                       "' (expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)"));
    }

    const auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no 'shape' array"));
    }
    for (const nlohmann::json& dim : *shape_it) {
      uint64_t d;
      if (!JsonToU64(dim, &d) || d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, " has invalid shape ", shape_it->dump(),
                         ": dimensions must be non-negative integers"));
      }
      tensor.shape.push_back(static_cast<int64_t>(d));
    }

    const auto offsets_it = entry.find("data_offsets");
    uint64_t begin = 0, end = 0;
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !JsonToU64((*offsets_it)[0], &begin) || !JsonToU64((*offsets_it)[1], &end)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " needs 'data_offsets' [begin, end] of non-negative integers"));
    }
    if (begin > end) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " has data_offsets [", begin, ", ", end, "] with begin > end"));
    }
    if (end > data_size) {
      return absl::DataLossError(absl::StrCat(where, " data_offsets [", begin, ", ", end,
                                              "] exceed the data region of ", data_size, " bytes"));
    }
    uint64_t expected_bytes;
    if (!ByteSize(tensor.shape, elem_size, &expected_bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " shape ", ShapeString(tensor.shape), " overflows 64 bits"));
    }
    if (end - begin != expected_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " has data_offsets [", begin, ", ", end, "] spanning ", end - begin,
                       " bytes, but ", tensor.dtype, " shape ", ShapeString(tensor.shape),
                       " needs ", expected_bytes, " bytes"));
    }
    tensor.data = data + begin;
    tensor.bytes = static_cast<size_t>(expected_bytes);
    tensors_.push_back(std::move(tensor));
  }

  // Sort by data offset (ties: empty tensors first) so overlap is a check between neighbours.
  std::sort(tensors_.begin(), tensors_.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
              if (a.data != b.data) return a.data < b.data;
              return a.bytes < b.bytes;
            });
  const SafetensorsTensor* furthest = nullptr;  // The tensor reaching furthest so far.
  for (const SafetensorsTensor& t : tensors_) {
    if (furthest != nullptr && t.data < furthest->data + furthest->bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(path_, ": tensor '", t.name, "' data_offsets [", t.data - data, ", ",
                       t.data - data + t.bytes, "] overlap tensor '", furthest->name, "' at [",
                       furthest->data - data, ", ", furthest->data - data + furthest->bytes, "]"));
    }
    if (furthest == nullptr || t.data + t.bytes >= furthest->data + furthest->bytes) {
      furthest = &t;
    }
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  return absl::OkStatus();
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::Status SafetensorsFile::ReadF32(std::string_view name,
                                      absl::Span<const int64_t> expected_shape, float* out) const {
  const SafetensorsTensor* t = Find(name);
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing tensor '", std::string(name), "' in ", path_));
  }
  if (!std::equal(t->shape.begin(), t->shape.end(), expected_shape.begin(), expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", t->name, "' has shape ",
                                                   ShapeString(t->shape), ", expected ",
                                                   ShapeString(expected_shape)));
  }
  if (t->dtype == "F32") {
    if (t->bytes != 0) std::memcpy(out, t->data, t->bytes);
    return absl::OkStatus();
  }
  const bool is_bf16 = t->dtype == "BF16";
  if (!is_bf16 && t->dtype != "F16") {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", t->name, "' has dtype ",
                                                   t->dtype,
                                                   "; only F32, F16 and BF16 convert to fp32"));
  }
  const size_t n = t->bytes / 2;
  for (size_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, t->data + 2 * i, sizeof(h));  // The mapping may be unaligned.
    out[i] = is_bf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsWriteTensor>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              std::string_view dtype) {
  const bool bf16 = dtype == "BF16";
  if (!bf16 && dtype != "F32") {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": WriteSafetensors supports dtype F32 or BF16, not '", std::string(dtype), "'"));
  }
  const size_t elem_size = bf16 ? 2 : 4;

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header["__metadata__"] = std::move(meta);
  }
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const SafetensorsWriteTensor& t : tensors) {
    const std::string where = absl::StrCat(path, ": tensor '", t.name, "'");
    if (t.name.empty() || t.name == "__metadata__") {
      return absl::InvalidArgumentError(absl::StrCat(where, " has a reserved or empty name"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(absl::StrCat(where, " appears twice"));
    }
    uint64_t bytes;
    if (!ByteSize(t.shape, elem_size, &bytes)) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, " has invalid shape ", ShapeString(t.shape)));
    }
    if (bytes != 0 && t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(where, " has no data"));
    }
    header[t.name] = {{"dtype", std::string(dtype)},
                      {"shape", t.shape},
                      {"data_offsets", nlohmann::ordered_json::array({offset, offset + bytes})}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return ErrnoStatus(errno, absl::StrCat(path, ": cannot create"));
  bool ok = true;
  int write_errno = 0;
  const auto put = [&](const void* p, size_t n) {
    if (ok && n != 0 && std::fwrite(p, 1, n, f) != n) {
      ok = false;
      write_errno = errno;
    }
  };
  const uint64_t header_len = header_text.size();
  put(&header_len, sizeof(header_len));
  put(header_text.data(), header_text.size());
  std::vector<uint16_t> buffer;
  for (const SafetensorsWriteTensor& t : tensors) {
    uint64_t bytes = 0;
    ByteSize(t.shape, elem_size, &bytes);
    if (!bf16) {
      put(t.data, bytes);
      continue;
    }
    // Convert in bounded chunks so a large tensor does not need a full-size copy.
    constexpr size_t kChunk = 1 << 16;
    const size_t n = bytes / 2;
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t m = std::min(kChunk, n - i);
      buffer.resize(m);
      for (size_t j = 0; j < m; ++j) buffer[j] = FloatToBf16(t.data[i + j]);
      put(buffer.data(), m * 2);
    }
  }
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    write_errno = errno;
  }
  if (!ok) {
    std::remove(path.c_str());  // Do not leave a truncated file behind.
    return ErrnoStatus(write_errno, absl::StrCat(path, ": write failed"));
  }
  return absl::OkStatus();
}

}  // namespace moleserve::engine
