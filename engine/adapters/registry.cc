#include "engine/adapters/registry.h"

#include "absl/strings/str_cat.h"
#include "engine/core/chunked_visit.h"
#include "engine/core/quote.h"

namespace moleserve::engine {

std::shared_ptr<const AdapterVersion> AdapterRegistry::Publish(
    std::shared_ptr<const Adapter> adapter, std::string source,
    std::shared_ptr<const ChatTemplate> chat_template) {
  auto version = std::make_shared<AdapterVersion>();
  version->source = std::move(source);
  version->chat_template = std::move(chat_template);
  version->loaded_at = absl::Now();
  const std::string name = adapter->name;
  version->adapter = std::move(adapter);
  MutexLock lock(&mu_);
  version->version = ++next_version_[name];
  adapters_[name] = version;
  return version;
}

std::shared_ptr<const AdapterVersion> AdapterRegistry::Find(const std::string& name) const {
  MutexLock lock(&mu_);
  auto it = adapters_.find(name);
  return it == adapters_.end() ? nullptr : it->second;
}

absl::Status AdapterRegistry::Remove(const std::string& name) {
  MutexLock lock(&mu_);
  if (adapters_.erase(name) == 0) {
    return absl::NotFoundError(absl::StrCat("adapter ", Quote(name), " is not loaded"));
  }
  return absl::OkStatus();
}

std::vector<std::shared_ptr<const AdapterVersion>> AdapterRegistry::List() const {
  std::vector<std::shared_ptr<const AdapterVersion>> out;
  // In chunks: Find (every request's admission) never waits for more than one chunk.
  VisitInChunks(&mu_, adapters_, 256,
                [&](const std::string&, const std::shared_ptr<const AdapterVersion>& v) {
                  out.push_back(v);
                });
  return out;
}

}  // namespace moleserve::engine
