#include "bench/molebench/http_driver.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moleserve::bench {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

absl::StatusCode CodeOfHttpStatus(int status) {
  switch (status) {
    case 400:
      return absl::StatusCode::kInvalidArgument;
    case 404:
      return absl::StatusCode::kNotFound;
    case 429:
      return absl::StatusCode::kResourceExhausted;
    case 503:
      return absl::StatusCode::kUnavailable;
    case 504:
      return absl::StatusCode::kDeadlineExceeded;
    default:
      return absl::StatusCode::kInternal;
  }
}

// Connections to one endpoint: connected on demand, kept for reuse after a complete keep-alive
// response. Sync socket operations are bounded by SO_RCVTIMEO / SO_SNDTIMEO.
class ConnectionPool {
 public:
  ConnectionPool(const HttpEndpoint& endpoint, absl::Duration io_timeout)
      : endpoint_(endpoint), io_timeout_(io_timeout) {}

  // A pooled connection (reused = true) or a new one; null with `error` set when none connects.
  std::unique_ptr<tcp::socket> Take(bool* reused, std::string* error) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        std::unique_ptr<tcp::socket> s = std::move(idle_.back());
        idle_.pop_back();
        *reused = true;
        return s;
      }
    }
    *reused = false;
    return Connect(error);
  }
  void Give(std::unique_ptr<tcp::socket> s) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(std::move(s));
  }
  std::unique_ptr<tcp::socket> Connect(std::string* error) {
    beast::error_code ec;
    tcp::resolver resolver(ioc_);
    const auto endpoints = resolver.resolve(endpoint_.host, endpoint_.port, ec);
    if (ec) {
      *error = absl::StrCat("cannot resolve ", endpoint_.host, ": ", ec.message());
      return nullptr;
    }
    auto s = std::make_unique<tcp::socket>(ioc_);
    net::connect(*s, endpoints, ec);
    if (ec) {
      *error = absl::StrCat("cannot connect to ", endpoint_.host, ":", endpoint_.port, ": ",
                            ec.message());
      return nullptr;
    }
    s->set_option(tcp::no_delay(true), ec);
    const int64_t us = absl::ToInt64Microseconds(io_timeout_);
    timeval tv{.tv_sec = static_cast<time_t>(us / 1000000),
               .tv_usec = static_cast<suseconds_t>(us % 1000000)};
    setsockopt(s->native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(s->native_handle(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    return s;
  }
  const HttpEndpoint& endpoint() const { return endpoint_; }

 private:
  const HttpEndpoint endpoint_;
  const absl::Duration io_timeout_;
  net::io_context ioc_;  // sockets only; nothing runs on it (all operations are synchronous)
  std::mutex mu_;
  std::vector<std::unique_ptr<tcp::socket>> idle_;
};

http::request<http::string_body> Post(const HttpEndpoint& endpoint, const std::string& target,
                                      std::string body) {
  http::request<http::string_body> req(http::verb::post, target, 11);
  req.set(http::field::host, endpoint.host);
  req.set(http::field::content_type, "application/json");
  req.keep_alive(true);
  req.body() = std::move(body);
  req.prepare_payload();
  return req;
}

// One streamed completion: sends, reads the events as they arrive, fills `record`.
void RunOne(ConnectionPool& pool, const std::string& body, Clock::time_point start,
            absl::Duration timeout, RequestRecord* record) {
  auto now_s = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  const Clock::time_point deadline = Clock::now() + absl::ToChronoNanoseconds(timeout);
  auto fail = [&](absl::StatusCode code, std::string message) {
    record->code = code;
    record->error_message = std::move(message);
    record->end_s = now_s();
  };
  const http::request<http::string_body> req = Post(pool.endpoint(), "/v1/completions", body);
  std::string error;
  bool reused = false;
  std::unique_ptr<tcp::socket> sock;
  beast::error_code ec;
  beast::flat_buffer buffer;
  std::optional<http::response_parser<http::buffer_body>> parser;
  // A pooled connection the server closed meanwhile (its idle timeout) fails the write or, more
  // often, ends before the response header: once more on a new connection.
  for (int attempt = 0; attempt < 2; ++attempt) {
    sock = attempt == 0 ? pool.Take(&reused, &error) : pool.Connect(&error);
    if (sock == nullptr) return fail(absl::StatusCode::kUnavailable, error);
    record->send_s = now_s();
    http::write(*sock, req, ec);
    buffer.clear();
    parser.emplace();
    parser->body_limit(boost::none);
    if (!ec) http::read_header(*sock, buffer, *parser, ec);
    if (!ec || !reused || attempt > 0) break;
  }
  if (ec) return fail(absl::StatusCode::kUnavailable, absl::StrCat("request: ", ec.message()));
  const int status = static_cast<int>(parser->get().result_int());
  std::string raw, pending;
  int64_t completion_tokens = -1;
  bool done = false;
  std::string stream_error;
  char chunk[16384];
  while (!parser->is_done()) {
    if (Clock::now() > deadline) {
      return fail(absl::StatusCode::kDeadlineExceeded, "past --timeout");
    }
    parser->get().body().data = chunk;
    parser->get().body().size = sizeof(chunk);
    http::read_some(*sock, buffer, *parser, ec);  // what has arrived, not a full buffer
    if (ec == http::error::need_buffer) ec = {};
    if (ec) return fail(absl::StatusCode::kUnavailable, absl::StrCat("read: ", ec.message()));
    const size_t got = sizeof(chunk) - parser->get().body().size;
    if (status != 200) {
      raw.append(chunk, got);
      continue;
    }
    const double at = now_s();
    pending.append(chunk, got);
    for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (!absl::StartsWith(event, "data: ")) continue;
      const std::string data = event.substr(6);
      if (data == "[DONE]") {
        done = true;
        continue;
      }
      const Json j = Json::parse(data, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded()) continue;
      if (j.contains("error")) {
        stream_error = j["error"].value("message", data);
      } else if (j.contains("choices") && !j["choices"].empty()) {
        record->token_times_s.push_back(at);
      }
      if (j.contains("usage") && j["usage"].is_object()) {
        record->prompt_tokens = j["usage"].value("prompt_tokens", int64_t{0});
        completion_tokens = j["usage"].value("completion_tokens", int64_t{-1});
      }
    }
  }
  record->end_s = now_s();
  if (status != 200) {
    const Json j = Json::parse(raw, nullptr, false);
    return fail(CodeOfHttpStatus(status),
                !j.is_discarded() && j.contains("error")
                    ? j["error"].value("message", raw)
                    : absl::StrCat("HTTP ", status, ": ", raw.substr(0, 200)));
  }
  if (!stream_error.empty()) return fail(absl::StatusCode::kInternal, stream_error);
  if (!done) return fail(absl::StatusCode::kInternal, "the stream ended without [DONE]");
  if (completion_tokens >= 0) {  // the usage frame is the count
    record->token_times_s.resize(static_cast<size_t>(completion_tokens), record->end_s);
  }
  record->code = absl::StatusCode::kOk;
  if (parser->keep_alive()) pool.Give(std::move(sock));
}

}  // namespace

