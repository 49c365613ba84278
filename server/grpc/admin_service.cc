#include "server/grpc/admin_service.h"

#include <grpcpp/impl/codegen/method_handler.h>
#include <grpcpp/impl/codegen/rpc_service_method.h>

#include <limits>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/core/file_io.h"
#include "server/grpc/conversion.h"
#include "server/grpc/status_conversion.h"
#include "server/grpc/wire.h"

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

constexpr absl::Duration kDefaultDrain = absl::Seconds(30);
constexpr size_t kMaxUnaryRequestBytes = 64 << 10;

// Compares without an early exit, so the time taken does not reveal the matching prefix.
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

pb::AdapterState ToProto(engine::AdapterState s) {
  switch (s) {
    case engine::AdapterState::kLoading:
      return pb::ADAPTER_STATE_LOADING;
    case engine::AdapterState::kReady:
      return pb::ADAPTER_STATE_READY;
    case engine::AdapterState::kDraining:
      return pb::ADAPTER_STATE_DRAINING;
    case engine::AdapterState::kFailed:
      return pb::ADAPTER_STATE_FAILED;
  }
  return pb::ADAPTER_STATE_UNSPECIFIED;
}

void ToProto(const engine::AdapterStatus& in, pb::AdapterStatus* out) {
  if (in.has_version) server::ToProto(in.summary, out->mutable_info());
  out->mutable_info()->set_name(in.name);
  out->mutable_info()->set_state(ToProto(in.state));
  out->set_error(in.error);
  out->set_path(in.path);
  out->set_sha256(in.sha256);
  out->set_disk_bytes(static_cast<uint64_t>(in.disk_bytes));
  out->set_host_bytes(static_cast<uint64_t>(in.host_bytes));
  out->set_device_bytes(static_cast<uint64_t>(in.device_bytes));
  out->set_in_flight(static_cast<uint64_t>(in.in_flight));
  out->set_loaded_at_unix_ms(in.has_version ? absl::ToUnixMillis(in.loaded_at) : 0);
  out->set_retiring_versions(static_cast<uint64_t>(in.retiring_versions));
}

std::string Describe(const grpc::Status& s) {
  if (s.ok()) return "OK";
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  const int code = static_cast<int>(s.error_code());
  return absl::StrCat(code >= 0 && code <= 16 ? kNames[code] : "CODE", ": ", s.error_message());
}

// Audit fields are cut to this many bytes: enough for any valid name or path, and a refused
// 100 KB name costs one short line.
constexpr size_t kMaxAuditFieldBytes = 256;

std::string Cut(const std::string& text) {
  if (text.size() <= kMaxAuditFieldBytes) return text;
  return absl::StrCat(text.substr(0, kMaxAuditFieldBytes), "... (", text.size(), " bytes)");
}

std::string DescribeLoad(const pb::LoadAdapterRequest& r) {
  return absl::StrCat("path=", r.path(), " replace=", r.replace() ? "true" : "false",
                      r.sha256().empty() ? "" : " sha256=given");
}
std::string DescribeUnload(const pb::UnloadAdapterRequest& r) {
  return absl::StrCat("force=", r.force() ? "true" : "false",
                      " drain_timeout_seconds=", r.drain_timeout_seconds());
}
std::string DescribeNothing(const pb::ListAdaptersRequest&) { return ""; }
std::string DescribeNothing(const pb::GetAdapterRequest&) { return ""; }

// The adapter a request names, for the audit entry.
std::string AdapterOf(const pb::LoadAdapterRequest& r) { return r.name(); }
std::string AdapterOf(const pb::UnloadAdapterRequest& r) { return r.name(); }
std::string AdapterOf(const pb::ListAdaptersRequest&) { return ""; }
std::string AdapterOf(const pb::GetAdapterRequest& r) { return r.name(); }

}  // namespace

