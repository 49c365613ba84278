#pragma once

// InferenceService: the moleserve.v1.Inference gRPC service on the callback API.
//
// Generate is a server-streaming reactor per call. The engine pushes output into a per-call
// StreamState (the engine's GenerationSink) from its loop thread; the state writes one message at
// a time (gRPC allows one outstanding write) and finishes the call once the engine is done, the
// client cancels, or a write fails. Client cancellation and the gRPC deadline cancel the engine
// request, which frees its KV blocks.
// Thread safety: gRPC calls the service from its own threads; the service holds no mutable state
// beyond an atomic id counter.

#include <atomic>
#include <cstdint>

#include "engine/engine.h"
#include "moleserve/v1/inference.grpc.pb.h"
#include "server/grpc/metadata.h"

namespace moleserve::server {

class InferenceService final : public moleserve::v1::Inference::CallbackService {
 public:
  explicit InferenceService(engine::Engine* engine) : engine_(engine) {}

  grpc::ServerWriteReactor<moleserve::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const moleserve::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const moleserve::v1::TokenizeRequest* request,
                                     moleserve::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const moleserve::v1::ListModelsRequest* request,
                                       moleserve::v1::ListModelsResponse* response) override;

 private:
  engine::Engine* engine_;  // not owned
  std::atomic<uint64_t> next_request_id_{1};
};

}  // namespace moleserve::server
