#pragma once

// The TCP sockets this process listens on, read from the kernel (/proc/self/net/tcp and tcp6,
// matched to this process's descriptors), so that the startup log names every socket that serves
// anything, not only the ones the code meant to open. Linux only; empty elsewhere.

#include <string>
#include <vector>

namespace moleserve::server {

// "127.0.0.1:50052", "[::]:50051", ... in the kernel's order; IPv4-mapped IPv6 addresses are
// shown as IPv4.
std::vector<std::string> ListeningTcpAddresses();

}  // namespace moleserve::server
