#pragma once

// The one place absl::Status becomes grpc::Status (STYLE.md section 3). Canonical codes map
// one to one; the message is kept.

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace moleserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moleserve::server
