#include "server/molectl/admin.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/adapters/adapter_files.h"
#include "moleserve/v1/admin.grpc.pb.h"
#include "server/molectl/replicas.h"

ABSL_FLAG(bool, replace, false, "admin load/upload: replace a loaded adapter");
ABSL_FLAG(std::string, sha256, "", "admin load: expected digest of the adapter's files");
ABSL_FLAG(bool, force, false, "admin unload: cancel in-flight requests at once");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "admin unload: how long in-flight requests may finish");
ABSL_FLAG(bool, all_replicas, false,
          "admin load/upload/unload/list/get: on every replica --admin-addr resolves to (a list "
          "a:p,b:p; a DNS name host:port, every address; srv:NAME, its SRV records)");
ABSL_FLAG(std::string, dns_server, "",
          "IPv4 address:port of the DNS server that resolves --all-replicas (default: the "
          "system's resolver, /etc/hosts included)");

namespace moleserve::molectl {
namespace {

namespace pb = moleserve::v1;
namespace fs = std::filesystem;

constexpr size_t kUploadChunkBytes = 1 << 20;  // the server's per-message limit for data

std::string Describe(const pb::AdapterStatus& a) {
  const pb::AdapterInfo& i = a.info();
  std::ostringstream out;
  out << i.name() << "\t" << pb::AdapterState_Name(i.state());
  if (i.version() > 0) {
    out << "\tv" << i.version() << " " << i.family() << " (" << i.format() << ", "
        << i.num_experts() << " experts, ranks " << absl::StrJoin(i.ranks(), "/") << ")";
  }
  out << "\tpath=" << a.path() << " disk=" << a.disk_bytes() << " host=" << a.host_bytes()
      << " device=" << a.device_bytes() << " in_flight=" << a.in_flight();
  if (a.retiring_versions() > 0) out << " retiring_versions=" << a.retiring_versions();
  if (!a.sha256().empty()) out << " sha256=" << a.sha256();
  if (!a.error().empty()) out << "\terror: " << a.error();
  return out.str();
}

// A local adapter directory to upload: its files (symlinks followed, as the digest reads them)
// and its digest.
struct UploadPlan {
  struct File {
    std::string path;  // relative, '/'-separated
    fs::path source;
    uint64_t size = 0;
  };
  std::vector<File> files;
  uint64_t total_bytes = 0;
  std::string sha256;
};

absl::StatusOr<UploadPlan> PlanUpload(const std::string& dir) {
  UploadPlan plan;
  absl::StatusOr<engine::AdapterFiles> inspected = engine::InspectAdapterFiles(
      dir, {.max_file_bytes = int64_t{1} << 50, .max_total_bytes = int64_t{1} << 50},
      /*digest=*/true);
  if (!inspected.ok()) return inspected.status();
  plan.sha256 = inspected->sha256;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(
           dir, fs::directory_options::follow_directory_symlink, ec);
       !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (!fs::is_regular_file(it->path(), ec)) continue;  // follows symlinks, like the digest
    const uint64_t size = fs::file_size(it->path(), ec);
    plan.files.push_back({fs::relative(it->path(), dir).generic_string(), it->path(), size});
    plan.total_bytes += size;
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
  std::sort(plan.files.begin(), plan.files.end(),
            [](const UploadPlan::File& a, const UploadPlan::File& b) { return a.path < b.path; });
  return plan;
}

// One admin call against one server: its status and what to print for it.
struct Outcome {
  grpc::Status status;
  std::string text;  // the result's description (OK), printed as is for a single server
  std::string note;  // for stderr (a single server) or the end of the replica's line
};

class Client {
 public:
  Client(const AdminConnection& c, const std::string& address)
      : c_(c), stub_(pb::AdapterAdmin::NewStub(c.channel(address))) {}

  Outcome Load(const std::string& name, const std::string& path) {
    pb::LoadAdapterRequest req;
    req.set_name(name);
    req.set_path(path);
    req.set_replace(absl::GetFlag(FLAGS_replace));
    req.set_sha256(absl::GetFlag(FLAGS_sha256));
    pb::LoadAdapterResponse resp;
    auto ctx = Context();
    Outcome o{stub_->LoadAdapter(ctx.get(), req, &resp)};
    if (o.status.ok()) Loaded(resp, &o);
    return o;
  }

