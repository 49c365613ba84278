// End-to-end tests of the gRPC server: an in-process MoleServer on 127.0.0.1:0 around a CPU
// engine with the built-in demo model (byte-level tokenizer: ids 0..255 are bytes, BOS 256,
// EOS 257), driven through the generated stub. Each TEST runs in its own process under ctest
// (gtest_discover_tests), so every test starts its own engine and server.

#include "server/grpc/server.h"

#include <arpa/inet.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/model_io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "server/grpc/health_client.h"
#include "server/grpc/metadata.h"
#include "server/http/http_server.h"
#include "server/http/openai_api.h"
#include "server/metrics/prometheus_metrics.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/metrics_scrape.h"

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint32_t kBos = 256;
// A hang guard, not a speed bound (the suite must pass on a loaded machine).
constexpr absl::Duration kCallTimeout = absl::Seconds(240);

engine::EngineOptions SmallEngineOptions() {
  engine::EngineOptions o;
  o.num_threads = 2;
  o.kv_cache_bytes = int64_t{64} << 20;
  return o;
}

// One engine + server (+ optional /metrics) and a client stub. Members are destroyed in reverse
// order: the client, then the server, then the engine, then the metrics sink it reports to.
struct Instance {
  std::unique_ptr<PrometheusMetrics> metrics;
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<MoleServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::Inference::Stub> stub;

  static std::unique_ptr<Instance> Start(engine::EngineOptions engine_options,
                                         ServerOptions server_options = {},
                                         bool with_metrics = false) {
    auto inst = std::make_unique<Instance>();
    if (with_metrics) {
      auto m = PrometheusMetrics::Create("127.0.0.1:0");
      EXPECT_TRUE(m.ok()) << m.status();
      if (!m.ok()) return nullptr;
      inst->metrics = *std::move(m);
      engine_options.metrics = inst->metrics.get();
    }
    auto e = engine::Engine::Create(engine_options);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return nullptr;
    inst->engine = *std::move(e);
    server_options.listen_address = "127.0.0.1:0";
    auto s = MoleServer::Start(inst->engine.get(), server_options);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    inst->server = *std::move(s);
    EXPECT_GT(inst->server->port(), 0);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    inst->channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", inst->server->port()),
                                              grpc::InsecureChannelCredentials(), args);
    inst->stub = pb::Inference::NewStub(inst->channel);
    return inst;
  }

  // Waits (bounded) until the engine holds no request and every KV block is free.
  bool WaitEngineIdle(absl::Duration timeout = absl::Seconds(10)) const {
    const absl::Time end = absl::Now() + timeout;
    while (absl::Now() < end) {
      engine::EngineStats s = engine->Stats();
      if (s.running == 0 && s.waiting == 0 && s.in_flight == 0 &&
          s.free_kv_blocks == s.total_kv_blocks) {
        return true;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    engine::EngineStats s = engine->Stats();
    ADD_FAILURE() << "engine not idle: running=" << s.running << " waiting=" << s.waiting
                  << " in_flight=" << s.in_flight << " free_kv_blocks=" << s.free_kv_blocks
                  << " total_kv_blocks=" << s.total_kv_blocks;
    return false;
  }
};

void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
}

pb::GenerateRequest Greedy(const std::string& text, uint32_t max_new_tokens) {
  pb::GenerateRequest req;
  req.set_text(text);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_stopping()->set_max_new_tokens(max_new_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

struct GenResult {
  grpc::Status status;
  std::vector<pb::GenerateResponse> messages;
  std::vector<uint32_t> ids;
  std::string text;
  int finals = 0;  // messages that carried `final`
  pb::FinalInfo final;
};

GenResult RunGenerate(pb::Inference::Stub& stub, const pb::GenerateRequest& req,
                      absl::Duration timeout = kCallTimeout,
                      const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
  GenResult r;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, timeout);
  for (const auto& [key, value] : metadata) ctx.AddMetadata(key, value);
  std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader = stub.Generate(&ctx, req);
  pb::GenerateResponse msg;
  while (reader->Read(&msg)) {
    r.ids.insert(r.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    r.text += msg.text();
    if (msg.has_final()) {
      ++r.finals;
      r.final = msg.final();
    }
    r.messages.push_back(msg);
  }
  r.status = reader->Finish();
  return r;
}

// The status of a Generate call that is expected to fail before producing anything.
grpc::Status GenerateStatus(pb::Inference::Stub& stub, const pb::GenerateRequest& req) {
  GenResult r = RunGenerate(stub, req, absl::Seconds(30));
  EXPECT_TRUE(r.ids.empty()) << "a rejected request produced tokens";
  return r.status;
}

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    int len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<uint8_t>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

std::string AsciiOnly(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (static_cast<uint8_t>(c) < 0x80) out.push_back(c);
  }
  return out;
}

// The raw bytes of generated tokens, as the engine's tokenizer decodes them one by one.
std::string RawBytes(const engine::Engine& engine, const std::vector<uint32_t>& ids) {
  std::string out;
  for (uint32_t id : ids) out += engine.DecodeToken(static_cast<int32_t>(id));
  return out;
}

// A quick request that must succeed: the server still serves after an error.
void ExpectStillServing(pb::Inference::Stub& stub) {
  GenResult r = RunGenerate(stub, Greedy("ok", 2), absl::Seconds(30));
  EXPECT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 2u);
}

// ---------------------------------------------------------------------------------------------
// Streaming and sampling

TEST(ServerTest, StreamsExactlyMaxNewTokensWithFinalOnLastMessage) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kN = 24;
  pb::GenerateRequest req = Greedy("Hello, world", kN);
  req.set_request_id("stream-1");
  GenResult r = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_FALSE(r.messages.empty());
  EXPECT_EQ(r.ids.size(), kN);
  EXPECT_EQ(r.finals, 1);
  EXPECT_TRUE(r.messages.back().has_final());
  for (const pb::GenerateResponse& m : r.messages) EXPECT_EQ(m.request_id(), "stream-1");
  for (uint32_t id : r.ids) EXPECT_LT(id, 260u);
  EXPECT_EQ(r.final.finish_reason(), pb::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.final.prompt_tokens(), 13u);  // BOS + 12 bytes
  EXPECT_EQ(r.final.generated_tokens(), kN);
  EXPECT_TRUE(r.final.matched_stop().empty());
  EXPECT_GT(r.final.timings().time_to_first_token_seconds(), 0.0);
  EXPECT_GE(r.final.timings().total_seconds(), r.final.timings().time_to_first_token_seconds());
  // No logprobs unless asked for.
  for (const pb::GenerateResponse& m : r.messages) EXPECT_EQ(m.logprobs_size(), 0);

  // The text is the sanitized UTF-8 of the tokens' bytes: always valid, and byte-identical when
  // the bytes themselves are valid UTF-8.
  EXPECT_TRUE(IsValidUtf8(r.text));
  const std::string raw = RawBytes(*inst->engine, r.ids);
  if (IsValidUtf8(raw)) {
    EXPECT_EQ(r.text, raw);
  } else {
    // Invalid sequences become U+FFFD, which contains no ASCII byte; ASCII bytes pass unchanged.
    EXPECT_EQ(AsciiOnly(r.text), AsciiOnly(raw));
    EXPECT_NE(r.text.find("\xEF\xBF\xBD"), std::string::npos);
  }

  // An empty request_id gets a server-assigned one, echoed on every message.
  GenResult anon = RunGenerate(*inst->stub, Greedy("Hello, world", 4));
  ASSERT_TRUE(anon.status.ok());
  ASSERT_FALSE(anon.messages.empty());
  const std::string assigned = anon.messages.front().request_id();
  EXPECT_FALSE(assigned.empty());
  for (const pb::GenerateResponse& m : anon.messages) EXPECT_EQ(m.request_id(), assigned);
  // Greedy decoding is deterministic: the 4 tokens are the first 4 of the 24.
  EXPECT_EQ(anon.ids, std::vector<uint32_t>(r.ids.begin(), r.ids.begin() + 4));

  // Token-id input gives the same result as the equivalent text.
  pb::GenerateRequest by_ids = Greedy("", kN);
  for (uint32_t id : {kBos, 72u, 101u, 108u, 108u, 111u, 44u, 32u, 119u, 111u, 114u, 108u, 100u}) {
    by_ids.mutable_token_ids()->add_ids(id);
  }
  GenResult r2 = RunGenerate(*inst->stub, by_ids);
  ASSERT_TRUE(r2.status.ok());
  EXPECT_EQ(r2.ids, r.ids);
  EXPECT_EQ(r2.final.prompt_tokens(), 13u);
}

TEST(ServerTest, SameSeedSameTokensAndGreedyIsDeterministic) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  auto sampled = [&](uint64_t seed) {
    pb::GenerateRequest req;
    req.set_text("Once upon a time");
    req.mutable_sampling()->set_temperature(1.0f);
    req.mutable_sampling()->set_seed(seed);
    req.mutable_stopping()->set_max_new_tokens(32);
    req.mutable_stopping()->set_ignore_eos(true);
    GenResult r = RunGenerate(*inst->stub, req);
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.ids.size(), 32u);
    return r;
  };
  GenResult a = sampled(42);
  GenResult b = sampled(42);
  GenResult c = sampled(43);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(a.text, b.text);
  // 32 tokens sampled at temperature 1 from a random model: another seed gives other tokens.
  EXPECT_NE(a.ids, c.ids);

  GenResult g1 = RunGenerate(*inst->stub, Greedy("Once upon a time", 32));
  GenResult g2 = RunGenerate(*inst->stub, Greedy("Once upon a time", 32));
  ASSERT_TRUE(g1.status.ok());
  ASSERT_TRUE(g2.status.ok());
  EXPECT_EQ(g1.ids.size(), 32u);
  EXPECT_EQ(g1.ids, g2.ids);
  EXPECT_EQ(g1.text, g2.text);
}

