// Hostile input against the gRPC front end (issue 16): malformed bodies, log injection through
// the admin audit, names and paths outside the documented set, special files in the adapter
// root, loads that outlive their deadline or the process, errors that would echo unbounded
// input, and every documented request bound at its edge (accepted at the limit, refused one
// past it). MoleServer runs on 127.0.0.1:0 around a CPU engine with the built-in demo model.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/client_unary_call.h>
#include <grpcpp/impl/codegen/sync_stream.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "engine/adapters/adapter_files.h"
#include "engine/engine.h"
#include "engine/model_io/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "moleserve/v1/admin.grpc.pb.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/grpc/admin_service.h"
#include "server/grpc/listeners.h"
#include "server/grpc/metadata.h"
#include "server/grpc/server.h"
#include "server/grpc/tls.h"
#include "server/grpc/wire.h"
#include "server/metrics/prometheus_metrics.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/common/metrics_scrape.h"

namespace moleserve::server {
namespace {

namespace fs = std::filesystem;
namespace pb = moleserve::v1;

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "hardening-admin-token-0123456789";
// A hang guard, not a speed bound (the suite must pass on a loaded machine).
constexpr absl::Duration kCallTimeout = absl::Seconds(240);
constexpr uint32_t kBos = 256;

struct AdapterRoot {
  fs::path path;
  AdapterRoot() {
    path = fs::path(::testing::TempDir()) / absl::StrCat("moleserve_hardening_root_", getpid());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~AdapterRoot() { fs::remove_all(path); }
  void Write(const std::string& rel, uint32_t seed) {
    ASSERT_FALSE(test_util::WriteDemoMoleAdapter((path / rel).string(), seed).empty());
  }
};

struct Instance {
  std::unique_ptr<PrometheusMetrics> metrics;
  std::unique_ptr<engine::Engine> engine;
  std::unique_ptr<MoleServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::shared_ptr<grpc::Channel> admin_channel;
  std::unique_ptr<pb::Inference::Stub> stub;
  std::unique_ptr<pb::AdapterAdmin::Stub> admin;
  std::mutex audit_mu;
  std::vector<AdminAuditEntry> audit;

  static std::unique_ptr<Instance> Start(engine::EngineOptions o, ServerOptions so = {}) {
    auto inst = std::make_unique<Instance>();
    auto m = PrometheusMetrics::Create("127.0.0.1:0");
    EXPECT_TRUE(m.ok()) << m.status();
    if (!m.ok()) return nullptr;
    inst->metrics = *std::move(m);
    o.metrics = inst->metrics.get();
    o.num_threads = 2;
    o.kv_cache_bytes = int64_t{64} << 20;
    auto e = engine::Engine::Create(o);
    EXPECT_TRUE(e.ok()) << e.status();
    if (!e.ok()) return nullptr;
    inst->engine = *std::move(e);
    Instance* self = inst.get();
    so.listen_address = "127.0.0.1:0";
    so.admin_address = "127.0.0.1:0";
    so.admin_token = kToken;
    so.admin_audit = [self](const AdminAuditEntry& entry) {
      std::lock_guard<std::mutex> lock(self->audit_mu);
      self->audit.push_back(entry);
    };
    auto s = MoleServer::Start(inst->engine.get(), so);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return nullptr;
    inst->server = *std::move(s);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    inst->channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", inst->server->port()),
                                              grpc::InsecureChannelCredentials(), args);
    inst->stub = pb::Inference::NewStub(inst->channel);
    inst->admin_channel =
        grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", inst->server->admin_port()),
                                  grpc::InsecureChannelCredentials(), args);
    inst->admin = pb::AdapterAdmin::NewStub(inst->admin_channel);
    return inst;
  }

  std::unique_ptr<grpc::ClientContext> AdminContext(const std::string& token = kToken) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
    return ctx;
  }
  grpc::Status Load(const std::string& name, const std::string& path,
                    const std::string& token = kToken) {
    pb::LoadAdapterRequest req;
    req.set_name(name);
    req.set_path(path);
    pb::LoadAdapterResponse resp;
    return admin->LoadAdapter(AdminContext(token).get(), req, &resp);
  }
  absl::StatusOr<pb::AdapterStatus> Get(const std::string& name) {
    pb::GetAdapterRequest req;
    req.set_name(name);
    pb::AdapterStatus resp;
    grpc::Status st = admin->GetAdapter(AdminContext().get(), req, &resp);
    if (!st.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
    }
    return resp;
  }
  std::vector<AdminAuditEntry> Audit() {
    std::lock_guard<std::mutex> lock(audit_mu);
    return audit;
  }
  double Metric(const std::string& sample) {
    auto m = test_util::ParsePrometheus(test_util::HttpGetMetrics(metrics->port()));
    return m.count(sample) ? m[sample] : 0.0;
  }
};

pb::GenerateRequest Greedy(const std::string& text, uint32_t max_new_tokens) {
  pb::GenerateRequest req;
  req.set_text(text);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_stopping()->set_max_new_tokens(max_new_tokens);
  req.mutable_stopping()->set_ignore_eos(true);
  return req;
}

// Runs a Generate to the end; the status and the number of tokens streamed.
struct GenResult {
  grpc::Status status;
  size_t tokens = 0;
};
GenResult RunGenerate(pb::Inference::Stub& stub, const pb::GenerateRequest& req) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
  auto reader = stub.Generate(&ctx, req);
  pb::GenerateResponse msg;
  GenResult r;
  while (reader->Read(&msg)) r.tokens += static_cast<size_t>(msg.token_ids_size());
  r.status = reader->Finish();
  return r;
}

