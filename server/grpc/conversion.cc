#include "server/grpc/conversion.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "engine/core/quote.h"

namespace moleserve::server {
namespace {

namespace pb = moleserve::v1;

constexpr uint32_t kMaxInt32 = static_cast<uint32_t>(std::numeric_limits<int32_t>::max());

pb::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case engine::FinishReason::kStopSequence:
      return pb::FINISH_REASON_STOP_SEQUENCE;
    case engine::FinishReason::kStopToken:
      return pb::FINISH_REASON_STOP_TOKEN;
    case engine::FinishReason::kEos:
      return pb::FINISH_REASON_EOS;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

}  // namespace

absl::StatusOr<engine::GenerateRequest> FromProto(const pb::GenerateRequest& in,
                                                  absl::Time deadline,
                                                  const engine::SamplingParams& defaults) {
  engine::GenerateRequest out;
  out.sampling = defaults;
  out.request_id = in.request_id();
  out.adapter = in.adapter();
  switch (in.input_case()) {
    case pb::GenerateRequest::kText:
      out.text = in.text();
      break;
    case pb::GenerateRequest::kTokenIds:
      out.token_ids.reserve(in.token_ids().ids_size());
      for (uint32_t id : in.token_ids().ids()) {
        if (id > kMaxInt32) {
          return absl::InvalidArgumentError(absl::StrCat("token_ids: ", id, " is not a token id"));
        }
        out.token_ids.push_back(static_cast<int32_t>(id));
      }
      break;
    case pb::GenerateRequest::INPUT_NOT_SET:
      return absl::InvalidArgumentError("no input: set `text` or `token_ids`");
  }
  if (in.has_add_bos()) out.add_bos = in.add_bos();

  const pb::SamplingParams& s = in.sampling();
  if (s.has_temperature()) out.sampling.temperature = s.temperature();
  if (s.has_top_p()) out.sampling.top_p = s.top_p();
  if (s.has_top_k()) out.sampling.top_k = s.top_k();
  if (s.has_min_p()) out.sampling.min_p = s.min_p();
  if (s.has_repetition_penalty()) out.sampling.repetition_penalty = s.repetition_penalty();
  if (s.has_frequency_penalty()) out.sampling.frequency_penalty = s.frequency_penalty();
  if (s.has_presence_penalty()) out.sampling.presence_penalty = s.presence_penalty();
  if (s.has_seed()) out.sampling.seed = s.seed();
  for (const auto& [id, value] : s.logit_bias()) {
    if (id > kMaxInt32) {
      return absl::InvalidArgumentError(
          absl::StrCat("sampling.logit_bias: ", id, " is not a token id"));
    }
    out.sampling.logit_bias.emplace_back(static_cast<int32_t>(id), value);
  }
  // Map order is unspecified: sorted, so that the same request samples the same way.
  std::sort(out.sampling.logit_bias.begin(), out.sampling.logit_bias.end());

  const pb::StoppingCriteria& st = in.stopping();
  if (st.max_new_tokens() > kMaxInt32) {
    return absl::InvalidArgumentError(
        absl::StrCat("stopping.max_new_tokens = ", st.max_new_tokens(), " is out of range"));
  }
  out.stopping.max_new_tokens = static_cast<int32_t>(st.max_new_tokens());
  out.stopping.stop.assign(st.stop().begin(), st.stop().end());
  for (uint32_t id : st.stop_token_ids()) {
    if (id > kMaxInt32) {
      return absl::InvalidArgumentError(
          absl::StrCat("stopping.stop_token_ids: ", id, " is out of range"));
    }
    out.stopping.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  out.stopping.ignore_eos = st.ignore_eos();

  out.logprobs = in.output().logprobs() || in.output().top_logprobs() > 0;
  if (in.output().top_logprobs() > engine::kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("output.top_logprobs = ", in.output().top_logprobs(), "; at most ",
                     engine::kMaxTopLogprobs));
  }
  out.top_logprobs = static_cast<int32_t>(in.output().top_logprobs());
  out.return_routing = in.output().return_routing();
  out.prompt_logprobs = in.output().prompt_logprobs();
  if (in.has_routing()) {
    const pb::RoutingOverride& r = in.routing();
    if (!r.algorithm().empty()) {
      absl::StatusOr<engine::RoutingAlgorithm> a = engine::ParseRoutingAlgorithm(r.algorithm());
      if (!a.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("routing.algorithm ", engine::Quote(r.algorithm()),
                         " is an unknown algorithm (topk, top_p, dynmole, soft, switch, "
                         "rank_topk)"));
      }
      out.routing_override.algorithm = *a;
    }
    if (r.has_k()) {
      if (r.k() > 1u << 20) return absl::InvalidArgumentError("routing.k is out of range");
      out.routing_override.k = static_cast<int32_t>(r.k());
    }
    if (r.has_p()) out.routing_override.p = r.p();
    for (uint32_t e : r.disabled_experts()) {
      if (e > 1u << 20)
        return absl::InvalidArgumentError("routing.disabled_experts is out of range");
      out.routing_override.disabled_experts.push_back(static_cast<int32_t>(e));
    }
  }
  out.deadline = deadline;
  out.priority = in.priority();
  return out;
}

