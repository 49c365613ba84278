#pragma once

// InferenceService: the moleserve.v1.Inference gRPC service on the callback API.
//
// Generate is a server-streaming reactor per call, with one engine request per sequence
// (GenerateRequest.n). The engine pushes output into the call's StreamState (through one
// GenerationSink per sequence) from its loop thread; the state writes one message at
// a time (gRPC allows one outstanding write) and finishes the call once the engine is done, the
// client cancels, or a write fails. Client cancellation and the gRPC deadline cancel the engine
// request, which frees its KV blocks.
// Every method is registered raw (grpc::ByteBuffer in and out) and parses its request with
// wire.h, so a malformed body is INVALID_ARGUMENT with a reason, counted in the rejections, not
// gRPC's bare UNIMPLEMENTED.
// Thread safety: gRPC calls the service from its own threads; the service holds no mutable state
// beyond an atomic id counter.

#include <atomic>
#include <cstdint>

#include "engine/engine.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/grpc/metadata.h"

namespace moleserve::server {

using RawInferenceService = moleserve::v1::Inference::WithRawCallbackMethod_Generate<
    moleserve::v1::Inference::WithRawCallbackMethod_Tokenize<
        moleserve::v1::Inference::WithRawCallbackMethod_ListModels<
            moleserve::v1::Inference::Service>>>;

class InferenceService final : public RawInferenceService {
 public:
  // `max_n`: the most sequences one Generate call may ask for (GenerateRequest.n).
  InferenceService(engine::Engine* engine, int32_t max_n) : engine_(engine), max_n_(max_n) {}

  // moleserve.v1.GenerateRequest in, a stream of moleserve.v1.GenerateResponse out.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  // moleserve.v1.TokenizeRequest in, moleserve.v1.TokenizeResponse out.
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  // moleserve.v1.ListModelsRequest in, moleserve.v1.ListModelsResponse out.
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;

 private:
  engine::Engine* engine_;  // not owned
  const int32_t max_n_;
  std::atomic<uint64_t> next_request_id_{1};
};

}  // namespace moleserve::server
