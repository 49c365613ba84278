#pragma once

// molectl admin: the AdapterAdmin verbs (proto/moleserve/v1/admin.proto) on one server, or with
// --all-replicas on every replica that --admin-addr resolves to (server/molectl/replicas.h):
//
//   admin load NAME PATH [--replace] [--sha256 HEX]   a directory under the server's root
//   admin upload NAME DIR [--replace]                  a local directory, streamed (its sha256
//                                                      is computed here and checked there)
//   admin unload NAME [--force] [--drain-timeout D]
//   admin list | admin get NAME
//   admin replicas                                     the replicas --all-replicas would touch
//
// With --all-replicas the change is applied to each replica at once and reported one line per
// replica ("<address>\tOK\t..." or "<address>\tFAILED\t<CODE>: <message>"), then a summary;
// exit 0 when every replica succeeded, 1 when some failed, 2 for a usage or resolution error. A
// retry is idempotent: a load or upload whose sha256 already serves is a no-op there (upload
// always sends it; give load --sha256), and unloading a name a replica no longer has counts as
// done ("absent").

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace moleserve::molectl {

struct AdminConnection {
  std::string address;  // --admin-addr
  std::string token;    // bearer token ("" = none)
  absl::Duration timeout;
  std::function<std::shared_ptr<grpc::Channel>(const std::string& address)> channel;
};

// args: the words after "admin". Returns the exit status.
int Admin(const std::vector<std::string>& args, const AdminConnection& connection);

}  // namespace moleserve::molectl
