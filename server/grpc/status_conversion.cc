#include "server/grpc/status_conversion.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace moleserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  std::string message(status.message());
  if (message.size() > kMaxStatusMessageBytes) {
    const size_t total = message.size();
    message.resize(kMaxStatusMessageBytes);
    absl::StrAppend(&message, "... (message cut from ", total, " bytes)");
  }
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::move(message));
}

}  // namespace moleserve::server
