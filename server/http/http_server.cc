#include "server/http/http_server.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <deque>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace moleserve::server {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;

std::chrono::steady_clock::duration ToChrono(absl::Duration d) {
  return std::chrono::nanoseconds(absl::ToInt64Nanoseconds(d));
}

class Session;

// The responder of one request; forwards to its session on the session's strand.
class Responder final : public HttpResponder {
 public:
  explicit Responder(std::shared_ptr<Session> session) : session_(std::move(session)) {}
  void Send(int status, std::string content_type, std::string body) override;
  void Start(int status, std::string content_type) override;
  void Write(std::string data) override;
  void Finish() override;
  bool closed() const override { return closed_.load(); }
  void OnClose(std::function<void()> fn) override;

  // Called by the session (on its strand).
  void MarkClosed() {
    closed_.store(true);
    std::vector<std::function<void()>> fns;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fns.swap(on_close_);
      fired_ = true;
    }
    for (auto& fn : fns) fn();
  }
  void MarkDone() {
    std::lock_guard<std::mutex> lock(mu_);
    on_close_.clear();
    done_ = true;
  }

 private:
  std::shared_ptr<Session> session_;
  std::atomic<bool> closed_{false};
  std::mutex mu_;
  std::vector<std::function<void()>> on_close_;
  bool fired_ = false;
  bool done_ = false;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  // `ioc` runs `socket`; held so that a responder kept by the engine after the server is gone
  // still posts into a live context (whose handlers then never run).
  Session(std::shared_ptr<net::io_context> ioc, tcp::socket socket,
          std::shared_ptr<const HttpServerOptions> options,
          std::shared_ptr<const HttpHandler> handler)
      : ioc_(std::move(ioc)),
        stream_(std::move(socket)),
        options_(*options),
        options_owner_(std::move(options)),
        handler_(std::move(handler)) {
    beast::error_code ec;
    const tcp::endpoint peer = stream_.socket().remote_endpoint(ec);
    if (!ec) peer_ = absl::StrCat(peer.address().to_string(), ":", peer.port());
  }

  void Run() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->ReadHeader(); });
  }

  // From any thread: closes the connection (server shutdown).
  void Close() {
    net::post(stream_.get_executor(), [self = shared_from_this()] { self->Fail(); });
  }

  // ---- responder side, always on the strand
  void DoSend(int status, std::string content_type, std::string body) {
    if (closed_ || responded_) return;
    responded_ = true;
    auto res =
        std::make_shared<http::response<http::string_body>>(static_cast<http::status>(status), 11);
    res->set(http::field::server, "moleserve");
    res->set(http::field::content_type, content_type);
    res->keep_alive(keep_alive_);
    res->body() = std::move(body);
    res->prepare_payload();
    stream_.expires_never();
    http::async_write(stream_, *res,
                      [self = shared_from_this(), res](beast::error_code ec, size_t) {
                        self->AfterResponse(ec);
                      });
  }
  void DoStart(int status, std::string content_type) {
    if (closed_ || responded_) return;
    responded_ = true;
    streaming_ = true;
    auto res =
        std::make_shared<http::response<http::empty_body>>(static_cast<http::status>(status), 11);
    res->set(http::field::server, "moleserve");
    res->set(http::field::content_type, content_type);
    res->set(http::field::cache_control, "no-cache");
    res->keep_alive(keep_alive_);
    res->chunked(true);
    auto sr = std::make_shared<http::response_serializer<http::empty_body>>(*res);
    writing_ = true;
    stream_.expires_never();
    http::async_write_header(stream_, *sr,
                             [self = shared_from_this(), res, sr](beast::error_code ec, size_t) {
                               self->writing_ = false;
                               if (ec) return self->Fail();
                               self->Pump();
                             });
  }
  void DoWrite(std::string data) {
    if (closed_ || !streaming_ || finishing_ || data.empty()) return;
    pending_bytes_ += static_cast<int64_t>(data.size());
    if (pending_bytes_ > options_.max_pending_bytes) return Fail();  // the client stopped reading
    queue_.push_back(std::move(data));
    Pump();
  }
  void DoFinish() {
    if (closed_ || !streaming_ || finishing_) return;
    finishing_ = true;
    Pump();
  }
  net::any_io_executor executor() { return stream_.get_executor(); }

 private:
  void ReadHeader() {
    parser_.emplace();
    parser_->body_limit(static_cast<uint64_t>(options_.max_body_bytes));
    parser_->header_limit(64 * 1024);
    // A new connection's first header, and every later one, must arrive in time: the idle
    // timeout covers waiting for a request to begin, the header timeout then bounds it.
    stream_.expires_after(ToChrono(first_request_
                                       ? options_.header_timeout
                                       : options_.idle_timeout + options_.header_timeout));
    http::async_read_header(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnHeader(ec); });
  }

  void OnHeader(beast::error_code ec) {
    // (The parser refuses a declared Content-Length over the body limit with the header.)
    if (ec == http::error::body_limit) {
      return Reject(413, absl::StrCat("request body over ", options_.max_body_bytes, " bytes"));
    }
    if (ec)
      return ec == http::error::header_limit ? Reject(431, "request header too large") : Fail();
    first_request_ = false;
    const auto& h = parser_->get();
    if (h.has_content_length() &&
        *parser_->content_length() > static_cast<uint64_t>(options_.max_body_bytes)) {
      return Reject(413, absl::StrCat("request body over ", options_.max_body_bytes, " bytes"));
    }
    stream_.expires_after(ToChrono(options_.body_timeout));
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRequest(ec); });
  }

  void OnRequest(beast::error_code ec) {
    if (ec == http::error::body_limit) {
      return Reject(413, absl::StrCat("request body over ", options_.max_body_bytes, " bytes"));
    }
    if (ec) return Fail();
    stream_.expires_never();
    http::request<http::string_body> req = parser_->release();
    keep_alive_ = req.keep_alive();
    HttpRequest out;
    out.method = std::string(req.method_string());
    const std::string target(req.target());
    const size_t q = target.find('?');
    out.path = target.substr(0, q);
    if (q != std::string::npos) out.query = target.substr(q + 1);
    for (const auto& field : req) {
      out.headers[absl::AsciiStrToLower(std::string(field.name_string()))] =
          std::string(field.value());
    }
    out.body = std::move(req.body());
    out.peer = peer_;
    responded_ = streaming_ = finishing_ = false;
    pending_bytes_ = 0;
    auto responder = std::make_shared<Responder>(shared_from_this());
    responder_ = responder;
    ++request_count_;
    WatchForClose();
    (*handler_)(std::move(out), responder);
  }

  // While a response is pending, a read that fails means the client went away. (Bytes of a
  // pipelined request stay in buffer_ for the next parse.)
  void WatchForClose() {
    if (watching_ || closed_) return;
    watching_ = true;
    const uint64_t request = request_count_;
    stream_.socket().async_wait(
        tcp::socket::wait_read, [self = shared_from_this(), request](beast::error_code ec) {
          self->watching_ = false;
          if (ec || self->closed_) return;
          if (request != self->request_count_ || !self->responder_) {
            // A wait armed for an earlier request: watch for the current one, if any.
            if (self->responder_) self->WatchForClose();
            return;
          }
          // Readable: the end of the stream, or a pipelined request. Peek, without blocking.
          char byte;
          beast::error_code peek_ec;
          self->stream_.socket().non_blocking(true, peek_ec);
          const size_t n = self->stream_.socket().receive(net::buffer(&byte, 1),
                                                          tcp::socket::message_peek, peek_ec);
          if (peek_ec == net::error::would_block || peek_ec == net::error::try_again) {
            return self->WatchForClose();
          }
          if (peek_ec || n == 0) return self->Fail();
          // A pipelined request: left in the socket for after this response.
        });
  }

  void Pump() {
    if (writing_ || closed_) return;
    if (!queue_.empty()) {
      writing_ = true;
      auto data = std::make_shared<std::string>(std::move(queue_.front()));
      queue_.pop_front();
      net::async_write(stream_, http::make_chunk(net::buffer(*data)),
                       [self = shared_from_this(), data](beast::error_code ec, size_t) {
                         self->writing_ = false;
                         self->pending_bytes_ -= static_cast<int64_t>(data->size());
                         if (ec) return self->Fail();
                         self->Pump();
                       });
      return;
    }
    if (finishing_) {
      writing_ = true;
      net::async_write(stream_, http::make_chunk_last(),
                       [self = shared_from_this()](beast::error_code ec, size_t) {
                         self->writing_ = false;
                         self->AfterResponse(ec);
                       });
    }
  }

  void AfterResponse(beast::error_code ec) {
    if (responder_) responder_->MarkDone();
    responder_.reset();
    if (ec) return Fail(/*quiet=*/true);
    if (!keep_alive_) return Linger();
    ReadHeader();
  }

  // Closing with unread input (a body refused before it was read) would make the kernel reset the
  // connection, and the client could lose the response: stop sending, read and drop what the
  // client still sends (bounded in bytes and time), then close.
  void Linger() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.expires_after(std::chrono::seconds(2));
    auto scratch = std::make_shared<std::array<char, 16384>>();
    DrainInput(scratch, 0);
  }
  void DrainInput(std::shared_ptr<std::array<char, 16384>> scratch, size_t drained) {
    if (drained > (size_t{1} << 20)) return Fail(/*quiet=*/true);
    stream_.async_read_some(net::buffer(*scratch), [self = shared_from_this(), scratch, drained](
                                                       beast::error_code ec, size_t n) {
      if (ec) return self->Fail(/*quiet=*/true);
      self->DrainInput(scratch, drained + n);
    });
  }

  void Reject(int status, std::string why) {
    keep_alive_ = false;
    responded_ = false;
    const std::string body =
        absl::StrCat(R"({"error": {"message": ")", why,
                     R"(", "type": "invalid_request_error", "param": null, "code": null}})");
    DoSend(status, "application/json", body);
  }

  void Fail(bool quiet = false) {
    if (closed_) return;
    closed_ = true;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
    if (responder_ && !quiet) responder_->MarkClosed();
    responder_.reset();
  }

  std::shared_ptr<net::io_context> ioc_;  // first: destroyed after the socket
  beast::tcp_stream stream_;
  const HttpServerOptions& options_;
  std::shared_ptr<const HttpServerOptions> options_owner_;
  std::shared_ptr<const HttpHandler> handler_;
  std::string peer_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  std::shared_ptr<Responder> responder_;
  std::deque<std::string> queue_;
  int64_t pending_bytes_ = 0;
  bool first_request_ = true;
  bool keep_alive_ = true;
  bool responded_ = false, streaming_ = false, finishing_ = false, writing_ = false;
  bool watching_ = false, closed_ = false;
  uint64_t request_count_ = 0;  // requests read on this connection
};

