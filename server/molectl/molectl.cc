// molectl: command-line client for moleserve.
//
//   molectl generate --text "Hello" --max-new-tokens 32 --temperature 0
//   molectl list
//   molectl health
//   molectl tokenize --text "Hello"
//   molectl admin load NAME PATH [--replace] [--sha256 HEX]    (AdapterAdmin; --admin-addr and
//   molectl admin upload NAME DIR [--replace]                   --admin-token-file, or the
//   molectl admin unload NAME [--force] [--drain-timeout 30s]   MOLESERVE_ADMIN_TOKEN variable;
//   molectl admin list | get NAME | replicas                    server/molectl/admin.h)
//   ... admin load|upload|unload ... --all-replicas [--dns-server IP:PORT]
//
// generate prints text as it streams, then a summary line on stderr. With --tls-ca-file the
// channels use TLS (add --tls-cert-file/--tls-key-file for a listener that requires client
// certificates).

#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "moleserve/v1/admin.grpc.pb.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/cli/dashed_flags.h"
#include "server/grpc/health_client.h"
#include "server/grpc/metadata.h"
#include "server/molectl/admin.h"

ABSL_FLAG(std::string, addr, "localhost:50051", "moleserve address (host:port)");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(120), "Deadline of the call");
ABSL_FLAG(std::string, text, "", "Input text");
ABSL_FLAG(std::string, ids, "", "Input token ids, comma-separated (instead of --text)");
ABSL_FLAG(std::string, adapter, "", "Adapter to apply (empty = base model)");
ABSL_FLAG(int, max_new_tokens, 0, "Tokens to generate (0 = server default)");
ABSL_FLAG(double, temperature, 1.0, "Sampling temperature (0 = greedy)");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling mass, (0, 1]");
ABSL_FLAG(int, top_k, 0, "Top-k sampling (0 = off)");
ABSL_FLAG(double, min_p, 0.0, "Min-p sampling (0 = off)");
ABSL_FLAG(double, repetition_penalty, 1.0, "Repetition penalty (1 = off)");
ABSL_FLAG(int64_t, seed, -1, "Sampling seed (-1 = random)");
ABSL_FLAG(std::vector<std::string>, stop, {},
          "Stop strings, comma-separated; C escapes such as \\n are understood");
ABSL_FLAG(bool, ignore_eos, false, "Keep generating past EOS");
ABSL_FLAG(int, n, 1,
          "Sequences to sample from the prompt; above 1 each is printed whole, as [i] TEXT, once "
          "all finished");
ABSL_FLAG(bool, logprobs, false, "Print each token's id and log-probability");
ABSL_FLAG(bool, routing, false, "Print the experts each routed site chose for every token");
ABSL_FLAG(std::string, routing_algorithm, "", "Routing override: topk, top_p, soft, ...");
ABSL_FLAG(int, routing_k, 0, "Routing override: k (0 = the adapter's)");
ABSL_FLAG(double, routing_p, 0.0, "Routing override: p (0 = the adapter's)");
ABSL_FLAG(std::string, service, "", "Service name for `health` (empty = whole server)");
ABSL_FLAG(std::string, admin_addr, "localhost:50052", "moleserve AdapterAdmin address");
ABSL_FLAG(bool, tls, false,
          "Connect with TLS, trusting the system's CA roots (implied by any --tls-*-file flag)");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA bundle that signed the server's certificate: connect with TLS");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate, for listeners that require one (mTLS)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls-cert-file");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name to verify the server's certificate against (default: the host of the address)");
ABSL_FLAG(std::string, admin_token_file, "",
          "File with the admin token (default: the MOLESERVE_ADMIN_TOKEN variable)");
namespace {

namespace pb = moleserve::v1;

int Fail(const grpc::Status& s) {
  std::cerr << "error: " << s.error_code() << " " << s.error_message() << "\n";
  return 2;
}

std::unique_ptr<grpc::ClientContext> Context() {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + absl::GetFlag(FLAGS_timeout)));
  return ctx;
}