// Sends `bytes` as the body of server-streaming `method` and reads to the end.
grpc::Status RawStreamingCall(grpc::Channel* channel, const std::string& method,
                              const std::string& bytes) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  const grpc::internal::RpcMethod rpc(method.c_str(), grpc::internal::RpcMethod::SERVER_STREAMING);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel, rpc, &ctx, request));
  grpc::ByteBuffer msg;
  while (reader->Read(&msg)) {
  }
  return reader->Finish();
}

// Sends `bytes` as the body of unary `method`, with the admin token when `token` is set.
grpc::Status RawUnaryCall(grpc::Channel* channel, const std::string& method,
                          const std::string& bytes, const std::string& token = "") {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  const grpc::internal::RpcMethod rpc(method.c_str(), grpc::internal::RpcMethod::NORMAL_RPC);
  return grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(channel, rpc, &ctx,
                                                                               request, &response);
}

std::string Varint(uint64_t v) {
  std::string out;
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Malformed bodies

struct MalformedBody {
  std::string name;
  std::string bytes;
  std::string reason;  // expected in the message
};

std::vector<MalformedBody> MalformedBodies(const std::string& type) {
  std::vector<MalformedBody> out;
  std::string random;
  uint32_t x = 12345;
  for (int i = 0; i < 300; ++i) {
    x = x * 1103515245 + 12345;
    random.push_back(static_cast<char>(x >> 23));
  }
  out.push_back({"random bytes", random, "not a valid " + type});
  // Field 3 (text, length-delimited) says 100 bytes and carries 5.
  out.push_back({"truncated field", std::string("\x1a\x64hello", 7), "malformed protobuf"});
  out.push_back({"length 2^62", "\x1a" + Varint(uint64_t{1} << 62) + "abc", "malformed protobuf"});
  std::string groups;
  for (int i = 0; i < 5000; ++i) groups += "\x0b";  // field 1, start group
  for (int i = 0; i < 5000; ++i) groups += "\x0c";  // field 1, end group
  out.push_back({"5000 nested groups", groups, "not a valid " + type});
  return out;
}

TEST(HardeningTest, MalformedBodiesAreInvalidArgumentWithAReasonAndCounted) {
  AdapterRoot root;
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  const double before = inst->Metric(
      "moleserve_requests_rejected_total{code=\"invalid_argument\",protocol=\"grpc\"}");
  int sent = 0;
  for (const MalformedBody& body : MalformedBodies("moleserve.v1.GenerateRequest")) {
    SCOPED_TRACE(body.name);
    grpc::Status st =
        RawStreamingCall(inst->channel.get(), "/moleserve.v1.Inference/Generate", body.bytes);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(body.reason));
    ++sent;
  }
  // A string field that is not UTF-8 is named.
  std::string text = "\x1a\x03\xff\xfe\x41";
  grpc::Status utf8 =
      RawStreamingCall(inst->channel.get(), "/moleserve.v1.Inference/Generate", text);
  EXPECT_EQ(utf8.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(utf8.error_message(),
              HasSubstr("moleserve.v1.GenerateRequest.text is not valid UTF-8"));
  ++sent;
  // Nested: stopping.stop[0] (field 7 -> field 2).
  std::string stop = std::string("\x3a\x04\x12\x02\xc3\x28", 6);
  grpc::Status nested =
      RawStreamingCall(inst->channel.get(), "/moleserve.v1.Inference/Generate", stop);
  EXPECT_THAT(nested.error_message(), HasSubstr("moleserve.v1.StoppingCriteria.stop is not valid"));
  ++sent;
  grpc::Status tokenize =
      RawUnaryCall(inst->channel.get(), "/moleserve.v1.Inference/Tokenize", "\x0a\x02\xff\xff");
  EXPECT_EQ(tokenize.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(tokenize.error_message(), HasSubstr("TokenizeRequest"));
  ++sent;

  // The admin service: the token is checked first, then the body.
  for (const MalformedBody& body : MalformedBodies("moleserve.v1.LoadAdapterRequest")) {
    SCOPED_TRACE("admin " + body.name);
    grpc::Status st = RawUnaryCall(inst->admin_channel.get(),
                                   "/moleserve.v1.AdapterAdmin/LoadAdapter", body.bytes, kToken);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(body.reason));
    ++sent;
    grpc::Status anonymous = RawUnaryCall(inst->admin_channel.get(),
                                          "/moleserve.v1.AdapterAdmin/LoadAdapter", body.bytes);
    EXPECT_EQ(anonymous.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  grpc::Status admin_utf8 = RawUnaryCall(
      inst->admin_channel.get(), "/moleserve.v1.AdapterAdmin/GetAdapter", "\x0a\x01\x80", kToken);
  EXPECT_THAT(admin_utf8.error_message(),
              HasSubstr("moleserve.v1.GetAdapterRequest.name is not valid UTF-8"));
  ++sent;

  EXPECT_EQ(inst->Metric(
                "moleserve_requests_rejected_total{code=\"invalid_argument\",protocol=\"grpc\"}") -
                before,
            sent);
  // Still serving, and nothing was loaded.
  GenResult ok = RunGenerate(*inst->stub, Greedy("Hello", 3));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens, 3u);
}

TEST(HardeningTest, ParseRequestAcceptsWhatProtobufWrites) {
  pb::GenerateRequest req = Greedy("h\xc3\xa9llo", 4);
  req.set_adapter("a");
  req.mutable_stopping()->add_stop("\n");
  req.mutable_stopping()->add_stop_token_ids(3);
  req.mutable_routing()->set_k(2);
  pb::GenerateRequest parsed;
  ASSERT_TRUE(ParseRequest(req.SerializeAsString(), &parsed).ok());
  EXPECT_EQ(parsed.SerializeAsString(), req.SerializeAsString());
  // Through a ByteBuffer too, and unknown fields (a newer client) are not an error.
  std::string bytes = req.SerializeAsString() + "\xf8\x06\x01";  // field 111, varint 1
  grpc::Slice slice(bytes);
  pb::GenerateRequest from_buffer;
  EXPECT_TRUE(ParseRequest(grpc::ByteBuffer(&slice, 1), &from_buffer).ok());
  EXPECT_EQ(from_buffer.text(), req.text());
  // An empty body is the default message.
  EXPECT_TRUE(ParseRequest(std::string(), &parsed).ok());
  EXPECT_EQ(parsed.ByteSizeLong(), 0u);
}

// ---------------------------------------------------------------------------------------------
// The audit log

TEST(HardeningTest, AuditLinesAreOneJsonObjectWhateverTheStrings) {
  AdminAuditEntry e{.peer = "ipv4:127.0.0.1:5555",
                    .authenticated = false,
                    .method = "LoadAdapter",
                    .adapter = "x\nadmin audit: peer=ipv4:1.2.3.4 authenticated=true -> OK",
                    .detail = std::string("path=a\0b\r\x1b[31m\xff", 14),
                    .result = "UNAUTHENTICATED: wrong admin token"};
  const std::string line = FormatAuditLine(e);
  EXPECT_EQ(line.find('\n'), std::string::npos) << line;
  EXPECT_EQ(line.find('\r'), std::string::npos) << line;
  for (char c : line) {
    EXPECT_TRUE(c >= 0x20 && c < 0x7f) << "byte " << int{static_cast<unsigned char>(c)};
  }
  const nlohmann::json parsed = nlohmann::json::parse(line);
  EXPECT_EQ(parsed["event"], "admin_audit");
  EXPECT_EQ(parsed["authenticated"], false);
  EXPECT_EQ(parsed["adapter"], e.adapter);  // escaped on the line, intact when read back
  EXPECT_EQ(parsed["method"], "LoadAdapter");
  // Long fields are cut.
  e.adapter = std::string(100000, 'a');
  EXPECT_LT(FormatAuditLine(e).size(), 1000u);
}

TEST(HardeningTest, RefusedAdminCallsAuditOnlyPeerMethodAndRefusal) {
  AdapterRoot root;
  root.Write("good", 1);
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  const std::string forged =
      "x\nadmin audit: peer=ipv4:10.0.0.1:1 authenticated=true method=LoadAdapter -> OK";
  EXPECT_EQ(inst->Load(forged, "good\nforged", "").error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(inst->Load(forged, "good", "wrong-token-wrong-token").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  // An authenticated call with the same strings is refused for its name, and its line is one line.
  grpc::Status named = inst->Load(forged, "good");
  EXPECT_EQ(named.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(named.error_message(), HasSubstr("x\\nadmin audit"));  // quoted, escaped
  std::vector<AdminAuditEntry> audit = inst->Audit();
  ASSERT_EQ(audit.size(), 3u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_FALSE(audit[i].authenticated);
    EXPECT_EQ(audit[i].method, "LoadAdapter");
    EXPECT_EQ(audit[i].adapter, "") << "a refused call's strings must not reach the log";
    EXPECT_EQ(audit[i].detail, "");
    EXPECT_THAT(audit[i].result, HasSubstr("UNAUTHENTICATED"));
    EXPECT_THAT(audit[i].peer, HasSubstr("127.0.0.1"));
  }
  EXPECT_TRUE(audit[2].authenticated);
  EXPECT_EQ(audit[2].adapter, forged);
  for (const AdminAuditEntry& e : audit) {
    EXPECT_EQ(FormatAuditLine(e).find('\n'), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// Names and paths

TEST(HardeningTest, NamesAndPathsOutsideTheDocumentedSetAreRefused) {
  AdapterRoot root;
  root.Write("good", 2);
  root.Write("evil", 3);
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  struct Case {
    std::string what;
    std::string name;
    std::string path;
    std::string message;
  };
  const std::vector<Case> refused = {
      {"NUL in the path", "n1", std::string("evil\0/../good", 13), "byte 0x00 (NUL) at offset 4"},
      {"NUL cutting to another dir", "n2", std::string("good\0x", 6), "NUL"},
      {"newline in the path", "n3", "good\n", "byte 0x0a (a control character)"},
      {"space", "n4", "go od", "a space"},
      {"backslash", "n5", "good\\x", "outside the allowed set"},
      {"non-ASCII", "n6", "g\xc3\xa9od", "non-ASCII"},
      {"dot-dot that returns", "n7", "good/../good", "'..' component"},
      {"leading dot-dot", "n8", "../x", "'..' component"},
      {"absolute", "n9", "/etc", "absolute"},
      {"1025 bytes", "n10", std::string(1025, 'a'), "1025 bytes; the limit is 1024"},
      {"NUL in the name", std::string("go\0od", 5), "good", "byte 0x00 (NUL) at offset 2"},
      {"newline in the name", "good\nx", "good", "control character"},
      {"129-byte name", std::string(129, 'n'), "good", "129 bytes"},
      {"empty name", "", "good", "0 bytes"},
  };
  for (const Case& c : refused) {
    SCOPED_TRACE(c.what);
    grpc::Status st = inst->Load(c.name, c.path);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(c.message));
    EXPECT_LT(st.error_message().size(), 400u);
  }
  // Nothing of these is served.
  GenResult evil = RunGenerate(*inst->stub, [] {
    pb::GenerateRequest r = Greedy("hi", 2);
    r.set_adapter("n1");
    return r;
  }());
  EXPECT_NE(evil.status.error_code(), grpc::StatusCode::OK);
  // At the limits: a 128-byte name and a 1024-byte path are accepted as such.
  EXPECT_TRUE(inst->Load(std::string(128, 'n'), "good").ok());
  std::string long_path = "good";
  while (long_path.size() + 2 <= 1024) long_path += "/.";
  if (long_path.size() < 1024) long_path += "/";
  ASSERT_EQ(long_path.size(), 1024u);
  grpc::Status at_limit = inst->Load("longpath", long_path);
  EXPECT_TRUE(at_limit.ok()) << at_limit.error_message();
  // `./good` and `good/` are the same directory.
  EXPECT_TRUE(inst->Load("dot", "./good").ok());
  EXPECT_TRUE(inst->Load("slash", "good/").ok());
}

// ---------------------------------------------------------------------------------------------
// Special files, deadlines, shutdown

TEST(HardeningTest, SpecialFilesAreRefusedAtOnce) {
  AdapterRoot root;
  root.Write("template", 4);
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  int n = 0;
  for (const auto& entry : fs::directory_iterator(root.path / "template")) {
    const std::string file = entry.path().filename().string();
    SCOPED_TRACE(file);
    const std::string dir = absl::StrCat("fifo", n++);
    fs::copy(root.path / "template", root.path / dir);
    fs::remove(root.path / dir / file);
    ASSERT_EQ(mkfifo((root.path / dir / file).c_str(), 0600), 0);
    grpc::Status st = inst->Load(dir, dir);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr("FIFO"));
    absl::StatusOr<pb::AdapterStatus> got = inst->Get(dir);
    ASSERT_TRUE(got.ok());
    EXPECT_EQ(got->info().state(), pb::ADAPTER_STATE_FAILED);
  }
  EXPECT_GE(n, 2);
  // A directory where a file is expected.
  fs::copy(root.path / "template", root.path / "dirfile");
  fs::remove(root.path / "dirfile" / "mole_config.json");
  fs::create_directory(root.path / "dirfile" / "mole_config.json");
  EXPECT_EQ(inst->Load("dirfile", "dirfile").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

// A symlink nested in a subdirectory of the adapter cannot reach outside the root, and what the
// load would have read out there never shows in a message.
TEST(HardeningTest, NestedLinksOutsideTheRootAreRefused) {
  AdapterRoot root;
  root.Write("a", 10);
  const fs::path outside =
      fs::path(::testing::TempDir()) / absl::StrCat("outside_nested_", getpid());
  fs::create_directories(outside);
  std::ofstream(outside / "secret.txt") << "secret";
  fs::create_directories(root.path / "a" / "sub");
  fs::create_directory_symlink(outside, root.path / "a" / "sub" / "escape");
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  grpc::Status st = inst->Load("a", "a");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("'sub/escape' links outside the adapter root"));
  fs::remove(root.path / "a" / "sub" / "escape");
  EXPECT_TRUE(inst->Load("a", "a").ok());  // the same adapter without the link loads
  fs::remove_all(outside);
}

// Text from an adapter file (here a tensor name with an escape sequence and a newline, 50 KB long)
// reaches the client and the adapter's stored error escaped and bounded.
TEST(HardeningTest, FileTextInErrorsIsEscapedAndBounded) {
  AdapterRoot root;
  root.Write("a", 11);
  // A tensor the adapter does not use, named hostilely: the loader refuses it by name.
  const std::string hostile = "\x1b[2J\nadmin audit: forged " + std::string(50000, 'x');
  const std::string weights = (root.path / "a" / "model.safetensors").string();
  std::vector<std::vector<float>> data;
  std::vector<engine::SafetensorsWriteTensor> tensors;
  {
    auto file = engine::SafetensorsFile::Open(weights);
    ASSERT_TRUE(file.ok()) << file.status();
    data.reserve((*file)->tensors().size() + 1);
    for (const engine::SafetensorsTensor& t : (*file)->tensors()) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      data.emplace_back(static_cast<size_t>(n));
      ASSERT_TRUE((*file)->ReadF32(t.name, t.shape, data.back().data()).ok());
      tensors.push_back({t.name, t.shape, data.back().data()});
    }
  }
  data.push_back({0.0f});
  tensors.push_back({hostile, {1}, data.back().data()});
  ASSERT_TRUE(engine::WriteSafetensors(weights, tensors, {}).ok());
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  grpc::Status st = inst->Load("a", "a");
  ASSERT_FALSE(st.ok());
  EXPECT_LT(st.error_message().size(), 1200u);
  for (char c : st.error_message()) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << int{c};
  absl::StatusOr<pb::AdapterStatus> got = inst->Get("a");
  ASSERT_TRUE(got.ok());
  EXPECT_LT(got->error().size(), 1200u);
  EXPECT_EQ(got->error().find('\n'), std::string::npos);
}

TEST(HardeningTest, ALoadPastItsDeadlineFails) {
  AdapterRoot root;
  root.Write("a", 5);
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  o.max_adapter_load_time = absl::Milliseconds(1);
  // The stage hook runs before the deadline check: 20 ms in it puts every load past 1 ms.
  o.adapter_load_stage_hook = [](std::string_view) { absl::SleepFor(absl::Milliseconds(20)); };
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  grpc::Status st = inst->Load("a", "a");
  EXPECT_EQ(st.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr("--max-adapter-load-time"));
  absl::StatusOr<pb::AdapterStatus> got = inst->Get("a");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->info().state(), pb::ADAPTER_STATE_FAILED);
  EXPECT_EQ(inst->Metric("moleserve_adapter_load_failures_total{reason=\"timeout\"}"), 1);
}

TEST(HardeningTest, ALoadInProgressStopsWhenTheServerDrains) {
  AdapterRoot root;
  root.Write("a", 6);
  absl::Notification reached, release;
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  o.adapter_load_stage_hook = [&](std::string_view stage) {
    if (stage != "read") return;
    reached.Notify();
    release.WaitForNotification();
  };
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  grpc::Status loaded;
  std::thread loader([&] { loaded = inst->Load("a", "a"); });
  reached.WaitForNotification();
  // The drain begins while the load is reading; the load gives up at its next stage.
  inst->engine->StopAccepting();
  release.Notify();
  loader.join();
  EXPECT_EQ(loaded.error_code(), grpc::StatusCode::UNAVAILABLE) << loaded.error_message();
  EXPECT_THAT(loaded.error_message(), HasSubstr("shutting down"));
  inst->server->Drain(absl::Seconds(1));
}

TEST(HardeningTest, DigestingStopsWhenTheLoadMustNotGoOn) {
  AdapterRoot root;
  root.Write("a", 9);
  // A 130 MiB file (sparse): hashing asks keep_going before the file and every 64 MiB.
  { std::ofstream big(root.path / "a" / "padding.bin", std::ios::binary); }
  fs::resize_file(root.path / "a" / "padding.bin", 130 << 20);
  int calls = 0;
  auto counting = [&] {
    ++calls;
    return absl::OkStatus();
  };
  absl::StatusOr<engine::AdapterFiles> all =
      engine::InspectAdapterFiles((root.path / "a").string(), {}, /*digest=*/true, counting);
  ASSERT_TRUE(all.ok()) << all.status();
  const int files = static_cast<int>(all->num_files);
  EXPECT_EQ(calls, files + 2);  // one per file, and at 64 and 128 MiB of the big one
  // Refusing at the last check (inside the big file) stops the digest with that status.
  const int allowed = calls - 1;
  calls = 0;
  auto refusing = [&] {
    return ++calls > allowed ? absl::DeadlineExceededError("too late") : absl::OkStatus();
  };
  absl::StatusOr<engine::AdapterFiles> stopped =
      engine::InspectAdapterFiles((root.path / "a").string(), {}, /*digest=*/true, refusing);
  EXPECT_TRUE(absl::IsDeadlineExceeded(stopped.status())) << stopped.status();
}

// ---------------------------------------------------------------------------------------------
// Bounded echoes

TEST(HardeningTest, ErrorsQuoteAShortEscapedPrefixOfTheirInput) {
  AdapterRoot root;
  root.Write("m", 7);
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  o.adapters = {{"m", (root.path / "m").string()}};
  auto inst = Instance::Start(o);
  ASSERT_NE(inst, nullptr);
  // A client with gRPC's default 8 KB metadata limit sees the real error.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_MAX_METADATA_SIZE, 8 << 10);
  auto small = pb::Inference::NewStub(grpc::CreateCustomChannel(
      absl::StrCat("127.0.0.1:", inst->server->port()), grpc::InsecureChannelCredentials(), args));
  const std::string huge(100 << 10, 'z');

  pb::GenerateRequest unknown = Greedy("hi", 2);
  unknown.set_adapter(huge + "\n");
  GenResult r = RunGenerate(*small, unknown);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::NOT_FOUND) << r.status.error_message();
  EXPECT_LT(r.status.error_message().size(), 300u);
  EXPECT_THAT(r.status.error_message(), HasSubstr("(102401 bytes)"));

  pb::GenerateRequest algorithm = Greedy("hi", 2);
  algorithm.set_adapter("m");
  algorithm.mutable_routing()->set_algorithm(huge);
  r = RunGenerate(*small, algorithm);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  EXPECT_LT(r.status.error_message().size(), 400u);
  EXPECT_THAT(r.status.error_message(), HasSubstr("unknown algorithm"));

  grpc::ClientContext header_ctx;
  header_ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
  header_ctx.AddMetadata(kAdapterHeader, std::string(4000, 'h'));
  pb::GenerateRequest conflict = Greedy("hi", 2);
  conflict.set_adapter(std::string(4000, 'b'));
  auto reader = small->Generate(&header_ctx, conflict);
  pb::GenerateResponse msg;
  while (reader->Read(&msg)) {
  }
  grpc::Status header_status = reader->Finish();
  EXPECT_EQ(header_status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(header_status.error_message().size(), 400u);

  // Admin (whose messages are at most 64 KiB): a 60 KB name.
  const std::string large(60 << 10, 'z');
  grpc::Status name = inst->Load(large, "m");
  EXPECT_EQ(name.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_LT(name.error_message().size(), 300u);
  pb::GetAdapterRequest get;
  get.set_name(large);
  pb::AdapterStatus status;
  grpc::Status missing = inst->admin->GetAdapter(inst->AdminContext().get(), get, &status);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_LT(missing.error_message().size(), 300u);
}

// ---------------------------------------------------------------------------------------------
// Every documented bound, accepted at the limit and refused one past it

TEST(HardeningTest, EveryDocumentedBoundAtItsEdge) {
  AdapterRoot root;
  root.Write("m", 8);
  engine::EngineOptions o;
  o.adapters = {{"m", (root.path / "m").string()}};
  o.max_model_len = 64;
  auto inst = Instance::Start(o, {.max_receive_message_bytes = 64 << 10});
  ASSERT_NE(inst, nullptr);
  const engine::ModelInfo& info = inst->engine->model_info();
  ASSERT_EQ(info.context_length, 64);

  struct Edge {
    std::string bound;
    std::function<void(pb::GenerateRequest&)> at_limit;
    std::function<void(pb::GenerateRequest&)> one_past;
    std::string message;  // in the refusal
  };
  auto tokens = [](pb::GenerateRequest& r, int n, uint32_t id = 65) {
    r.clear_input();
    for (int i = 0; i < n; ++i) r.mutable_token_ids()->add_ids(i == 0 ? kBos : id);
  };
  const uint32_t vocab = static_cast<uint32_t>(info.vocab_size);
  const std::vector<Edge> edges = {
      {"top_logprobs 20", [](auto& r) { r.mutable_output()->set_top_logprobs(20); },
       [](auto& r) { r.mutable_output()->set_top_logprobs(21); }, "top_logprobs"},
      {"max_new_tokens = context - prompt",
       [&](auto& r) {
         tokens(r, 10);
         r.mutable_stopping()->set_max_new_tokens(54);
       },
       [&](auto& r) {
         tokens(r, 10);
         r.mutable_stopping()->set_max_new_tokens(55);
       },
       "exceeds the context"},
      {"prompt = context - 1",
       [&](auto& r) {
         tokens(r, 63);
         r.mutable_stopping()->set_max_new_tokens(1);
       },
       [&](auto& r) {
         tokens(r, 64);
         r.mutable_stopping()->set_max_new_tokens(1);
       },
       "must be at most 63"},
      {"token id vocab - 1", [&](auto& r) { tokens(r, 3, vocab - 1); },
       [&](auto& r) { tokens(r, 3, vocab); }, "outside the vocabulary"},
      {"stop token id vocab - 1",
       [&](auto& r) { r.mutable_stopping()->add_stop_token_ids(vocab - 1); },
       [&](auto& r) { r.mutable_stopping()->add_stop_token_ids(vocab); }, "stop_token_ids"},
      {"16 stop strings",
       [](auto& r) {
         for (int i = 0; i < 16; ++i) r.mutable_stopping()->add_stop(absl::StrCat("@", i));
       },
       [](auto& r) {
         for (int i = 0; i < 17; ++i) r.mutable_stopping()->add_stop(absl::StrCat("@", i));
       },
       "at most 16"},
      {"stop string of 256 bytes",
       [](auto& r) { r.mutable_stopping()->add_stop(std::string(256, '@')); },
       [](auto& r) { r.mutable_stopping()->add_stop(std::string(257, '@')); }, "1..256 bytes"},
      {"request_id of 256 bytes", [](auto& r) { r.set_request_id(std::string(256, 'r')); },
       [](auto& r) { r.set_request_id(std::string(257, 'r')); }, "at most 256"},
      {"routing k = experts",
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_k(4);
       },
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_k(5);
       },
       "exceeds the 4 experts"},
      {"routing k = 1",
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_k(1);
       },
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_k(0);
       },
       "must be >= 1"},
      {"routing p = 1",
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_algorithm("top_p");
         r.mutable_routing()->set_p(1.0f);
       },
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_algorithm("top_p");
         r.mutable_routing()->set_p(std::nextafter(1.0f, 2.0f));
       },
       "outside (0, 1]"},
      {"routing p just above 0",
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_algorithm("top_p");
         r.mutable_routing()->set_p(std::nextafter(0.0f, 1.0f));
       },
       [](auto& r) {
         r.set_adapter("m");
         r.mutable_routing()->set_algorithm("top_p");
         r.mutable_routing()->set_p(0.0f);
       },
       "outside (0, 1]"},
  };
  for (const Edge& e : edges) {
    SCOPED_TRACE(e.bound);
    pb::GenerateRequest ok = Greedy("Hi", 1);
    e.at_limit(ok);
    GenResult at = RunGenerate(*inst->stub, ok);
    EXPECT_TRUE(at.status.ok()) << "refused at the limit: " << at.status.error_message();
    pb::GenerateRequest bad = Greedy("Hi", 1);
    e.one_past(bad);
    GenResult past = RunGenerate(*inst->stub, bad);
    EXPECT_EQ(past.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << past.status.error_message();
    EXPECT_THAT(past.status.error_message(), HasSubstr(e.message));
  }

  pb::TokenizeRequest tok;
  pb::TokenizeResponse tok_out;
  auto big = [&](size_t n) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    tok.set_text(std::string(n, 'a'));
    return inst->stub->Tokenize(&ctx, tok, &tok_out);
  };
  // The 64 KiB message limit first: a message of exactly the limit passes, one byte more does not.
  const size_t overhead = [&] {
    pb::TokenizeRequest probe;
    probe.set_text(std::string(60000, 'a'));
    return probe.ByteSizeLong() - 60000;
  }();
  grpc::Status at_message_limit = big((64 << 10) - overhead);
  EXPECT_TRUE(at_message_limit.ok()) << at_message_limit.error_message();
  grpc::Status past_message_limit = big((64 << 10) - overhead + 1);
  EXPECT_EQ(past_message_limit.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
}