TEST(ServerTest, LogprobsAndTopLogprobsPerToken) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kN = 16;
  constexpr int kTop = 5;
  pb::GenerateRequest req = Greedy("The quick brown fox", kN);
  req.mutable_output()->set_logprobs(true);
  req.mutable_output()->set_top_logprobs(kTop);
  GenResult r = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(r.ids.size(), kN);
  size_t n = 0;
  for (const pb::GenerateResponse& m : r.messages) {
    ASSERT_EQ(m.logprobs_size(), m.token_ids_size());
    for (int i = 0; i < m.logprobs_size(); ++i, ++n) {
      const pb::TokenLogprob& lp = m.logprobs(i);
      EXPECT_EQ(lp.token_id(), m.token_ids(i));
      EXPECT_LE(lp.logprob(), 0.0f);
      EXPECT_TRUE(std::isfinite(lp.logprob()));
      ASSERT_EQ(lp.top_size(), kTop) << "token " << n;
      double mass = 0;
      for (int k = 0; k < kTop; ++k) {
        EXPECT_LE(lp.top(k).logprob(), 0.0f);
        EXPECT_LT(lp.top(k).token_id(), 260u);
        if (k > 0) {
          EXPECT_GE(lp.top(k - 1).logprob(), lp.top(k).logprob()) << "token " << n;
        }
        mass += std::exp(lp.top(k).logprob());
      }
      EXPECT_LE(mass, 1.0 + 1e-4);
      // Greedy picks the most likely token: its logprob is the top one.
      EXPECT_NEAR(lp.logprob(), lp.top(0).logprob(), 1e-5) << "token " << n;
    }
  }
  EXPECT_EQ(n, kN);

  // logprobs without alternatives.
  pb::GenerateRequest plain = Greedy("The quick brown fox", 4);
  plain.mutable_output()->set_logprobs(true);
  GenResult p = RunGenerate(*inst->stub, plain);
  ASSERT_TRUE(p.status.ok());
  size_t count = 0;
  for (const pb::GenerateResponse& m : p.messages) {
    for (const pb::TokenLogprob& lp : m.logprobs()) {
      EXPECT_EQ(lp.top_size(), 0);
      EXPECT_LE(lp.logprob(), 0.0f);
      ++count;
    }
  }
  EXPECT_EQ(count, 4u);
}

// Prompt logprobs over gRPC: the prompt's ids, then one scored entry per prompt token after the
// first, before the first generated token; a prompt that is the greedy continuation of its
// first part scores those tokens with the logprobs they were generated with (the engine test
// checks the values against the torch reference). logit_bias steers the same request.
TEST(ServerTest, PromptLogprobsAndLogitBias) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  pb::GenerateRequest first = Greedy("Score this", 6);
  first.mutable_output()->set_logprobs(true);
  GenResult gen = RunGenerate(*inst->stub, first);
  ASSERT_TRUE(gen.status.ok()) << gen.status.error_message();
  std::vector<float> gen_lp;
  for (const pb::GenerateResponse& m : gen.messages) {
    for (const pb::TokenLogprob& lp : m.logprobs()) gen_lp.push_back(lp.logprob());
  }
  pb::TokenizeRequest treq;
  treq.set_text("Score this");
  pb::TokenizeResponse tresp;
  grpc::ClientContext tctx;
  ASSERT_TRUE(inst->stub->Tokenize(&tctx, treq, &tresp).ok());
  std::vector<uint32_t> prompt(tresp.ids().begin(), tresp.ids().end());
  const size_t context = prompt.size();
  prompt.insert(prompt.end(), gen.ids.begin(), gen.ids.end());

  pb::GenerateRequest req;
  for (uint32_t id : prompt) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_temperature(0);
  req.mutable_stopping()->set_max_new_tokens(3);
  req.mutable_output()->set_prompt_logprobs(true);
  req.mutable_output()->set_top_logprobs(2);
  GenResult r = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  std::vector<uint32_t> prompt_ids;
  std::vector<pb::TokenLogprob> scored;
  bool tokens_seen = false;
  for (const pb::GenerateResponse& m : r.messages) {
    if (m.prompt_logprobs_size() > 0) {
      EXPECT_FALSE(tokens_seen) << "prompt scores come first";
    }
    tokens_seen = tokens_seen || m.token_ids_size() > 0;
    prompt_ids.insert(prompt_ids.end(), m.prompt_token_ids().begin(), m.prompt_token_ids().end());
    scored.insert(scored.end(), m.prompt_logprobs().begin(), m.prompt_logprobs().end());
    EXPECT_EQ(m.logprobs_size(), m.token_ids_size());  // top_logprobs implies logprobs
  }
  EXPECT_EQ(prompt_ids, prompt);
  ASSERT_EQ(scored.size(), prompt.size() - 1);
  for (size_t i = 0; i < scored.size(); ++i) {
    EXPECT_EQ(scored[i].token_id(), prompt[i + 1]);
    EXPECT_EQ(scored[i].top_size(), 2);
  }
  for (size_t i = 0; i < gen_lp.size(); ++i) {
    EXPECT_NEAR(scored[context - 1 + i].logprob(), gen_lp[i], 1e-4) << "continuation token " << i;
  }

  // logit_bias through the proto map: +100 on one token makes greedy decoding repeat it.
  pb::GenerateRequest biased = Greedy("Anything", 4);
  (*biased.mutable_sampling()->mutable_logit_bias())[66] = 100.0f;
  GenResult b = RunGenerate(*inst->stub, biased);
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(b.ids, std::vector<uint32_t>(4, 66));
  (*biased.mutable_sampling()->mutable_logit_bias())[66] = 1000.0f;
  EXPECT_EQ(GenerateStatus(*inst->stub, biased).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// ---------------------------------------------------------------------------------------------
// Stopping

TEST(ServerTest, StopSequenceSpanningTokensEndsTheTextBeforeIt) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kN = 64;
  const std::string prompt = "The quick brown fox";
  GenResult full = RunGenerate(*inst->stub, Greedy(prompt, kN));
  ASSERT_TRUE(full.status.ok());
  ASSERT_EQ(full.ids.size(), kN);
  // Byte offset where each token's bytes end.
  std::vector<size_t> end_of_token;
  std::string raw;
  for (uint32_t id : full.ids) {
    raw += inst->engine->DecodeToken(static_cast<int32_t>(id));
    end_of_token.push_back(raw.size());
  }
  // A 3-byte printable-ASCII stop string from the middle of the output (so it spans 3 tokens).
  // ASCII bytes survive UTF-8 sanitization unchanged and never occur inside a replacement
  // character, so the stop string occurs in the returned text exactly where it occurs in the
  // bytes, and the expected text is the greedy text up to its first occurrence.
  constexpr size_t kLen = 3;
  auto printable = [](const std::string& s) {
    for (char c : s) {
      if (c < 0x20 || c > 0x7e) return false;
    }
    return true;
  };
  // Prefer a window of mixed characters (a run of one repeated byte is a weaker test).
  std::optional<std::string> stop;
  size_t first = 0;
  for (bool mixed : {true, false}) {
    for (size_t start = raw.size() / 3; start + kLen <= raw.size() && !stop; ++start) {
      const std::string cand = raw.substr(start, kLen);
      if (!printable(cand) || (mixed && cand == std::string(kLen, cand[0]))) continue;
      const size_t pos = raw.find(cand);
      if (pos == 0) continue;
      stop = cand;
      first = pos;
    }
  }
  ASSERT_TRUE(stop.has_value()) << "no printable 3-byte window in the greedy output";
  const size_t text_pos = full.text.find(*stop);
  ASSERT_NE(text_pos, std::string::npos);
  // The token whose bytes complete the first match.
  size_t last_token = 0;
  while (end_of_token[last_token] < first + kLen) ++last_token;
  ASSERT_GE(last_token, 2u);

  pb::GenerateRequest req = Greedy(prompt, kN);
  req.mutable_stopping()->add_stop("this never appears \x01");
  req.mutable_stopping()->add_stop(*stop);
  GenResult r = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.finish_reason(), pb::FINISH_REASON_STOP_SEQUENCE);
  EXPECT_EQ(r.final.matched_stop(), *stop);
  EXPECT_EQ(r.text, full.text.substr(0, text_pos));
  if (IsValidUtf8(raw.substr(0, first))) {
    EXPECT_EQ(r.text, raw.substr(0, first));
  }
  EXPECT_EQ(r.ids, std::vector<uint32_t>(full.ids.begin(), full.ids.begin() + last_token + 1));
  EXPECT_EQ(r.final.generated_tokens(), last_token + 1);
  EXPECT_TRUE(inst->WaitEngineIdle());
}

