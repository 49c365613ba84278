#pragma once

// The one place absl::Status becomes grpc::Status (STYLE.md section 3). Canonical codes map
// one to one. The message goes through engine::SanitizeMessage: control and non-ASCII bytes
// escaped (text from an adapter file cannot reach a terminal or a log raw) and at most
// kMaxStatusMessageBytes kept (a status message travels in response metadata, and clients refuse
// metadata over their limit, gRPC's default being 8 KB, with a RESOURCE_EXHAUSTED that hides the
// real error). Messages quote client input through engine::Quote; this is the net under them.

#include <grpcpp/support/status.h>

#include <cstddef>

#include "absl/status/status.h"

namespace moleserve::server {

inline constexpr size_t kMaxStatusMessageBytes = 1024;

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moleserve::server