TEST(HardeningTest, TextLimitOfOneMebibyteAtItsEdge) {
  engine::EngineOptions o;
  auto inst = Instance::Start(o, {.max_receive_message_bytes = 4 << 20});
  ASSERT_NE(inst, nullptr);
  auto tokenize = [&](size_t n) {
    pb::TokenizeRequest req;
    req.set_text(std::string(n, 'a'));
    pb::TokenizeResponse out;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + kCallTimeout));
    return inst->stub->Tokenize(&ctx, req, &out);
  };
  EXPECT_TRUE(tokenize(1 << 20).ok());
  grpc::Status past = tokenize((1 << 20) + 1);
  EXPECT_EQ(past.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(past.error_message(), HasSubstr("the limit is 1048576"));
  // Generate refuses the same text for its size, before tokenizing it.
  GenResult gen = RunGenerate(*inst->stub, Greedy(std::string((1 << 20) + 1, 'a'), 1));
  EXPECT_EQ(gen.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(gen.status.error_message(), HasSubstr("the limit is 1048576"));
  GenResult at = RunGenerate(*inst->stub, Greedy(std::string(1 << 20, 'a'), 1));
  EXPECT_THAT(at.status.error_message(), Not(HasSubstr("the limit is 1048576")));
}

}  // namespace
}  // namespace moleserve::server