TEST(ServerTest, StopTokenIdEndsAfterThatToken) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kN = 32;
  GenResult full = RunGenerate(*inst->stub, Greedy("Stop token: ", kN));
  ASSERT_TRUE(full.status.ok());
  ASSERT_EQ(full.ids.size(), kN);
  const uint32_t stop_id = full.ids[kN / 2];
  size_t first = 0;
  while (full.ids[first] != stop_id) ++first;

  pb::GenerateRequest req = Greedy("Stop token: ", kN);
  req.mutable_stopping()->add_stop_token_ids(stop_id);
  GenResult r = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.final.finish_reason(), pb::FINISH_REASON_STOP_TOKEN);
  EXPECT_EQ(r.final.matched_stop(), absl::StrCat(stop_id));
  EXPECT_EQ(r.ids, std::vector<uint32_t>(full.ids.begin(), full.ids.begin() + first + 1));
  EXPECT_EQ(r.final.generated_tokens(), first + 1);
}

// ---------------------------------------------------------------------------------------------
// Cancellation and deadlines

TEST(ServerTest, ClientCancelMidStreamFreesKvBlocks) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  const engine::EngineStats before = inst->engine->Stats();
  ASSERT_GT(before.total_kv_blocks, 0);
  ASSERT_EQ(before.free_kv_blocks, before.total_kv_blocks);

  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  auto reader = inst->stub->Generate(&ctx, Greedy("A long story", 1500));
  pb::GenerateResponse msg;
  size_t tokens = 0;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(reader->Read(&msg));
    EXPECT_FALSE(msg.has_final());
    tokens += msg.token_ids_size();
  }
  EXPECT_GT(tokens, 0u);
  // The request holds KV blocks while it runs.
  EXPECT_LT(inst->engine->Stats().free_kv_blocks, before.total_kv_blocks);
  ctx.TryCancel();
  for (int i = 0; i < 2000 && reader->Read(&msg); ++i) {
    EXPECT_FALSE(msg.has_final());
  }
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED) << status.error_message();
  EXPECT_TRUE(inst->WaitEngineIdle());
  EXPECT_LT(inst->engine->Stats().steps, 1000) << "the cancelled request ran to completion";
  ExpectStillServing(*inst->stub);
}

TEST(ServerTest, DeadlineExceededFreesKvBlocks) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  GenResult r = RunGenerate(*inst->stub, Greedy("A long story", 2000), absl::Milliseconds(200));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << r.status.error_message();
  EXPECT_LT(r.ids.size(), 2000u);
  EXPECT_EQ(r.finals, 0);
  EXPECT_TRUE(inst->WaitEngineIdle());
  EXPECT_LT(inst->engine->Stats().steps, 1500) << "the expired request ran to completion";
  ExpectStillServing(*inst->stub);
}

// ---------------------------------------------------------------------------------------------
// Bad input: every rejection has its status code, and the server keeps serving.

TEST(ServerTest, InvalidArgumentsAreRejectedWithTheirCodes) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  pb::Inference::Stub& stub = *inst->stub;

  struct Case {
    std::string name;
    pb::GenerateRequest req;
    grpc::StatusCode code;
    std::string message_part;  // expected in the error message
  };
  std::vector<Case> cases;
  auto add = [&](std::string name, grpc::StatusCode code, std::string part, auto edit) {
    pb::GenerateRequest req = Greedy("Hello", 8);
    edit(req);
    cases.push_back({std::move(name), std::move(req), code, std::move(part)});
  };
  using C = grpc::StatusCode;
  add("empty text", C::INVALID_ARGUMENT, "empty", [](pb::GenerateRequest& r) { r.set_text(""); });
  add("no input", C::INVALID_ARGUMENT, "input", [](pb::GenerateRequest& r) { r.clear_input(); });
  add("empty token_ids", C::INVALID_ARGUMENT, "empty",
      [](pb::GenerateRequest& r) { r.mutable_token_ids(); });
  add("max_new_tokens past the context", C::INVALID_ARGUMENT, "context",
      [](pb::GenerateRequest& r) { r.mutable_stopping()->set_max_new_tokens(5000); });
  add("negative temperature", C::INVALID_ARGUMENT, "temperature",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-0.5f); });
  add("top_p 0", C::INVALID_ARGUMENT, "top_p",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0.0f); });
  add("top_p 1.5", C::INVALID_ARGUMENT, "top_p",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_top_p(1.5f); });
  add("top_k -1", C::INVALID_ARGUMENT, "top_k",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_top_k(-1); });
  add("min_p 2", C::INVALID_ARGUMENT, "min_p",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_min_p(2.0f); });
  add("repetition_penalty 0", C::INVALID_ARGUMENT, "repetition_penalty",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_repetition_penalty(0.0f); });
  add("frequency_penalty 3", C::INVALID_ARGUMENT, "frequency_penalty",
      [](pb::GenerateRequest& r) { r.mutable_sampling()->set_frequency_penalty(3.0f); });
  add("top_logprobs 50", C::INVALID_ARGUMENT, "top_logprobs",
      [](pb::GenerateRequest& r) { r.mutable_output()->set_top_logprobs(50); });
  add("token id 999", C::INVALID_ARGUMENT, "999", [](pb::GenerateRequest& r) {
    r.mutable_token_ids()->add_ids(kBos);
    r.mutable_token_ids()->add_ids(999);
  });
  add("stop token id 999", C::INVALID_ARGUMENT, "stop_token_ids",
      [](pb::GenerateRequest& r) { r.mutable_stopping()->add_stop_token_ids(999); });
  add("17 stop strings", C::INVALID_ARGUMENT, "stop", [](pb::GenerateRequest& r) {
    for (int i = 0; i < 17; ++i) r.mutable_stopping()->add_stop(absl::StrCat("s", i));
  });
  add("empty stop string", C::INVALID_ARGUMENT, "stop",
      [](pb::GenerateRequest& r) { r.mutable_stopping()->add_stop(""); });
  add("unknown adapter", C::NOT_FOUND, "no-such-adapter",
      [](pb::GenerateRequest& r) { r.set_adapter("no-such-adapter"); });

  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    grpc::Status s = GenerateStatus(stub, c.req);
    EXPECT_EQ(s.error_code(), c.code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(c.message_part));
    ExpectStillServing(stub);
  }
  EXPECT_TRUE(inst->WaitEngineIdle());
}

