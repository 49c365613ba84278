#include "server/http/openai_api.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>
#include <variant>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/core/json_depth.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace moleserve::server {
namespace {

using Json = nlohmann::ordered_json;

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

// OpenAI's error object.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::optional<std::string> param;
  std::optional<std::string> code;

  Json ToJson() const {
    Json e{{"message", message}, {"type", type}, {"param", nullptr}, {"code", nullptr}};
    if (param) e["param"] = *param;
    if (code) e["code"] = *code;
    return Json{{"error", e}};
  }
};

ApiError BadParam(std::string param, std::string message) {
  return ApiError{.status = 400, .message = std::move(message), .param = std::move(param)};
}

ApiError FromStatus(const absl::Status& s) {
  ApiError e;
  e.message = std::string(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition:
      e.status = 400;
      break;
    case absl::StatusCode::kNotFound:
      e.status = 404;
      e.code = "model_not_found";
      break;
    case absl::StatusCode::kResourceExhausted:
      e.status = 429;
      e.type = "rate_limit_error";
      break;
    case absl::StatusCode::kUnavailable:
      e.status = 503;
      e.type = "service_unavailable";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      e.status = 504;
      e.type = "timeout";
      break;
    default:
      e.status = 500;
      e.type = "internal_error";
  }
  return e;
}

void SendError(HttpResponder& out, const ApiError& e) {
  out.Send(e.status, "application/json", Dump(e.ToJson()));
}

const char* FinishReasonText(engine::FinishReason r) {
  return r == engine::FinishReason::kLength ? "length" : "stop";
}

// ---------------------------------------------------------------- request parsing

struct CompletionParams {
  bool chat = false;  // /v1/chat/completions (else /v1/completions)
  std::string model;
  std::string adapter;  // "" = base model
  std::vector<std::variant<std::string, std::vector<int32_t>>> prompts;
  int32_t n = 1;
  bool stream = false;
  bool include_usage = false;
  int32_t logprobs = -1;         // -1: none; else the alternatives per token (0..20)
  bool echo = false;             // completions: the prompt comes back before the completion
  bool hide_completion = false;  // echo with max_tokens 0: only the prompt comes back
  engine::GenerateRequest base;  // everything but the input
};

// Reads an optional number field into *out, within [lo, hi].
template <typename T>
std::optional<ApiError> Number(const Json& body, const char* name, double lo, double hi, T* out) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return BadParam(name, absl::StrCat("'", name, "' must be a number"));
  const double v = it->get<double>();
  if (std::is_integral_v<T> && (!it->is_number_integer() && !it->is_number_unsigned())) {
    return BadParam(name, absl::StrCat("'", name, "' must be an integer"));
  }
  if (!(v >= lo && v <= hi)) {
    return BadParam(name,
                    absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", it->dump()));
  }
  *out = static_cast<T>(std::is_integral_v<T> ? it->get<int64_t>() : v);
  return std::nullopt;
}

std::optional<ApiError> Bool(const Json& body, const char* name, bool* out) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return BadParam(name, absl::StrCat("'", name, "' must be a boolean"));
  *out = it->get<bool>();
  return std::nullopt;
}

std::optional<ApiError> ParseModel(const Json& body, const engine::Engine& engine,
                                   CompletionParams* p) {
  auto model = body.find("model");
  if (model == body.end() || !model->is_string()) {
    return BadParam("model", "'model' is required: the base model's name or an adapter's");
  }
  p->model = model->get<std::string>();
  if (p->model == engine.model_info().name) return std::nullopt;
  const std::vector<engine::AdapterSummary> adapters = engine.ListAdapters();
  if (std::none_of(adapters.begin(), adapters.end(),
                   [&](const engine::AdapterSummary& a) { return a.name == p->model; })) {
    return ApiError{.status = 404,
                    .message = absl::StrCat("The model '", p->model, "' does not exist"),
                    .param = "model",
                    .code = "model_not_found"};
  }
  p->adapter = p->model;
  return std::nullopt;
}

