// GroupRole (src/replication/group_role.h): the role a group has after
// promote/demote, kept in data_dir and preferred to the config's.
#include <fstream>
#include <sstream>

#include <catch2/catch.hpp>

#include "replication/group_role.h"
#include "testutil/daemon.h"

namespace blockrelay::replication {
namespace {

using Catch::Matchers::Contains;

TEST_CASE("GroupRole: a new group starts with the config's role; secondary is fresh",
          "[group_role]") {
  testutil::TempDir dir;
  auto p = GroupRole::Open(dir.path().string(), "db", config::Role::kPrimary);
  REQUIRE(p.ok());
  CHECK((*p)->Get().role == config::Role::kPrimary);
  CHECK_FALSE((*p)->Get().fresh);
  auto s = GroupRole::Open(dir.path().string(), "logs", config::Role::kSecondary);
  REQUIRE(s.ok());
  CHECK((*s)->Get().role == config::Role::kSecondary);
  CHECK((*s)->Get().fresh);
}

TEST_CASE("GroupRole: an update survives a reopen and wins over the config's role",
          "[group_role]") {
  testutil::TempDir dir;
  {
    auto r = GroupRole::Open(dir.path().string(), "db", config::Role::kSecondary);
    REQUIRE(r.ok());
    REQUIRE((*r)->Update([](GroupRoleState& s) {
      s.role = config::Role::kPrimary;
      s.fresh = false;
      s.discard_local = "paris";
    }).ok());
  }
  auto r = GroupRole::Open(dir.path().string(), "db", config::Role::kSecondary);
  REQUIRE(r.ok());
  CHECK((*r)->Get().role == config::Role::kPrimary);
  CHECK((*r)->Get().discard_local == "paris");
  CHECK_FALSE((*r)->Get().fresh);
}

TEST_CASE("GroupRole: a damaged file refuses the start naming the file", "[group_role]") {
  testutil::TempDir dir;
  std::string path;
  {
    auto r = GroupRole::Open(dir.path().string(), "db", config::Role::kPrimary);
    REQUIRE(r.ok());
    path = (*r)->path();
  }
  std::stringstream text;
  text << std::ifstream(path).rdbuf();
  std::string body = text.str();
  const auto at = body.find("primary");
  REQUIRE(at != std::string::npos);
  body.replace(at, 7, "primarx");
  std::ofstream(path, std::ios::trunc) << body;
  auto r = GroupRole::Open(dir.path().string(), "db", config::Role::kPrimary);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().message(), Contains(path) && Contains("checksum mismatch"));
}

TEST_CASE("GroupRole: Decode refuses what is not a group state", "[group_role]") {
  CHECK_FALSE(GroupRole::Decode("").ok());
  CHECK_FALSE(GroupRole::Decode("{}").ok());
  CHECK_FALSE(GroupRole::Decode("[1,2]").ok());
  GroupRoleState s;
  s.role = config::Role::kSecondary;
  s.reconciled_with = "a";
  auto back = GroupRole::Decode(GroupRole::Encode(s));
  REQUIRE(back.ok());
  CHECK(*back == s);
}

}  // namespace
}  // namespace blockrelay::replication
