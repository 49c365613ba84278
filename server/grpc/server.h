#pragma once

// MoleServer: the gRPC server process around an Engine: the Inference service, the standard
// grpc.health.v1 service and server reflection on one listener; the AdapterAdmin service on a
// second one (when an admin address is given), so that operators' calls never compete with
// inference traffic and the admin port can stay on localhost.
//
// Listeners bind exactly the address they are given, one socket each (SO_REUSEPORT is off, so no
// other process can bind the same port, and gRPC opens no extra sockets); TLS and mTLS are per
// listener (tls.h). The admin listener refuses to start on an address other hosts can reach
// unless it has TLS or `allow_insecure_admin` says so.
//
// Lifecycle: Start() -> serving (health SERVING) -> Drain(): health NOT_SERVING, the engine
// refuses new requests (UNAVAILABLE), in-flight requests run to completion up to the timeout,
// then whatever is left is failed with UNAVAILABLE and the listener shuts down.
// Thread safety: Drain and Shutdown may be called from any thread, once.

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "server/grpc/tls.h"

namespace moleserve::server {

// grpc.health.v1 service name that stays SERVING until the process exits, drains included (the
// liveness probe); "" and "moleserve.v1.Inference" are readiness: NOT_SERVING while draining.
inline constexpr char kLivenessService[] = "moleserve.liveness";

class InferenceService;
class AdminService;
struct AdminAuditEntry;

struct ServerOptions {
  // host:port; port 0 picks a free port (see port()).
  std::string listen_address = "0.0.0.0:50051";
  // Largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED.
  int max_receive_message_bytes = 4 << 20;
  // The most sequences one Generate call may ask for (GenerateRequest.n).
  int32_t max_n = 16;
  // AdapterAdmin listener host:port (port 0 = any free port, see admin_port()); empty = off.
  std::string admin_address;
  // Bearer token every admin call must carry; required with admin_address.
  std::string admin_token;
  // Receives every admin call after it finished (the audit log).
  std::function<void(const AdminAuditEntry&)> admin_audit;
  // TLS of the inference listener and of the admin listener (plaintext when not enabled).
  TlsOptions tls;
  TlsOptions admin_tls;
  // Lets the admin listener serve plaintext on a non-loopback address (the token then travels in
  // the clear); without it that configuration is refused at Start.
  bool allow_insecure_admin = false;
  // Health right after Start: false keeps readiness NOT_SERVING (liveness SERVING) until
  // SetServing(true), for a process that still loads its start-up adapters.
  bool serving_at_start = true;
};

class MoleServer {
 public:
  static absl::StatusOr<std::unique_ptr<MoleServer>> Start(engine::Engine* engine,
                                                           const ServerOptions& options);
  ~MoleServer();

  int port() const { return port_; }
  int admin_port() const { return admin_port_; }  // 0 when the admin listener is off
  // Health of the overall server ("") and of "moleserve.v1.Inference".
  void SetServing(bool serving);
  // Returns once draining finished and the listener stopped.
  void Drain(absl::Duration timeout);
  // Blocks until the server shuts down.
  void Wait();

 private:
  MoleServer() = default;

  engine::Engine* engine_ = nullptr;  // not owned
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<AdminService> admin_service_;
  std::unique_ptr<grpc::Server> admin_server_;
  int admin_port_ = 0;
};

}  // namespace moleserve::server