// prompt: a string, a list of strings, a list of token ids, or a list of those lists.
std::optional<ApiError> ParsePrompt(const Json& body, CompletionParams* p) {
  auto prompt = body.find("prompt");
  if (prompt == body.end() || prompt->is_null()) return BadParam("prompt", "'prompt' is required");
  auto token_list = [](const Json& j, std::vector<int32_t>* ids) {
    for (const Json& t : j) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
        return false;
      }
      ids->push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    return !ids->empty();
  };
  if (prompt->is_string()) {
    p->prompts.push_back(prompt->get<std::string>());
  } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number()) {
    std::vector<int32_t> ids;
    if (!token_list(*prompt, &ids)) return BadParam("prompt", "'prompt' has an invalid token id");
    p->prompts.push_back(std::move(ids));
  } else if (prompt->is_array() && !prompt->empty()) {
    for (const Json& one : *prompt) {
      if (one.is_string()) {
        p->prompts.push_back(one.get<std::string>());
        continue;
      }
      std::vector<int32_t> ids;
      if (!one.is_array() || !token_list(one, &ids)) {
        return BadParam("prompt", "'prompt' must be a string, a list of strings or token ids");
      }
      p->prompts.push_back(std::move(ids));
    }
  } else {
    return BadParam("prompt", "'prompt' must be a string, a list of strings or token ids");
  }
  return std::nullopt;
}

// messages through the chat template: one prompt, its special tokens included.
std::optional<ApiError> ParseMessages(const Json& body, const engine::Engine& engine,
                                      CompletionParams* p) {
  auto messages = body.find("messages");
  if (messages == body.end() || !messages->is_array() || messages->empty()) {
    return BadParam("messages", "'messages' must be a non-empty list");
  }
  Json normalized = Json::array();
  for (const Json& m : *messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
      return BadParam("messages", "each message needs a string 'role'");
    }
    Json out = m;
    // Content parts of type text are joined (the templates expect a string); others refused.
    if (auto c = m.find("content"); c != m.end() && c->is_array()) {
      std::string text;
      for (const Json& part : *c) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return BadParam("messages", "only text content parts are supported");
        }
        text += part["text"].get<std::string>();
      }
      out["content"] = text;
    } else if (c != m.end() && !c->is_string() && !c->is_null()) {
      return BadParam("messages", "'content' must be a string or a list of text parts");
    }
    normalized.push_back(std::move(out));
  }
  Json tools = Json();
  if (auto t = body.find("tools"); t != body.end() && !t->is_null()) {
    if (!t->is_array()) return BadParam("tools", "'tools' must be a list");
    tools = *t;
  }
  if (auto choice = body.find("tool_choice"); choice != body.end() && !choice->is_null()) {
    if (!choice->is_string() || (*choice != "auto" && *choice != "none")) {
      return BadParam("tool_choice",
                      "'tool_choice' other than \"auto\" or \"none\" is not "
                      "supported");
    }
    if (*choice == "none") tools = Json();
  }
  bool add_generation_prompt = true;
  if (auto e = Bool(body, "add_generation_prompt", &add_generation_prompt)) return e;
  absl::StatusOr<std::string> prompt =
      engine.ApplyChatTemplate(normalized, tools, add_generation_prompt, p->adapter);
  if (!prompt.ok()) {
    ApiError e = BadParam("messages", std::string(prompt.status().message()));
    return e;
  }
  p->prompts.push_back(*std::move(prompt));
  p->base.add_bos = false;  // the template wrote the special tokens
  return std::nullopt;
}

