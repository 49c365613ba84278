#include "server/grpc/listeners.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moleserve::server {
namespace {

// Inodes of the sockets among this process's descriptors.
std::set<uint64_t> SocketInodes() {
  std::set<uint64_t> inodes;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return inodes;
  while (dirent* e = readdir(dir)) {
    char target[64] = {};
    const std::string link = absl::StrCat("/proc/self/fd/", e->d_name);
    const ssize_t n = readlink(link.c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;
    const std::string_view t(target, static_cast<size_t>(n));
    constexpr std::string_view kPrefix = "socket:[";
    if (t.substr(0, kPrefix.size()) != kPrefix || t.back() != ']') continue;
    uint64_t inode = 0;
    const std::string digits(t.substr(kPrefix.size(), t.size() - kPrefix.size() - 1));
    if (absl::SimpleAtoi(digits, &inode)) inodes.insert(inode);
  }
  closedir(dir);
  return inodes;
}

// "0100007F:C351" (tcp) or 32 hex digits + ":PORT" (tcp6), as the kernel prints them: each 32-bit
// word of the address in host byte order.
std::string FormatAddress(const std::string& hex, bool v6) {
  const size_t colon = hex.find(':');
  if (colon == std::string::npos) return hex;
  const unsigned port = static_cast<unsigned>(std::strtoul(hex.c_str() + colon + 1, nullptr, 16));
  const std::string addr = hex.substr(0, colon);
  unsigned char bytes[16] = {};
  const size_t words = v6 ? 4 : 1;
  if (addr.size() != words * 8) return hex;
  for (size_t w = 0; w < words; ++w) {
    const uint32_t word =
        static_cast<uint32_t>(std::strtoul(addr.substr(w * 8, 8).c_str(), nullptr, 16));
    std::memcpy(bytes + w * 4, &word, 4);  // the kernel printed the word in host order
  }
  char text[INET6_ADDRSTRLEN] = {};
  if (!v6) {
    inet_ntop(AF_INET, bytes, text, sizeof(text));
    return absl::StrCat(text, ":", port);
  }
  in6_addr a;
  std::memcpy(&a, bytes, 16);
  if (IN6_IS_ADDR_V4MAPPED(&a)) {
    inet_ntop(AF_INET, bytes + 12, text, sizeof(text));
    return absl::StrCat(text, ":", port);
  }
  inet_ntop(AF_INET6, bytes, text, sizeof(text));
  return absl::StrCat("[", text, "]:", port);
}

}  // namespace

std::vector<std::string> ListeningTcpAddresses() {
  const std::set<uint64_t> inodes = SocketInodes();
  std::vector<std::string> out;
  for (const bool v6 : {false, true}) {
    std::ifstream table(v6 ? "/proc/self/net/tcp6" : "/proc/self/net/tcp");
    std::string line;
    std::getline(table, line);  // header
    while (std::getline(table, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout;
      uint64_t inode = 0;
      fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >>
          timeout >> inode;
      if (!fields || state != "0A" || inodes.count(inode) == 0) continue;  // 0A: LISTEN
      out.push_back(FormatAddress(local, v6));
    }
  }
  return out;
}

}  // namespace moleserve::server
