#include "server/molectl/replicas.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace moleserve::molectl {
namespace {

struct HostPort {
  std::string host;  // without brackets
  std::string port;
};

absl::StatusOr<HostPort> SplitHostPort(absl::string_view target) {
  const size_t colon = target.rfind(':');
  if (colon == absl::string_view::npos || colon + 1 == target.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", target, "' is not host:port"));
  }
  absl::string_view host = target.substr(0, colon);
  uint32_t port = 0;
  if (!absl::SimpleAtoi(target.substr(colon + 1), &port) || port == 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", target, "' has no valid port"));
  }
  if (absl::ConsumePrefix(&host, "[") && !absl::ConsumeSuffix(&host, "]")) {
    return absl::InvalidArgumentError(absl::StrCat("'", target, "' has an unclosed '['"));
  }
  if (host.empty()) return absl::InvalidArgumentError(absl::StrCat("'", target, "' has no host"));
  return HostPort{std::string(host), std::to_string(port)};
}

std::string Join(const std::string& ip, const std::string& port) {
  return ip.find(':') != std::string::npos ? absl::StrCat("[", ip, "]:", port)
                                           : absl::StrCat(ip, ":", port);
}

// DNS queries through libresolv, to the system's servers or to one given server.
class Dns {
 public:
  explicit Dns(const std::string& server) : custom_(!server.empty()) {
    std::memset(&state_, 0, sizeof(state_));
    ok_ = res_ninit(&state_) == 0;
  }
  ~Dns() { res_nclose(&state_); }

  absl::Status UseServer(const std::string& server) {
    absl::StatusOr<HostPort> hp = SplitHostPort(server);
    if (!hp.ok()) return hp.status();
    sockaddr_in sin{};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(static_cast<uint16_t>(std::stoi(hp->port)));
    if (inet_pton(AF_INET, hp->host.c_str(), &sin.sin_addr) != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("--dns-server '", server, "' is not an IPv4 address with a port"));
    }
    state_.nscount = 1;
    state_.nsaddr_list[0] = sin;
    state_.retry = 2;
    state_.retrans = 2;
    return absl::OkStatus();
  }

  struct Record {
    std::string text;   // A / AAAA: the address; SRV: the target
    uint16_t port = 0;  // SRV
  };
  // The answers of `type` (ns_t_a, ns_t_aaaa, ns_t_srv); kNotFound when there are none.
  absl::StatusOr<std::vector<Record>> Query(const std::string& name, int type) {
    if (!ok_) return absl::UnavailableError("the DNS resolver could not be initialized");
    std::vector<unsigned char> answer(65536);
    const int n = res_nquery(&state_, name.c_str(), ns_c_in, type, answer.data(),
                             static_cast<int>(answer.size()));
    if (n < 0) {
      const int err = state_.res_h_errno;
      if (err == HOST_NOT_FOUND || err == NO_DATA) {
        return absl::NotFoundError(absl::StrCat("no DNS records for ", name));
      }
      return absl::UnavailableError(
          absl::StrCat("DNS query for ", name, " failed: ", hstrerror(err)));
    }
    ns_msg msg;
    if (ns_initparse(answer.data(), n, &msg) != 0) {
      return absl::UnavailableError(absl::StrCat("malformed DNS answer for ", name));
    }
    std::vector<Record> out;
    for (int i = 0; i < ns_msg_count(msg, ns_s_an); ++i) {
      ns_rr rr;
      if (ns_parserr(&msg, ns_s_an, i, &rr) != 0 || ns_rr_type(rr) != type) continue;
      const unsigned char* data = ns_rr_rdata(rr);
      const int len = ns_rr_rdlen(rr);
      char text[NS_MAXDNAME];
      if (type == ns_t_a && len == 4) {
        inet_ntop(AF_INET, data, text, sizeof(text));
        out.push_back({text});
      } else if (type == ns_t_aaaa && len == 16) {
        inet_ntop(AF_INET6, data, text, sizeof(text));
        out.push_back({text});
      } else if (type == ns_t_srv && len > 6) {
        if (dn_expand(ns_msg_base(msg), ns_msg_end(msg), data + 6, text, sizeof(text)) < 0) {
          continue;
        }
        out.push_back({text, static_cast<uint16_t>(ns_get16(data + 4))});
      }
    }
    if (out.empty()) return absl::NotFoundError(absl::StrCat("no DNS records for ", name));
    return out;
  }

