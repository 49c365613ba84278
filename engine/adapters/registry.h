#pragma once

// AdapterRegistry: the adapters that requests can name, each as its current immutable version.
//
// Lifecycle of a name: absent --Publish--> published(v1) --Publish--> published(v2) ...
// --Remove--> absent. Publishing replaces the version atomically; a request that resolved the
// old version keeps it alive (shared_ptr reference count) until it finishes, so a reload never
// changes an adapter under a running request and nothing half-loaded is ever visible (callers
// publish only fully validated adapters).
//
// Thread safety: every method may be called from any thread.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "engine/adapters/adapter.h"
#include "engine/core/mutex.h"

namespace moleserve::engine {

class ChatTemplate;  // engine/chat/chat_template.h

struct AdapterVersion {
  std::shared_ptr<const Adapter> adapter;
  uint64_t version = 0;  // 1, 2, ... per name
  std::string source;    // directory it was loaded from
  absl::Time loaded_at;
  // The adapter directory's own chat template (a fine-tune often changes it); null: the base
  // model's.
  std::shared_ptr<const ChatTemplate> chat_template;
};

class AdapterRegistry {
 public:
  // Publishes `adapter` under adapter->name, replacing any previous version; returns the new one.
  std::shared_ptr<const AdapterVersion> Publish(
      std::shared_ptr<const Adapter> adapter, std::string source,
      std::shared_ptr<const ChatTemplate> chat_template = nullptr);
  // The current version, or nullptr.
  std::shared_ptr<const AdapterVersion> Find(const std::string& name) const;
  // kNotFound when absent.
  absl::Status Remove(const std::string& name);
  // All current versions, by name. The lock is held for 256 names at a time, so Find never waits
  // for a whole listing; a name published or removed meanwhile may be missed or seen.
  std::vector<std::shared_ptr<const AdapterVersion>> List() const;

 private:
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<const AdapterVersion>> adapters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> next_version_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moleserve::engine