absl::StatusOr<HttpEndpoint> ParseHttpEndpoint(const std::string& addr) {
  std::string a = addr;
  if (absl::StartsWith(a, "http://")) a = a.substr(7);
  a = a.substr(0, a.find('/'));
  const size_t colon = a.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == a.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", addr, "' is not host:port"));
  }
  HttpEndpoint e{a.substr(0, colon), a.substr(colon + 1)};
  if (e.host.size() >= 2 && e.host.front() == '[' && e.host.back() == ']') {
    e.host = e.host.substr(1, e.host.size() - 2);
  }
  return e;
}

absl::StatusOr<std::vector<std::string>> HttpListModels(const HttpEndpoint& endpoint,
                                                        absl::Duration timeout) {
  ConnectionPool pool(endpoint, timeout);
  std::string error;
  std::unique_ptr<tcp::socket> sock = pool.Connect(&error);
  if (sock == nullptr) return absl::UnavailableError(error);
  http::request<http::empty_body> req(http::verb::get, "/v1/models", 11);
  req.set(http::field::host, endpoint.host);
  beast::error_code ec;
  http::write(*sock, req, ec);
  beast::flat_buffer buffer;
  http::response<http::string_body> res;
  if (!ec) http::read(*sock, buffer, res, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("GET /v1/models: ", ec.message()));
  const Json j = Json::parse(res.body(), nullptr, false);
  if (res.result_int() != 200 || j.is_discarded() || !j.contains("data") || !j["data"].is_array() ||
      j["data"].empty()) {
    return absl::UnavailableError(
        absl::StrCat("GET /v1/models: HTTP ", res.result_int(), ": ", res.body().substr(0, 200)));
  }
  std::vector<std::string> ids;
  for (const Json& m : j["data"]) ids.push_back(m.value("id", ""));
  return ids;
}

std::string CompletionBody(const PlannedRequest& request, const std::string& base_model) {
  Json body{{"model", request.adapter.empty() ? base_model : request.adapter},
            {"max_tokens", request.output_len},
            {"temperature", 0},
            {"ignore_eos", true},
            {"stream", true},
            {"stream_options", {{"include_usage", true}}}};
  if (!request.prompt_ids.empty()) {
    body["prompt"] = request.prompt_ids;
  } else {
    body["prompt"] = request.prompt_text;
  }
  return body.dump(-1, ' ', false, Json::error_handler_t::replace);
}

std::vector<RequestRecord> RunHttpPlan(const HttpEndpoint& endpoint, const std::string& base_model,
                                       const std::vector<PlannedRequest>& plan, int max_in_flight,
                                       bool paced, absl::Duration timeout) {
  std::vector<RequestRecord> records(plan.size());
  ConnectionPool pool(endpoint, timeout);
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0;
  // One thread per request in flight: each reports its index when done and is joined then, so
  // finished requests hold no thread.
  std::vector<std::thread> threads(plan.size());
  std::vector<int> finished;
  auto join_finished = [&] {
    std::vector<int> done;
    {
      std::lock_guard<std::mutex> lock(mu);
      done.swap(finished);
    }
    for (int i : done) threads[i].join();
  };
  const Clock::time_point start = Clock::now();
  for (const PlannedRequest& request : plan) {
    if (paced) {
      std::this_thread::sleep_until(start +
                                    std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(request.send_offset_s)));
    }
    {
      std::unique_lock<std::mutex> lock(mu);
      if (max_in_flight > 0) cv.wait(lock, [&] { return in_flight < max_in_flight; });
      ++in_flight;
    }
    join_finished();
    RequestRecord* record = &records[request.index];
    record->adapter = request.adapter;
    record->prompt_tokens = static_cast<int64_t>(request.prompt_ids.size());
    const int index = request.index;
    threads[index] = std::thread([&, record, index, body = CompletionBody(request, base_model)] {
      RunOne(pool, body, start, timeout, record);
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
      finished.push_back(index);
      cv.notify_all();
    });
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return in_flight == 0; });
  }
  join_finished();
  return records;
}

}  // namespace moleserve::bench
