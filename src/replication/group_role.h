// GroupRole: a group's role and failover bookkeeping, kept in data_dir.
//
// The config's "role" is only the role a new group starts with; once the
// file data_dir/<group>/group-state.json exists it wins (DESIGN.md: roles
// change only by promote/demote). The file is JSON with an XXH3-64 of its
// body, replaced atomically (write a temporary file, sync, rename, sync the
// directory), so a crash leaves the old or the new state, never a mix; a
// file that fails its checksum refuses the start with a message naming it.
//
// Fields:
//   role             primary | secondary
//   fresh            created secondary and never primary, never synced:
//                    holds nothing of its own, so any upstream may fill it
//   discard_local    site whose next HELLO may overwrite this site's own
//                    writes (`resync --discard-local`), or empty
//   reconciled_with  the upstream site this (secondary) group has sent its
//                    dirty set to and adopted the generation of; writes from
//                    it need not be tracked for it (see ClearPeerSlot in
//                    docs/replication.md), or empty
//
// Thread safety: Get() from any thread; Update() blocks on file I/O (a
// storage thread or start-up) and is serialized by an internal mutex.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "blockrelay/config/site_config.h"
#include "blockrelay/status.h"

namespace blockrelay::replication {

struct GroupRoleState {
  config::Role role = config::Role::kPrimary;
  bool fresh = false;
  std::string discard_local;
  std::string reconciled_with;
  bool operator==(const GroupRoleState&) const = default;
};

class GroupRole {
 public:
  // Loads data_dir/<group>/group-state.json, or creates it with `initial`
  // role (fresh when secondary). Errors name the file.
  static Result<std::unique_ptr<GroupRole>> Open(const std::string& data_dir,
                                                 const std::string& group,
                                                 config::Role initial);

  GroupRoleState Get() const;
  // Applies `change` and persists the result durably; on failure the
  // in-memory state stays as it was.
  Status Update(const std::function<void(GroupRoleState&)>& change);

  const std::string& path() const { return path_; }

  // The file's bytes for a state, and back (exposed for tests).
  static std::string Encode(const GroupRoleState& state);
  static Result<GroupRoleState> Decode(const std::string& text);

 private:
  explicit GroupRole(std::string path) : path_(std::move(path)) {}
  Status Write(const GroupRoleState& state);

  const std::string path_;
  mutable std::mutex mu_;
  GroupRoleState state_;  // GUARDED_BY(mu_)
  std::mutex write_mu_;   // one Update at a time
};

}  // namespace blockrelay::replication
