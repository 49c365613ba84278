#pragma once

// Where a model's weights come from, and the Hugging Face tensor names of a Llama checkpoint.
//
// A WeightSource hands out fp32 tensors by HF name with an expected shape; the model converts them
// to the backend's dtype and uploads them. Implementations: HostWeights (weights built in memory,
// e.g. the demo model) and SafetensorsWeightSource (a checkpoint directory).

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model_io/model_config.h"

namespace moleserve::engine {

class SafetensorsFile;

// A named tensor with the shape a Llama model of `config` needs. Order: the checkpoint order
// (embeddings, then layers, then final norm and lm_head).
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<TensorSpec> LlamaTensorSpecs(const ModelConfig& config);

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // Fills out[0..numel) with tensor `name` as fp32. kInvalidArgument naming the tensor when it is
  // missing or its shape differs from `shape`.
  virtual absl::Status ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                               float* out) const = 0;
  // The stored shape of tensor `name`; kInvalidArgument naming it when it is missing. Lets
  // callers check shapes before allocating anything.
  virtual absl::StatusOr<std::vector<int64_t>> Shape(const std::string& name) const = 0;
};

// fp32 tensors held in host memory.
class HostWeights final : public WeightSource {
 public:
  struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> data;
  };
  std::map<std::string, Tensor>& tensors() { return tensors_; }
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  absl::Status ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                       float* out) const override;
  absl::StatusOr<std::vector<int64_t>> Shape(const std::string& name) const override;

 private:
  std::map<std::string, Tensor> tensors_;
};

// Tensors from one or more safetensors files (a sharded checkpoint lists several). Each tensor
// name must appear in exactly one file.
class SafetensorsWeightSource final : public WeightSource {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsWeightSource>> Open(
      const std::vector<std::string>& paths);
  ~SafetensorsWeightSource() override;
  absl::Status ReadF32(const std::string& name, absl::Span<const int64_t> shape,
                       float* out) const override;
  absl::StatusOr<std::vector<int64_t>> Shape(const std::string& name) const override;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*, std::less<>> index_;
};

// Random Llama weights, deterministic for a given (config, seed) on every platform: projections
// ~ N(0, 1/in_features), embeddings ~ N(0, 1), norm weights 1 + N(0, 0.1^2).
HostWeights RandomLlamaWeights(const ModelConfig& config, uint64_t seed);

}  // namespace moleserve::engine
