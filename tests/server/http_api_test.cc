// The OpenAI-compatible HTTP API (server/http) on the demo model, through a real socket:
// - /health, /v1/models (the base model and the adapters), /v1/models/{id}, 404 model_not_found;
// - /v1/completions, greedy, equals the same request submitted to the engine directly, token for
//   token, for the base model and a MoLE adapter; usage and finish_reason as OpenAI reports them;
// - the streamed form (Server-Sent Events) concatenates to the same text, ends with the usage
//   chunk when asked and `data: [DONE]`; n = 2 gives two choices;
// - bad values are 400 with OpenAI's error object naming the parameter; malformed JSON, wrong
//   methods, unknown routes and an oversized body get a clear 4xx and the server keeps serving;
// - a client that disconnects mid-stream has its request cancelled in the engine;
// - a drain answers 503 on /health and on new requests.

#include <gtest/gtest.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "engine/engine.h"
#include "engine/metrics_sink.h"
#include "nlohmann/json.hpp"
#include "server/http/http_server.h"
#include "server/http/openai_api.h"
#include "tests/common/demo_mole_adapter.h"

namespace moleserve::server {
namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = net::ip::tcp;
using Json = nlohmann::ordered_json;

// Records how requests finished (the cancellation test waits for a kCancelled one).
class RecordingMetrics final : public engine::MetricsSink {
 public:
  void OnRequestRejected(absl::StatusCode, engine::ClientProtocol protocol) override {
    std::lock_guard<std::mutex> lock(mu_);
    rejected_protocols_.push_back(protocol);
  }
  void OnFirstToken(double) override {}
  void OnInterTokenLatency(double) override {}
  void OnRequestFinished(const engine::FinishedRequestMetrics& m) override {
    std::lock_guard<std::mutex> lock(mu_);
    codes_.push_back(m.code);
    protocols_.push_back(m.protocol);
  }
  void OnStep(const engine::StepMetrics&) override {}
  void OnAdapterQueue(const std::vector<std::string>& running, const std::vector<std::string>&,
                      int64_t max_adapters) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const std::string& name : running) running_seen_.insert(name);
    max_adapters_ = max_adapters;
  }
  bool SawRunning(const std::string& adapter) {
    std::lock_guard<std::mutex> lock(mu_);
    return running_seen_.count(adapter) > 0;
  }
  int64_t max_adapters() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_adapters_;
  }
  void OnQueueState(int64_t, int64_t, double) override {}
  int Count(absl::StatusCode code) {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(std::count(codes_.begin(), codes_.end(), code));
  }
  // Requests finished / rejected through `p`.
  int Finished(engine::ClientProtocol p) {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(std::count(protocols_.begin(), protocols_.end(), p));
  }
  int Rejected(engine::ClientProtocol p) {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int>(std::count(rejected_protocols_.begin(), rejected_protocols_.end(), p));
  }

 private:
  std::mutex mu_;
  std::vector<absl::StatusCode> codes_;
  std::vector<engine::ClientProtocol> protocols_, rejected_protocols_;
  std::set<std::string> running_seen_;
  int64_t max_adapters_ = 0;
};

struct Response {
  int status = 0;
  std::string body;
  std::string content_type;
};

class HttpApiTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(::testing::TempDir() + "/http_api_mole");
    ASSERT_FALSE(test_util::WriteDemoMoleAdapter(*dir_).empty());
    ASSERT_FALSE(test_util::WriteDemoOutputGateAdapter(*dir_ + "_gate").empty());
    metrics_ = new RecordingMetrics();
    engine::EngineOptions o;
    o.num_threads = 2;
    o.kv_cache_bytes = int64_t{64} << 20;
    o.adapters = {{"mole", *dir_}, {"gate", *dir_ + "_gate"}};
    o.adapter_root = ::testing::TempDir();
    // ChatML, refusing roles it does not know (as real templates raise).
    const std::string chat_template = ::testing::TempDir() + "/http_api_chatml.jinja";
    std::ofstream(chat_template)
        << "{% for message in messages %}{% if message['role'] not in ['system', 'user', "
           "'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
           "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    o.chat_template_file = chat_template;
    o.metrics = metrics_;
    auto e = engine::Engine::Create(o);
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = e->release();
    api_ = new OpenAiApi(engine_, {});
    auto s = HttpServer::Start({.address = "127.0.0.1", .port = 0, .max_body_bytes = 64 * 1024},
                               [](HttpRequest r, std::shared_ptr<HttpResponder> out) {
                                 api_->Handle(std::move(r), std::move(out));
                               });
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = s->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    delete engine_;
    delete api_;
    delete metrics_;
    delete dir_;
  }

  // One request on a fresh connection; the whole response.
  static Response Call(const std::string& method, const std::string& target,
                       const std::string& body = "") {
    net::io_context ioc;
    beast::tcp_stream stream(ioc);
    stream.connect(
        tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(server_->port())));
    http::request<http::string_body> req(http::string_to_verb(method), target, 11);
    req.set(http::field::host, "localhost");
    if (!body.empty()) {
      req.set(http::field::content_type, "application/json");
      req.body() = body;
      req.prepare_payload();
    }
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    parser.body_limit(64 << 20);
    http::read(stream, buffer, parser);
    Response out;
    out.status = static_cast<int>(parser.get().result_int());
    out.body = parser.get().body();
    out.content_type = std::string(parser.get()[http::field::content_type]);
    return out;
  }

  static Json Post(const std::string& target, const Json& body, int* status = nullptr) {
    Response r = Call("POST", target, body.dump());
    if (status) *status = r.status;
    return Json::parse(r.body, nullptr, false);
  }

  // The greedy text the engine gives for `prompt` on `adapter`, submitted directly.
  static std::string Direct(const std::string& adapter, const std::string& prompt, int tokens,
                            bool add_bos = true) {
    engine::GenerateRequest r;
    r.adapter = adapter;
    r.text = prompt;
    if (!add_bos) r.add_bos = false;
    r.sampling = engine_->model_info().default_sampling;
    r.sampling.temperature = 0;
    r.stopping.max_new_tokens = tokens;
    return DirectText(r);
  }
  // The text the engine gives for `r`, submitted directly.
  static std::string DirectText(const engine::GenerateRequest& r) {
    struct Collect final : engine::GenerationSink {
      std::string text;
      absl::Notification done;
      void OnChunk(engine::GenerationChunk c) override { text += c.text; }
      void OnFinish(engine::GenerationChunk c, engine::FinishInfo) override {
        text += c.text;
        done.Notify();
      }
      void OnError(absl::Status) override { done.Notify(); }
    };
    auto sink = std::make_shared<Collect>();
    EXPECT_TRUE(engine_->Submit(r, sink).ok());
    sink->done.WaitForNotification();
    return sink->text;
  }

  // The `data:` payloads of a Server-Sent Events body.
  static std::vector<std::string> Events(const std::string& body) {
    std::vector<std::string> out;
    size_t at = 0;
    while ((at = body.find("data: ", at)) != std::string::npos) {
      const size_t end = body.find("\n\n", at);
      out.push_back(body.substr(at + 6, end - at - 6));
      at = end;
    }
    return out;
  }

  static std::string* dir_;
  static RecordingMetrics* metrics_;
  static engine::Engine* engine_;
  static OpenAiApi* api_;
  static HttpServer* server_;
};

std::string* HttpApiTest::dir_ = nullptr;
RecordingMetrics* HttpApiTest::metrics_ = nullptr;
engine::Engine* HttpApiTest::engine_ = nullptr;
OpenAiApi* HttpApiTest::api_ = nullptr;
HttpServer* HttpApiTest::server_ = nullptr;

TEST_F(HttpApiTest, HealthAndModels) {
  Response health = Call("GET", "/health");
  EXPECT_EQ(health.status, 200);
  // Not ready (start-up adapters still loading): /health says so, models are still listed.
  api_->SetReady(false);
  health = Call("GET", "/health");
  api_->SetReady(true);
  EXPECT_EQ(health.status, 503);
  EXPECT_EQ(health.body, "loading start-up adapters\n");
  EXPECT_EQ(Call("GET", "/health").status, 200);
  Response models = Call("GET", "/v1/models");
  ASSERT_EQ(models.status, 200);
  const Json list = Json::parse(models.body);
  EXPECT_EQ(list["object"], "list");
  ASSERT_EQ(list["data"].size(), 3u);
  const std::string base = engine_->model_info().name;
  EXPECT_EQ(list["data"][0]["id"], base);
  std::set<std::string> adapters;
  for (size_t i = 1; i < 3; ++i) {
    adapters.insert(list["data"][i]["id"].get<std::string>());
    EXPECT_EQ(list["data"][i]["parent"], base);
  }
  EXPECT_EQ(adapters, (std::set<std::string>{"gate", "mole"}));
  Response one = Call("GET", "/v1/models/mole");
  EXPECT_EQ(one.status, 200);
  EXPECT_EQ(Json::parse(one.body)["id"], "mole");
  Response missing = Call("GET", "/v1/models/nope");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(Json::parse(missing.body)["error"]["code"], "model_not_found");
}

