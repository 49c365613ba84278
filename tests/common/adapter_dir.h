#pragma once

// AdapterDir: writes an adapter directory for tests (a JSON config file and one safetensors file
// of fp32 tensors, random N(0, 0.1^2) unless a fill value is given) under the gtest temp dir, and
// removes it on destruction.

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "engine/model_io/model_config.h"
#include "engine/model_io/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace moleserve::test_util {

// A tiny Llama shape for adapter tests: 2 layers, hidden 32, intermediate 48, 4 query / 2 KV
// heads of 8, vocab 64.
inline engine::ModelConfig TinyModelConfig() {
  engine::ModelConfig c;
  c.name = "tiny";
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  return c;
}

// Writes an adapter directory: a config file and one safetensors file.
class AdapterDir {
 public:
  explicit AdapterDir(const std::string& name) {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           (name + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  ~AdapterDir() { std::filesystem::remove_all(dir_); }
  std::string path() const { return dir_.string(); }

  void Tensor(const std::string& name, std::vector<int64_t> shape, float fill = NAN) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> data(n);
    std::mt19937 rng(static_cast<uint32_t>(tensors_.size() + 1));
    std::normal_distribution<float> dist(0.0f, 0.1f);
    for (float& v : data) v = std::isnan(fill) ? dist(rng) : fill;
    tensors_[name] = {std::move(shape), std::move(data)};
  }
  void Set(const std::string& name, std::vector<int64_t> shape, std::vector<float> data) {
    tensors_[name] = {std::move(shape), std::move(data)};
  }
  std::vector<float>& data(const std::string& name) { return tensors_.at(name).second; }
  void Erase(const std::string& name) { tensors_.erase(name); }
  void Write(const std::string& config_name, const nlohmann::json& config) {
    std::ofstream(dir_ / config_name) << config.dump(2);
    std::vector<engine::SafetensorsWriteTensor> out;
    for (const auto& [name, t] : tensors_) out.push_back({name, t.first, t.second.data()});
    ASSERT_TRUE(engine::WriteSafetensors((dir_ / file_).string(), out, {}).ok());
  }
  void set_file(const std::string& f) { file_ = f; }

 private:
  static inline int counter_ = 0;
  std::filesystem::path dir_;
  std::string file_ = "model.safetensors";
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors_;
};

}  // namespace moleserve::test_util
