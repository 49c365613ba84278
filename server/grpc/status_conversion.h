#pragma once

// The one place absl::Status becomes grpc::Status (STYLE.md section 3). Canonical codes map
// one to one. The message is kept up to kMaxStatusMessageBytes: a status message travels in
// response metadata, and clients refuse metadata over their limit (gRPC's default is 8 KB) with
// a RESOURCE_EXHAUSTED that hides the real error. Messages quote their inputs through
// engine::Quote, so this cap is the safety net, not the rule.

#include <grpcpp/support/status.h>

#include <cstddef>

#include "absl/status/status.h"

namespace moleserve::server {

inline constexpr size_t kMaxStatusMessageBytes = 1024;

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moleserve::server