TEST_F(HttpApiTest, GreedyCompletionsEqualTheEngineForTheBaseModelAndAnAdapter) {
  const int http_before = metrics_->Finished(engine::ClientProtocol::kHttp);
  const int grpc_before = metrics_->Finished(engine::ClientProtocol::kGrpc);
  for (const std::string adapter : {"", "mole"}) {
    const std::string model = adapter.empty() ? engine_->model_info().name : adapter;
    int status = 0;
    const Json r = Post("/v1/completions",
                        {{"model", model},
                         {"prompt", "The quick brown fox"},
                         {"max_tokens", 12},
                         {"temperature", 0}},
                        &status);
    ASSERT_EQ(status, 200) << r.dump();
    EXPECT_EQ(r["object"], "text_completion");
    EXPECT_EQ(r["model"], model);
    ASSERT_EQ(r["choices"].size(), 1u);
    EXPECT_EQ(r["choices"][0]["text"], Direct(adapter, "The quick brown fox", 12)) << model;
    EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(r["usage"]["completion_tokens"], 12);
    EXPECT_GT(r["usage"]["prompt_tokens"].get<int>(), 0);
    EXPECT_EQ(r["usage"]["total_tokens"].get<int>(), r["usage"]["prompt_tokens"].get<int>() + 12);
    EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  }
  // Counted with the protocol they came through (the direct submissions count as gRPC's, the
  // engine's default).
  EXPECT_EQ(metrics_->Finished(engine::ClientProtocol::kHttp) - http_before, 2);
  EXPECT_EQ(metrics_->Finished(engine::ClientProtocol::kGrpc) - grpc_before, 2);
}

TEST_F(HttpApiTest, StreamingGivesTheSameTextThenUsageThenDone) {
  const Json request{{"model", "mole"},  {"prompt", "Once upon a time"},
                     {"max_tokens", 10}, {"temperature", 0},
                     {"logprobs", 2},    {"stream_options", {{"include_usage", true}}}};
  const Json whole = Post("/v1/completions", request);
  Json streamed_request = request;
  streamed_request["stream"] = true;
  Response r = Call("POST", "/v1/completions", streamed_request.dump());
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.content_type, "text/event-stream");
  const std::vector<std::string> events = Events(r.body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  int tokens = 0;
  std::string finish;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const Json e = Json::parse(events[i]);
    ASSERT_EQ(e["choices"].size(), 1u);
    text += e["choices"][0]["text"].get<std::string>();
    tokens += static_cast<int>(e["choices"][0]["logprobs"]["tokens"].size());
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, whole["choices"][0]["text"]);
  EXPECT_EQ(tokens, 10);
  EXPECT_EQ(whole["choices"][0]["logprobs"]["tokens"].size(), 10u);
  EXPECT_EQ(whole["choices"][0]["logprobs"]["top_logprobs"][0].size(), 2u);
  EXPECT_EQ(finish, "length");
  const Json usage = Json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"], whole["usage"]);
}

TEST_F(HttpApiTest, SeveralChoicesAndStops) {
  const Json r = Post("/v1/completions", {{"model", "mole"},
                                          {"prompt", "Hello"},
                                          {"max_tokens", 6},
                                          {"n", 2},
                                          {"seed", 7},
                                          {"temperature", 1.0}});
  ASSERT_EQ(r["choices"].size(), 2u) << r.dump();
  EXPECT_EQ(r["choices"][0]["index"], 0);
  EXPECT_EQ(r["choices"][1]["index"], 1);
  EXPECT_EQ(r["usage"]["completion_tokens"], 12);
  // Seeded: the same request gives the same choices.
  const Json again = Post("/v1/completions", {{"model", "mole"},
                                              {"prompt", "Hello"},
                                              {"max_tokens", 6},
                                              {"n", 2},
                                              {"seed", 7},
                                              {"temperature", 1.0}});
  EXPECT_EQ(again["choices"], r["choices"]);
  // A stop string cut out of the greedy text ends the choice there, with "stop".
  const std::string greedy = Direct("", "Hello", 12);
  ASSERT_GE(greedy.size(), 4u);
  const std::string stop = greedy.substr(greedy.size() / 2, 2);
  const Json stopped = Post("/v1/completions", {{"model", engine_->model_info().name},
                                                {"prompt", "Hello"},
                                                {"max_tokens", 12},
                                                {"temperature", 0},
                                                {"stop", Json::array({stop})}});
  EXPECT_EQ(stopped["choices"][0]["finish_reason"], "stop") << stopped.dump();
  EXPECT_EQ(stopped["choices"][0]["text"], greedy.substr(0, greedy.find(stop)));
}