// Everything else, shared by both endpoints (their differences: `chat`).
std::optional<ApiError> ParseSampling(const Json& body, const engine::Engine& engine,
                                      const OpenAiApiOptions& options, bool chat,
                                      CompletionParams* p) {
  // Refused until implemented, rather than silently ignored.
  for (const char* name : {"suffix", "response_format", "functions"}) {
    auto it = body.find(name);
    if (it != body.end() && !it->is_null() && !(it->is_object() && it->empty())) {
      return BadParam(name, absl::StrCat("'", name, "' is not supported"));
    }
  }
  if (!chat && body.contains("tools") && !body["tools"].is_null()) {
    return BadParam("tools", "'tools' belongs to /v1/chat/completions");
  }
  engine::GenerateRequest& r = p->base;
  r.sampling = engine.model_info().default_sampling;
  // Completions default to OpenAI's 16 tokens; chat to the server's default (the room left).
  int32_t max_tokens = chat ? 0 : 16;
  if (chat && body.contains("echo") && body["echo"] != false && !body["echo"].is_null()) {
    return BadParam("echo", "'echo' belongs to /v1/completions");
  }
  if (auto e = Bool(body, "echo", &p->echo)) return e;
  // OpenAI's legacy scoring call: echo with max_tokens 0 returns the prompt (and its logprobs)
  // alone.
  if (auto e = Number(body, "max_tokens", p->echo ? 0 : 1, INT32_MAX, &max_tokens)) return e;
  if (max_tokens == 0 && p->echo) {
    p->hide_completion = true;
    max_tokens = 1;
  }
  if (chat) {
    if (auto e = Number(body, "max_completion_tokens", 1, INT32_MAX, &max_tokens)) return e;
  }
  r.stopping.max_new_tokens = max_tokens;
  if (auto e = Number(body, "temperature", 0, 2, &r.sampling.temperature)) return e;
  if (auto e = Number(body, "top_p", 1e-9, 1, &r.sampling.top_p)) return e;
  if (auto e = Number(body, "top_k", -1, INT32_MAX, &r.sampling.top_k)) return e;
  if (r.sampling.top_k < 0) r.sampling.top_k = 0;  // vLLM: -1 = off
  if (auto e = Number(body, "min_p", 0, 1, &r.sampling.min_p)) return e;
  if (auto e = Number(body, "repetition_penalty", 0.01, 100, &r.sampling.repetition_penalty)) {
    return e;
  }
  if (auto e = Number(body, "frequency_penalty", -2, 2, &r.sampling.frequency_penalty)) return e;
  if (auto e = Number(body, "presence_penalty", -2, 2, &r.sampling.presence_penalty)) return e;
  int64_t seed = -1;
  if (auto e = Number(body, "seed", static_cast<double>(INT64_MIN), 9.2e18, &seed)) return e;
  if (body.contains("seed") && !body["seed"].is_null()) {
    r.sampling.seed = static_cast<uint64_t>(seed);
  }
  if (auto e = Number(body, "n", 1, options.max_n, &p->n)) return e;
  int32_t best_of = p->n;
  if (auto e = Number(body, "best_of", 1, options.max_n, &best_of)) return e;
  if (best_of != p->n) return BadParam("best_of", "'best_of' other than 'n' is not supported");
  if (chat) {  // logprobs: a boolean; top_logprobs: the alternatives (needs logprobs)
    bool logprobs = false;
    if (auto e = Bool(body, "logprobs", &logprobs)) return e;
    int32_t top = 0;
    if (auto e = Number(body, "top_logprobs", 0, engine::kMaxTopLogprobs, &top)) return e;
    if (top > 0 && !logprobs) {
      return BadParam("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    }
    p->logprobs = logprobs ? top : -1;
  } else {
    if (auto e = Number(body, "logprobs", 0, engine::kMaxTopLogprobs, &p->logprobs)) return e;
    if (!body.contains("logprobs") || body["logprobs"].is_null()) p->logprobs = -1;
  }
  if (p->logprobs >= 0) {
    r.logprobs = true;
    r.top_logprobs = p->logprobs;
    r.prompt_logprobs = p->echo;
  }
  if (auto bias = body.find("logit_bias"); bias != body.end() && !bias->is_null()) {
    if (!bias->is_object()) {
      return BadParam("logit_bias", "'logit_bias' must map token ids to numbers");
    }
    if (bias->size() > static_cast<size_t>(engine::kMaxLogitBiasEntries)) {
      return BadParam("logit_bias", absl::StrCat("'logit_bias' holds at most ",
                                                 engine::kMaxLogitBiasEntries, " tokens"));
    }
    for (const auto& [key, value] : bias->items()) {
      int64_t id = -1;
      if (key.empty() || key.size() > 10 ||
          !std::all_of(key.begin(), key.end(), [](char ch) { return ch >= '0' && ch <= '9'; }) ||
          (id = std::stoll(key)) >= engine.model_info().vocab_size) {
        return BadParam("logit_bias", "'logit_bias' keys must be token ids of the vocabulary");
      }
      if (!value.is_number() || !(std::fabs(value.get<double>()) <= engine::kMaxLogitBias)) {
        return BadParam("logit_bias", "'logit_bias' values must be numbers in [-100, 100]");
      }
      r.sampling.logit_bias.emplace_back(static_cast<int32_t>(id), value.get<float>());
    }
    std::sort(r.sampling.logit_bias.begin(), r.sampling.logit_bias.end());
  }
  if (auto e = Bool(body, "stream", &p->stream)) return e;
  if (auto so = body.find("stream_options"); so != body.end() && !so->is_null()) {
    if (!so->is_object()) return BadParam("stream_options", "'stream_options' must be an object");
    if (auto e = Bool(*so, "include_usage", &p->include_usage)) return e;
  }
  if (auto e = Bool(body, "ignore_eos", &r.stopping.ignore_eos)) return e;
  if (auto e = Number(body, "priority", -1000000, 1000000, &r.priority)) return e;
  if (auto stop = body.find("stop"); stop != body.end() && !stop->is_null()) {
    if (stop->is_string()) {
      r.stopping.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      for (const Json& s : *stop) {
        if (!s.is_string()) return BadParam("stop", "'stop' must be a string or a list of them");
        r.stopping.stop.push_back(s.get<std::string>());
      }
    } else {
      return BadParam("stop", "'stop' must be a string or a list of them");
    }
  }
  if (auto ids = body.find("stop_token_ids"); ids != body.end() && !ids->is_null()) {
    if (!ids->is_array()) return BadParam("stop_token_ids", "'stop_token_ids' must be a list");
    for (const Json& t : *ids) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() > INT32_MAX) {
        return BadParam("stop_token_ids", "'stop_token_ids' has an invalid token id");
      }
      r.stopping.stop_token_ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
  }
  // moleserve's extensions for MoLE adapters: the routing override and the routing trace.
  if (auto ro = body.find("routing"); ro != body.end() && !ro->is_null()) {
    if (!ro->is_object()) {
      return BadParam("routing", "'routing' must be an object {algorithm, k, p, disabled_experts}");
    }
    for (const auto& [key, value] : ro->items()) {
      if (key != "algorithm" && key != "k" && key != "p" && key != "disabled_experts") {
        return BadParam("routing",
                        "'routing' takes only 'algorithm', 'k', 'p' and 'disabled_experts'");
      }
    }
    if (auto a = ro->find("algorithm"); a != ro->end() && !a->is_null()) {
      absl::StatusOr<engine::RoutingAlgorithm> algorithm =
          a->is_string() ? engine::ParseRoutingAlgorithm(a->get<std::string>())
                         : absl::InvalidArgumentError("not a string");
      if (!algorithm.ok()) {
        return BadParam("routing",
                        "'routing.algorithm' must be one of topk, top_p, dynmole, soft, switch, "
                        "rank_topk");
      }
      r.routing_override.algorithm = *algorithm;
    }
    int32_t k = 0;
    if (auto e = Number(*ro, "k", 1, 1 << 20, &k)) return BadParam("routing", e->message);
    if (ro->contains("k") && !(*ro)["k"].is_null()) r.routing_override.k = k;
    float p_value = 0;
    if (auto e = Number(*ro, "p", 1e-9, 1, &p_value)) return BadParam("routing", e->message);
    if (ro->contains("p") && !(*ro)["p"].is_null()) r.routing_override.p = p_value;
    // Output-gated adapters: the LoRAs this request turns off (the engine checks them against
    // the adapter, as for gRPC's RoutingOverride.disabled_experts).
    if (auto d = ro->find("disabled_experts"); d != ro->end() && !d->is_null()) {
      if (!d->is_array()) {
        return BadParam("routing", "'routing.disabled_experts' must be a list of expert indices");
      }
      for (const Json& e : *d) {
        if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() > (1 << 20)) {
          return BadParam("routing", "'routing.disabled_experts' has an invalid expert index");
        }
        r.routing_override.disabled_experts.push_back(static_cast<int32_t>(e.get<int64_t>()));
      }
    }
  }
  if (auto e = Bool(body, "return_routing", &r.return_routing)) return e;
  if (auto user = body.find("user"); user != body.end() && !user->is_null() && !user->is_string()) {
    return BadParam("user", "'user' must be a string");
  }
  return std::nullopt;
}

