#pragma once

// Request and response messages on the wire. The services register their methods as raw
// (grpc::ByteBuffer in, grpc::ByteBuffer out) and parse requests here, instead of letting gRPC's
// generated handlers do it: a generated handler answers a body it cannot parse with
// UNIMPLEMENTED and an empty message, while a client that sent random bytes, a truncated field or
// a string that is not UTF-8 deserves INVALID_ARGUMENT saying which.
//
//   pb::GenerateRequest request;
//   if (absl::Status st = ParseRequest(buffer, &request); !st.ok()) ...  // INVALID_ARGUMENT
//   grpc::ByteBuffer out = SerializeMessage(response);
//
// Thread-safe (no state).

#include <google/protobuf/message.h>
#include <grpcpp/support/byte_buffer.h>

#include <string_view>

#include "absl/status/status.h"

namespace moleserve::server {

// Parses `bytes` into `out` (cleared first). kInvalidArgument naming the message type and what is
// wrong: malformed wire data (truncated, a length past the end, nested deeper than protobuf's
// recursion limit of 100) or the first string field (by its full name) that is not valid UTF-8.
// Unknown fields, and known fields sent with another wire type, are kept as unknown fields (the
// protobuf rule that lets old servers read new clients).
absl::Status ParseRequest(std::string_view bytes, google::protobuf::Message* out);
absl::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* out);

grpc::ByteBuffer SerializeMessage(const google::protobuf::Message& message);

}  // namespace moleserve::server