TEST_F(HttpApiTest, ChatCompletionsRenderTheTemplateAndStreamTheRoleFirst) {
  const Json messages = Json::array({{{"role", "system"}, {"content", "Be brief."}},
                                     {{"role", "user"}, {"content", "Hi there"}}});
  const std::string prompt =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
      "<|im_start|>assistant\n";
  int status = 0;
  const Json r = Post("/v1/chat/completions",
                      {{"model", "mole"},
                       {"messages", messages},
                       {"max_tokens", 9},
                       {"temperature", 0},
                       {"logprobs", true},
                       {"top_logprobs", 2}},
                      &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  // The prompt is the template's text, tokenized without another BOS.
  EXPECT_EQ(r["choices"][0]["message"]["content"], Direct("mole", prompt, 9, /*add_bos=*/false));
  const Json& content = r["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 9u);
  EXPECT_EQ(content[0]["top_logprobs"].size(), 2u);
  for (const Json& t : content) {  // each token with its text's UTF-8 bytes
    EXPECT_TRUE(t["token"].is_string());
    EXPECT_FALSE(t["bytes"].empty());
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
  }
  // Streamed: the role first, then content deltas that add up, then the finish.
  Response s = Call("POST", "/v1/chat/completions",
                    Json{{"model", "mole"},
                         {"messages", messages},
                         {"max_tokens", 9},
                         {"temperature", 0},
                         {"stream", true}}
                        .dump());
  ASSERT_EQ(s.status, 200);
  const std::vector<std::string> events = Events(s.body);
  ASSERT_GE(events.size(), 3u);
  const Json first = Json::parse(events[0]);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  std::string text, finish;
  for (size_t i = 1; i + 1 < events.size(); ++i) {
    const Json e = Json::parse(events[i]);
    const Json& delta = e["choices"][0]["delta"];
    if (delta.contains("content")) text += delta["content"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, r["choices"][0]["message"]["content"]);
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(events.back(), "[DONE]");
  // Text content parts are joined; a role the template refuses is a 400 naming messages.
  const Json parts =
      Post("/v1/chat/completions",
           {{"model", "mole"},
            {"messages",
             Json::array({{{"role", "user"},
                           {"content", Json::array({{{"type", "text"}, {"text", "Hi "}},
                                                    {{"type", "text"}, {"text", "there"}}})}}})},
            {"max_tokens", 9},
            {"temperature", 0}});
  EXPECT_EQ(
      parts["choices"][0]["message"]["content"],
      Direct("mole", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", 9, false));
  const Json refused =
      Post("/v1/chat/completions",
           {{"model", "mole"}, {"messages", Json::array({{{"role", "wizard"}, {"content", "x"}}})}},
           &status);
  EXPECT_EQ(status, 400);
  EXPECT_EQ(refused["error"]["param"], "messages");
  EXPECT_NE(refused["error"]["message"].get<std::string>().find("unknown role wizard"),
            std::string::npos);
  EXPECT_EQ(Post("/v1/chat/completions", {{"model", "mole"}}, &status)["error"]["param"],
            "messages");
  EXPECT_EQ(
      Post("/v1/chat/completions", {{"model", "mole"}, {"messages", messages}, {"top_logprobs", 2}},
           &status)["error"]["param"],
      "top_logprobs");
}

TEST_F(HttpApiTest, BadInputIsA4xxNamingTheParameter) {
  const std::string base = engine_->model_info().name;
  struct Case {
    Json body;
    int status;
    std::string param;
  };
  const std::vector<Case> cases = {
      {{{"model", "nope"}, {"prompt", "x"}}, 404, "model"},
      {{{"prompt", "x"}}, 400, "model"},
      {{{"model", base}}, 400, "prompt"},
      {{{"model", base}, {"prompt", "x"}, {"temperature", 3}}, 400, "temperature"},
      {{{"model", base}, {"prompt", "x"}, {"temperature", "hot"}}, 400, "temperature"},
      {{{"model", base}, {"prompt", "x"}, {"max_tokens", 0}}, 400, "max_tokens"},
      {{{"model", base}, {"prompt", "x"}, {"n", 1000}}, 400, "n"},
      {{{"model", base}, {"prompt", "x"}, {"top_p", 0}}, 400, "top_p"},
      {{{"model", base}, {"prompt", "x"}, {"logprobs", 21}}, 400, "logprobs"},
      {{{"model", base}, {"prompt", "x"}, {"stop", 5}}, 400, "stop"},
      {{{"model", base}, {"prompt", "x"}, {"logit_bias", {{"5", 101}}}}, 400, "logit_bias"},
      {{{"model", base}, {"prompt", "x"}, {"logit_bias", {{"five", 1}}}}, 400, "logit_bias"},
      {{{"model", base}, {"prompt", "x"}, {"logit_bias", {{"99999", 1}}}}, 400, "logit_bias"},
      {{{"model", base}, {"prompt", "x"}, {"logit_bias", Json::array({1})}}, 400, "logit_bias"},
      {{{"model", base}, {"prompt", "x"}, {"echo", "yes"}}, 400, "echo"},
      {{{"model", base}, {"prompt", Json::array({-1})}}, 400, "prompt"},
      {{{"model", base}, {"prompt", "x"}, {"stream", "yes"}}, 400, "stream"},
  };
  const int rejected_before = metrics_->Rejected(engine::ClientProtocol::kHttp);
  for (const Case& c : cases) {
    int status = 0;
    const Json r = Post("/v1/completions", c.body, &status);
    EXPECT_EQ(status, c.status) << c.body.dump() << " -> " << r.dump();
    ASSERT_TRUE(r.contains("error")) << r.dump();
    EXPECT_EQ(r["error"]["param"], c.param) << c.body.dump();
    EXPECT_FALSE(r["error"]["message"].get<std::string>().empty());
  }
  // Each refusal counted as an HTTP rejection.
  EXPECT_EQ(metrics_->Rejected(engine::ClientProtocol::kHttp) - rejected_before,
            static_cast<int>(cases.size()));
  EXPECT_EQ(Call("POST", "/v1/completions", "{not json").status, 400);
  EXPECT_EQ(Call("POST", "/v1/completions", "[" + std::string(200, '[')).status, 400);
  // Valid JSON nested far deeper than any request needs: refused before it is parsed.
  const std::string deep = R"({"model": ")" + base + R"(", "prompt": "x", "extra": )" +
                           std::string(30000, '[') + std::string(30000, ']') + "}";
  Response nested = Call("POST", "/v1/chat/completions", deep);
  EXPECT_EQ(nested.status, 400);
  EXPECT_EQ(Json::parse(nested.body)["error"]["param"], "body");
  int chat_status = 0;
  const Json chat_echo = Post("/v1/chat/completions",
                              {{"model", base},
                               {"messages", Json::array({{{"role", "user"}, {"content", "x"}}})},
                               {"echo", true}},
                              &chat_status);
  EXPECT_EQ(chat_status, 400);
  EXPECT_EQ(chat_echo["error"]["param"], "echo");
  EXPECT_EQ(Call("GET", "/v1/completions").status, 405);
  EXPECT_EQ(Call("GET", "/v2/anything").status, 404);
  Response big = Call("POST", "/v1/completions", std::string(100 * 1024, ' '));
  EXPECT_EQ(big.status, 413);
  EXPECT_EQ(Json::parse(big.body)["error"]["type"], "invalid_request_error");
  // Still serving.
  EXPECT_EQ(Call("GET", "/health").status, 200);
}

// An adapter hot-loaded with its own chat template: chat requests naming it render that one.
TEST_F(HttpApiTest, AnAdapterWithItsOwnTemplateRendersIt) {
  const std::string dir = ::testing::TempDir() + "/http_api_chat_adapter";
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(dir).empty());
  std::ofstream(dir + "/chat_template.jinja")
      << "{% for m in messages %}## {{ m.content }}\n{% endfor %}## ";
  ASSERT_TRUE(engine_->LoadAdapter("chatty", "http_api_chat_adapter", false).ok());
  const Json r = Post("/v1/chat/completions",
                      {{"model", "chatty"},
                       {"messages", Json::array({{{"role", "user"}, {"content", "Hi"}}})},
                       {"max_tokens", 6},
                       {"temperature", 0}});
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  EXPECT_EQ(r["choices"][0]["message"]["content"], Direct("chatty", "## Hi\n## ", 6, false));
  EXPECT_NE(Direct("chatty", "## Hi\n## ", 6, false),
            Direct("chatty", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 6, false));
  ASSERT_TRUE(engine_->UnloadAdapter("chatty", absl::Seconds(30), false).ok());
}

// echo as lm-eval's local-completions scores continuations: token-id prompts, echo, logprobs 1,
// max_tokens 1 (and the legacy max_tokens 0). The prompt's logprobs line up with its tokens: a
// prompt that is a greedy continuation scores each continuation token with the logprob it was
// generated with.
TEST_F(HttpApiTest, EchoReturnsThePromptAndItsLogprobs) {
  const std::string base = engine_->model_info().name;
  auto tokenized = engine_->Tokenize("Scores", std::nullopt, false);
  ASSERT_TRUE(tokenized.ok());
  std::vector<int32_t> prompt = tokenized->ids;
  const size_t context = prompt.size();
  // The greedy continuation, with its logprobs.
  const Json gen = Post("/v1/completions", {{"model", base},
                                            {"prompt", prompt},
                                            {"max_tokens", 5},
                                            {"temperature", 0},
                                            {"logprobs", 1}});
  ASSERT_TRUE(gen.contains("choices")) << gen.dump();
  const Json& gen_lp = gen["choices"][0]["logprobs"];
  for (const Json& piece : gen_lp["tokens"]) {
    auto ids = engine_->Tokenize(piece.get<std::string>(), false, false);
    ASSERT_TRUE(ids.ok());
    ASSERT_EQ(ids->ids.size(), 1u) << piece;  // the demo tokenizer: one byte, one token
    prompt.push_back(ids->ids[0]);
  }
  for (int max_tokens : {1, 0}) {
    int status = 0;
    const Json r = Post("/v1/completions",
                        {{"model", base},
                         {"prompt", Json::array({prompt, prompt})},  // a batch, as lm-eval sends
                         {"max_tokens", max_tokens},
                         {"temperature", 0},
                         {"logprobs", 1},
                         {"echo", true}},
                        &status);
    ASSERT_EQ(status, 200) << r.dump();
    ASSERT_EQ(r["choices"].size(), 2u);
    for (const Json& choice : r["choices"]) {
      const Json& lp = choice["logprobs"];
      const size_t want = prompt.size() + static_cast<size_t>(max_tokens);
      ASSERT_EQ(lp["tokens"].size(), want);
      ASSERT_EQ(lp["token_logprobs"].size(), want);
      ASSERT_EQ(lp["top_logprobs"].size(), want);
      ASSERT_EQ(lp["text_offset"].size(), want);
      EXPECT_TRUE(lp["token_logprobs"][0].is_null());  // nothing precedes the first token
      EXPECT_TRUE(lp["top_logprobs"][0].is_null());
      for (size_t i = 0; i < 5; ++i) {
        EXPECT_NEAR(lp["token_logprobs"][context + i].get<double>(),
                    gen_lp["token_logprobs"][i].get<double>(), 1e-4)
            << "position " << context + i;
        // Greedy tokens: each is its own most likely alternative (lm-eval's is_greedy).
        EXPECT_NEAR(lp["top_logprobs"][context + i].begin().value().get<double>(),
                    lp["token_logprobs"][context + i].get<double>(), 1e-6);
      }
      for (size_t i = 1; i < want; ++i) {
        EXPECT_LE(lp["text_offset"][i - 1].get<int>(), lp["text_offset"][i].get<int>());
      }
      const std::string text = choice["text"];
      EXPECT_EQ(text.substr(0, 6), "Scores");
      EXPECT_EQ(choice["finish_reason"], "length");
    }
    EXPECT_EQ(r["usage"]["completion_tokens"], 2 * max_tokens);
    EXPECT_EQ(r["usage"]["prompt_tokens"], 2 * prompt.size());
  }
  // Echo of a text prompt, streamed: the first event opens with the prompt; without logprobs no
  // prompt scoring is asked for.
  const Response stream = Call("POST", "/v1/completions",
                               Json{{"model", base},
                                    {"prompt", "Echo me"},
                                    {"max_tokens", 3},
                                    {"echo", true},
                                    {"stream", true}}
                                   .dump());
  ASSERT_EQ(stream.status, 200);
  const std::vector<std::string> events = Events(stream.body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(Json::parse(events[0])["choices"][0]["text"].get<std::string>().substr(0, 7),
            "Echo me");
}

// The MoLE extensions: `return_routing` gives each generated token's routed experts per site
// (whole and streamed), `routing` overrides the adapter's routing for the request, as gRPC's
// RoutingOverride does; a bad override is a 400 naming `routing`.
TEST_F(HttpApiTest, RoutingOverrideAndRoutingTrace) {
  const Json request{{"model", "mole"},  {"prompt", "Route me"},   {"max_tokens", 4},
                     {"temperature", 0}, {"return_routing", true}, {"ignore_eos", true}};
  const Json r = Post("/v1/completions", request);
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  const Json& routing = r["choices"][0]["routing"];
  ASSERT_EQ(routing.size(), 4u) << r.dump();
  for (const Json& token : routing) {
    ASSERT_FALSE(token.empty());
    for (const Json& site : token) {
      EXPECT_TRUE(site["module"].is_string());
      EXPECT_EQ(site["experts"].size(), 2u) << site.dump();  // the demo adapter routes top-2
      EXPECT_EQ(site["weights"].size(), site["experts"].size());
    }
  }
  // Override: top-1 everywhere, the same text as the engine gives with that override.
  Json top1 = request;
  top1["routing"] = {{"algorithm", "topk"}, {"k", 1}};
  const Json one = Post("/v1/completions", top1);
  ASSERT_TRUE(one.contains("choices")) << one.dump();
  for (const Json& token : one["choices"][0]["routing"]) {
    for (const Json& site : token) EXPECT_EQ(site["experts"].size(), 1u) << site.dump();
  }
  engine::GenerateRequest direct;
  direct.adapter = "mole";
  direct.text = "Route me";
  direct.sampling.temperature = 0;
  direct.stopping.max_new_tokens = 4;
  direct.stopping.ignore_eos = true;
  direct.routing_override.algorithm = engine::RoutingAlgorithm::kTopK;
  direct.routing_override.k = 1;
  EXPECT_EQ(one["choices"][0]["text"], DirectText(direct));
  // Streamed: each event carries its tokens' routing.
  Json streamed = request;
  streamed["stream"] = true;
  const Response s = Call("POST", "/v1/completions", streamed.dump());
  size_t traced = 0;
  for (const std::string& e : Events(s.body)) {
    if (e == "[DONE]") continue;
    const Json j = Json::parse(e);
    if (!j["choices"].empty()) traced += j["choices"][0]["routing"].size();
  }
  EXPECT_EQ(traced, 4u);
  // Bad overrides.
  // disabled_experts reaches the engine, which refuses it for an adapter without an output gate
  // (mole_families_test serves it on one); malformed lists are refused before.
  for (const Json& bad :
       {Json{{"algorithm", "bogus"}}, Json{{"k", 100}}, Json{{"k", "two"}}, Json{{"q", 1}}, Json(5),
        Json{{"disabled_experts", {0}}}, Json{{"disabled_experts", 1}},
        Json{{"disabled_experts", {-1}}}, Json{{"disabled_experts", {"a"}}}}) {
    Json b = request;
    b["routing"] = bad;
    int status = 0;
    const Json e = Post("/v1/completions", b, &status);
    EXPECT_EQ(status, 400) << bad.dump() << " -> " << e.dump();
    EXPECT_EQ(e["error"]["param"], "routing") << bad.dump() << " -> " << e.dump();
  }
  // On the output-gated adapter: expert 1 is never routed to, and the text is the engine's
  // with the same mask.
  Json masked = request;
  masked["model"] = "gate";
  masked["routing"] = {{"disabled_experts", {1}}};
  const Json off = Post("/v1/completions", masked);
  ASSERT_TRUE(off.contains("choices")) << off.dump();
  ASSERT_EQ(off["choices"][0]["routing"].size(), 4u) << off.dump();
  for (const Json& token : off["choices"][0]["routing"]) {
    for (const Json& site : token) {
      EXPECT_EQ(site["experts"].size(), 2u) << site.dump();  // soft over the other two
      for (const Json& e : site["experts"]) EXPECT_NE(e.get<int>(), 1) << site.dump();
    }
  }
  engine::GenerateRequest direct_masked = direct;
  direct_masked.adapter = "gate";
  direct_masked.routing_override = {};
  direct_masked.routing_override.disabled_experts = {1};
  EXPECT_EQ(off["choices"][0]["text"], DirectText(direct_masked));
  Json gated = request;
  gated["routing"] = {{"disabled_experts", {1}}};
  int gated_status = 0;
  const Json gated_error = Post("/v1/completions", gated, &gated_status);
  EXPECT_EQ(gated_status, 400);
  EXPECT_TRUE(absl::StrContains(gated_error["error"]["message"].get<std::string>(),
                                "applies to output-gated groups"))
      << gated_error.dump();
  Json base = request;
  base["model"] = engine_->model_info().name;
  base["routing"] = {{"k", 1}};
  int status = 0;
  EXPECT_EQ(Post("/v1/completions", base, &status)["error"]["param"], "routing");
  EXPECT_EQ(status, 400);
}

TEST_F(HttpApiTest, LogitBiasSteersTheTokens) {
  const Json r = Post("/v1/completions", {{"model", engine_->model_info().name},
                                          {"prompt", "Anything"},
                                          {"max_tokens", 4},
                                          {"temperature", 0.8},
                                          {"seed", 3},
                                          {"logit_bias", {{"65", 100}}}});
  ASSERT_TRUE(r.contains("choices")) << r.dump();
  const std::string a = engine_->DecodeToken(65);
  EXPECT_EQ(r["choices"][0]["text"], a + a + a + a);
}

// One keep-alive connection, requests one after another (GETs and POSTs, whole and streamed):
// each answered in order on the same socket.
TEST_F(HttpApiTest, KeepAliveServesRequestsInTurn) {
  net::io_context ioc;
  beast::tcp_stream stream(ioc);
  stream.connect(
      tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(server_->port())));
  beast::flat_buffer buffer;
  for (int round = 0; round < 3; ++round) {
    for (const bool post : {false, true}) {
      http::request<http::string_body> req(post ? http::verb::post : http::verb::get,
                                           post ? "/v1/completions" : "/v1/models", 11);
      req.set(http::field::host, "localhost");
      if (post) {
        req.body() =
            Json{{"model", "mole"}, {"prompt", "again"}, {"max_tokens", 3}, {"stream", round == 1}}
                .dump();
        req.prepare_payload();
      }
      http::write(stream, req);
      http::response<http::string_body> res;
      http::read(stream, buffer, res);
      EXPECT_EQ(res.result_int(), 200u) << "round " << round << (post ? " POST" : " GET");
      EXPECT_TRUE(res.keep_alive());
    }
  }
}

TEST_F(HttpApiTest, AClientThatDisconnectsMidStreamIsCancelled) {
  const int cancelled_before = metrics_->Count(absl::StatusCode::kCancelled);
  {
    net::io_context ioc;
    beast::tcp_stream stream(ioc);
    stream.connect(
        tcp::endpoint(net::ip::make_address("127.0.0.1"), static_cast<uint16_t>(server_->port())));
    http::request<http::string_body> req(http::verb::post, "/v1/completions", 11);
    req.set(http::field::host, "localhost");
    req.body() = Json{
        {"model", "mole"},
        {"prompt", "Tell me everything"},
        {"max_tokens", 1000},
        {"ignore_eos", true},
        {"stream",
         true}}.dump();
    req.prepare_payload();
    http::write(stream, req);
    // The header and the first event, then the client goes away.
    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    http::read_header(stream, buffer, parser);
    ASSERT_EQ(parser.get().result_int(), 200u);
    char chunk[256];
    parser.get().body().data = chunk;
    parser.get().body().size = sizeof(chunk);
    beast::error_code ec;
    http::read(stream, buffer, parser, ec);  // some body bytes (need_buffer once full)
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream.close();
  }
  // The engine reports the request cancelled, long before 1000 tokens.
  for (int i = 0; i < 6000 && metrics_->Count(absl::StatusCode::kCancelled) == cancelled_before;
       ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(metrics_->Count(absl::StatusCode::kCancelled), cancelled_before + 1);
  EXPECT_TRUE(engine_->WaitIdle(absl::Seconds(60)));
  // While it ran, the adapter queue reported it (what a gateway's endpoint picker reads), with
  // the most adapters a step may hold (max_num_seqs).
  EXPECT_TRUE(metrics_->SawRunning("mole"));
  EXPECT_EQ(metrics_->max_adapters(), engine::EngineOptions().max_num_seqs);
}

// Slow headers (slowloris) and idle keep-alive connections are cut off by the server's timeouts,
// and it keeps serving others meanwhile. (A server of its own, with short timeouts.)
TEST(HttpServerTest, SlowHeadersAndIdleConnectionsAreCutOff) {
  auto server = HttpServer::Start(
      {.address = "127.0.0.1",
       .port = 0,
       .header_timeout = absl::Milliseconds(300),
       .idle_timeout = absl::Milliseconds(300)},
      [](HttpRequest, std::shared_ptr<HttpResponder> out) { out->Send(200, "text/plain", "ok"); });
  ASSERT_TRUE(server.ok()) << server.status();
  const tcp::endpoint at(net::ip::make_address("127.0.0.1"),
                         static_cast<uint16_t>((*server)->port()));
  net::io_context ioc;
  // A header that never ends: the server closes the connection (the read sees the end).
  tcp::socket slow(ioc);
  slow.connect(at);
  net::write(slow, net::buffer(std::string("GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")));
  // Meanwhile another client is served.
  {
    beast::tcp_stream other(ioc);
    other.connect(at);
    http::request<http::string_body> req(http::verb::get, "/health", 11);
    req.set(http::field::host, "x");
    http::write(other, req);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(other, buffer, res);
    EXPECT_EQ(res.body(), "ok");
    // Then it idles past the idle timeout: closed too.
    beast::error_code ec;
    char byte;
    other.socket().read_some(net::buffer(&byte, 1), ec);
    EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
  }
  beast::error_code ec;
  char byte;
  slow.read_some(net::buffer(&byte, 1), ec);  // blocks until the server gives up on it
  EXPECT_TRUE(ec == net::error::eof || ec == net::error::connection_reset) << ec.message();
}

// Last: the drain is not undone.
TEST_F(HttpApiTest, ZzDrainAnswers503) {
  api_->StartDrain();
  EXPECT_EQ(Call("GET", "/health").status, 503);
  int status = 0;
  const Json r =
      Post("/v1/completions", {{"model", engine_->model_info().name}, {"prompt", "x"}}, &status);
  EXPECT_EQ(status, 503);
  EXPECT_EQ(r["error"]["type"], "service_unavailable");
}

}  // namespace
}  // namespace moleserve::server