std::string FormatAuditLine(const AdminAuditEntry& e) {
  const nlohmann::json line = {{"event", "admin_audit"},           {"peer", Cut(e.peer)},
                               {"authenticated", e.authenticated}, {"method", Cut(e.method)},
                               {"adapter", Cut(e.adapter)},        {"detail", Cut(e.detail)},
                               {"result", Cut(e.result)}};
  // ASCII only: control characters, quotes and non-ASCII become escapes; invalid UTF-8 is
  // replaced (U+FFFD), never an exception.
  return line.dump(-1, ' ', /*ensure_ascii=*/true, nlohmann::json::error_handler_t::replace);
}

AdminService::AdminService(engine::Engine* engine, std::string token,
                           std::function<void(const AdminAuditEntry&)> audit)
    : engine_(engine), token_(std::move(token)), audit_(std::move(audit)) {
  AddRawMethod("LoadAdapter", &AdminService::LoadAdapter, &DescribeLoad);
  AddRawMethod("UnloadAdapter", &AdminService::UnloadAdapter, &DescribeUnload);
  AddRawMethod<pb::ListAdaptersRequest, pb::ListAdaptersResponse>(
      "ListAdapters", &AdminService::ListAdapters, &DescribeNothing);
  AddRawMethod<pb::GetAdapterRequest, pb::AdapterStatus>("GetAdapter", &AdminService::GetAdapter,
                                                         &DescribeNothing);
  AddUploadMethod();
}

bool AdminService::Authenticate(grpc::ServerContext* context, grpc::Status* refusal) const {
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  constexpr std::string_view kBearer = "Bearer ";
  if (it == md.end()) {
    *refusal = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                            "missing admin token: send metadata 'authorization: Bearer <token>'");
    return false;
  }
  const std::string_view value(it->second.data(), it->second.size());
  if (value.substr(0, kBearer.size()) != kBearer ||
      !ConstantTimeEquals(value.substr(kBearer.size()), token_)) {
    *refusal = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong admin token");
    return false;
  }
  return true;
}

template <typename Request, typename Response>
void AdminService::AddRawMethod(const char* method,
                                grpc::Status (AdminService::*handler)(grpc::ServerContext*,
                                                                      const Request&, Response*),
                                std::string (*describe)(const Request&)) {
  method_paths_.push_back(absl::StrCat("/", pb::AdapterAdmin::service_full_name(), "/", method));
  // gRPC's generated services register their methods the same way, with typed messages; ours
  // take the raw body so that parsing is ours (see wire.h).
  AddMethod(new grpc::internal::RpcServiceMethod(
      method_paths_.back().c_str(), grpc::internal::RpcMethod::NORMAL_RPC,
      new grpc::internal::RpcMethodHandler<AdminService, grpc::ByteBuffer, grpc::ByteBuffer>(
          [method, handler, describe](AdminService* self, grpc::ServerContext* context,
                                      const grpc::ByteBuffer* raw, grpc::ByteBuffer* raw_out) {
            AdminAuditEntry entry{.peer = context->peer(), .method = method};
            grpc::Status status;
            if (self->Authenticate(context, &status)) {
              entry.authenticated = true;
              Request request;
              if (raw->Length() > kMaxUnaryRequestBytes) {
                // The listener takes UploadAdapter's 1 MiB messages; the others stay small.
                self->engine_->CountRejected(absl::StatusCode::kResourceExhausted);
                status = grpc::Status(
                    grpc::StatusCode::RESOURCE_EXHAUSTED,
                    absl::StrCat("the request is ", raw->Length(),
                                 " bytes; admin requests are at most ", kMaxUnaryRequestBytes));
              } else if (absl::Status parsed = ParseRequest(*raw, &request); !parsed.ok()) {
                self->engine_->CountRejected(parsed.code());
                status = ToGrpcStatus(parsed);
              } else {
                entry.adapter = AdapterOf(request);
                entry.detail = describe(request);
                Response response;
                status = (self->*handler)(context, request, &response);
                if (status.ok()) *raw_out = SerializeMessage(response);
              }
            }
            entry.result = Describe(status);
            if (self->audit_) self->audit_(entry);
            return status;
          },
          this)));
}