TEST(ServerTest, OversizedMessageAndFullQueueAreResourceExhausted) {
  engine::EngineOptions options = SmallEngineOptions();
  options.max_num_seqs = 1;
  options.max_queue = 1;
  auto inst = Instance::Start(options, {.max_receive_message_bytes = 64 << 10});
  ASSERT_NE(inst, nullptr);
  pb::Inference::Stub& stub = *inst->stub;

  // A 200 KiB request against a 64 KiB limit.
  grpc::Status big = GenerateStatus(stub, Greedy(std::string(200 << 10, 'a'), 4));
  EXPECT_EQ(big.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << big.error_message();
  ExpectStillServing(stub);

  // Hold the single running slot, fill the single queue slot, then one more is refused.
  struct Background {
    grpc::ClientContext ctx;
    grpc::Status status;
    std::thread thread;
  };
  auto start_background = [&](Background* b, uint32_t max_new_tokens) {
    SetDeadline(&b->ctx, kCallTimeout);
    b->thread = std::thread([&stub, b, max_new_tokens] {
      auto reader = stub.Generate(&b->ctx, Greedy("hold the slot", max_new_tokens));
      pb::GenerateResponse msg;
      for (int i = 0; i < 5000 && reader->Read(&msg); ++i) {
      }
      b->status = reader->Finish();
    });
  };
  auto wait_for = [&](auto pred) {
    const absl::Time end = absl::Now() + absl::Seconds(10);
    while (absl::Now() < end && !pred(inst->engine->Stats())) absl::SleepFor(absl::Milliseconds(5));
    return pred(inst->engine->Stats());
  };
  // The demo model finishes the holder in a few seconds; on a loaded machine the second call may
  // arrive after that, so the setup is retried until both slots are seen taken at once.
  bool filled = false;
  for (int attempt = 0; attempt < 5 && !filled; ++attempt) {
    auto running = std::make_unique<Background>();
    auto waiting = std::make_unique<Background>();
    start_background(running.get(), 1900);
    const bool holding = wait_for([](const engine::EngineStats& s) { return s.running == 1; });
    start_background(waiting.get(), 100);
    filled = holding && wait_for([](const engine::EngineStats& s) {
               return s.running == 1 && s.waiting == 1;
             });
    if (filled) {
      grpc::Status full = GenerateStatus(stub, Greedy("one too many", 4));
      EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << full.error_message();
      EXPECT_THAT(full.error_message(), HasSubstr("queue is full"));
    }
    running->ctx.TryCancel();
    waiting->ctx.TryCancel();
    running->thread.join();
    waiting->thread.join();
    EXPECT_TRUE(inst->WaitEngineIdle());
  }
  EXPECT_TRUE(filled) << "never saw the running and the queue slot taken at once";
  ExpectStillServing(stub);
}

// ---------------------------------------------------------------------------------------------
// Concurrency

// ---------------------------------------------------------------------------------------------
// n sequences per call

// One call's messages split by GenerateResponse.index.
struct PerIndex {
  std::vector<uint32_t> ids;
  std::vector<float> logprobs;
  std::vector<uint32_t> prompt_token_ids;
  size_t prompt_logprobs = 0;
  int finals = 0;
  bool after_final = false;  // a message of this index came after its final
};
std::map<uint32_t, PerIndex> SplitByIndex(const GenResult& r) {
  std::map<uint32_t, PerIndex> out;
  for (const pb::GenerateResponse& m : r.messages) {
    PerIndex& p = out[m.index()];
    if (p.finals > 0) p.after_final = true;
    p.ids.insert(p.ids.end(), m.token_ids().begin(), m.token_ids().end());
    for (const pb::TokenLogprob& lp : m.logprobs()) p.logprobs.push_back(lp.logprob());
    p.prompt_token_ids.insert(p.prompt_token_ids.end(), m.prompt_token_ids().begin(),
                              m.prompt_token_ids().end());
    p.prompt_logprobs += m.prompt_logprobs_size();
    if (m.has_final()) ++p.finals;
  }
  return out;
}

TEST(ServerTest, NSequencesShareThePromptAndSampleLikeSeparateCallsWithSeedPlusIndex) {
  auto inst = Instance::Start(SmallEngineOptions(), {.max_n = 4});
  ASSERT_NE(inst, nullptr);
  // 5+ full KV blocks of prompt (16 tokens each).
  const std::string prompt =
      "You are a helpful assistant. Answer in one short sentence, and never repeat the question "
      "back to the user. The question follows after this line of instructions, which is long.";
  pb::GenerateRequest req;
  req.set_text(prompt);
  req.mutable_sampling()->set_temperature(1.0f);
  req.mutable_sampling()->set_seed(100);
  req.mutable_stopping()->set_max_new_tokens(12);
  req.mutable_stopping()->set_ignore_eos(true);
  req.mutable_output()->set_logprobs(true);

  // Cold cache: sequence 0 prefills the prompt, the other three share its blocks.
  const engine::EngineStats before = inst->engine->Stats();
  pb::GenerateRequest four = req;
  four.set_n(4);
  GenResult r = RunGenerate(*inst->stub, four);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const engine::EngineStats after = inst->engine->Stats();
  EXPECT_EQ(r.finals, 4);
  std::map<uint32_t, PerIndex> seqs = SplitByIndex(r);
  ASSERT_EQ(seqs.size(), 4u);
  pb::TokenizeRequest treq;
  treq.set_text(prompt);
  pb::TokenizeResponse tresp;
  grpc::ClientContext tctx;
  ASSERT_TRUE(inst->stub->Tokenize(&tctx, treq, &tresp).ok());
  const int64_t full_blocks = (tresp.ids_size() - 1) / before.kv_block_size;
  ASSERT_GE(full_blocks, 5);
  EXPECT_GE(after.prefix_hit_tokens - before.prefix_hit_tokens,
            3 * full_blocks * before.kv_block_size)
      << "the n sequences did not share the prompt's blocks";

  std::set<std::vector<uint32_t>> distinct;
  for (uint32_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(absl::StrCat("sequence ", i));
    ASSERT_TRUE(seqs.count(i));
    const PerIndex& got = seqs[i];
    EXPECT_EQ(got.finals, 1);
    EXPECT_FALSE(got.after_final);
    ASSERT_EQ(got.ids.size(), 12u);
    distinct.insert(got.ids);
    // The same as one call with seed 100 + i (its prompt now found in the cache).
    pb::GenerateRequest one = req;
    one.mutable_sampling()->set_seed(100 + i);
    GenResult alone = RunGenerate(*inst->stub, one);
    ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
    std::map<uint32_t, PerIndex> single = SplitByIndex(alone);
    ASSERT_EQ(single.size(), 1u);
    EXPECT_EQ(single.begin()->first, 0u);
    EXPECT_EQ(single[0].ids, got.ids);
    ASSERT_EQ(single[0].logprobs.size(), got.logprobs.size());
    for (size_t t = 0; t < got.logprobs.size(); ++t) {
      EXPECT_NEAR(single[0].logprobs[t], got.logprobs[t], 1e-4) << "token " << t;
    }
  }
  // 12 tokens at temperature 1 from a random model: four seeds give four different sequences.
  EXPECT_EQ(distinct.size(), 4u);
  EXPECT_TRUE(inst->WaitEngineIdle());

  // Prompt logprobs come once, with sequence 0.
  pb::GenerateRequest scored = Greedy("Score this prompt once", 3);
  scored.set_n(3);
  scored.mutable_output()->set_prompt_logprobs(true);
  GenResult s = RunGenerate(*inst->stub, scored);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  std::map<uint32_t, PerIndex> scored_seqs = SplitByIndex(s);
  ASSERT_EQ(scored_seqs.size(), 3u);
  EXPECT_GT(scored_seqs[0].prompt_logprobs, 0u);
  EXPECT_EQ(scored_seqs[0].prompt_logprobs + 1, scored_seqs[0].prompt_token_ids.size());
  for (uint32_t i = 1; i < 3; ++i) {
    EXPECT_EQ(scored_seqs[i].prompt_logprobs, 0u) << i;
    EXPECT_TRUE(scored_seqs[i].prompt_token_ids.empty()) << i;
    EXPECT_EQ(scored_seqs[i].ids, scored_seqs[0].ids) << "greedy sequences agree";
  }

  // n = 0 means one; above --max-n is refused before any work.
  pb::GenerateRequest zero = Greedy("n zero", 2);
  zero.set_n(0);
  GenResult z = RunGenerate(*inst->stub, zero);
  ASSERT_TRUE(z.status.ok());
  EXPECT_EQ(SplitByIndex(z).size(), 1u);
  pb::GenerateRequest five = Greedy("too many", 2);
  five.set_n(5);
  grpc::Status refused = GenerateStatus(*inst->stub, five);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.error_message(), HasSubstr("at most 4"));
  EXPECT_TRUE(inst->WaitEngineIdle());
}

TEST(ServerTest, NSequencesEndTogetherOnCancelAndOnARefusal) {
  engine::EngineOptions options = SmallEngineOptions();
  options.max_num_seqs = 1;
  options.max_queue = 2;
  auto inst = Instance::Start(options);
  ASSERT_NE(inst, nullptr);

  // A client cancel ends both sequences, the running one and the queued one.
  {
    pb::GenerateRequest req = Greedy("A long story", 1500);
    req.set_n(2);
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    auto reader = inst->stub->Generate(&ctx, req);
    pb::GenerateResponse msg;
    ASSERT_TRUE(reader->Read(&msg));
    ctx.TryCancel();
    for (int i = 0; i < 4000 && reader->Read(&msg); ++i) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
    EXPECT_TRUE(inst->WaitEngineIdle());
    EXPECT_LT(inst->engine->Stats().steps, 2000) << "a cancelled sequence ran to completion";
  }

  // One slot running and a queue of two: sequences 0 and 1 of a three-sequence call are queued,
  // sequence 2 is refused, and the call fails with the refusal, taking the others out of the
  // queue.
  bool refused = false;
  for (int attempt = 0; attempt < 5 && !refused; ++attempt) {
    grpc::ClientContext hold_ctx;
    SetDeadline(&hold_ctx, kCallTimeout);
    auto holder = inst->stub->Generate(&hold_ctx, Greedy("hold the slot", 1900));
    pb::GenerateResponse msg;
    if (!holder->Read(&msg) || inst->engine->Stats().waiting != 0) {
      hold_ctx.TryCancel();
      while (holder->Read(&msg)) {
      }
      holder->Finish();
      continue;
    }
    pb::GenerateRequest three = Greedy("three at once", 4);
    three.set_n(3);
    grpc::Status st = GenerateStatus(*inst->stub, three);
    const bool holder_running = inst->engine->Stats().running == 1;
    hold_ctx.TryCancel();
    while (holder->Read(&msg)) {
    }
    holder->Finish();
    if (!holder_running) continue;  // the holder finished first: try again
    refused = true;
    EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("queue is full"));
  }
  EXPECT_TRUE(refused) << "the holder never held the slot long enough";
  EXPECT_TRUE(inst->WaitEngineIdle());
  ExpectStillServing(*inst->stub);
}

TEST(ServerTest, ThirtyTwoConcurrentStreamsGetTheirExactTokenCounts) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  constexpr int kStreams = 32;
  std::vector<GenResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      pb::GenerateRequest req = Greedy(absl::StrCat("stream number ", i), 8 + i);
      req.set_request_id(absl::StrCat("c", i));
      results[i] = RunGenerate(*inst->stub, req);
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    SCOPED_TRACE(absl::StrCat("stream ", i));
    const GenResult& r = results[i];
    ASSERT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
    EXPECT_EQ(r.ids.size(), static_cast<size_t>(8 + i));
    EXPECT_EQ(r.finals, 1);
    EXPECT_EQ(r.final.generated_tokens(), static_cast<uint32_t>(8 + i));
    EXPECT_EQ(r.final.finish_reason(), pb::FINISH_REASON_LENGTH);
    for (const pb::GenerateResponse& m : r.messages)
      EXPECT_EQ(m.request_id(), absl::StrCat("c", i));
  }
  EXPECT_TRUE(inst->WaitEngineIdle());
}