  Outcome Upload(const std::string& name, const UploadPlan& plan) {
    pb::LoadAdapterResponse resp;
    auto ctx = Context();
    std::unique_ptr<grpc::ClientWriter<pb::UploadAdapterRequest>> writer =
        stub_->UploadAdapter(ctx.get(), &resp);
    pb::UploadAdapterRequest msg;
    pb::UploadHeader* h = msg.mutable_header();
    h->set_name(name);
    h->set_sha256(plan.sha256);
    h->set_total_bytes(plan.total_bytes);
    h->set_num_files(static_cast<uint32_t>(plan.files.size()));
    h->set_replace(absl::GetFlag(FLAGS_replace));
    bool sending = writer->Write(msg);
    std::string chunk(kUploadChunkBytes, '\0');
    for (const UploadPlan::File& f : plan.files) {
      if (!sending) break;
      msg.Clear();
      msg.mutable_file()->set_path(f.path);
      msg.mutable_file()->set_size(f.size);
      sending = writer->Write(msg);
      std::ifstream in(f.source, std::ios::binary);
      for (uint64_t left = f.size; sending && left > 0;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(left, chunk.size()));
        if (!in.read(chunk.data(), static_cast<std::streamsize>(n))) {
          ctx->TryCancel();  // the file changed under us: the server discards the upload
          writer->Finish().IgnoreError();
          return {grpc::Status(grpc::StatusCode::DATA_LOSS,
                               absl::StrCat("reading ", f.source.string(), " failed"))};
        }
        msg.Clear();
        msg.set_data(chunk.data(), n);
        sending = writer->Write(msg);
        left -= n;
      }
    }
    if (sending) writer->WritesDone();
    Outcome o{writer->Finish()};
    if (o.status.ok()) Loaded(resp, &o);
    return o;
  }

  Outcome Unload(const std::string& name) {
    pb::UnloadAdapterRequest req;
    req.set_name(name);
    req.set_force(absl::GetFlag(FLAGS_force));
    req.set_drain_timeout_seconds(absl::ToDoubleSeconds(absl::GetFlag(FLAGS_drain_timeout)));
    pb::UnloadAdapterResponse resp;
    auto ctx = Context();
    Outcome o{stub_->UnloadAdapter(ctx.get(), req, &resp)};
    if (o.status.ok()) {
      o.text = absl::StrCat("unloaded ", name, ": ", resp.drained(), " drained, ", resp.cancelled(),
                            " cancelled");
    }
    return o;
  }

  Outcome List() {
    pb::ListAdaptersResponse resp;
    auto ctx = Context();
    Outcome o{stub_->ListAdapters(ctx.get(), pb::ListAdaptersRequest(), &resp)};
    if (!o.status.ok()) return o;
    std::ostringstream out;
    for (const pb::AdapterStatus& a : resp.adapters()) out << Describe(a) << "\n";
    const pb::ExpertCacheStatus& c = resp.cache();
    out << "expert cache: " << c.capacity_bytes() << " bytes, " << c.resident_experts()
        << " experts resident, " << c.hits() << " hits, " << c.misses() << " misses, "
        << c.evictions() << " evictions, " << c.bytes_to_device() << " bytes copied in";
    o.text = out.str();
    return o;
  }

  Outcome Get(const std::string& name) {
    pb::GetAdapterRequest req;
    req.set_name(name);
    pb::AdapterStatus resp;
    auto ctx = Context();
    Outcome o{stub_->GetAdapter(ctx.get(), req, &resp)};
    if (o.status.ok()) o.text = Describe(resp);
    return o;
  }

 private:
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(absl::ToChronoTime(absl::Now() + c_.timeout));
    if (!c_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + c_.token);
    return ctx;
  }
  static void Loaded(const pb::LoadAdapterResponse& resp, Outcome* o) {
    o->text = Describe(resp.adapter());
    o->note = absl::StrCat("loaded in ", resp.load_seconds(), " s");
  }

  const AdminConnection& c_;
  std::unique_ptr<pb::AdapterAdmin::Stub> stub_;
};

