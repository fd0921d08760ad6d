// VolumeCatalog: the exports a server offers, one per volume, by name.
//
// Thread safety: built before the server starts and not changed while it
// runs (roles change inside Volume, which is thread-safe).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "blockrelay/core/volume.h"
#include "nbd/handshake.h"

namespace blockrelay::nbd {

class VolumeCatalog final : public ExportCatalog {
 public:
  void Add(std::shared_ptr<core::Volume> volume) {
    volumes_.push_back(std::move(volume));
  }
  std::shared_ptr<core::Volume> FindVolume(const std::string& name) const {
    if (name.empty()) return volumes_.empty() ? nullptr : volumes_.front();
    for (const auto& v : volumes_) {
      if (v->name() == name) return v;
    }
    return nullptr;
  }
  std::optional<ExportInfo> Find(const std::string& name) const override {
    auto v = FindVolume(name);
    if (!v) return std::nullopt;
    return Describe(*v);
  }
  std::vector<ExportInfo> List() const override {
    std::vector<ExportInfo> out;
    for (const auto& v : volumes_) out.push_back(Describe(*v));
    return out;
  }
  const std::vector<std::shared_ptr<core::Volume>>& volumes() const {
    return volumes_;
  }

 private:
  static ExportInfo Describe(const core::Volume& v) {
    ExportInfo e;
    e.name = v.name();
    e.description = "blockrelay volume " + v.name() + " of group " + v.group() +
                    (v.read_only() ? " (secondary, read-only)" : "");
    e.size_bytes = v.size_bytes();
    e.read_only = v.read_only();
    e.can_trim = true;
    e.can_fast_zero = v.can_fast_zero();
    return e;
  }

  std::vector<std::shared_ptr<core::Volume>> volumes_;
};

}  // namespace blockrelay::nbd
