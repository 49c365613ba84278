#pragma once

// AdapterVersion: one published, immutable version of an adapter name. Requests hold it by
// shared_ptr, so a replaced or unloaded version keeps serving the requests that resolved it and
// is freed after the last one (engine/lifecycle/adapter_lifecycle.h publishes them).

#include <cstdint>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "engine/adapters/adapter.h"

namespace moleserve::engine {

class ChatTemplate;  // engine/chat/chat_template.h

struct AdapterVersion {
  std::shared_ptr<const Adapter> adapter;
  uint64_t version = 0;  // 1, 2, ... per name, never repeated
  std::string source;    // directory it was loaded from
  absl::Time loaded_at;
  // The adapter directory's own chat template (a fine-tune often changes it); null: the base
  // model's.
  std::shared_ptr<const ChatTemplate> chat_template;
};

}  // namespace moleserve::engine
