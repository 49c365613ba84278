#include "server/grpc/status_conversion.h"

#include <string>

#include "engine/core/quote.h"

namespace moleserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const absl::string_view text = status.message();
  std::string message =
      engine::SanitizeMessage(std::string_view(text.data(), text.size()), kMaxStatusMessageBytes);
  // absl::StatusCode and grpc::StatusCode share the canonical numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::move(message));
}

}  // namespace moleserve::server