std::optional<ApiError> ParseRequest(const Json& body, const engine::Engine& engine,
                                     const OpenAiApiOptions& options, bool chat,
                                     CompletionParams* p) {
  if (!body.is_object()) return BadParam("body", "the request body must be a JSON object");
  p->chat = chat;
  if (auto e = ParseModel(body, engine, p)) return e;
  if (auto e = ParseSampling(body, engine, options, chat, p)) return e;
  if (auto e = chat ? ParseMessages(body, engine, p) : ParsePrompt(body, p)) return e;
  if (static_cast<int64_t>(p->prompts.size()) * p->n > options.max_n) {
    return BadParam("n",
                    absl::StrCat("at most ", options.max_n, " choices per request (prompts x n)"));
  }
  return std::nullopt;
}

// ---------------------------------------------------------------- one completion call

// The choices of one /v1/completions call: one engine request each, reported to the client as
// OpenAI's response (or stream) once every choice has finished.
class CompletionCall : public std::enable_shared_from_this<CompletionCall> {
 public:
  CompletionCall(engine::Engine* engine, std::shared_ptr<HttpResponder> out, CompletionParams p,
                 std::string id)
      : engine_(engine),
        out_(std::move(out)),
        p_(std::move(p)),
        id_(std::move(id)),
        created_(absl::ToUnixSeconds(absl::Now())) {
    choices_.resize(p_.prompts.size() * p_.n);
  }