void AdminService::AddUploadMethod() {
  method_paths_.push_back(
      absl::StrCat("/", pb::AdapterAdmin::service_full_name(), "/UploadAdapter"));
  AddMethod(new grpc::internal::RpcServiceMethod(
      method_paths_.back().c_str(), grpc::internal::RpcMethod::CLIENT_STREAMING,
      new grpc::internal::ClientStreamingHandler<AdminService, grpc::ByteBuffer, grpc::ByteBuffer>(
          [](AdminService* self, grpc::ServerContext* context,
             grpc::ServerReader<grpc::ByteBuffer>* reader, grpc::ByteBuffer* raw_out) {
            AdminAuditEntry entry{.peer = context->peer(), .method = "UploadAdapter"};
            grpc::Status status;
            if (self->Authenticate(context, &status)) {
              entry.authenticated = true;
              pb::LoadAdapterResponse response;
              status = self->UploadAdapter(context, reader, &response, &entry);
              if (!status.ok()) {
                self->engine_->CountRejected(static_cast<absl::StatusCode>(status.error_code()));
              }
              if (status.ok()) *raw_out = SerializeMessage(response);
            }
            entry.result = Describe(status);
            if (self->audit_) self->audit_(entry);
            return status;
          },
          this)));
}

grpc::Status AdminService::UploadAdapter(grpc::ServerContext* context,
                                         grpc::ServerReader<grpc::ByteBuffer>* reader,
                                         pb::LoadAdapterResponse* response,
                                         AdminAuditEntry* entry) {
  const absl::Time start = absl::Now();
  auto refuse = [](std::string message) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::move(message));
  };
  grpc::ByteBuffer raw;
  pb::UploadAdapterRequest message;
  if (!reader->Read(&raw)) return refuse("an upload starts with its header");
  if (absl::Status st = ParseRequest(raw, &message); !st.ok()) return ToGrpcStatus(st);
  if (!message.has_header()) return refuse("an upload starts with its header");
  const pb::UploadHeader h = message.header();  // `message` is reused for the files
  entry->adapter = h.name();
  entry->detail = absl::StrCat("upload files=", h.num_files(), " bytes=", h.total_bytes(),
                               " replace=", h.replace() ? "true" : "false");
  if (h.total_bytes() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return refuse("total_bytes is out of range");
  }
  absl::StatusOr<std::unique_ptr<engine::AdapterUpload>> upload =
      engine_->BeginUpload({.name = h.name(),
                            .sha256 = h.sha256(),
                            .total_bytes = static_cast<int64_t>(h.total_bytes()),
                            .num_files = h.num_files()});
  if (!upload.ok()) return ToGrpcStatus(upload.status());
  const bool replace = h.replace();
  // The files; the upload (and its staging directory) goes at any error or an early end.
  while (reader->Read(&raw)) {
    if (absl::Status st = ParseRequest(raw, &message); !st.ok()) return ToGrpcStatus(st);
    absl::Status st;
    switch (message.part_case()) {
      case pb::UploadAdapterRequest::kFile:
        if (message.file().size() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          return refuse("a file size is out of range");
        }
        st = (*upload)->BeginFile(message.file().path(),
                                  static_cast<int64_t>(message.file().size()));
        break;
      case pb::UploadAdapterRequest::kData:
        st = (*upload)->Write(message.data());
        break;
      default:
        return refuse("after the header, an upload sends only `file` and `data` messages");
    }
    if (!st.ok()) return ToGrpcStatus(st);
  }
  if (context->IsCancelled()) {
    return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away mid-upload");
  }
  const auto call_deadline = context->deadline();
  const absl::Time deadline = call_deadline == std::chrono::system_clock::time_point::max()
                                  ? absl::InfiniteFuture()
                                  : absl::FromChrono(call_deadline);
  absl::StatusOr<engine::AdapterSummary> loaded =
      engine_->CommitUpload(*std::move(upload), replace, deadline);
  if (!loaded.ok()) return ToGrpcStatus(loaded.status());
  response->set_load_seconds(absl::ToDoubleSeconds(absl::Now() - start));
  absl::StatusOr<engine::AdapterStatus> st = engine_->GetAdapterStatus(h.name());
  if (st.ok()) ToProto(*st, response->mutable_adapter());
  return grpc::Status::OK;
}

