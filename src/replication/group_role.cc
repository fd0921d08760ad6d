#include "replication/group_role.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include "util/xxhash.h"

#include "blockrelay/io/env.h"

namespace blockrelay::replication {

namespace {
constexpr int kFormat = 1;

std::string BodyChecksum(const std::string& body) {
  return fmt::format("{:016x}", XXH3_64bits(body.data(), body.size()));
}
}  // namespace

std::string GroupRole::Encode(const GroupRoleState& s) {
  nlohmann::json body = {
      {"format", kFormat},
      {"role", config::ToString(s.role)},
      {"fresh", s.fresh},
      {"discard_local", s.discard_local},
      {"reconciled_with", s.reconciled_with},
  };
  const std::string text = body.dump();
  nlohmann::json file = {{"state", text}, {"xxh3", BodyChecksum(text)}};
  return file.dump(2) + "\n";
}

Result<GroupRoleState> GroupRole::Decode(const std::string& text) {
  try {
    auto file = nlohmann::json::parse(text);
    const std::string body = file.at("state").get<std::string>();
    if (file.at("xxh3").get<std::string>() != BodyChecksum(body)) {
      return Status::Corruption("checksum mismatch");
    }
    auto j = nlohmann::json::parse(body);
    if (j.at("format").get<int>() != kFormat) {
      return Status::NotSupported(fmt::format("format {} (this release reads {})",
                                              j.at("format").get<int>(), kFormat));
    }
    GroupRoleState s;
    const std::string role = j.at("role").get<std::string>();
    if (role == "primary") {
      s.role = config::Role::kPrimary;
    } else if (role == "secondary") {
      s.role = config::Role::kSecondary;
    } else {
      return Status::Corruption(fmt::format("unknown role \"{}\"", role));
    }
    s.fresh = j.at("fresh").get<bool>();
    s.discard_local = j.at("discard_local").get<std::string>();
    s.reconciled_with = j.at("reconciled_with").get<std::string>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    return Status::Corruption(fmt::format("not a group state file: {}", e.what()));
  }
}

Result<std::unique_ptr<GroupRole>> GroupRole::Open(const std::string& data_dir,
                                                   const std::string& group,
                                                   config::Role initial) {
  io::Env* env = io::Env::Default();
  const std::string dir = data_dir + "/" + group;
  if (Status s = env->CreateDirs(dir); !s.ok()) return s;
  std::unique_ptr<GroupRole> r(new GroupRole(dir + "/group-state.json"));
  if (!env->FileExists(r->path_)) {
    GroupRoleState s;
    s.role = initial;
    s.fresh = initial == config::Role::kSecondary;
    if (Status st = r->Write(s); !st.ok()) return st;
    r->state_ = s;
    return r;
  }
  auto file = env->OpenFile(r->path_, io::OpenMode::kReadOnly);
  if (!file.ok()) return file.status();
  auto size = (*file)->Size();
  if (!size.ok()) return size.status();
  std::string text(*size, '\0');
  auto n = (*file)->PRead(0, std::as_writable_bytes(std::span(text)));
  if (!n.ok()) return n.status();
  text.resize(*n);
  auto state = Decode(text);
  if (!state.ok()) {
    return Status::FromCode(
        state.status().code(),
        fmt::format("group {}: {}: {}. It holds the group's role after "
                    "promote/demote; restore it, or remove it to start "
                    "again with the config's role",
                    group, r->path_, state.status().message()),
        0);
  }
  r->state_ = *state;
  return r;
}

GroupRoleState GroupRole::Get() const {
  std::lock_guard lock(mu_);
  return state_;
}

Status GroupRole::Update(const std::function<void(GroupRoleState&)>& change) {
  std::lock_guard wlock(write_mu_);
  GroupRoleState next = Get();
  change(next);
  if (Status s = Write(next); !s.ok()) return s;
  std::lock_guard lock(mu_);
  state_ = next;
  return Status::OK();
}

Status GroupRole::Write(const GroupRoleState& state) {
  io::Env* env = io::Env::Default();
  const std::string tmp = path_ + ".tmp";
  const std::string text = Encode(state);
  auto file = env->OpenFile(tmp, io::OpenMode::kCreateTruncate);
  if (!file.ok()) return file.status().WithContext(tmp);
  if (Status s = (*file)->PWrite(0, std::as_bytes(std::span(text))); !s.ok()) {
    return s.WithContext(tmp);
  }
  if (Status s = (*file)->Sync(); !s.ok()) return s.WithContext(tmp);
  file->reset();
  if (Status s = env->RenameFile(tmp, path_); !s.ok()) return s;
  return env->SyncDir(io::DirName(path_));
}

}  // namespace blockrelay::replication