  struct Choice {
    std::string text;
    Json tokens = Json::array(), token_logprobs = Json::array(), top_logprobs = Json::array(),
         text_offset = Json::array();
    Json chat_logprobs = Json::array();  // chat's {"content": [...]} entries
    bool sent_role = false;              // chat streams open each choice with the role
    Json routing = Json::array();        // return_routing: one entry per generated token
    std::string echo;                    // the prompt's text, until sent (echo)
    bool echoed = false;
    int32_t prompt_tokens = 0, completion_tokens = 0;
    const char* finish_reason = nullptr;
    uint64_t handle = 0;
  };

  // Submits every choice; on a refusal cancels those already submitted and answers the error.
  void Submit() {
    for (size_t i = 0; i < choices_.size(); ++i) {
      engine::GenerateRequest r = p_.base;
      r.adapter = p_.adapter;
      r.protocol = engine::ClientProtocol::kHttp;
      r.request_id = absl::StrCat(id_, "-", i);
      const auto& prompt = p_.prompts[i / p_.n];
      if (std::holds_alternative<std::string>(prompt)) {
        r.text = std::get<std::string>(prompt);
      } else {
        r.token_ids = std::get<std::vector<int32_t>>(prompt);
      }
      if (p_.echo) {
        if (r.text) {
          choices_[i].echo = *r.text;
        } else {
          std::string bytes;
          for (int32_t id : r.token_ids) bytes += engine_->DecodeToken(id);
          choices_[i].echo = engine::SanitizeUtf8(bytes);
        }
      }
      // n > 1 with a seed: each choice its own stream, reproducibly.
      if (r.sampling.seed && i > 0) *r.sampling.seed += i;
      absl::StatusOr<uint64_t> handle =
          engine_->Submit(std::move(r), std::make_shared<Sink>(shared_from_this(), i));
      if (!handle.ok()) {
        std::vector<uint64_t> started;
        {
          std::lock_guard<std::mutex> lock(mu_);
          failed_ = true;
          for (size_t j = 0; j < i; ++j) started.push_back(choices_[j].handle);
        }
        for (uint64_t h : started) engine_->Cancel(h);
        ApiError e = FromStatus(handle.status());
        if (handle.status().code() == absl::StatusCode::kInvalidArgument) {
          const absl::string_view message = handle.status().message();
          if (absl::StrContains(message, "routing override") ||
              absl::StartsWith(message, "routing.")) {
            e.param = "routing";
          } else if (absl::StrContains(message, "logit_bias")) {
            e.param = "logit_bias";
          } else {
            e.param = "prompt";
          }
        }
        SendError(*out_, e);
        return;
      }
      std::lock_guard<std::mutex> lock(mu_);
      choices_[i].handle = *handle;
    }
    if (p_.stream) out_->Start(200, "text/event-stream");
    // A client that goes away cancels what is still running.
    std::weak_ptr<CompletionCall> weak = shared_from_this();
    out_->OnClose([weak] {
      if (auto call = weak.lock()) call->CancelAll();
    });
  }

 private:
  class Sink final : public engine::GenerationSink {
   public:
    Sink(std::shared_ptr<CompletionCall> call, size_t index)
        : call_(std::move(call)), index_(index) {}
    void OnChunk(engine::GenerationChunk chunk) override { call_->OnChunk(index_, chunk, nullptr); }
    void OnFinish(engine::GenerationChunk last, engine::FinishInfo info) override {
      call_->OnChunk(index_, last, &info);
    }
    void OnError(absl::Status status) override { call_->OnError(status); }

   private:
    std::shared_ptr<CompletionCall> call_;
    size_t index_;
  };