void Responder::Send(int status, std::string content_type, std::string body) {
  if (closed()) return;
  net::post(session_->executor(),
            [s = session_, status, ct = std::move(content_type), b = std::move(body)]() mutable {
              s->DoSend(status, std::move(ct), std::move(b));
            });
}

void Responder::Start(int status, std::string content_type) {
  if (closed()) return;
  net::post(session_->executor(), [s = session_, status, ct = std::move(content_type)]() mutable {
    s->DoStart(status, std::move(ct));
  });
}

void Responder::Write(std::string data) {
  if (closed()) return;
  net::post(session_->executor(),
            [s = session_, d = std::move(data)]() mutable { s->DoWrite(std::move(d)); });
}

void Responder::Finish() {
  if (closed()) return;
  net::post(session_->executor(), [s = session_] { s->DoFinish(); });
}

void Responder::OnClose(std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_) return;
    if (!fired_) {
      on_close_.push_back(std::move(fn));
      return;
    }
  }
  fn();  // already closed
}

}  // namespace

struct HttpServer::Impl {
  std::shared_ptr<const HttpServerOptions> options;
  std::shared_ptr<const HttpHandler> handler;
  std::shared_ptr<net::io_context> ioc = std::make_shared<net::io_context>();
  tcp::acceptor acceptor{*ioc};
  std::vector<std::thread> threads;
  std::mutex mu;
  std::vector<std::weak_ptr<Session>> all;  // to close at shutdown
  bool stopped = false;

