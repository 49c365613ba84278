#include "engine/model/step_records.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/core/status_macros.h"

namespace moleserve::engine {

absl::Status StepRecords::Begin(std::vector<int32_t> record, int32_t num_records, bool may_route) {
  record_ = std::move(record);
  records_.assign(num_records, {});
  pending_.clear();
  num_words_ = 0;
  source_ = nullptr;
  issued_ = false;
  device_routed_ = false;
  if (!may_route) return absl::OkStatus();
  if (undefined_.bytes() == 0) {
    ASSIGN_OR_RETURN(undefined_, backend_->Allocate(sizeof(int32_t)));
  }
  const int32_t zero = 0;
  return backend_->CopyToDevice(undefined_.data(), &zero, sizeof(zero));
}

void StepRecords::Record(int32_t token, int32_t layer, const char* module, const int32_t* experts,
                         const float* weights, int32_t n) {
  const int32_t r = record_[token];
  if (r < 0) return;
  RoutingRecord rec;
  rec.layer = layer;
  rec.module = module;
  rec.experts.assign(experts, experts + n);
  rec.weights.assign(weights, weights + n);
  records_[r].push_back(std::move(rec));
}

absl::StatusOr<int64_t> StepRecords::Keep(const void* src, int64_t words) {
  const int64_t at = num_words_;
  const size_t need = static_cast<size_t>(at + words) * 4;
  if (words_.bytes() < need) {
    // Grow keeping what earlier sites copied (a device-side copy, in stream order).
    ASSIGN_OR_RETURN(DeviceBuffer grown, backend_->Allocate(std::max(need, words_.bytes() * 2)));
    if (at > 0) {
      RETURN_IF_ERROR(backend_->Convert({.src = words_.data(),
                                         .dst = grown.data(),
                                         .n = at,
                                         .src_dtype = ScalarType::kF32,
                                         .dst_dtype = ScalarType::kF32}));
    }
    words_ = std::move(grown);
  }
  // A same-dtype Convert is a copy of 4-byte words, whatever they hold.
  RETURN_IF_ERROR(backend_->Convert({.src = src,
                                     .dst = words_.as<int32_t>() + at,
                                     .n = words,
                                     .src_dtype = ScalarType::kF32,
                                     .dst_dtype = ScalarType::kF32}));
  num_words_ += words;
  return at;
}

void StepRecords::Defer(int32_t token, int32_t layer, const char* module, int64_t experts_at,
                        int64_t weights_at, int64_t count_at, int32_t fixed_count) {
  const int32_t r = record_[token];
  if (r < 0) return;
  RoutingRecord rec;
  rec.layer = layer;
  rec.module = module;
  records_[r].push_back(std::move(rec));
  pending_.push_back({r, records_[r].size() - 1, experts_at, weights_at, count_at, fixed_count});
}

void StepRecords::UseDeviceWords(const DeviceBuffer* buf, int64_t words) {
  source_ = buf;
  num_words_ = words;
}

absl::Status StepRecords::IssueCopies() {
  issued_ = true;
  if (!pending_.empty()) {
    const size_t bytes = static_cast<size_t>(num_words_) * 4;
    if (words_host_.bytes() < bytes) {
      ASSIGN_OR_RETURN(words_host_,
                       backend_->AllocateHost(std::max(bytes, words_host_.bytes() * 2)));
    }
    const DeviceBuffer& src = source_ != nullptr ? *source_ : words_;
    RETURN_IF_ERROR(backend_->CopyToHostAsync(words_host_.data(), src.data(), bytes));
  }
  if (device_routed_) {
    if (undefined_host_.bytes() == 0) {
      ASSIGN_OR_RETURN(undefined_host_, backend_->AllocateHost(sizeof(int32_t)));
    }
    RETURN_IF_ERROR(
        backend_->CopyToHostAsync(undefined_host_.data(), undefined_.data(), sizeof(int32_t)));
  }
  return absl::OkStatus();
}

absl::Status StepRecords::Collect() {
  if (!issued_) return absl::InternalError("StepRecords::Collect before IssueCopies");
  const int32_t* words = words_host_.as<int32_t>();
  for (const Pending& p : pending_) {
    RoutingRecord& rec = records_[p.record][p.index];
    const int32_t n = p.count_at >= 0 ? words[p.count_at] : p.fixed_count;
    rec.experts.assign(words + p.experts_at, words + p.experts_at + n);
    if (p.weights_at >= 0) {
      const auto* w = reinterpret_cast<const float*>(words + p.weights_at);
      rec.weights.assign(w, w + n);
    } else {
      rec.weights.assign(n, 1.0f);
    }
  }
  pending_.clear();
  if (!device_routed_) return absl::OkStatus();
  return UndefinedError(*undefined_host_.as<int32_t>());
}

absl::Status StepRecords::Check() {
  if (!device_routed_) return absl::OkStatus();
  int32_t undefined = 0;
  RETURN_IF_ERROR(backend_->CopyToHost(&undefined, undefined_.data(), sizeof(undefined)));
  return UndefinedError(undefined);
}

absl::Status StepRecords::UndefinedError(int32_t undefined) const {
  if (undefined == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("routing: router logits contain NaN, or are +inf or all -inf, for ", undefined,
                   " token-site(s) of this step"));
}

}  // namespace moleserve::engine