  void CancelAll() {
    std::vector<uint64_t> handles;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Choice& c : choices_) {
        if (c.finish_reason == nullptr) handles.push_back(c.handle);
      }
    }
    for (uint64_t h : handles) engine_->Cancel(h);
  }

  // One generated token's routing (return_routing): its sites, as gRPC's TokenRouting.
  static Json RoutingJson(const std::vector<engine::RoutingRecord>& records) {
    Json sites = Json::array();
    for (const engine::RoutingRecord& rec : records) {
      sites.push_back(Json{{"layer", rec.layer},
                           {"module", rec.module},
                           {"experts", rec.experts},
                           {"weights", rec.weights}});
    }
    return sites;
  }

  // The UTF-8 bytes of a token's text (chat logprobs carry them: a token may be half a
  // character).
  static Json Bytes(const std::string& piece) {
    Json out = Json::array();
    for (unsigned char b : piece) out.push_back(static_cast<int>(b));
    return out;
  }

  // Echo with logprobs: the prompt's tokens first, the first one without a logprob (nothing
  // precedes it), offsets into the echoed text.
  void AddPromptLogprobs(Choice& c, const engine::GenerationChunk& chunk, Json* delta) {
    int64_t offset = static_cast<int64_t>(c.text.size());
    const int64_t end = offset + static_cast<int64_t>(c.echo.size());
    for (size_t i = 0; i < chunk.prompt_ids.size(); ++i) {
      const std::string piece = engine_->DecodeToken(chunk.prompt_ids[i]);
      Json lp = nullptr, top = nullptr;
      if (i > 0 && i - 1 < chunk.prompt_logprobs.size()) {
        const engine::GeneratedToken& t = chunk.prompt_logprobs[i - 1];
        lp = t.logprob;
        top = Json::object();
        for (const auto& [id, value] : t.top) top[engine_->DecodeToken(id)] = value;
      }
      for (Json* j : {&c.tokens, delta ? &(*delta)["tokens"] : nullptr}) {
        if (j) j->push_back(piece);
      }
      for (Json* j : {&c.token_logprobs, delta ? &(*delta)["token_logprobs"] : nullptr}) {
        if (j) j->push_back(lp);
      }
      for (Json* j : {&c.top_logprobs, delta ? &(*delta)["top_logprobs"] : nullptr}) {
        if (j) j->push_back(top);
      }
      for (Json* j : {&c.text_offset, delta ? &(*delta)["text_offset"] : nullptr}) {
        if (j) j->push_back(std::min(offset, end));
      }
      offset += static_cast<int64_t>(piece.size());
    }
  }

  // Appends the chunk's tokens to the choice's logprobs, in the endpoint's format (and to the
  // stream's delta when given).
  void AddLogprobs(Choice& c, const engine::GenerationChunk& chunk, Json* delta) {
    for (const engine::GeneratedToken& t : chunk.tokens) {
      const std::string piece = engine_->DecodeToken(t.id);
      if (p_.chat) {
        Json top = Json::array();
        for (const auto& [id, lp] : t.top) {
          const std::string alt = engine_->DecodeToken(id);
          top.push_back(Json{{"token", alt}, {"logprob", lp}, {"bytes", Bytes(alt)}});
        }
        Json entry{{"token", piece},
                   {"logprob", t.logprob},
                   {"bytes", Bytes(piece)},
                   {"top_logprobs", std::move(top)}};
        if (delta) (*delta)["content"].push_back(entry);
        c.chat_logprobs.push_back(std::move(entry));
        continue;
      }
      Json top = Json::object();
      for (const auto& [id, lp] : t.top) top[engine_->DecodeToken(id)] = lp;
      const int64_t offset = static_cast<int64_t>(c.text.size());
      for (Json* j : {&c.tokens, delta ? &(*delta)["tokens"] : nullptr}) {
        if (j) j->push_back(piece);
      }
      for (Json* j : {&c.token_logprobs, delta ? &(*delta)["token_logprobs"] : nullptr}) {
        if (j) j->push_back(t.logprob);
      }
      for (Json* j : {&c.top_logprobs, delta ? &(*delta)["top_logprobs"] : nullptr}) {
        if (j) j->push_back(top);
      }
      for (Json* j : {&c.text_offset, delta ? &(*delta)["text_offset"] : nullptr}) {
        if (j) j->push_back(offset);
      }
    }
  }

  void OnChunk(size_t index, const engine::GenerationChunk& chunk, const engine::FinishInfo* info) {
    std::string event;
    bool all_done = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
      Choice& c = choices_[index];
      Json delta_logprobs = nullptr;
      if (p_.logprobs >= 0) {
        delta_logprobs = p_.chat ? Json{{"content", Json::array()}}
                                 : Json{{"tokens", Json::array()},
                                        {"token_logprobs", Json::array()},
                                        {"top_logprobs", Json::array()},
                                        {"text_offset", Json::array()}};
      }
      // Echo: the prompt (and its logprobs) ahead of the first chunk's text.
      std::string text;
      if (p_.echo && !c.echoed) {
        c.echoed = true;
        if (p_.logprobs >= 0) AddPromptLogprobs(c, chunk, &delta_logprobs);
        text = std::move(c.echo);
        c.echo.clear();
        c.text += text;  // before the completion's logprobs: their offsets follow the prompt
      }
      Json delta_routing = Json::array();
      if (!p_.hide_completion) {
        if (p_.base.return_routing) {
          for (const engine::GeneratedToken& t : chunk.tokens) {
            delta_routing.push_back(RoutingJson(t.routing));
            c.routing.push_back(delta_routing.back());
          }
        }
        if (p_.logprobs >= 0) AddLogprobs(c, chunk, &delta_logprobs);
        text += chunk.text;
        c.text += chunk.text;
      }
      if (info) {
        // Echo with max_tokens 0 generated nothing the client sees: "length", as OpenAI says.
        c.finish_reason = p_.hide_completion ? "length" : FinishReasonText(info->reason);
        c.prompt_tokens = info->prompt_tokens;
        c.completion_tokens = p_.hide_completion ? 0 : info->generated_tokens;
        all_done = std::all_of(choices_.begin(), choices_.end(),
                               [](const Choice& x) { return x.finish_reason != nullptr; });
      }
      if (p_.stream && (!text.empty() || (!chunk.tokens.empty() && !p_.hide_completion) || info)) {
        const Json finish = info ? Json(c.finish_reason) : Json(nullptr);
        if (p_.chat && !c.sent_role) {  // the role first, as OpenAI streams it
          c.sent_role = true;
          Json opening{{"index", index},
                       {"delta", {{"role", "assistant"}, {"content", ""}}},
                       {"logprobs", nullptr},
                       {"finish_reason", nullptr}};
          event = "data: " + Dump(Frame(Json::array({opening}))) + "\n\n";
        }
        Json choice = p_.chat
                          ? Json{{"index", index},
                                 {"delta", text.empty() ? Json::object() : Json{{"content", text}}},
                                 {"logprobs", delta_logprobs},
                                 {"finish_reason", finish}}
                          : Json{{"index", index},
                                 {"text", text},
                                 {"logprobs", delta_logprobs},
                                 {"finish_reason", finish}};
        if (p_.base.return_routing) choice["routing"] = std::move(delta_routing);
        event += "data: " + Dump(Frame(Json::array({choice}))) + "\n\n";
        if (all_done && p_.include_usage) {
          Json usage_frame = Frame(Json::array());
          usage_frame["usage"] = Usage();
          event += "data: " + Dump(usage_frame) + "\n\n";
        }
        if (all_done) event += "data: [DONE]\n\n";
      }
    }
    if (p_.stream) {
      if (!event.empty()) out_->Write(std::move(event));
      if (all_done) out_->Finish();
      return;
    }
    if (all_done) Respond();
  }

  void OnError(const absl::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
      failed_ = true;
    }
    CancelAll();
    if (out_->closed()) return;  // the client left: nobody to tell
    const ApiError e = FromStatus(status);
    if (p_.stream) {
      out_->Write("data: " + Dump(e.ToJson()) + "\n\ndata: [DONE]\n\n");
      out_->Finish();
    } else {
      SendError(*out_, e);
    }
  }

  Json Frame(Json choices) const {
    return Json{{"id", id_},
                {"object", !p_.chat    ? "text_completion"
                           : p_.stream ? "chat.completion.chunk"
                                       : "chat.completion"},
                {"created", created_},
                {"model", p_.model},
                {"choices", std::move(choices)}};
  }

  Json Usage() const {
    int64_t prompt = 0, completion = 0;
    for (size_t i = 0; i < choices_.size(); ++i) {
      if (i % p_.n == 0) prompt += choices_[i].prompt_tokens;  // each prompt counted once
      completion += choices_[i].completion_tokens;
    }
    return Json{{"prompt_tokens", prompt},
                {"completion_tokens", completion},
                {"total_tokens", prompt + completion}};
  }

  void Respond() {
    Json choices = Json::array();
    Json body;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < choices_.size(); ++i) {
        const Choice& c = choices_[i];
        Json logprobs = nullptr;
        if (p_.logprobs >= 0 && p_.chat) {
          logprobs = Json{{"content", c.chat_logprobs}};
        } else if (p_.logprobs >= 0) {
          logprobs = Json{{"tokens", c.tokens},
                          {"token_logprobs", c.token_logprobs},
                          {"top_logprobs", c.top_logprobs},
                          {"text_offset", c.text_offset}};
        }
        if (p_.chat) {
          choices.push_back(Json{{"index", i},
                                 {"message", {{"role", "assistant"}, {"content", c.text}}},
                                 {"logprobs", logprobs},
                                 {"finish_reason", c.finish_reason}});
        } else {
          choices.push_back(Json{{"index", i},
                                 {"text", c.text},
                                 {"logprobs", logprobs},
                                 {"finish_reason", c.finish_reason}});
        }
        if (p_.base.return_routing) choices.back()["routing"] = c.routing;
      }
      body = Frame(std::move(choices));
      body["usage"] = Usage();
    }
    out_->Send(200, "application/json", Dump(body));
  }

  engine::Engine* engine_;
  std::shared_ptr<HttpResponder> out_;
  const CompletionParams p_;
  const std::string id_;
  const int64_t created_;
  std::mutex mu_;
  std::vector<Choice> choices_;
  bool failed_ = false;
};

}  // namespace

