#pragma once

// proto <-> engine conversion for the Inference service. Validation that needs no model knowledge
// (field presence, integer ranges of proto types) happens here; the engine validates the rest.

#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/request.h"
#include "moleserve/v1/inference.pb.h"

namespace moleserve::server {

// Unset sampling fields take `defaults` (the model's, see engine::ModelInfo::default_sampling).
absl::StatusOr<engine::GenerateRequest> FromProto(const moleserve::v1::GenerateRequest& in,
                                                  absl::Time deadline,
                                                  const engine::SamplingParams& defaults);

// The chunk's prompt logprobs (GenerationChunk::prompt_ids non-empty) as the messages that
// precede its tokens: at most kMaxPromptLogprobsPerMessage entries each (a 20-alternative entry
// is at most about 250 bytes: each message stays near 1 MiB, far below clients' 4 MiB
// default; the stream never merges them with other messages).
inline constexpr int kMaxPromptLogprobsPerMessage = 4096;
std::vector<moleserve::v1::GenerateResponse> PromptLogprobMessages(
    const engine::GenerationChunk& chunk);
// Appends chunk's tokens, logprobs (when `logprobs`), routing (when `routing`) and text to `out`.
void AppendChunk(const engine::GenerationChunk& chunk, bool logprobs, bool routing,
                 moleserve::v1::GenerateResponse* out);
void SetFinal(const engine::FinishInfo& info, moleserve::v1::FinalInfo* out);
// A served adapter version (ListModels, and the admin API's AdapterStatus.info).
void ToProto(const engine::AdapterSummary& a, moleserve::v1::AdapterInfo* out);

}  // namespace moleserve::server
