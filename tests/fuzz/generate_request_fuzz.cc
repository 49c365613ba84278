// Fuzzes the Generate request path from wire bytes to a validated engine request: ParseRequest
// (server/grpc/wire.h) into moleserve.v1.GenerateRequest, server::FromProto (defaults from the
// model), then Engine::Validate (adapter lookup and routing override, tokenization of the text,
// sampling, stopping, top_logprobs, context and KV rules) on one engine serving the built-in demo
// model with one demo mole/1 adapter named "demo" (2 experts of rank 2, top-2 routing). Invariants:
// every refusal carries a message and one of the codes Submit documents.

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "google/protobuf/stubs/logging.h"
#include "moleserve/v1/inference.pb.h"
#include "server/grpc/conversion.h"
#include "server/grpc/wire.h"
#include "tests/common/demo_mole_adapter.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

moleserve::engine::Engine* served = nullptr;  // created once, never destroyed

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  using namespace moleserve;  // NOLINT(build/namespaces)
  // Malformed input (e.g. invalid UTF-8 in a string field) is logged by protobuf; not a finding.
  google::protobuf::SetLogHandler(nullptr);
  const std::string adapter_dir = fuzz::ScratchDir() + "/demo-adapter";
  FUZZ_CHECK(!test_util::WriteDemoMoleAdapter(adapter_dir, /*seed=*/7, /*num_experts=*/2,
                                              /*rank=*/2)
                  .empty());
  engine::EngineOptions options;
  options.model = "";  // the built-in demo model
  options.num_threads = 1;
  options.kv_cache_bytes = int64_t{4} << 20;
  options.max_queue = 4;
  options.adapters = {{"demo", adapter_dir}};
  absl::StatusOr<std::unique_ptr<engine::Engine>> created = engine::Engine::Create(options);
  FUZZ_CHECK_MSG(created.ok(), created.status().ToString());
  served = created->release();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moleserve;  // NOLINT(build/namespaces)
  v1::GenerateRequest proto;
  const absl::Status parsed = server::ParseRequest(fuzz::AsView(data, size), &proto);
  if (!parsed.ok()) {
    FUZZ_CHECK_MSG(parsed.code() == absl::StatusCode::kInvalidArgument, parsed.ToString());
    FUZZ_CHECK(!parsed.message().empty());
    return 0;
  }
  absl::StatusOr<engine::GenerateRequest> request =
      server::FromProto(proto, absl::InfiniteFuture(), served->model_info().default_sampling);
  if (!request.ok()) {
    FUZZ_CHECK_MSG(request.status().code() == absl::StatusCode::kInvalidArgument,
                   request.status().ToString());
    FUZZ_CHECK(!request.status().message().empty());
    return 0;
  }
  FUZZ_CHECK(request->request_id == proto.request_id());
  FUZZ_CHECK(request->adapter == proto.adapter());
  const absl::Status status = served->Validate(*request);
  if (!status.ok()) {
    const absl::StatusCode code = status.code();
    FUZZ_CHECK_MSG(code == absl::StatusCode::kInvalidArgument ||
                       code == absl::StatusCode::kNotFound ||
                       code == absl::StatusCode::kFailedPrecondition ||
                       code == absl::StatusCode::kResourceExhausted,
                   status.ToString());
    FUZZ_CHECK(!status.message().empty());
  }
  return 0;
}