namespace {

void SetLogprob(const engine::GeneratedToken& t, pb::TokenLogprob* lp) {
  lp->set_token_id(static_cast<uint32_t>(t.id));
  lp->set_logprob(t.logprob);
  for (const auto& [id, value] : t.top) {
    pb::TopLogprob* top = lp->add_top();
    top->set_token_id(static_cast<uint32_t>(id));
    top->set_logprob(value);
  }
}

}  // namespace

std::vector<pb::GenerateResponse> PromptLogprobMessages(const engine::GenerationChunk& chunk) {
  std::vector<pb::GenerateResponse> out;
  if (chunk.prompt_ids.empty()) return out;
  out.emplace_back();
  for (int32_t id : chunk.prompt_ids) out.back().add_prompt_token_ids(static_cast<uint32_t>(id));
  for (const engine::GeneratedToken& t : chunk.prompt_logprobs) {
    if (out.back().prompt_logprobs_size() >= kMaxPromptLogprobsPerMessage) out.emplace_back();
    SetLogprob(t, out.back().add_prompt_logprobs());
  }
  return out;
}

void AppendChunk(const engine::GenerationChunk& chunk, bool logprobs, bool routing,
                 pb::GenerateResponse* out) {
  for (const engine::GeneratedToken& t : chunk.tokens) {
    out->add_token_ids(static_cast<uint32_t>(t.id));
    if (routing) {
      pb::TokenRouting* tr = out->add_routing();
      for (const engine::RoutingRecord& rec : t.routing) {
        pb::SiteRouting* site = tr->add_sites();
        site->set_layer(static_cast<uint32_t>(rec.layer));
        site->set_module(rec.module);
        for (int32_t e : rec.experts) site->add_experts(static_cast<uint32_t>(e));
        for (float w : rec.weights) site->add_weights(w);
      }
    }
    if (logprobs) SetLogprob(t, out->add_logprobs());
  }
  out->mutable_text()->append(chunk.text);
}

void SetFinal(const engine::FinishInfo& info, pb::FinalInfo* out) {
  out->set_finish_reason(ToProto(info.reason));
  out->set_matched_stop(info.matched_stop);
  out->set_prompt_tokens(static_cast<uint32_t>(info.prompt_tokens));
  out->set_generated_tokens(static_cast<uint32_t>(info.generated_tokens));
  pb::Timings* t = out->mutable_timings();
  t->set_queue_seconds(info.timings.queue_seconds);
  t->set_time_to_first_token_seconds(info.timings.time_to_first_token_seconds);
  t->set_prefill_seconds(info.timings.prefill_seconds);
  t->set_decode_seconds(info.timings.decode_seconds);
  t->set_total_seconds(info.timings.total_seconds);
}

void ToProto(const engine::AdapterSummary& a, pb::AdapterInfo* out) {
  out->set_name(a.name);
  out->set_state(pb::ADAPTER_STATE_READY);
  out->set_family(a.family);
  out->set_format(a.format);
  out->set_version(a.version);
  out->set_num_experts(static_cast<uint64_t>(a.num_experts));
  out->set_max_experts_per_site(static_cast<uint32_t>(a.max_experts));
  for (int32_t r : a.ranks) out->add_ranks(static_cast<uint32_t>(r));
  for (const std::string& alg : a.algorithms) out->add_algorithms(alg);
  out->set_bytes(static_cast<uint64_t>(a.bytes));
}

}  // namespace moleserve::server
