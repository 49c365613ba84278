#pragma once

// A grpc.health.v1.Health/Check client without the health proto: the request and response are
// two tiny messages, encoded here by hand on a generic stub (Debian ships no health.proto).

#include <grpcpp/channel.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moleserve::server {

// grpc.health.v1.HealthCheckResponse.ServingStatus values.
enum class HealthStatus { kUnknown = 0, kServing = 1, kNotServing = 2, kServiceUnknown = 3 };
const char* HealthStatusName(HealthStatus s);

// Calls Health/Check for `service` ("" = the whole server). Errors are the RPC's status
// (e.g. kNotFound for a service the server does not know, kUnavailable when unreachable).
absl::StatusOr<HealthStatus> CheckHealth(const std::shared_ptr<grpc::Channel>& channel,
                                         const std::string& service, absl::Duration timeout);

}  // namespace moleserve::server
