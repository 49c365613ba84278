#pragma once

// AdminService: moleserve.v1.AdapterAdmin (proto/moleserve/v1/admin.proto) on the synchronous
// gRPC API: loads validate files and drains wait, so each call holds a thread of the admin
// listener's own pool and never a thread of the inference listener.
//
// Every call must carry `authorization: Bearer <token>`; the token is compared in constant time.
// Every call, authorized or not, is reported to the audit callback (peer, method, adapter,
// result) after it finishes.
// Thread safety: gRPC calls it from many threads; it holds no mutable state.

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "moleserve/v1/admin.grpc.pb.h"

namespace moleserve::server {

struct AdminAuditEntry {
  std::string peer;  // the client's address, as gRPC reports it
  bool authenticated = false;
  std::string method;   // "LoadAdapter", ...
  std::string adapter;  // the adapter named by the call (empty for ListAdapters)
  std::string detail;   // e.g. "path=a/b replace=true"
  std::string result;   // "OK" or "<CODE>: <message>"
};

class AdminService final : public moleserve::v1::AdapterAdmin::Service {
 public:
  // `token` must not be empty.
  AdminService(engine::Engine* engine, std::string token,
               std::function<void(const AdminAuditEntry&)> audit);

  grpc::Status LoadAdapter(grpc::ServerContext* context,
                           const moleserve::v1::LoadAdapterRequest* request,
                           moleserve::v1::LoadAdapterResponse* response) override;
  grpc::Status UnloadAdapter(grpc::ServerContext* context,
                             const moleserve::v1::UnloadAdapterRequest* request,
                             moleserve::v1::UnloadAdapterResponse* response) override;
  grpc::Status ListAdapters(grpc::ServerContext* context,
                            const moleserve::v1::ListAdaptersRequest* request,
                            moleserve::v1::ListAdaptersResponse* response) override;
  grpc::Status GetAdapter(grpc::ServerContext* context,
                          const moleserve::v1::GetAdapterRequest* request,
                          moleserve::v1::AdapterStatus* response) override;

 private:
  // Checks the bearer token, runs `body` when it matches, reports the call to the audit log.
  grpc::Status Audited(grpc::ServerContext* context, const char* method, const std::string& adapter,
                       const std::string& detail, const std::function<grpc::Status()>& body);

  engine::Engine* engine_;  // not owned
  const std::string token_;
  const std::function<void(const AdminAuditEntry&)> audit_;
};

// Reads a token file: its first line, surrounding whitespace removed. kInvalidArgument when the
// file cannot be read or the token is shorter than 16 characters.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path);

}  // namespace moleserve::server
