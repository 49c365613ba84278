#include "server/grpc/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/strings/str_cat.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/inference_service.h"

namespace moleserve::server {

absl::StatusOr<std::unique_ptr<MoleServer>> MoleServer::Start(engine::Engine* engine,
                                                              const ServerOptions& options) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  std::unique_ptr<MoleServer> server(new MoleServer());
  server->engine_ = engine;
  server->service_ = std::make_unique<InferenceService>(engine, options.max_n);

  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      MakeServerCredentials(options.tls, "gRPC");
  if (!credentials.ok()) return credentials.status();
  grpc::ServerBuilder builder;
  // One socket on exactly the given address: with SO_REUSEPORT gRPC 1.51 clones listeners, and
  // a clone of a port-0 listener lands on a second, unannounced port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(options.listen_address, *credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address, " (address in use or invalid)"));
  }
  if (!options.admin_address.empty()) {
    if (options.admin_token.empty()) {
      return absl::InvalidArgumentError("the admin listener needs a token (--admin-token-file)");
    }
    if (!options.admin_tls.enabled() && !options.allow_insecure_admin &&
        !IsLoopbackHost(HostOf(options.admin_address))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the admin listener ", options.admin_address,
          " is reachable from other hosts and has no TLS: its bearer token would travel in "
          "plaintext; give it a certificate (--tls-cert-file/--tls-key-file or "
          "--admin-tls-cert-file/--admin-tls-key-file), bind it to loopback, or pass "
          "--admin-allow-insecure"));
    }
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> admin_credentials =
        MakeServerCredentials(options.admin_tls, "admin");
    if (!admin_credentials.ok()) return admin_credentials.status();
    server->admin_service_ =
        std::make_unique<AdminService>(engine, options.admin_token, options.admin_audit);
    grpc::ServerBuilder admin;
    admin.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    admin.AddListeningPort(options.admin_address, *admin_credentials, &server->admin_port_);
    admin.RegisterService(server->admin_service_.get());
    // Admin requests are a few names and paths (64 KiB, checked per method), except
    // UploadAdapter's data messages of up to 1 MiB.
    admin.SetMaxReceiveMessageSize((1 << 20) + (4 << 10));
    server->admin_server_ = admin.BuildAndStart();
    if (server->admin_server_ == nullptr || server->admin_port_ == 0) {
      return absl::UnavailableError(absl::StrCat("cannot listen on ", options.admin_address,
                                                 " (admin; address in use or invalid)"));
    }
  }
  server->SetServing(options.serving_at_start);
  return server;
}

MoleServer::~MoleServer() {
  if (admin_server_) admin_server_->Shutdown(std::chrono::system_clock::now());
  if (server_) server_->Shutdown(std::chrono::system_clock::now());
}

void MoleServer::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);  // every registered service name, "" included
  health->SetServingStatus("moleserve.v1.Inference", serving);
  // Liveness stays SERVING through a drain: the process is alive and finishing its requests, and
  // must not be restarted for going NOT_SERVING (deploy/kubernetes's livenessProbe asks for it).
  health->SetServingStatus(kLivenessService, true);
}

void MoleServer::Drain(absl::Duration timeout) {
  SetServing(false);
  engine_->StopAccepting();
  engine_->WaitIdle(timeout);
  // Whatever is still running after the timeout ends with UNAVAILABLE.
  engine_->Shutdown();
  if (admin_server_) admin_server_->Shutdown(std::chrono::system_clock::now());
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

void MoleServer::Wait() { server_->Wait(); }

}  // namespace moleserve::server