// Overload: requests arrive at three times the measured capacity, a fixed count of them. The queue
// is bounded: the ones beyond it get RESOURCE_EXHAUSTED at once, naming the full queue; every
// accepted one completes with the tokens it gives alone; the server stays healthy; /metrics
// counts what happened.
// Overload, asserted by order and counts rather than by rates: ten long requests fill the running
// batch (4) and the queue (6); a burst of 50 short ones then meets a full queue. Rejections are
// RESOURCE_EXHAUSTED and come back at once (at least one before any long request ends, i.e.
// without waiting for capacity); everything accepted completes with its solo tokens; the metrics
// count both.
TEST(ServerTest, OverloadRejectsAtOnceWhenFullAndCompletesTheRest) {
  engine::EngineOptions options = SmallEngineOptions();
  options.max_num_seqs = 4;
  options.max_queue = 6;
  auto inst = Instance::Start(options, {}, /*with_metrics=*/true);
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kLong = 200;
  constexpr uint32_t kShort = 8;
  std::vector<std::string> prompts;
  std::vector<std::vector<uint32_t>> reference;  // greedy, kLong tokens; kShort is its prefix
  for (int i = 0; i < 4; ++i) {
    prompts.push_back(absl::StrCat("overload prompt ", i));
    GenResult r = RunGenerate(*inst->stub, Greedy(prompts.back(), kLong));
    ASSERT_TRUE(r.status.ok());
    reference.push_back(r.ids);
  }
  ASSERT_TRUE(inst->WaitEngineIdle());
  const std::map<std::string, double> before =
      test_util::ParsePrometheus(test_util::HttpGetMetrics(inst->metrics->port()));

  struct Outcome {
    GenResult result;
    absl::Time done;
  };
  constexpr int kHolders = 10;
  constexpr int kBurst = 50;
  std::vector<Outcome> holders(kHolders), burst(kBurst);
  // The holders arrive one at a time, each seen running or waiting before the next, so that the
  // queue holds exactly the six beyond the running batch (a request counts against --max-queue
  // until a step admits it).
  std::vector<std::thread> threads;
  bool full = true;
  for (int i = 0; i < kHolders && full; ++i) {
    threads.emplace_back([&, i] {
      // A hang guard, not a speed bound: under a loaded machine the last holders queue for long.
      holders[i].result =
          RunGenerate(*inst->stub, Greedy(prompts[i % 4], kLong), absl::Seconds(240));
      holders[i].done = absl::Now();
    });
    const int64_t running = std::min(i + 1, 4), waiting = std::max(0, i + 1 - 4);
    full = false;
    for (int k = 0; k < 5000 && !full; ++k) {
      const engine::EngineStats st = inst->engine->Stats();
      full = st.running == running && st.waiting == waiting;
      if (!full) absl::SleepFor(absl::Milliseconds(1));
    }
  }
  if (!full) {
    for (std::thread& t : threads) t.join();
  }
  ASSERT_TRUE(full) << "never saw the holders running and queued one by one";
  for (int i = 0; i < kBurst; ++i) {
    threads.emplace_back([&, i] {
      burst[i].result =
          RunGenerate(*inst->stub, Greedy(prompts[i % 4], kShort), absl::Seconds(240));
      burst[i].done = absl::Now();
    });
  }
  for (std::thread& t : threads) t.join();

  absl::Time first_holder_done = absl::InfiniteFuture();
  for (int i = 0; i < kHolders; ++i) {
    SCOPED_TRACE(absl::StrCat("holder ", i));
    ASSERT_TRUE(holders[i].result.status.ok()) << holders[i].result.status.error_message();
    EXPECT_EQ(holders[i].result.ids, reference[i % 4]);
    first_holder_done = std::min(first_holder_done, holders[i].done);
  }
  int accepted = 0, rejected = 0, rejected_before_any_holder_ended = 0;
  for (int i = 0; i < kBurst; ++i) {
    SCOPED_TRACE(absl::StrCat("burst ", i));
    const GenResult& r = burst[i].result;
    if (r.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++rejected;
      rejected_before_any_holder_ended += burst[i].done < first_holder_done ? 1 : 0;
      EXPECT_THAT(r.status.error_message(), HasSubstr("queue is full"));
      EXPECT_TRUE(r.ids.empty());
      continue;
    }
    ASSERT_TRUE(r.status.ok()) << r.status.error_code() << " " << r.status.error_message();
    ++accepted;
    EXPECT_EQ(r.ids,
              std::vector<uint32_t>(reference[i % 4].begin(), reference[i % 4].begin() + kShort));
    EXPECT_EQ(r.final.finish_reason(), pb::FINISH_REASON_LENGTH);
  }
  std::printf(
      "burst of %d against a full queue: %d accepted, %d rejected (%d before any "
      "long request ended)\n",
      kBurst, accepted, rejected, rejected_before_any_holder_ended);
  EXPECT_EQ(accepted + rejected, kBurst);
  EXPECT_GT(rejected_before_any_holder_ended, 0)
      << "a full queue must refuse at once, not when capacity frees";
  ASSERT_TRUE(inst->WaitEngineIdle());
  ExpectStillServing(*inst->stub);

  std::map<std::string, double> after;
  auto delta = [&](const std::string& name) {
    auto b = before.find(name);
    return after[name] - (b == before.end() ? 0.0 : b->second);
  };
  const int finished = kHolders + accepted + 1;  // and the ExpectStillServing request
  for (int i = 0; i < 600; ++i) {                // a hang guard: 30 s
    after = test_util::ParsePrometheus(test_util::HttpGetMetrics(inst->metrics->port()));
    // Finishing is recorded inside a step and the gauges at its end: a scrape may fall between.
    if (delta("moleserve_request_queue_time_seconds_count") == finished &&
        after["moleserve_num_requests_running"] == 0 &&
        after["moleserve_num_requests_waiting"] == 0) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(
      delta("moleserve_requests_rejected_total{code=\"resource_exhausted\",protocol=\"grpc\"}"),
      rejected);
  EXPECT_EQ(delta("moleserve_requests_finished_total{outcome=\"length\",protocol=\"grpc\"}"),
            finished);
  EXPECT_EQ(delta("moleserve_request_queue_time_seconds_count"), finished);
  EXPECT_EQ(delta("moleserve_generation_tokens_total"), kHolders * kLong + accepted * kShort + 2);
  EXPECT_TRUE(after.contains("moleserve_requests_preempted_total"));
  EXPECT_EQ(after["moleserve_num_requests_waiting"], 0);
  EXPECT_EQ(after["moleserve_num_requests_running"], 0);
}

// ---------------------------------------------------------------------------------------------
// Health and drain

TEST(ServerTest, HealthGoesNotServingDuringDrainWhileInFlightCompletes) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  auto health = [&](const std::string& service) {
    return CheckHealth(inst->channel, service, absl::Seconds(5));
  };
  ASSERT_TRUE(health("").ok());
  EXPECT_EQ(*health(""), HealthStatus::kServing);
  EXPECT_EQ(*health("moleserve.v1.Inference"), HealthStatus::kServing);
  EXPECT_EQ(*health(std::string(kLivenessService)), HealthStatus::kServing);
  EXPECT_EQ(health("no.such.Service").status().code(), absl::StatusCode::kNotFound);

  constexpr uint32_t kInFlight = 1500;
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  auto reader = inst->stub->Generate(&ctx, Greedy("in flight", kInFlight));
  pb::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  size_t tokens = msg.token_ids_size();

  std::atomic<bool> drained{false};
  std::thread drainer([&] {
    inst->server->Drain(absl::Seconds(30));
    drained = true;
  });
  // NOT_SERVING while the in-flight request still runs.
  bool not_serving = false;
  for (int i = 0; i < 500 && !not_serving; ++i) {
    auto s = health("");
    not_serving = s.ok() && *s == HealthStatus::kNotServing;
    if (!not_serving) absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_TRUE(not_serving) << "health(\"\") never became NOT_SERVING during the drain";
  auto inference_health = health("moleserve.v1.Inference");
  ASSERT_TRUE(inference_health.ok()) << inference_health.status();
  EXPECT_EQ(*inference_health, HealthStatus::kNotServing);
  // Liveness stays SERVING: a draining server must not be restarted by its liveness probe.
  auto liveness = health(std::string(kLivenessService));
  ASSERT_TRUE(liveness.ok()) << liveness.status();
  EXPECT_EQ(*liveness, HealthStatus::kServing);
  EXPECT_FALSE(drained.load()) << "drain finished before the in-flight request did";

  // New work is refused.
  GenResult refused = RunGenerate(*inst->stub, Greedy("too late", 4), absl::Seconds(10));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused.status.error_message();
  EXPECT_TRUE(refused.ids.empty());

  // The in-flight request completes with all its tokens.
  pb::FinalInfo final;
  for (int i = 0; i < 5000 && reader->Read(&msg); ++i) {
    tokens += msg.token_ids_size();
    if (msg.has_final()) final = msg.final();
  }
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_code() << " " << status.error_message();
  EXPECT_EQ(tokens, kInFlight);
  EXPECT_EQ(final.generated_tokens(), kInFlight);
  EXPECT_EQ(final.finish_reason(), pb::FINISH_REASON_LENGTH);
  drainer.join();
  EXPECT_TRUE(drained.load());
}

// ---------------------------------------------------------------------------------------------
// /metrics

// Past --drain-timeout, whatever still runs ends with UNAVAILABLE and the drain returns.
TEST(ServerTest, DrainTimeoutEndsWhatIsLeftWithUnavailable) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, kCallTimeout);
  auto reader = inst->stub->Generate(&ctx, Greedy("long", 1800));
  pb::GenerateResponse msg;
  ASSERT_TRUE(reader->Read(&msg));
  inst->server->Drain(absl::Milliseconds(300));
  size_t tokens = msg.token_ids_size();
  bool got_final = false;
  for (int i = 0; i < 5000 && reader->Read(&msg); ++i) {
    tokens += msg.token_ids_size();
    got_final = got_final || msg.has_final();
  }
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_FALSE(got_final);
  EXPECT_LT(tokens, 1800u);
}

