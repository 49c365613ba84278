#pragma once

// Scrapes a Prometheus /metrics endpoint over plain HTTP/1.0 and parses the text format, for
// server tests.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace moleserve::test_util {

// Sends `request` to 127.0.0.1:port and reads until the server closes (each read and write
// bounded by `timeout_s`); the whole raw response ("" when nothing came).
inline std::string HttpExchange(int port, const std::string& request, int timeout_s = 5) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  timeval tv{.tv_sec = timeout_s, .tv_usec = 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    if (send(fd, request.data(), request.size(), 0) == static_cast<ssize_t>(request.size())) {
      char buf[4096];
      for (int i = 0; i < 10000; ++i) {
        const ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n <= 0) break;
        response.append(buf, static_cast<size_t>(n));
      }
    }
  }
  close(fd);
  return response;
}

// GET http://127.0.0.1:port/metrics; returns the body ("" on failure).
inline std::string HttpGetMetrics(int port) {
  const std::string response =
      HttpExchange(port, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || response.find(" 200 ") == std::string::npos ||
      body == std::string::npos) {
    ADD_FAILURE() << "bad /metrics response: " << response.substr(0, 200);
    return "";
  }
  return response.substr(body + 4);
}

// Prometheus text format: `name{labels} value [timestamp]` per sample; '#' lines are comments.
inline std::map<std::string, double> ParsePrometheus(const std::string& text) {
  std::map<std::string, double> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    // The name and labels end at the first space after the closing brace (label values may
    // contain spaces).
    size_t name_end = line.find('{');
    size_t space;
    if (name_end != absl::string_view::npos && name_end < line.find(' ')) {
      space = line.find(' ', line.find('}', name_end));
    } else {
      space = line.find(' ');
    }
    if (space == absl::string_view::npos) {
      ADD_FAILURE() << "malformed metrics line: " << line;
      continue;
    }
    std::vector<absl::string_view> rest = absl::StrSplit(line.substr(space + 1), ' ');
    double value = 0;
    if (rest.empty() || !absl::SimpleAtod(rest[0], &value)) {
      ADD_FAILURE() << "malformed metrics value: " << line;
      continue;
    }
    samples[std::string(line.substr(0, space))] = value;
  }
  return samples;
}

}  // namespace moleserve::test_util