grpc::Status AdminService::LoadAdapter(grpc::ServerContext* context,
                                       const pb::LoadAdapterRequest& request,
                                       pb::LoadAdapterResponse* response) {
  const absl::Time start = absl::Now();
  const auto call_deadline = context->deadline();
  const absl::Time deadline = call_deadline == std::chrono::system_clock::time_point::max()
                                  ? absl::InfiniteFuture()
                                  : absl::FromChrono(call_deadline);
  absl::StatusOr<engine::AdapterSummary> loaded = engine_->LoadAdapter(
      request.name(), request.path(), request.replace(), request.sha256(), deadline);
  if (!loaded.ok()) return ToGrpcStatus(loaded.status());
  response->set_load_seconds(absl::ToDoubleSeconds(absl::Now() - start));
  absl::StatusOr<engine::AdapterStatus> st = engine_->GetAdapterStatus(request.name());
  if (st.ok()) ToProto(*st, response->mutable_adapter());
  return grpc::Status::OK;
}

grpc::Status AdminService::UnloadAdapter(grpc::ServerContext* context,
                                         const pb::UnloadAdapterRequest& request,
                                         pb::UnloadAdapterResponse* response) {
  const double seconds = request.drain_timeout_seconds();
  if (!(seconds >= 0) || seconds > 3600) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "drain_timeout_seconds must be in [0, 3600]");
  }
  const absl::Duration drain = seconds > 0 ? absl::Seconds(seconds) : kDefaultDrain;
  absl::StatusOr<engine::Engine::UnloadResult> r =
      engine_->UnloadAdapter(request.name(), drain, request.force());
  if (!r.ok()) return ToGrpcStatus(r.status());
  response->set_drained(static_cast<uint64_t>(r->drained));
  response->set_cancelled(static_cast<uint64_t>(r->cancelled));
  return grpc::Status::OK;
}

grpc::Status AdminService::ListAdapters(grpc::ServerContext* context,
                                        const pb::ListAdaptersRequest& request,
                                        pb::ListAdaptersResponse* response) {
  for (const engine::AdapterStatus& st : engine_->AdapterStatuses()) {
    ToProto(st, response->add_adapters());
  }
  const engine::ExpertCacheInfo c = engine_->CacheInfo();
  pb::ExpertCacheStatus* out = response->mutable_cache();
  out->set_capacity_bytes(static_cast<uint64_t>(c.capacity_bytes));
  out->set_hits(static_cast<uint64_t>(c.hits));
  out->set_misses(static_cast<uint64_t>(c.misses));
  out->set_evictions(static_cast<uint64_t>(c.evictions));
  out->set_resident_experts(static_cast<uint64_t>(c.resident_experts));
  out->set_bytes_to_device(static_cast<uint64_t>(c.bytes_to_device));
  return grpc::Status::OK;
}

grpc::Status AdminService::GetAdapter(grpc::ServerContext* context,
                                      const pb::GetAdapterRequest& request,
                                      pb::AdapterStatus* response) {
  absl::StatusOr<engine::AdapterStatus> st = engine_->GetAdapterStatus(request.name());
  if (!st.ok()) return ToGrpcStatus(st.status());
  ToProto(*st, response);
  return grpc::Status::OK;
}

absl::StatusOr<std::string> ReadAdminToken(const std::string& path) {
  absl::StatusOr<std::string> text = engine::ReadRegularFile(path, 64 << 10);
  if (!text.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read admin token file: ", text.status().message()));
  }
  std::string token(absl::StripAsciiWhitespace(text->substr(0, text->find('\n'))));
  if (token.size() < 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin token in '", path,
                     "' is shorter than 16 characters; use e.g. `openssl rand -hex 32`"));
  }
  return token;
}

}  // namespace moleserve::server
