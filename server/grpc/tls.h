#pragma once

// Transport security for the gRPC listeners (inference and admin): TLS from PEM certificate and
// key files, optional client-certificate verification (mTLS) per listener, and certificate
// reload without a restart.
//
// Files are checked when the listener starts (readable regular files, the key matches the
// certificate, the client CA parses), so a wrong path stops startup with a message instead of
// failing every handshake. After that gRPC's FileWatcherCertificateProvider re-reads the files
// every `reload_interval`: replacing the certificate and key (e.g. cert-manager renewing a
// Kubernetes Secret) takes effect for new connections within one interval. A reload that finds
// unreadable or mismatched files keeps the previous credentials.
//
// Thread safety: the functions are pure; the credentials they return are gRPC's (thread-safe).

#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moleserve::server {

struct TlsOptions {
  // PEM certificate chain (leaf first) and its private key; both empty = plaintext.
  std::string cert_file;
  std::string key_file;
  // PEM CA bundle: when set, clients must present a certificate signed by it (mTLS); a client
  // without one, or with one from another CA, fails the handshake.
  std::string client_ca_file;
  // How often the files are re-read (whole seconds, at least 1).
  absl::Duration reload_interval = absl::Minutes(1);

  bool enabled() const { return !cert_file.empty() || !key_file.empty(); }
};

// Insecure credentials when `tls` is not enabled, TLS (or mTLS) credentials otherwise.
// kInvalidArgument naming the file and the problem when a file is missing, not PEM, or the key
// does not belong to the certificate; `what` ("gRPC", "admin") prefixes the message.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& tls, const std::string& what);

// True when `host` (as in "host:port": a name, an IPv4 address or a bracketed IPv6 address) can
// only be reached from this machine: 127.0.0.0/8, ::1, or "localhost".
bool IsLoopbackHost(const std::string& host);

// The host part of "host:port" / "[v6]:port" (brackets removed).
std::string HostOf(const std::string& address);

}  // namespace moleserve::server