int Generate(pb::Inference::Stub& stub) {
  pb::GenerateRequest req;
  req.set_adapter(absl::GetFlag(FLAGS_adapter));
  if (!absl::GetFlag(FLAGS_ids).empty()) {
    for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_ids), ',')) {
      uint32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        std::cerr << "error: --ids: '" << part << "' is not a token id\n";
        return 2;
      }
      req.mutable_token_ids()->add_ids(id);
    }
  } else {
    req.set_text(absl::GetFlag(FLAGS_text));
  }
  pb::SamplingParams* s = req.mutable_sampling();
  s->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  s->set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  s->set_top_k(absl::GetFlag(FLAGS_top_k));
  s->set_min_p(static_cast<float>(absl::GetFlag(FLAGS_min_p)));
  s->set_repetition_penalty(static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty)));
  if (absl::GetFlag(FLAGS_seed) >= 0) s->set_seed(static_cast<uint64_t>(absl::GetFlag(FLAGS_seed)));
  pb::StoppingCriteria* st = req.mutable_stopping();
  st->set_max_new_tokens(static_cast<uint32_t>(std::max(0, absl::GetFlag(FLAGS_max_new_tokens))));
  for (const std::string& stop : absl::GetFlag(FLAGS_stop)) {
    std::string unescaped;
    if (!absl::CUnescape(stop, &unescaped)) {
      std::cerr << "error: --stop: bad escape in '" << stop << "'\n";
      return 2;
    }
    st->add_stop(unescaped);
  }
  st->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  const int n = absl::GetFlag(FLAGS_n);
  if (n < 1) {
    std::cerr << "error: --n must be at least 1\n";
    return 2;
  }
  req.set_n(static_cast<uint32_t>(n));
  req.mutable_output()->set_logprobs(absl::GetFlag(FLAGS_logprobs));
  req.mutable_output()->set_return_routing(absl::GetFlag(FLAGS_routing));
  if (!absl::GetFlag(FLAGS_routing_algorithm).empty()) {
    req.mutable_routing()->set_algorithm(absl::GetFlag(FLAGS_routing_algorithm));
  }
  if (absl::GetFlag(FLAGS_routing_k) > 0) {
    req.mutable_routing()->set_k(static_cast<uint32_t>(absl::GetFlag(FLAGS_routing_k)));
  }
  if (absl::GetFlag(FLAGS_routing_p) > 0) {
    req.mutable_routing()->set_p(static_cast<float>(absl::GetFlag(FLAGS_routing_p)));
  }

  auto ctx = Context();
  // Also as metadata, for a balancer that routes on it (deploy/nginx).
  if (!req.adapter().empty()) ctx->AddMetadata(moleserve::server::kAdapterHeader, req.adapter());
  std::unique_ptr<grpc::ClientReader<pb::GenerateResponse>> reader = stub.Generate(ctx.get(), req);
  pb::GenerateResponse resp;
  std::map<uint32_t, pb::FinalInfo> finals;  // by sequence index
  std::map<uint32_t, std::string> texts;     // n > 1: printed once all finished
  while (reader->Read(&resp)) {
    if (n == 1) {
      std::cout << resp.text() << std::flush;
    } else {
      texts[resp.index()] += resp.text();
    }
    // With n > 1 the per-token lines name their sequence.
    const std::string seq = n > 1 ? absl::StrCat("[", resp.index(), "] ") : "";
    if (absl::GetFlag(FLAGS_logprobs)) {
      for (const pb::TokenLogprob& lp : resp.logprobs()) {
        std::cerr << seq << "[" << lp.token_id() << " " << lp.logprob() << "]";
      }
    }
    for (const pb::TokenRouting& tr : resp.routing()) {
      std::cerr << "\n  " << seq << "routing:";
      for (const pb::SiteRouting& site : tr.sites()) {
        std::cerr << " " << site.layer() << "." << site.module() << "={";
        for (int i = 0; i < site.experts_size(); ++i) {
          std::cerr << (i ? "," : "") << site.experts(i) << ":" << site.weights(i);
        }
        std::cerr << "}";
      }
    }
    if (resp.has_final()) finals[resp.index()] = resp.final();
  }
  grpc::Status status = reader->Finish();
  if (n == 1) std::cout << "\n";
  for (const auto& [index, text] : texts) std::cout << "[" << index << "] " << text << "\n";
  if (!status.ok()) return Fail(status);
  for (const auto& [index, final] : finals) {
    if (n > 1) std::cerr << "[" << index << "] ";
    std::cerr << "finish=" << pb::FinishReason_Name(final.finish_reason())
              << " prompt_tokens=" << final.prompt_tokens()
              << " generated_tokens=" << final.generated_tokens()
              << " ttft=" << final.timings().time_to_first_token_seconds() << "s"
              << " total=" << final.timings().total_seconds() << "s\n";
  }
  return 0;
}

int List(pb::Inference::Stub& stub) {
  pb::ListModelsResponse resp;
  auto ctx = Context();
  grpc::Status status = stub.ListModels(ctx.get(), pb::ListModelsRequest(), &resp);
  if (!status.ok()) return Fail(status);
  const pb::BaseModelInfo& b = resp.base();
  std::cout << "base: " << b.name() << " (" << b.architecture() << ", " << b.num_layers()
            << " layers, hidden " << b.hidden_size() << ", vocab " << b.vocab_size() << ", context "
            << b.context_length() << ", " << b.parameter_count() << " params, " << b.backend()
            << "/" << b.dtype() << ")\n";
  const pb::KvCacheInfo& kv = b.kv_cache();
  std::cout << "kv cache: " << kv.total_blocks() << " blocks of " << kv.block_size() << " tokens, "
            << kv.free_blocks() << " free; prefix cache " << (kv.prefix_caching() ? "on" : "off")
            << ", " << kv.cached_blocks() << " blocks cached, " << kv.prefix_hit_tokens() << " of "
            << kv.prefix_query_tokens() << " prompt tokens found\n";
  for (const pb::AdapterInfo& a : resp.adapters()) {
    std::cout << "adapter: " << a.name() << " " << pb::AdapterState_Name(a.state()) << " "
              << a.family() << " (" << a.format() << " v" << a.version() << ", " << a.num_experts()
              << " experts, ranks " << absl::StrJoin(a.ranks(), "/") << ", routing "
              << absl::StrJoin(a.algorithms(), "+") << ", " << a.bytes() << " bytes)\n";
  }
  if (resp.adapters_size() == 0) std::cout << "adapters: none\n";
  return 0;
}

