#pragma once

// The replicas an admin change goes to (molectl admin ... --all-replicas), from one target:
//
//   a:50052,b:50052,10.0.0.7:50052   a list: each entry as given
//   moleserve-admin:50052            every address the name resolves to (A and AAAA records,
//                                    /etc/hosts included), each with the port
//   srv:_admin._tcp.moleserve-headless.prod.svc.cluster.local
//                                    the SRV records of the name (what a Kubernetes headless
//                                    Service publishes for a named port): each target's
//                                    addresses with the record's port
//
// `dns_server` ("ip:port", optional) sends the DNS queries (SRV, and A/AAAA of names) to that
// server instead of the system's resolver (for a test double, or a cluster's DNS from outside);
// /etc/hosts is then not read. Addresses come back sorted and without duplicates, IPv6 ones in
// brackets. kNotFound when the name has no records, kInvalidArgument for a malformed target.

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moleserve::molectl {

absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& target,
                                                         const std::string& dns_server = "");

}  // namespace moleserve::molectl
