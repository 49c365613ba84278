#pragma once

// HttpServer: the HTTP/1.1 listener of the OpenAI-compatible API (issue 18), on Boost.Beast
// (Debian's Boost 1.74), next to the gRPC server on the same engine.
//
//   ASSIGN_OR_RETURN(auto http, HttpServer::Start({.port = 8000}, [&](HttpRequest req,
//       std::shared_ptr<HttpResponder> out) { out->Send(200, "text/plain", "ok"); }));
//
// Per connection: keep-alive, one request at a time (no pipelining); the whole header must arrive
// within header_timeout (slow headers are cut off), the body within body_timeout and up to
// max_body_bytes (413 otherwise, before the handler runs); an idle keep-alive connection closes
// after idle_timeout. The handler runs on a server thread and answers through the responder,
// from any thread, now or later: Send for a whole response, or Start / Write / Finish for a
// chunked stream (Server-Sent Events). While a response is pending the connection watches for the
// client going away: the responder is then closed() and its OnClose callbacks run once (the
// OpenAI layer cancels the engine request). A client that stops reading a stream is cut off once
// max_pending_bytes are queued for it.
//
// Thread safety: Start/Shutdown from one thread; responders from any thread. Shutdown stops
// accepting, closes every connection (their OnClose callbacks run) and joins the threads.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace moleserve::server {

struct HttpRequest {
  std::string method;                          // "GET", "POST", ...
  std::string path;                            // the target without its query string
  std::string query;                           // after '?', undecoded
  std::map<std::string, std::string> headers;  // names lower-cased
  std::string body;
  std::string peer;  // "ip:port"
};

class HttpResponder {
 public:
  virtual ~HttpResponder() = default;
  // A whole response (Content-Length).
  virtual void Send(int status, std::string content_type, std::string body) = 0;
  // A chunked response: the header, then each Write as one chunk, then the last chunk.
  virtual void Start(int status, std::string content_type) = 0;
  virtual void Write(std::string data) = 0;
  virtual void Finish() = 0;
  // True once the client went away or the connection was cut off (writes are then dropped).
  virtual bool closed() const = 0;
  // Runs `fn` once when the connection closes before the response is complete (now, when it
  // already has), on a server thread.
  virtual void OnClose(std::function<void()> fn) = 0;
};

using HttpHandler = std::function<void(HttpRequest, std::shared_ptr<HttpResponder>)>;

struct HttpServerOptions {
  std::string address = "0.0.0.0";
  int port = 8000;  // 0 = any free port
  int threads = 2;
  int64_t max_body_bytes = int64_t{4} << 20;
  absl::Duration header_timeout = absl::Seconds(10);
  absl::Duration body_timeout = absl::Seconds(30);
  absl::Duration idle_timeout = absl::Seconds(60);
  int64_t max_pending_bytes = int64_t{16} << 20;
};

class HttpServer {
 public:
  // kInvalidArgument for bad options, kUnavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const HttpServerOptions& options,
                                                           HttpHandler handler);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;
  void Shutdown();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace moleserve::server