OpenAiApi::OpenAiApi(engine::Engine* engine, OpenAiApiOptions options)
    : engine_(engine), options_(options) {}

void OpenAiApi::Handle(HttpRequest request, std::shared_ptr<HttpResponder> out) {
  const std::string& path = request.path;
  if (path == "/health") {
    if (draining_.load()) {
      out->Send(503, "text/plain", "draining\n");
    } else if (!ready_.load()) {
      out->Send(503, "text/plain", "loading start-up adapters\n");
    } else {
      out->Send(200, "text/plain", "ok\n");
    }
    return;
  }
  if (path == "/metrics" && options_.metrics_text) {
    if (request.method != "GET") return SendError(*out, {.status = 405, .message = "use GET"});
    out->Send(200, "text/plain; version=0.0.4", options_.metrics_text());
    return;
  }
  if (path == "/v1/models" || absl::StartsWith(path, "/v1/models/")) {
    if (request.method != "GET") {
      return SendError(*out, {.status = 405, .message = "use GET"});
    }
    return Models(request, *out);
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions") {
    if (request.method != "POST") {
      return SendError(*out, {.status = 405, .message = "use POST"});
    }
    if (draining_.load()) {
      return SendError(
          *out,
          {.status = 503, .message = "the server is shutting down", .type = "service_unavailable"});
    }
    return Completions(request, std::move(out));
  }
  SendError(*out, {.status = 404,
                   .message = absl::StrCat("no route ", request.method, " ", path),
                   .type = "not_found_error"});
}