TEST(ServerTest, OverlongRequestIdIsInvalidArgument) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  pb::GenerateRequest req = Greedy("hi", 2);
  req.set_request_id(std::string(257, 'x'));
  GenResult r = RunGenerate(*inst->stub, req, absl::Seconds(10));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("request_id"));
  req.set_request_id(std::string(256, 'x'));
  r = RunGenerate(*inst->stub, req, absl::Seconds(10));
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 2u);
}

TEST(ServerTest, MetricsEndpointCountsTraffic) {
  auto inst = Instance::Start(SmallEngineOptions(), {}, /*with_metrics=*/true);
  ASSERT_NE(inst, nullptr);
  ASSERT_GT(inst->metrics->port(), 0);

  const std::vector<uint32_t> lengths = {5, 7, 9};
  uint32_t generated = 0, prompt = 0;
  for (uint32_t n : lengths) {
    GenResult r = RunGenerate(*inst->stub, Greedy("metrics", n));
    ASSERT_TRUE(r.status.ok());
    generated += r.final.generated_tokens();
    prompt += r.final.prompt_tokens();
  }
  EXPECT_EQ(generated, 21u);
  // One stop-token finish and one rejection.
  pb::GenerateRequest stop_req = Greedy("metrics", 16);
  GenResult first = RunGenerate(*inst->stub, Greedy("metrics", 1));
  ASSERT_EQ(first.ids.size(), 1u);
  stop_req.mutable_stopping()->add_stop_token_ids(first.ids[0]);
  GenResult stopped = RunGenerate(*inst->stub, stop_req);
  ASSERT_TRUE(stopped.status.ok());
  ASSERT_EQ(stopped.final.finish_reason(), pb::FINISH_REASON_STOP_TOKEN);
  generated += first.final.generated_tokens() + stopped.final.generated_tokens();
  prompt += first.final.prompt_tokens() + stopped.final.prompt_tokens();
  pb::GenerateRequest bad = Greedy("metrics", 4);
  bad.mutable_sampling()->set_top_p(2.0f);
  EXPECT_EQ(GenerateStatus(*inst->stub, bad).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Metrics are recorded by the engine around the final message; poll briefly until they agree.
  std::map<std::string, double> m;
  for (int i = 0; i < 600; ++i) {  // a hang guard: 30 s
    m = test_util::ParsePrometheus(test_util::HttpGetMetrics(inst->metrics->port()));
    if (m["moleserve_generation_tokens_total"] == generated &&
        m["moleserve_time_to_first_token_seconds_count"] == 5) {
      break;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(m["moleserve_generation_tokens_total"], generated);
  EXPECT_EQ(m["moleserve_prompt_tokens_total"], prompt);
  EXPECT_EQ(m["moleserve_requests_finished_total{outcome=\"length\",protocol=\"grpc\"}"], 4);
  EXPECT_EQ(m["moleserve_requests_finished_total{outcome=\"stop_token\",protocol=\"grpc\"}"], 1);
  EXPECT_EQ(m["moleserve_requests_rejected_total{code=\"invalid_argument\",protocol=\"grpc\"}"], 1);
  EXPECT_EQ(m["moleserve_time_to_first_token_seconds_count"], 5);
  EXPECT_EQ(m["moleserve_e2e_request_latency_seconds_count"], 5);
  EXPECT_GT(m["moleserve_time_to_first_token_seconds_sum"], 0);
  EXPECT_EQ(m["moleserve_time_to_first_token_seconds_bucket{le=\"+Inf\"}"], 5);
  EXPECT_GT(m["moleserve_steps_total"], 0);
  for (const char* gauge : {"moleserve_num_requests_running", "moleserve_num_requests_waiting",
                            "moleserve_kv_cache_usage_ratio"}) {
    EXPECT_TRUE(m.contains(gauge)) << gauge;
  }
  EXPECT_GE(m["moleserve_kv_cache_usage_ratio"], 0.0);
  EXPECT_LE(m["moleserve_kv_cache_usage_ratio"], 1.0);
  EXPECT_EQ(m["moleserve_prefix_cache_hits_tokens_total"], 0);  // short prompts: no full block

  // The prefix cache: a long prompt again finds its full blocks (of 16 tokens).
  const std::string long_text(99, 'q');
  ASSERT_TRUE(RunGenerate(*inst->stub, Greedy(long_text, 2)).status.ok());
  ASSERT_TRUE(RunGenerate(*inst->stub, Greedy(long_text, 2)).status.ok());
  for (int i = 0; i < 600 && m["moleserve_prefix_cache_hits_tokens_total"] < 16; ++i) {
    m = test_util::ParsePrometheus(test_util::HttpGetMetrics(inst->metrics->port()));
    absl::SleepFor(absl::Milliseconds(50));
  }
  const double hits = m["moleserve_prefix_cache_hits_tokens_total"];
  EXPECT_GE(hits, 16);
  EXPECT_EQ(std::fmod(hits, 16.0), 0) << hits;
  EXPECT_GT(m["moleserve_prefix_cache_queries_tokens_total"], hits);
  EXPECT_GE(m["moleserve_prefix_cache_blocks"], hits / 16);
  EXPECT_TRUE(m.contains("moleserve_prefix_cache_evictions_total"));
}

// ---------------------------------------------------------------------------------------------
// Tokenize, ListModels, reflection

TEST(ServerTest, TokenizeAndListModels) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  pb::TokenizeRequest treq;
  treq.set_text("Hi");
  treq.set_add_bos(true);
  treq.set_return_pieces(true);
  pb::TokenizeResponse tresp;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    grpc::Status s = inst->stub->Tokenize(&ctx, treq, &tresp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_THAT(tresp.ids(), ElementsAre(kBos, 72u, 105u));
  ASSERT_EQ(tresp.pieces_size(), 3);
  EXPECT_EQ(tresp.pieces(1), "H");
  EXPECT_EQ(tresp.pieces(2), "i");

  treq.set_add_bos(false);
  treq.set_return_pieces(false);
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    ASSERT_TRUE(inst->stub->Tokenize(&ctx, treq, &tresp).ok());
  }
  EXPECT_THAT(tresp.ids(), ElementsAre(72u, 105u));
  EXPECT_EQ(tresp.pieces_size(), 0);

  pb::ListModelsResponse lresp;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, absl::Seconds(10));
    grpc::Status s = inst->stub->ListModels(&ctx, pb::ListModelsRequest(), &lresp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(lresp.base().name(), "moleserve-demo");
  EXPECT_EQ(lresp.base().vocab_size(), 260u);
  EXPECT_EQ(lresp.base().context_length(), 2048u);
  const pb::KvCacheInfo& kv = lresp.base().kv_cache();
  EXPECT_EQ(kv.block_size(), 16u);
  EXPECT_GT(kv.total_blocks(), 0u);
  EXPECT_EQ(kv.free_blocks(), kv.total_blocks());  // nothing runs
  EXPECT_TRUE(kv.prefix_caching());
  EXPECT_EQ(lresp.base().num_layers(), 4u);
  EXPECT_EQ(lresp.base().backend(), "cpu");
  EXPECT_GT(lresp.base().parameter_count(), 0u);
  EXPECT_EQ(lresp.adapters_size(), 0);
}

// Wire-level helpers for grpc.reflection.v1alpha (Debian ships no reflection client headers).
std::string ToBytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// Services listed by ServerReflectionInfo(list_services), or nullopt on an RPC failure.
std::optional<std::vector<std::string>> ListServicesViaReflection(
    const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  SetDeadline(&ctx, absl::Seconds(10));
  grpc::CompletionQueue cq;
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t expected) {
    return cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) == expected && ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!step(1)) return std::nullopt;
  // ServerReflectionRequest { string list_services = 7; }
  const std::string request = "\x3a\x01*";
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  if (!step(2)) return std::nullopt;
  call->WritesDone(reinterpret_cast<void*>(3));
  if (!step(3)) return std::nullopt;
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(4));
  if (!step(4)) return std::nullopt;
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (!status.ok()) return std::nullopt;

  // ServerReflectionResponse { ListServiceResponse list_services_response = 6; }
  // ListServiceResponse { repeated ServiceResponse service = 1; } ServiceResponse { name = 1; }
  google::protobuf::UnknownFieldSet response;
  if (!response.ParseFromString(ToBytes(in))) return std::nullopt;
  std::vector<std::string> names;
  for (int i = 0; i < response.field_count(); ++i) {
    const google::protobuf::UnknownField& f = response.field(i);
    if (f.number() != 6 || f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      continue;
    }
    google::protobuf::UnknownFieldSet list;
    if (!list.ParseFromString(f.length_delimited())) return std::nullopt;
    for (int j = 0; j < list.field_count(); ++j) {
      if (list.field(j).number() != 1) continue;
      google::protobuf::UnknownFieldSet service;
      if (!service.ParseFromString(list.field(j).length_delimited())) return std::nullopt;
      for (int k = 0; k < service.field_count(); ++k) {
        if (service.field(k).number() == 1) names.push_back(service.field(k).length_delimited());
      }
    }
  }
  return names;
}

