#include "server/grpc/admin_service.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/grpc/conversion.h"
#include "server/grpc/status_conversion.h"

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

constexpr absl::Duration kDefaultDrain = absl::Seconds(30);

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

}  // namespace

AdminService::AdminService(engine::Engine* engine, std::string token,
                           std::function<void(const AdminAuditEntry&)> audit)
    : engine_(engine), token_(std::move(token)), audit_(std::move(audit)) {}

grpc::Status AdminService::Audited(grpc::ServerContext* context, const char* method,
                                   const std::string& adapter, const std::string& detail,
                                   const std::function<grpc::Status()>& body) {
  AdminAuditEntry entry{
      .peer = context->peer(), .method = method, .adapter = adapter, .detail = detail};
  grpc::Status status;
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  constexpr std::string_view kBearer = "Bearer ";
  if (it == md.end()) {
    status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "missing admin token: send metadata 'authorization: Bearer <token>'");
  } else {
    const std::string_view value(it->second.data(), it->second.size());
    if (value.substr(0, kBearer.size()) != kBearer ||
        !ConstantTimeEquals(value.substr(kBearer.size()), token_)) {
      status = grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "wrong admin token");
    } else {
      entry.authenticated = true;
      status = body();
    }
  }
  entry.result = Describe(status);
  if (audit_) audit_(entry);
  return status;
}

grpc::Status AdminService::LoadAdapter(grpc::ServerContext* context,
                                       const pb::LoadAdapterRequest* request,
                                       pb::LoadAdapterResponse* response) {
  const std::string detail =
      absl::StrCat("path=", request->path(), " replace=", request->replace() ? "true" : "false",
                   request->sha256().empty() ? "" : " sha256=given");
  return Audited(context, "LoadAdapter", request->name(), detail, [&] {
    const absl::Time start = absl::Now();
    absl::StatusOr<engine::AdapterSummary> loaded = engine_->LoadAdapter(
        request->name(), request->path(), request->replace(), request->sha256());
    if (!loaded.ok()) return ToGrpcStatus(loaded.status());
    response->set_load_seconds(absl::ToDoubleSeconds(absl::Now() - start));
    absl::StatusOr<engine::AdapterStatus> st = engine_->GetAdapterStatus(request->name());
    if (st.ok()) ToProto(*st, response->mutable_adapter());
    return grpc::Status::OK;
  });
}

grpc::Status AdminService::UnloadAdapter(grpc::ServerContext* context,
                                         const pb::UnloadAdapterRequest* request,
                                         pb::UnloadAdapterResponse* response) {
  const std::string detail =
      absl::StrCat("force=", request->force() ? "true" : "false",
                   " drain_timeout_seconds=", request->drain_timeout_seconds());
  return Audited(context, "UnloadAdapter", request->name(), detail, [&] {
    const double seconds = request->drain_timeout_seconds();
    if (!(seconds >= 0) || seconds > 3600) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "drain_timeout_seconds must be in [0, 3600]");
    }
    const absl::Duration drain = seconds > 0 ? absl::Seconds(seconds) : kDefaultDrain;
    absl::StatusOr<engine::Engine::UnloadResult> r =
        engine_->UnloadAdapter(request->name(), drain, request->force());
    if (!r.ok()) return ToGrpcStatus(r.status());
    response->set_drained(static_cast<uint64_t>(r->drained));
    response->set_cancelled(static_cast<uint64_t>(r->cancelled));
    return grpc::Status::OK;
  });
}

grpc::Status AdminService::ListAdapters(grpc::ServerContext* context,
                                        const pb::ListAdaptersRequest* request,
                                        pb::ListAdaptersResponse* response) {
  return Audited(context, "ListAdapters", "", "", [&] {
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
  });
}

grpc::Status AdminService::GetAdapter(grpc::ServerContext* context,
                                      const pb::GetAdapterRequest* request,
                                      pb::AdapterStatus* response) {
  return Audited(context, "GetAdapter", request->name(), "", [&] {
    absl::StatusOr<engine::AdapterStatus> st = engine_->GetAdapterStatus(request->name());
    if (!st.ok()) return ToGrpcStatus(st.status());
    ToProto(*st, response);
    return grpc::Status::OK;
  });
}

absl::StatusOr<std::string> ReadAdminToken(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    return absl::InvalidArgumentError(absl::StrCat("cannot read admin token file '", path, "'"));
  std::string line;
  std::getline(in, line);
  std::string token(absl::StripAsciiWhitespace(line));
  if (token.size() < 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("admin token in '", path,
                     "' is shorter than 16 characters; use e.g. `openssl rand -hex 32`"));
  }
  return token;
}

}  // namespace moleserve::server
