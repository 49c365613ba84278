#pragma once

// What the admin API and ListModels report about adapters: plain values, copied out of the
// lifecycle table (engine/lifecycle/adapter_lifecycle.h), safe to keep after the adapter is gone.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/time/time.h"

namespace moleserve::engine {

// One served adapter version (ListModels).
struct AdapterSummary {
  std::string name;
  std::string family;  // source_family: lora, mixlora, mola, dynmole, loramoe, xlora, flylora...
  std::string format;  // "mole/1" or "peft"
  uint64_t version = 0;
  std::string source;
  int64_t num_experts = 0;              // over all routed sites (static LoRAs count one each)
  int32_t max_experts = 0;              // most experts of one routed site
  std::vector<int32_t> ranks;           // distinct ranks
  std::vector<std::string> algorithms;  // routing algorithm per group
  int64_t bytes = 0;
};

// A name's state; the transitions are drawn in engine/lifecycle/adapter_lifecycle.h.
enum class AdapterState { kLoading, kReady, kDraining, kFailed };
const char* AdapterStateName(AdapterState s);  // "LOADING", "READY", "DRAINING", "FAILED"

// An adapter name's state for the admin API (ListAdapters / GetAdapter).
struct AdapterStatus {
  std::string name;
  AdapterState state = AdapterState::kLoading;
  // FAILED: why the load failed. READY: the error of the last failed reload (the previous
  // version kept serving), empty when the last load succeeded.
  std::string error;
  std::string path;    // as given to the load (relative to the adapter root) or at start-up
  std::string sha256;  // digest of the adapter's files when the load asked for one
  bool has_version = false;
  AdapterSummary summary;         // the serving version (has_version)
  int64_t disk_bytes = 0;         // its files
  int64_t host_bytes = 0;         // host memory (every loaded adapter is there)
  int64_t device_bytes = 0;       // resident experts in the expert cache + routers and classifier
  int64_t in_flight = 0;          // requests using it now (any of its versions)
  int64_t retiring_versions = 0;  // replaced versions still finishing their requests
  absl::Time loaded_at;
};

}  // namespace moleserve::engine