TEST(ServerTest, ReflectionListsTheServices) {
  auto inst = Instance::Start(SmallEngineOptions());
  ASSERT_NE(inst, nullptr);
  std::optional<std::vector<std::string>> services = ListServicesViaReflection(inst->channel);
  ASSERT_TRUE(services.has_value()) << "reflection call failed";
  EXPECT_THAT(*services,
              ::testing::IsSupersetOf({"moleserve.v1.Inference", "grpc.health.v1.Health"}));
}

// ---------------------------------------------------------------------------------------------
// MoLE adapters over the API: ListModels, per-request adapter, return_routing, routing override

// A server whose start-up adapters load after its listeners are up: readiness NOT_SERVING (and
// liveness SERVING) meanwhile, base-model requests already served, each adapter usable once
// LoadStartupAdapter returns, and a name given twice refused.
TEST(ServerTest, StartupAdaptersLoadBehindANotServingReadiness) {
  const std::string dir = test_util::WriteDemoMoleAdapter(
      absl::StrCat(::testing::TempDir(), "/moleserve_startup_mola_", getpid()));
  ASSERT_FALSE(dir.empty());
  auto inst = Instance::Start(SmallEngineOptions(), {.serving_at_start = false});
  ASSERT_NE(inst, nullptr);
  auto health = [&](const std::string& service) {
    absl::StatusOr<HealthStatus> h = CheckHealth(inst->channel, service, absl::Seconds(5));
    EXPECT_TRUE(h.ok()) << h.status();
    return h.ok() ? *h : HealthStatus::kUnknown;
  };
  EXPECT_EQ(health(""), HealthStatus::kNotServing);
  EXPECT_EQ(health("moleserve.v1.Inference"), HealthStatus::kNotServing);
  EXPECT_EQ(health(std::string(kLivenessService)), HealthStatus::kServing);
  ASSERT_TRUE(RunGenerate(*inst->stub, Greedy("Hello", 4)).status.ok());
  pb::GenerateRequest with_adapter = Greedy("Hello", 4);
  with_adapter.set_adapter("mola");
  EXPECT_EQ(RunGenerate(*inst->stub, with_adapter).status.error_code(), grpc::NOT_FOUND);

  ASSERT_TRUE(inst->engine->LoadStartupAdapter("mola", dir).ok());
  const GenResult got = RunGenerate(*inst->stub, with_adapter);
  EXPECT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.ids.size(), 4u);
  EXPECT_TRUE(absl::IsInvalidArgument(inst->engine->LoadStartupAdapter("mola", dir)));
  EXPECT_FALSE(inst->engine->LoadStartupAdapter("other", dir + "/missing").ok());
  inst->server->SetServing(true);
  EXPECT_EQ(health(""), HealthStatus::kServing);
  EXPECT_EQ(health("moleserve.v1.Inference"), HealthStatus::kServing);
}