void OpenAiApi::Models(const HttpRequest& request, HttpResponder& out) const {
  const engine::ModelInfo& info = engine_->model_info();
  Json data = Json::array();
  data.push_back(Json{{"id", info.name},
                      {"object", "model"},
                      {"created", 0},
                      {"owned_by", "moleserve"},
                      {"root", info.name},
                      {"parent", nullptr},
                      {"max_model_len", info.context_length}});
  for (const engine::AdapterSummary& a : engine_->ListAdapters()) {
    data.push_back(Json{{"id", a.name},
                        {"object", "model"},
                        {"created", 0},
                        {"owned_by", "moleserve"},
                        {"root", a.name},
                        {"parent", info.name},
                        {"family", a.family},
                        {"max_model_len", info.context_length}});
  }
  if (request.path == "/v1/models") {
    out.Send(200, "application/json", Dump(Json{{"object", "list"}, {"data", data}}));
    return;
  }
  const std::string id = request.path.substr(std::string("/v1/models/").size());
  for (const Json& m : data) {
    if (m["id"] == id) {
      out.Send(200, "application/json", Dump(m));
      return;
    }
  }
  SendError(out, {.status = 404,
                  .message = absl::StrCat("The model '", id, "' does not exist"),
                  .param = "model",
                  .code = "model_not_found"});
}

void OpenAiApi::Completions(const HttpRequest& request, std::shared_ptr<HttpResponder> out) {
  // Nesting is bounded before parsing: copying or dumping a value nested a million levels deep
  // would overflow the stack.
  if (engine::JsonNestingDepth(request.body) > engine::kMaxJsonDepth) {
    engine_->CountRejected(absl::StatusCode::kInvalidArgument, engine::ClientProtocol::kHttp);
    return SendError(*out, BadParam("body", absl::StrCat("the request body nests deeper than ",
                                                         engine::kMaxJsonDepth, " levels")));
  }
  Json body = Json::parse(request.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    engine_->CountRejected(absl::StatusCode::kInvalidArgument, engine::ClientProtocol::kHttp);
    return SendError(*out, BadParam("body", "the request body is not valid JSON"));
  }
  const bool chat = request.path == "/v1/chat/completions";
  CompletionParams params;
  if (std::optional<ApiError> e = ParseRequest(body, *engine_, options_, chat, &params)) {
    // Counted with the engine's own refusals (moleserve_requests_rejected_total).
    engine_->CountRejected(
        e->status == 404 ? absl::StatusCode::kNotFound : absl::StatusCode::kInvalidArgument,
        engine::ClientProtocol::kHttp);
    return SendError(*out, *e);
  }
  auto call = std::make_shared<CompletionCall>(
      engine_, out, std::move(params),
      absl::StrCat(chat ? "chatcmpl-" : "cmpl-", next_id_.fetch_add(1)));
  call->Submit();
}

}  // namespace moleserve::server
