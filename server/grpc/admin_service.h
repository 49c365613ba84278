#pragma once

// AdminService: moleserve.v1.AdapterAdmin (proto/moleserve/v1/admin.proto) on the synchronous
// gRPC API: loads validate files and drains wait, so each call holds a thread of the admin
// listener's own pool and never a thread of the inference listener.
//
// Every call must carry `authorization: Bearer <token>`; the token is compared in constant time.
// Every call, authorized or not, is reported to the audit callback after it finishes. A call
// without the right token is reported with its peer, method and refusal only: nothing it carried
// (names, paths) reaches the log. FormatAuditLine writes an entry as one JSON object, so no
// string in it can forge a second line.
//
// The methods are registered raw (grpc::ByteBuffer) and parse their requests with wire.h after
// the token check: a malformed body from an authenticated caller is INVALID_ARGUMENT with a
// reason (and counted in the rejections), never gRPC's bare UNIMPLEMENTED.
// Thread safety: gRPC calls it from many threads; it holds no mutable state.

#include <deque>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "engine/engine.h"
#include "moleserve/v1/admin.grpc.pb.h"
#include "moleserve/v1/admin.pb.h"

namespace moleserve::server {

struct AdminAuditEntry {
  std::string peer;  // the client's address, as gRPC reports it
  bool authenticated = false;
  std::string method;   // "LoadAdapter", ...
  std::string adapter;  // the adapter named by the call (empty for ListAdapters or when refused)
  std::string detail;   // e.g. "path=a/b replace=true" (empty when refused)
  std::string result;   // "OK" or "<CODE>: <message>"
};

// One line of the audit log: a JSON object with the entry's fields ("event":"admin_audit",
// "peer", "authenticated", "method", "adapter", "detail", "result"), strings escaped by the JSON
// writer (control characters as \uXXXX, invalid UTF-8 replaced) and cut to 256 bytes each.
std::string FormatAuditLine(const AdminAuditEntry& entry);

// moleserve.v1.AdapterAdmin, its methods on gRPC's synchronous API with raw messages.
class AdminService final : public grpc::Service {
 public:
  // `token` must not be empty.
  AdminService(engine::Engine* engine, std::string token,
               std::function<void(const AdminAuditEntry&)> audit);

 private:
  grpc::Status LoadAdapter(grpc::ServerContext* context,
                           const moleserve::v1::LoadAdapterRequest& request,
                           moleserve::v1::LoadAdapterResponse* response);
  grpc::Status UnloadAdapter(grpc::ServerContext* context,
                             const moleserve::v1::UnloadAdapterRequest& request,
                             moleserve::v1::UnloadAdapterResponse* response);
  grpc::Status ListAdapters(grpc::ServerContext* context,
                            const moleserve::v1::ListAdaptersRequest& request,
                            moleserve::v1::ListAdaptersResponse* response);
  grpc::Status GetAdapter(grpc::ServerContext* context,
                          const moleserve::v1::GetAdapterRequest& request,
                          moleserve::v1::AdapterStatus* response);
  // The client stream of UploadAdapter, after the token check; fills the audit entry's adapter
  // and detail from the header.
  grpc::Status UploadAdapter(grpc::ServerContext* context,
                             grpc::ServerReader<grpc::ByteBuffer>* reader,
                             moleserve::v1::LoadAdapterResponse* response, AdminAuditEntry* entry);
  void AddUploadMethod();

  // Registers `method` of moleserve.v1.AdapterAdmin: checks the token, parses Request from the
  // raw body, calls `handler`, serializes Response, and audits the call.
  template <typename Request, typename Response>
  void AddRawMethod(const char* method,
                    grpc::Status (AdminService::*handler)(grpc::ServerContext*, const Request&,
                                                          Response*),
                    std::string (*describe)(const Request&));

  // True when the call carries the right bearer token; otherwise sets `refusal`.
  bool Authenticate(grpc::ServerContext* context, grpc::Status* refusal) const;

  engine::Engine* engine_;  // not owned
  const std::string token_;
  const std::function<void(const AdminAuditEntry&)> audit_;
  // "/moleserve.v1.AdapterAdmin/<Method>": gRPC keeps pointers to them (a deque never moves them).
  std::deque<std::string> method_paths_;
};

// Reads a token file: its first line, surrounding whitespace removed. kInvalidArgument when the
// file cannot be read or the token is shorter than 16 characters.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path);

}  // namespace moleserve::server