// The adapter can also come from the x-moleserve-adapter header (what deploy/nginx hashes on):
// alone it selects the adapter, with the same name in the body it is accepted, and any
// disagreement is refused rather than guessed.
TEST(ServerTest, AdapterFromTheMetadataHeader) {
  const std::string dir = test_util::WriteDemoMoleAdapter(
      absl::StrCat(::testing::TempDir(), "/moleserve_header_mola_", getpid()));
  ASSERT_FALSE(dir.empty());
  engine::EngineOptions options = SmallEngineOptions();
  options.adapters = {{"mola", dir}, {"mola2", dir}};
  auto inst = Instance::Start(options);
  ASSERT_NE(inst, nullptr);
  constexpr uint32_t kN = 8;
  const GenResult base = RunGenerate(*inst->stub, Greedy("Hello, world", kN));
  ASSERT_TRUE(base.status.ok());
  pb::GenerateRequest in_body = Greedy("Hello, world", kN);
  in_body.set_adapter("mola");
  const GenResult body = RunGenerate(*inst->stub, in_body);
  ASSERT_TRUE(body.status.ok()) << body.status.error_message();
  ASSERT_NE(body.ids, base.ids);

  const GenResult header = RunGenerate(*inst->stub, Greedy("Hello, world", kN), kCallTimeout,
                                       {{server::kAdapterHeader, "mola"}});
  ASSERT_TRUE(header.status.ok()) << header.status.error_message();
  EXPECT_EQ(header.ids, body.ids);
  const GenResult both =
      RunGenerate(*inst->stub, in_body, kCallTimeout, {{server::kAdapterHeader, "mola"}});
  ASSERT_TRUE(both.status.ok()) << both.status.error_message();
  EXPECT_EQ(both.ids, body.ids);
  // An empty header is no header: the body decides (the base model when it names none).
  const GenResult empty = RunGenerate(*inst->stub, Greedy("Hello, world", kN), kCallTimeout,
                                      {{server::kAdapterHeader, ""}});
  ASSERT_TRUE(empty.status.ok());
  EXPECT_EQ(empty.ids, base.ids);
  const GenResult empty_with_body =
      RunGenerate(*inst->stub, in_body, kCallTimeout, {{server::kAdapterHeader, ""}});
  ASSERT_TRUE(empty_with_body.status.ok()) << empty_with_body.status.error_message();
  EXPECT_EQ(empty_with_body.ids, body.ids);

  const GenResult conflict =
      RunGenerate(*inst->stub, in_body, kCallTimeout, {{server::kAdapterHeader, "mola2"}});
  EXPECT_EQ(conflict.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(conflict.status.error_message(), HasSubstr("x-moleserve-adapter"));
  EXPECT_TRUE(conflict.ids.empty());
  const GenResult twice =
      RunGenerate(*inst->stub, Greedy("Hello, world", kN), kCallTimeout,
                  {{server::kAdapterHeader, "mola"}, {server::kAdapterHeader, "mola2"}});
  EXPECT_EQ(twice.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const GenResult unknown = RunGenerate(*inst->stub, Greedy("Hello, world", kN), kCallTimeout,
                                        {{server::kAdapterHeader, "nope"}});
  EXPECT_EQ(unknown.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(unknown.status.error_message(), HasSubstr("nope"));
}

TEST(ServerTest, AdaptersListedRoutedAndOverriddenPerRequest) {
  const std::string dir = test_util::WriteDemoMoleAdapter(
      absl::StrCat(::testing::TempDir(), "/moleserve_demo_mola_", getpid()));
  ASSERT_FALSE(dir.empty());
  engine::EngineOptions options = SmallEngineOptions();
  options.adapters = {{"mola", dir}};
  auto inst = Instance::Start(options);
  ASSERT_NE(inst, nullptr);

  // ListModels shows the adapter with its family, experts, ranks and bytes.
  pb::ListModelsResponse models;
  {
    grpc::ClientContext ctx;
    SetDeadline(&ctx, kCallTimeout);
    ASSERT_TRUE(inst->stub->ListModels(&ctx, pb::ListModelsRequest(), &models).ok());
  }
  ASSERT_EQ(models.adapters_size(), 1);
  const pb::AdapterInfo& info = models.adapters(0);
  EXPECT_EQ(info.name(), "mola");
  EXPECT_EQ(info.state(), pb::ADAPTER_STATE_READY);
  EXPECT_EQ(info.family(), "mola");
  EXPECT_EQ(info.format(), "mole/1");
  EXPECT_EQ(info.num_experts(), 4u * 2 * 4);
  EXPECT_EQ(info.max_experts_per_site(), 4u);
  EXPECT_THAT(info.ranks(), ElementsAre(4u));
  EXPECT_THAT(info.algorithms(), ElementsAre("topk"));
  // A [4,4,256] + B^T [4,4,256] + 4 scales + router [4,256], per site.
  EXPECT_EQ(info.bytes(), 8u * (4 * 4 * 256 * 2 + 4 + 4 * 256) * 4);

  // The adapter changes the output, and return_routing reports top-2 renormalised choices at
  // every routed site for every token.
  constexpr uint32_t kN = 12;
  GenResult base = RunGenerate(*inst->stub, Greedy("Hello, world", kN));
  ASSERT_TRUE(base.status.ok());
  pb::GenerateRequest req = Greedy("Hello, world", kN);
  req.set_adapter("mola");
  req.mutable_output()->set_return_routing(true);
  GenResult adapted = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(adapted.status.ok()) << adapted.status.error_message();
  EXPECT_NE(adapted.ids, base.ids);
  std::vector<pb::TokenRouting> routing;
  for (const pb::GenerateResponse& m : adapted.messages) {
    routing.insert(routing.end(), m.routing().begin(), m.routing().end());
  }
  ASSERT_EQ(routing.size(), kN);
  for (const pb::TokenRouting& tr : routing) {
    ASSERT_EQ(tr.sites_size(), 8);
    for (const pb::SiteRouting& s : tr.sites()) {
      EXPECT_LT(s.layer(), 4u);
      EXPECT_TRUE(s.module() == "q_proj" || s.module() == "o_proj") << s.module();
      ASSERT_EQ(s.experts_size(), 2);
      EXPECT_NE(s.experts(0), s.experts(1));
      EXPECT_LT(s.experts(0), 4u);
      EXPECT_GE(s.weights(0), s.weights(1));
      EXPECT_NEAR(s.weights(0) + s.weights(1), 1.0f, 1e-5f);
    }
  }
  // Routing is not returned unless asked for.
  req.mutable_output()->set_return_routing(false);
  GenResult quiet = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(quiet.status.ok());
  EXPECT_EQ(quiet.ids, adapted.ids);
  for (const pb::GenerateResponse& m : quiet.messages) EXPECT_EQ(m.routing_size(), 0);

  // A per-request override applies to that request only: k = 1 gives one expert of weight 1.
  req.mutable_output()->set_return_routing(true);
  req.mutable_routing()->set_k(1);
  GenResult top1 = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(top1.status.ok()) << top1.status.error_message();
  for (const pb::GenerateResponse& m : top1.messages) {
    for (const pb::TokenRouting& tr : m.routing()) {
      for (const pb::SiteRouting& s : tr.sites()) {
        ASSERT_EQ(s.experts_size(), 1);
        EXPECT_FLOAT_EQ(s.weights(0), 1.0f);
      }
    }
  }
  // Soft routing over all 4 experts.
  req.mutable_routing()->Clear();
  req.mutable_routing()->set_algorithm("soft");
  GenResult soft = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(soft.status.ok()) << soft.status.error_message();
  ASSERT_FALSE(soft.messages.empty());
  ASSERT_GT(soft.messages[0].routing_size(), 0);
  EXPECT_EQ(soft.messages[0].routing(0).sites(0).experts_size(), 4);
  // ...and the next request without an override routes top-2 again.
  req.clear_routing();
  GenResult again = RunGenerate(*inst->stub, req);
  ASSERT_TRUE(again.status.ok());
  EXPECT_EQ(again.ids, adapted.ids);

  // Bad adapter names and overrides are refused with an actionable message.
  pb::GenerateRequest bad = Greedy("Hello", 4);
  bad.set_adapter("nope");
  grpc::Status st = GenerateStatus(*inst->stub, bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(st.error_message(), HasSubstr("nope"));
  bad.set_adapter("mola");
  bad.mutable_routing()->set_k(5);
  st = GenerateStatus(*inst->stub, bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("k"));
  bad.mutable_routing()->Clear();
  bad.mutable_routing()->set_algorithm("bogus");
  st = GenerateStatus(*inst->stub, bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("bogus"));
  bad.mutable_routing()->Clear();
  bad.mutable_routing()->set_algorithm("top_p");  // no p given and the adapter has none
  st = GenerateStatus(*inst->stub, bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad.clear_adapter();
  bad.mutable_routing()->Clear();
  bad.mutable_routing()->set_k(1);
  st = GenerateStatus(*inst->stub, bad);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("needs an adapter"));
  EXPECT_TRUE(inst->WaitEngineIdle());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moleserve::server

namespace moleserve::server {
namespace {

// moleserve_lora_requests_info: one series at a time, in vLLM's label format (what the Gateway
// API Inference Extension's endpoint picker parses), its value the time it was set.
TEST(PrometheusMetricsTest, LoraRequestsInfoKeepsOneSeries) {
  auto metrics = PrometheusMetrics::Create("127.0.0.1:0");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  (*metrics)->OnAdapterQueue({"a", "b"}, {"c"}, 64);
  (*metrics)->OnAdapterQueue({"b"}, {}, 64);
  const std::string text = test_util::HttpGetMetrics((*metrics)->port());
  std::map<std::string, double> m = test_util::ParsePrometheus(text);
  int series = 0;
  for (const auto& [key, value] : m) {
    if (key.rfind("moleserve_lora_requests_info{", 0) == 0) ++series;
  }
  EXPECT_EQ(series, 1) << text;
  const double when =
      m["moleserve_lora_requests_info{max_lora=\"64\",running_lora_adapters=\"b\","
        "waiting_lora_adapters=\"\"}"];
  EXPECT_GT(when, 1.7e9) << text;  // a Unix time
}

}  // namespace
}  // namespace moleserve::server

namespace moleserve::server {
namespace {

// POST with Connection: close (test_util::HttpExchange); the response body ("" on failure).
std::string HttpPostJson(int port, const std::string& path, const std::string& body) {
  const std::string response = test_util::HttpExchange(
      port,
      absl::StrCat("POST ", path, " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n",
                   "Content-Type: application/json\r\nContent-Length: ", body.size(), "\r\n\r\n",
                   body),
      /*timeout_s=*/120);
  const size_t at = response.find("\r\n\r\n");
  return at == std::string::npos ? "" : response.substr(at + 4);
}

// The same greedy request through gRPC and through the OpenAI-compatible HTTP API, on one
// engine, for the base model and a MoLE adapter: the same tokens, one for one, and the same text.
TEST(ServerTest, HttpAndGrpcGiveTheSameGreedyTokens) {
  const std::string dir = testing::TempDir() + "/grpc_http_mole";
  ASSERT_FALSE(test_util::WriteDemoMoleAdapter(dir).empty());
  engine::EngineOptions o = SmallEngineOptions();
  o.adapters = {{"mole", dir}};
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  OpenAiApi api(inst->engine.get(), {});
  auto http = HttpServer::Start({.address = "127.0.0.1", .port = 0},
                                [&api](HttpRequest r, std::shared_ptr<HttpResponder> out) {
                                  api.Handle(std::move(r), std::move(out));
                                });
  ASSERT_TRUE(http.ok()) << http.status();
  for (const std::string adapter : {"", "mole"}) {
    pb::GenerateRequest req = Greedy("Tokens for tokens", 16);
    req.set_adapter(adapter);
    const GenResult grpc_result = RunGenerate(*inst->stub, req);
    ASSERT_TRUE(grpc_result.status.ok()) << grpc_result.status.error_message();
    ASSERT_EQ(grpc_result.ids.size(), 16u);
    const nlohmann::json body{
        {"model", adapter.empty() ? inst->engine->model_info().name : adapter},
        {"prompt", "Tokens for tokens"},
        {"max_tokens", 16},
        {"temperature", 0},
        {"ignore_eos", true},
        {"logprobs", 0}};
    const nlohmann::json r = nlohmann::json::parse(
        HttpPostJson((*http)->port(), "/v1/completions", body.dump()), nullptr, false);
    ASSERT_TRUE(r.contains("choices")) << r.dump();
    const nlohmann::json& tokens = r["choices"][0]["logprobs"]["tokens"];
    ASSERT_EQ(tokens.size(), grpc_result.ids.size()) << adapter;
    for (size_t i = 0; i < tokens.size(); ++i) {
      // A token that is not valid UTF-8 on its own (a byte of a character) is U+FFFD in JSON.
      const std::string piece = inst->engine->DecodeToken(static_cast<int32_t>(grpc_result.ids[i]));
      const std::string in_json =
          nlohmann::json::parse(
              nlohmann::json(piece).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace))
              .get<std::string>();
      EXPECT_EQ(tokens[i].get<std::string>(), in_json) << adapter << " token " << i;
    }
    EXPECT_EQ(r["choices"][0]["text"], grpc_result.text) << adapter;
  }
  (*http)->Shutdown();
}

// The trained demo model (models/demo) through the gRPC API: the held-out texts' prompt
// logprobs (output.prompt_logprobs) give the training script's held-out NLL (metrics.json,
// torch, float32) per adapter and domain within 1e-3 relative (tests/engine/demo_model_test
// checks the rest of the demo model through the engine).
TEST(ServerTest, DemoModelPromptLogprobsGiveTheTrainingScriptsHeldOutPerplexity) {
  const std::string dir = std::string(MOLESERVE_SOURCE_DIR) + "/models/demo";
  engine::EngineOptions o = SmallEngineOptions();
  o.model = dir;
  o.adapters = {{"code", dir + "/adapters/code"},
                {"mail", dir + "/adapters/mail"},
                {"mixlora", dir + "/adapters/mixlora"}};
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  std::ifstream heldout_in(dir + "/heldout.json"), metrics_in(dir + "/metrics.json");
  ASSERT_TRUE(heldout_in.is_open() && metrics_in.is_open()) << dir;
  const nlohmann::json heldout = nlohmann::json::parse(heldout_in);
  const nlohmann::json metrics = nlohmann::json::parse(metrics_in);
  for (const std::string model : {"base", "code", "mail", "mixlora"}) {
    for (const char* domain : {"prose", "code", "mail"}) {
      double nll = 0;
      for (const nlohmann::json& seq : heldout[domain]) {
        pb::GenerateRequest req;
        if (model != "base") req.set_adapter(model);
        for (int32_t id : seq["ids"].get<std::vector<int32_t>>()) {
          req.mutable_token_ids()->add_ids(static_cast<uint32_t>(id));
        }
        req.mutable_sampling()->set_temperature(0);
        req.mutable_stopping()->set_max_new_tokens(1);
        req.mutable_output()->set_prompt_logprobs(true);
        GenResult r = RunGenerate(*inst->stub, req);
        ASSERT_TRUE(r.status.ok()) << r.status.error_message();
        size_t scored = 0;
        for (const pb::GenerateResponse& m : r.messages) {
          for (const pb::TokenLogprob& lp : m.prompt_logprobs()) nll -= lp.logprob();
          scored += static_cast<size_t>(m.prompt_logprobs_size());
        }
        EXPECT_EQ(scored + 1, seq["ids"].size());
      }
      const double want = metrics["perplexity"][model][domain]["nll"].get<double>();
      EXPECT_NEAR(nll, want, 1e-3 * want) << model << " on " << domain;
    }
  }
}

}  // namespace
}  // namespace moleserve::server