int Tokenize(pb::Inference::Stub& stub) {
  pb::TokenizeRequest req;
  req.set_text(absl::GetFlag(FLAGS_text));
  req.set_return_pieces(true);
  pb::TokenizeResponse resp;
  auto ctx = Context();
  grpc::Status status = stub.Tokenize(ctx.get(), req, &resp);
  if (!status.ok()) return Fail(status);
  for (int i = 0; i < resp.ids_size(); ++i) {
    std::cout << resp.ids(i) << "\t" << (i < resp.pieces_size() ? resp.pieces(i) : "") << "\n";
  }
  return 0;
}

int Health(const std::shared_ptr<grpc::Channel>& channel) {
  absl::StatusOr<moleserve::server::HealthStatus> s = moleserve::server::CheckHealth(
      channel, absl::GetFlag(FLAGS_service), absl::GetFlag(FLAGS_timeout));
  if (!s.ok()) {
    std::cerr << "error: " << s.status() << "\n";
    return 2;
  }
  std::cout << moleserve::server::HealthStatusName(*s) << "\n";
  return *s == moleserve::server::HealthStatus::kServing ? 0 : 1;
}

std::string ReadFileOrDie(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << flag << ": cannot read " << path << "\n";
    std::exit(2);
  }
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A channel to `address`: TLS when any --tls-* flag is given (the system's CA roots unless
// --tls-ca-file names others), plaintext otherwise.
std::shared_ptr<grpc::Channel> Channel(const std::string& address) {
  const std::string ca = absl::GetFlag(FLAGS_tls_ca_file);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert_file);
  const std::string key = absl::GetFlag(FLAGS_tls_key_file);
  if (ca.empty() && cert.empty() && key.empty() && !absl::GetFlag(FLAGS_tls)) {
    return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  }
  if (cert.empty() != key.empty()) {
    std::cerr << "--tls-cert-file and --tls-key-file go together\n";
    std::exit(2);
  }
  grpc::SslCredentialsOptions ssl;
  if (!ca.empty()) ssl.pem_root_certs = ReadFileOrDie(ca, "--tls-ca-file");
  if (!cert.empty()) {
    ssl.pem_cert_chain = ReadFileOrDie(cert, "--tls-cert-file");
    ssl.pem_private_key = ReadFileOrDie(key, "--tls-key-file");
  }
  grpc::ChannelArguments args;
  if (const std::string name = absl::GetFlag(FLAGS_tls_server_name); !name.empty()) {
    args.SetSslTargetNameOverride(name);
  }
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(ssl), args);
}

std::string AdminToken() {
  const std::string file = absl::GetFlag(FLAGS_admin_token_file);
  if (file.empty()) {
    const char* env = std::getenv("MOLESERVE_ADMIN_TOKEN");
    return env != nullptr ? env : "";
  }
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  return std::string(absl::StripAsciiWhitespace(line));
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "molectl COMMAND [flags]\n"
      "  generate   stream a generation (--text or --ids, sampling flags)\n"
      "  list       the base model and adapters\n"
      "  tokenize   token ids and pieces of --text\n"
      "  health     grpc.health.v1 status (exit 0 when SERVING)\n"
      "  admin      load NAME PATH [--replace --sha256 HEX] | upload NAME DIR [--replace]\n"
      "             | unload NAME [--force --drain-timeout D] | list | get NAME | replicas\n"
      "             (--admin-addr, --admin-token-file; --all-replicas [--dns-server IP:PORT]\n"
      "             applies it on every replica --admin-addr resolves to)");
  std::vector<std::string> storage;
  std::vector<char*> normalized = moleserve::server::NormalizeDashedFlags(argc, argv, &storage);
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  if (args.size() >= 2 && std::string(args[1]) == "admin") {
    return moleserve::molectl::Admin(
        std::vector<std::string>(args.begin() + 2, args.end()),
        {.address = absl::GetFlag(FLAGS_admin_addr),
         .token = AdminToken(),
         .timeout = absl::GetFlag(FLAGS_timeout),
         .channel = [](const std::string& address) { return Channel(address); }});
  }
  if (args.size() != 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string command = args[1];
  auto channel = Channel(absl::GetFlag(FLAGS_addr));
  if (command == "health") return Health(channel);
  auto stub = pb::Inference::NewStub(channel);
  if (command == "generate") return Generate(*stub);
  if (command == "list") return List(*stub);
  if (command == "tokenize") return Tokenize(*stub);
  std::cerr << "unknown command '" << command << "'\n" << absl::ProgramUsageMessage() << "\n";
  return 2;
}