namespace moleserve::server {
namespace {

// ---------------------------------------------------------------------------------------------
// Listeners

TEST(HardeningTest, EachListenerIsExactlyOneSocketOnItsAddress) {
  const std::vector<std::string> before = ListeningTcpAddresses();
  AdapterRoot root;
  engine::EngineOptions o;
  o.adapter_root = root.path.string();
  auto inst = Instance::Start(o);  // inference and admin on 127.0.0.1:0, /metrics on 127.0.0.1:0
  ASSERT_NE(inst, nullptr);
  std::vector<std::string> added;
  for (const std::string& a : ListeningTcpAddresses()) {
    if (std::find(before.begin(), before.end(), a) == before.end()) added.push_back(a);
  }
  EXPECT_THAT(
      added, ::testing::UnorderedElementsAre(absl::StrCat("127.0.0.1:", inst->server->port()),
                                             absl::StrCat("127.0.0.1:", inst->server->admin_port()),
                                             absl::StrCat("127.0.0.1:", inst->metrics->port())));
}

TEST(HardeningTest, AdminOnANonLoopbackAddressNeedsTlsOrAnExplicitFlag) {
  EXPECT_TRUE(IsLoopbackHost("127.0.0.1"));
  EXPECT_TRUE(IsLoopbackHost("127.8.9.10"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("LocalHost"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
  EXPECT_FALSE(IsLoopbackHost("::"));
  EXPECT_FALSE(IsLoopbackHost("10.0.0.1"));
  EXPECT_FALSE(IsLoopbackHost("admin.internal"));
  EXPECT_EQ(HostOf("[::1]:50052"), "::1");
  EXPECT_EQ(HostOf("0.0.0.0:50052"), "0.0.0.0");

  auto engine = engine::Engine::Create({});
  ASSERT_TRUE(engine.ok());
  ServerOptions so{
      .listen_address = "127.0.0.1:0", .admin_address = "0.0.0.0:0", .admin_token = kToken};
  absl::StatusOr<std::unique_ptr<MoleServer>> refused = MoleServer::Start(engine->get(), so);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("--admin-allow-insecure"));
  so.allow_insecure_admin = true;
  absl::StatusOr<std::unique_ptr<MoleServer>> allowed = MoleServer::Start(engine->get(), so);
  EXPECT_TRUE(allowed.ok()) << allowed.status();
}

// ---------------------------------------------------------------------------------------------
// TLS

// Certificates made with the openssl command line in a temp directory: two CAs, a server
// certificate (localhost, 127.0.0.1) and a client certificate from each.
class Pki {
 public:
  Pki() {
    dir_ = fs::path(::testing::TempDir()) / absl::StrCat("moleserve_pki_", getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    std::ofstream(dir_ / "san.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    ok_ = Run("openssl version") && MakeCa("ca1") && MakeCa("ca2") &&
          MakeLeaf("server1", "ca1", "localhost", true) &&
          MakeLeaf("server2", "ca2", "localhost", true) &&
          MakeLeaf("client1", "ca1", "c1", false) && MakeLeaf("client2", "ca2", "c2", false);
  }
  ~Pki() { fs::remove_all(dir_); }
  bool ok() const { return ok_; }
  std::string Path(const std::string& file) const { return (dir_ / file).string(); }
  std::string Read(const std::string& file) const {
    std::ifstream in(dir_ / file);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  bool Run(const std::string& cmd) const {
    const std::string full = absl::StrCat("cd '", dir_.string(), "' && ", cmd, " >/dev/null 2>&1");
    const int rc = std::system(full.c_str());
    if (rc != 0) ADD_FAILURE() << "failed: " << cmd;
    return rc == 0;
  }
  bool MakeCa(const std::string& name) const {
    return Run(
        absl::StrCat("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                     "-nodes -keyout ",
                     name, ".key -out ", name, ".pem -days 2 -subj /CN=", name));
  }
  bool MakeLeaf(const std::string& name, const std::string& ca, const std::string& cn,
                bool server) const {
    return Run(absl::StrCat("openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                            "-keyout ",
                            name, ".key -out ", name, ".csr -subj /CN=", cn)) &&
           Run(absl::StrCat("openssl x509 -req -in ", name, ".csr -CA ", ca, ".pem -CAkey ", ca,
                            ".key -CAcreateserial -days 2 -out ", name, ".pem",
                            server ? " -extfile san.ext" : ""));
  }

  fs::path dir_;
  bool ok_ = false;
};

// A channel to 127.0.0.1:port trusting `ca` (PEM), presenting `client` (cert, key) when given.
std::shared_ptr<grpc::Channel> TlsChannel(int port, const std::string& ca,
                                          const std::string& client_cert = "",
                                          const std::string& client_key = "") {
  grpc::SslCredentialsOptions ssl{
      .pem_root_certs = ca, .pem_private_key = client_key, .pem_cert_chain = client_cert};
  grpc::ChannelArguments args;
  // A fresh connection per channel (no sharing with channels of other credentials).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port), grpc::SslCredentials(ssl),
                                   args);
}

// ListModels over `channel` within a few seconds.
grpc::Status Ping(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = pb::Inference::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  pb::ListModelsResponse out;
  return stub->ListModels(&ctx, pb::ListModelsRequest(), &out);
}
grpc::Status AdminPing(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = pb::AdapterAdmin::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  ctx.AddMetadata("authorization", absl::StrCat("Bearer ", kToken));
  pb::ListAdaptersResponse out;
  return stub->ListAdapters(&ctx, pb::ListAdaptersRequest(), &out);
}

TEST(HardeningTest, TlsAndMutualTlsPerListener) {
  Pki pki;
  ASSERT_TRUE(pki.ok());
  ServerOptions so;
  so.tls = {.cert_file = pki.Path("server1.pem"), .key_file = pki.Path("server1.key")};
  so.admin_tls = so.tls;
  so.admin_tls.client_ca_file = pki.Path("ca1.pem");
  auto inst = Instance::Start({}, so);
  ASSERT_NE(inst, nullptr);
  const int port = inst->server->port();
  const int admin_port = inst->server->admin_port();

  // Inference: TLS, no client certificate needed.
  EXPECT_TRUE(Ping(TlsChannel(port, pki.Read("ca1.pem"))).ok());
  EXPECT_FALSE(Ping(inst->channel).ok()) << "a plaintext client must be refused";
  EXPECT_FALSE(Ping(TlsChannel(port, pki.Read("ca2.pem"))).ok())
      << "a client that does not trust the server's CA must fail";

  // Admin: mTLS with clients of ca1 only.
  EXPECT_TRUE(AdminPing(TlsChannel(admin_port, pki.Read("ca1.pem"), pki.Read("client1.pem"),
                                   pki.Read("client1.key")))
                  .ok());
  EXPECT_FALSE(AdminPing(TlsChannel(admin_port, pki.Read("ca1.pem"))).ok())
      << "no client certificate";
  EXPECT_FALSE(AdminPing(TlsChannel(admin_port, pki.Read("ca1.pem"), pki.Read("client2.pem"),
                                    pki.Read("client2.key")))
                   .ok())
      << "a client certificate from an unknown CA";
  EXPECT_FALSE(AdminPing(inst->admin_channel).ok()) << "plaintext";
}

TEST(HardeningTest, BadTlsFilesStopStartupWithTheirName) {
  Pki pki;
  ASSERT_TRUE(pki.ok());
  auto engine = engine::Engine::Create({});
  ASSERT_TRUE(engine.ok());
  struct Case {
    std::string what;
    TlsOptions tls;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"missing key", {.cert_file = pki.Path("server1.pem")}, "both a certificate file and a key"},
      {"absent file",
       {.cert_file = pki.Path("nope.pem"), .key_file = pki.Path("server1.key")},
       "nope.pem"},
      {"key of another certificate",
       {.cert_file = pki.Path("server1.pem"), .key_file = pki.Path("server2.key")},
       "does not belong to the certificate"},
      {"key in place of the certificate",
       {.cert_file = pki.Path("server1.key"), .key_file = pki.Path("server1.key")},
       "no PEM certificate"},
      {"client CA without TLS", {.client_ca_file = pki.Path("ca1.pem")}, "needs TLS"},
      {"client CA that is a key",
       {.cert_file = pki.Path("server1.pem"),
        .key_file = pki.Path("server1.key"),
        .client_ca_file = pki.Path("ca1.key")},
       "no PEM certificate"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    ServerOptions so{.listen_address = "127.0.0.1:0", .tls = c.tls};
    absl::StatusOr<std::unique_ptr<MoleServer>> s = MoleServer::Start(engine->get(), so);
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.status().message(), HasSubstr(c.message));
  }
}

TEST(HardeningTest, RenewedCertificatesApplyWithoutARestart) {
  Pki pki;
  ASSERT_TRUE(pki.ok());
  // The layout of a Kubernetes Secret volume: `live` is a symlink to the current version's
  // directory, swapped atomically on renewal, so certificate and key always change together.
  const fs::path live = fs::path(pki.Path("live"));
  fs::create_directories(pki.Path("v1"));
  fs::create_directories(pki.Path("v2"));
  fs::copy_file(pki.Path("server1.pem"), pki.Path("v1/cert.pem"));
  fs::copy_file(pki.Path("server1.key"), pki.Path("v1/key.pem"));
  fs::copy_file(pki.Path("server2.pem"), pki.Path("v2/cert.pem"));
  fs::copy_file(pki.Path("server2.key"), pki.Path("v2/key.pem"));
  fs::create_directory_symlink("v1", live);
  ServerOptions so;
  so.tls = {.cert_file = (live / "cert.pem").string(),
            .key_file = (live / "key.pem").string(),
            .reload_interval = absl::Seconds(1)};
  auto inst = Instance::Start({}, so);
  ASSERT_NE(inst, nullptr);
  const int port = inst->server->port();
  ASSERT_TRUE(Ping(TlsChannel(port, pki.Read("ca1.pem"))).ok());
  // Renewal: a certificate from ca2, swapped in with the symlink.
  fs::create_directory_symlink("v2", pki.Path("live.new"));
  fs::rename(pki.Path("live.new"), live);
  // Within a few reload intervals new connections get the new certificate (bounded wait).
  bool renewed = false;
  for (int i = 0; i < 120 && !renewed; ++i) {
    renewed = Ping(TlsChannel(port, pki.Read("ca2.pem"))).ok();
    if (!renewed) absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_TRUE(renewed) << "the renewed certificate was never served";
  EXPECT_FALSE(Ping(TlsChannel(port, pki.Read("ca1.pem"))).ok())
      << "the old certificate is still served";
}

}  // namespace
}  // namespace moleserve::server