  void Accept() {
    acceptor.async_accept(net::make_strand(*ioc), [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
        return Accept();  // e.g. too many open files: keep serving the others
      }
      // Each streamed event is a small write: without TCP_NODELAY, Nagle holds it until the
      // client ACKs the previous one, and a delayed ACK makes that ~40 ms per event.
      beast::error_code nodelay_ec;
      socket.set_option(tcp::no_delay(true), nodelay_ec);
      auto session = std::make_shared<Session>(ioc, std::move(socket), options, handler);
      {
        std::lock_guard<std::mutex> lock(mu);
        if (stopped) return;
        std::erase_if(all, [](const std::weak_ptr<Session>& w) { return w.expired(); });
        all.push_back(session);
      }
      session->Run();
      Accept();
    });
  }
};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Shutdown(); }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const HttpServerOptions& options,
                                                              HttpHandler handler) {
  if (options.threads < 1 || options.max_body_bytes < 1 || options.max_pending_bytes < 1 ||
      options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError("http server: threads, limits and port out of range");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::make_shared<const HttpServerOptions>(options);
  impl->handler = std::make_shared<const HttpHandler>(std::move(handler));
  beast::error_code ec;
  const net::ip::address address = net::ip::make_address(options.address, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("http server: bad address '", options.address, "'"));
  }
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(options.port));
  impl->acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl->acceptor.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(endpoint, ec);
  if (!ec) impl->acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("http server: cannot listen on ", options.address,
                                               ":", options.port, ": ", ec.message()));
  }
  impl->Accept();
  for (int i = 0; i < options.threads; ++i) {
    impl->threads.emplace_back([io = impl->ioc] { io->run(); });
  }
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

int HttpServer::port() const {
  beast::error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

void HttpServer::Shutdown() {
  std::vector<std::shared_ptr<Session>> open;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->stopped) return;
    impl_->stopped = true;
    for (const auto& w : impl_->all) {
      if (auto s = w.lock()) open.push_back(std::move(s));
    }
  }
  net::post(impl_->acceptor.get_executor(), [this] {
    beast::error_code ec;
    impl_->acceptor.close(ec);
  });
  for (const auto& s : open) s->Close();
  open.clear();
  // The closes abort every pending operation, so the threads run out of work; a bounded wait,
  // then stop, for a handler that keeps re-arming.
  const absl::Time give_up = absl::Now() + absl::Seconds(2);
  while (absl::Now() < give_up && !impl_->ioc->stopped()) {
    bool live = false;
    {
      std::lock_guard<std::mutex> lock(impl_->mu);
      for (const auto& w : impl_->all) live = live || !w.expired();
    }
    if (!live) break;
    absl::SleepFor(absl::Milliseconds(5));
  }
  impl_->ioc->stop();
  for (std::thread& t : impl_->threads) t.join();
  impl_->threads.clear();
}

}  // namespace moleserve::server