// Runs `op` on every replica at once and prints one line per replica, in address order.
int OnEveryReplica(const AdminConnection& c, const std::string& verb,
                   const std::function<Outcome(Client&)>& op) {
  absl::StatusOr<std::vector<std::string>> replicas =
      ResolveReplicas(c.address, absl::GetFlag(FLAGS_dns_server));
  if (!replicas.ok()) {
    std::cerr << "error: --all-replicas: " << replicas.status().message() << "\n";
    return 2;
  }
  std::vector<Outcome> outcomes(replicas->size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < replicas->size(); ++i) {
    threads.emplace_back([&, i] {
      Client client(c, (*replicas)[i]);
      outcomes[i] = op(client);
    });
  }
  for (std::thread& t : threads) t.join();
  size_t ok = 0;
  for (size_t i = 0; i < outcomes.size(); ++i) {
    const Outcome& o = outcomes[i];
    const bool absent = verb == "unload" && o.status.error_code() == grpc::StatusCode::NOT_FOUND;
    if (o.status.ok() || absent) ++ok;
    std::string text =
        o.status.ok() ? o.text
        : absent
            ? "absent (not loaded there)"
            : absl::StrCat(
                  absl::StatusCodeToString(static_cast<absl::StatusCode>(o.status.error_code())),
                  ": ", o.status.error_message());
    if (o.status.ok() && !o.note.empty()) absl::StrAppend(&text, " (", o.note, ")");
    std::replace(text.begin(), text.end(), '\n', ' ');
    std::replace(text.begin(), text.end(), '\t', ' ');  // three tab-separated fields a line
    std::cout << (*replicas)[i] << "\t" << (o.status.ok() || absent ? "OK" : "FAILED") << "\t"
              << text << "\n";
  }
  std::cout << verb << ": " << ok << " of " << outcomes.size() << " replicas succeeded\n";
  return ok == outcomes.size() ? 0 : 1;
}

}  // namespace

int Admin(const std::vector<std::string>& args, const AdminConnection& c) {
  static constexpr const char* kUsage =
      "admin: load NAME PATH | upload NAME DIR | unload NAME | list | get NAME | replicas";
  if (args.empty()) {
    std::cerr << kUsage << "\n";
    return 2;
  }
  const std::string& verb = args[0];
  const auto arity = [&](size_t n) {
    if (args.size() == n + 1) return true;
    std::cerr << "admin " << verb << ": expected " << n << " argument(s)\n";
    return false;
  };
  std::function<Outcome(Client&)> op;
  if (verb == "load") {
    if (!arity(2)) return 2;
    op = [&](Client& client) { return client.Load(args[1], args[2]); };
  } else if (verb == "upload") {
    if (!arity(2)) return 2;
    absl::StatusOr<UploadPlan> plan = PlanUpload(args[2]);
    if (!plan.ok()) {
      std::cerr << "error: " << plan.status().message() << "\n";
      return 2;
    }
    std::cerr << "uploading " << plan->files.size() << " files, " << plan->total_bytes
              << " bytes, sha256 " << plan->sha256 << "\n";
    op = [&, plan = *std::move(plan)](Client& client) { return client.Upload(args[1], plan); };
  } else if (verb == "unload") {
    if (!arity(1)) return 2;
    op = [&](Client& client) { return client.Unload(args[1]); };
  } else if (verb == "list") {
    if (!arity(0)) return 2;
    op = [](Client& client) { return client.List(); };
  } else if (verb == "get") {
    if (!arity(1)) return 2;
    op = [&](Client& client) { return client.Get(args[1]); };
  } else if (verb == "replicas") {
    if (!arity(0)) return 2;
    absl::StatusOr<std::vector<std::string>> replicas =
        ResolveReplicas(c.address, absl::GetFlag(FLAGS_dns_server));
    if (!replicas.ok()) {
      std::cerr << "error: " << replicas.status().message() << "\n";
      return 2;
    }
    for (const std::string& r : *replicas) std::cout << r << "\n";
    return 0;
  } else {
    std::cerr << "admin: unknown verb '" << verb << "'\n" << kUsage << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_all_replicas)) return OnEveryReplica(c, verb, op);
  Client client(c, c.address);
  const Outcome o = op(client);
  if (!o.status.ok()) {
    std::cerr << "error: " << o.status.error_code() << " " << o.status.error_message() << "\n";
    return 2;
  }
  std::cout << o.text << "\n";
  if (!o.note.empty()) std::cerr << o.note << "\n";
  return 0;
}

}  // namespace moleserve::molectl
