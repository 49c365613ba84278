#include "server/grpc/wire.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/stubs/common.h>
#include <google/protobuf/unknown_field_set.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace moleserve::server {
namespace {

namespace gp = google::protobuf;

// Why a wire-valid `set` does not parse as `type`: the first string field with invalid UTF-8,
// searched depth first through message fields; empty when nothing is found.
std::string Explain(const gp::UnknownFieldSet& set, const gp::Descriptor& type, int depth) {
  if (depth > 100) return "";
  for (int i = 0; i < set.field_count(); ++i) {
    const gp::UnknownField& f = set.field(i);
    const gp::FieldDescriptor* field = type.FindFieldByNumber(f.number());
    if (field == nullptr) continue;  // unknown fields are kept, not refused
    // A field of the wrong wire type is kept as an unknown field by the parser, not refused.
    if (f.type() != gp::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    if (field->type() == gp::FieldDescriptor::TYPE_STRING &&
        !gp::internal::IsStructurallyValidUTF8(f.length_delimited().data(),
                                               static_cast<int>(f.length_delimited().size()))) {
      return absl::StrCat("field ", field->full_name(),
                          " is not valid UTF-8 (protobuf strings must be UTF-8)");
    }
    if (field->type() == gp::FieldDescriptor::TYPE_MESSAGE) {
      gp::UnknownFieldSet inner;
      if (!inner.ParseFromString(f.length_delimited())) {
        return absl::StrCat("field ", field->full_name(), " is malformed");
      }
      std::string why = Explain(inner, *field->message_type(), depth + 1);
      if (!why.empty()) return why;
    }
  }
  return "";
}

absl::Status ParseError(std::string_view bytes, const gp::Message& out) {
  const std::string type = out.GetDescriptor()->full_name();
  gp::UnknownFieldSet set;
  if (!set.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request is not a valid ", type, ": malformed protobuf (", bytes.size(),
                     " bytes: truncated, a length past the end, or nested too deeply)"));
  }
  std::string why = Explain(set, *out.GetDescriptor(), 0);
  if (why.empty()) why = "it does not match the schema";
  return absl::InvalidArgumentError(absl::StrCat("the request is not a valid ", type, ": ", why));
}

}  // namespace

absl::Status ParseRequest(std::string_view bytes, gp::Message* out) {
  if (bytes.size() > static_cast<size_t>(INT32_MAX)) {
    return absl::InvalidArgumentError("the request is larger than 2 GiB");
  }
  if (out->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return absl::OkStatus();
  return ParseError(bytes, *out);
}

absl::Status ParseRequest(const grpc::ByteBuffer& buffer, gp::Message* out) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return absl::InvalidArgumentError("the request is unreadable");
  if (slices.size() == 1) {
    return ParseRequest(
        std::string_view(reinterpret_cast<const char*>(slices[0].begin()), slices[0].size()), out);
  }
  std::string bytes;
  bytes.reserve(buffer.Length());
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return ParseRequest(bytes, out);
}

grpc::ByteBuffer SerializeMessage(const gp::Message& message) {
  grpc::Slice slice(message.ByteSizeLong());
  message.SerializeWithCachedSizesToArray(const_cast<uint8_t*>(slice.begin()));
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace moleserve::server