  bool custom() const { return custom_; }

 private:
  struct __res_state state_;
  bool ok_ = false;
  const bool custom_;
};

// The addresses of `host`: itself when it is an IP address; else its A and AAAA records
// (through `dns` when it has its own server, else getaddrinfo, which reads /etc/hosts too).
absl::StatusOr<std::vector<std::string>> Addresses(const std::string& host, Dns* dns) {
  unsigned char buf[sizeof(in6_addr)];
  if (inet_pton(AF_INET, host.c_str(), buf) == 1 || inet_pton(AF_INET6, host.c_str(), buf) == 1) {
    return std::vector<std::string>{host};
  }
  std::vector<std::string> out;
  if (dns->custom()) {
    // A name with IPv4 addresses only is usual: a failed AAAA query matters only when the A
    // query found nothing either.
    absl::Status failure = absl::OkStatus();
    for (int type : {ns_t_a, ns_t_aaaa}) {
      absl::StatusOr<std::vector<Dns::Record>> records = dns->Query(host, type);
      if (records.ok()) {
        for (const Dns::Record& r : *records) out.push_back(r.text);
      } else if (!absl::IsNotFound(records.status()) && failure.ok()) {
        failure = records.status();
      }
    }
    if (out.empty() && !failure.ok()) return failure;
  } else {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    if (const int rc = getaddrinfo(host.c_str(), nullptr, &hints, &res); rc != 0) {
      if (rc == EAI_NONAME || rc == EAI_NODATA) {
        return absl::NotFoundError(absl::StrCat("no addresses for ", host));
      }
      return absl::UnavailableError(absl::StrCat("resolving ", host, ": ", gai_strerror(rc)));
    }
    for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
      char text[INET6_ADDRSTRLEN];
      const void* addr =
          a->ai_family == AF_INET
              ? static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(a->ai_addr)->sin_addr)
              : static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(a->ai_addr)->sin6_addr);
      if (inet_ntop(a->ai_family, addr, text, sizeof(text)) != nullptr) out.push_back(text);
    }
    freeaddrinfo(res);
  }
  if (out.empty()) return absl::NotFoundError(absl::StrCat("no addresses for ", host));
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveReplicas(const std::string& target,
                                                         const std::string& dns_server) {
  std::set<std::string> replicas;
  if (absl::StrContains(target, ',')) {
    for (absl::string_view entry : absl::StrSplit(target, ',', absl::SkipWhitespace())) {
      entry = absl::StripAsciiWhitespace(entry);
      absl::StatusOr<HostPort> hp = SplitHostPort(entry);
      if (!hp.ok()) return hp.status();
      replicas.insert(Join(hp->host, hp->port));
    }
    return std::vector<std::string>(replicas.begin(), replicas.end());
  }
  Dns dns(dns_server);
  if (!dns_server.empty()) {
    if (absl::Status st = dns.UseServer(dns_server); !st.ok()) return st;
  }
  absl::string_view rest = target;
  if (absl::ConsumePrefix(&rest, "srv:")) {
    if (rest.empty()) return absl::InvalidArgumentError("srv: needs a DNS name");
    absl::StatusOr<std::vector<Dns::Record>> records = dns.Query(std::string(rest), ns_t_srv);
    if (!records.ok()) return records.status();
    for (const Dns::Record& r : *records) {
      absl::StatusOr<std::vector<std::string>> ips = Addresses(r.text, &dns);
      if (!ips.ok()) return ips.status();
      for (const std::string& ip : *ips) replicas.insert(Join(ip, std::to_string(r.port)));
    }
  } else {
    absl::StatusOr<HostPort> hp = SplitHostPort(target);
    if (!hp.ok()) return hp.status();
    absl::StatusOr<std::vector<std::string>> ips = Addresses(hp->host, &dns);
    if (!ips.ok()) return ips.status();
    for (const std::string& ip : *ips) replicas.insert(Join(ip, hp->port));
  }
  return std::vector<std::string>(replicas.begin(), replicas.end());
}

}  // namespace moleserve::molectl
