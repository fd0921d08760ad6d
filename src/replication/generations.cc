#include "replication/generations.h"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>

#include "blockrelay/storage/volume_metadata.h"

namespace blockrelay::replication {

namespace {

bool Contains(const std::vector<storage::Generation>& list,
              const storage::Generation& g) {
  return std::find(list.begin(), list.end(), g) != list.end();
}

Result<storage::Generation> ParseOne(std::string_view item) {
  const size_t colon = item.rfind(':');
  if (colon == std::string_view::npos) {
    return Status::InvalidArgument(fmt::format(
        "generation \"{}\" is not <uuid>:<counter>", item));
  }
  auto uuid = storage::Uuid::Parse(item.substr(0, colon));
  if (!uuid) {
    return Status::InvalidArgument(fmt::format(
        "generation \"{}\" has no valid uuid", item));
  }
  std::string_view num = item.substr(colon + 1);
  uint64_t counter = 0;
  auto [ptr, ec] = std::from_chars(num.data(), num.data() + num.size(), counter);
  if (num.empty() || ec != std::errc() || ptr != num.data() + num.size() ||
      counter == 0) {
    return Status::InvalidArgument(fmt::format(
        "generation \"{}\" has no valid counter (a number >= 1)", item));
  }
  return storage::Generation{*uuid, counter};
}

}  // namespace

std::string GenerationName(const storage::Generation& g) {
  return fmt::format("{}:{}", g.uuid.ToString(), g.counter);
}

std::string EncodeGenerations(const GenerationSet& set) {
  std::string out = GenerationName(set.current);
  for (const auto& g : set.history) out += "," + GenerationName(g);
  return out;
}

Result<GenerationSet> ParseGenerations(std::string_view text) {
  if (text.empty()) {
    return Status::InvalidArgument("no generation given");
  }
  GenerationSet set;
  size_t n = 0;
  while (true) {
    const size_t comma = text.find(',');
    std::string_view item = text.substr(0, comma);
    if (++n > kMaxGenerations) {
      return Status::InvalidArgument(fmt::format(
          "more than {} generations", kMaxGenerations));
    }
    auto g = ParseOne(item);
    if (!g.ok()) return g.status();
    if (n == 1) {
      set.current = *g;
    } else {
      set.history.push_back(*g);
    }
    if (comma == std::string_view::npos) break;
    text.remove_prefix(comma + 1);
  }
  return set;
}

const char* GenerationVerdictName(GenerationVerdict v) {
  switch (v) {
    case GenerationVerdict::kSame:
      return "same";
    case GenerationVerdict::kInitial:
      return "initial";
    case GenerationVerdict::kFollower:
      return "follower";
    case GenerationVerdict::kDownstreamBehind:
      return "downstream_behind";
    case GenerationVerdict::kDiscardLocal:
      return "discard_local";
    case GenerationVerdict::kUpstreamStale:
      return "upstream_stale";
    case GenerationVerdict::kSplitBrain:
      return "split_brain";
  }
  return "unknown";
}

GenerationDecision DecideGenerations(const std::string& group,
                                     const GenerationSide& up,
                                     const GenerationSide& down,
                                     bool down_fresh, bool down_follows_up,
                                     bool discard_local) {
  GenerationDecision d;
  const auto& u = up.generations;
  const auto& w = down.generations;
  if (u.current == w.current) {
    d.verdict = GenerationVerdict::kSame;
    return d;
  }
  if (down_fresh) {
    d.verdict = GenerationVerdict::kInitial;
    d.message = fmt::format(
        "group {}: site {} has never written on its own; it takes site {}'s "
        "generation {}", group, down.site, up.site, GenerationName(u.current));
    return d;
  }
  if (down_follows_up) {
    d.verdict = GenerationVerdict::kFollower;
    return d;
  }
  if (Contains(u.history, w.current)) {
    d.verdict = GenerationVerdict::kDownstreamBehind;
    d.message = fmt::format(
        "group {}: site {} (generation {}) is behind site {} (generation {}, "
        "which descends from it); resyncing the union of both sides' dirty "
        "regions", group, down.site, GenerationName(w.current), up.site,
        GenerationName(u.current));
    return d;
  }
  const std::string how_to = fmt::format(
      "run `blockrelay resync {} --link {} --discard-local` on site {} to drop "
      "its writes, or demote site {} and promote site {} to keep them",
      group, up.site, down.site, up.site, down.site);
  if (Contains(w.history, u.current)) {
    d.verdict = GenerationVerdict::kUpstreamStale;
    d.message = fmt::format(
        "group {}: site {} is at generation {}, which site {} has left behind "
        "(it is at generation {}): site {} was not demoted after a failover; "
        "nothing written. Demote site {}, or {}",
        group, up.site, GenerationName(u.current), down.site,
        GenerationName(w.current), up.site, up.site, how_to);
  } else {
    d.verdict = GenerationVerdict::kSplitBrain;
    d.message = fmt::format(
        "split brain in group {}: site {} is at generation {} and site {} at "
        "generation {}; neither descends from the other, so both were written "
        "independently; nothing written. To choose: {}",
        group, up.site, GenerationName(u.current), down.site,
        GenerationName(w.current), how_to);
  }
  if (discard_local) {
    d.message = fmt::format(
        "group {}: {} site {}'s writes are discarded as the operator asked "
        "(resync --discard-local): resyncing from site {}",
        group,
        d.verdict == GenerationVerdict::kSplitBrain ? "split brain;" : "stale upstream;",
        down.site, up.site);
    d.verdict = GenerationVerdict::kDiscardLocal;
    return d;
  }
  d.accepted = false;
  return d;
}

std::optional<GenerationSet> GroupGenerations(
    const std::vector<std::shared_ptr<core::Volume>>& volumes) {
  if (volumes.empty() || !volumes[0]->metadata()) return std::nullopt;
  const auto* m = volumes[0]->metadata();
  return GenerationSet{m->generation(), m->generation_history()};
}

Status SetGroupGenerations(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                           const GenerationSet& set) {
  for (const auto& v : volumes) {
    if (!v->mutable_metadata()) continue;
    Status s = v->mutable_metadata()->SetGeneration(set.current, set.history);
    if (!s.ok()) return s.WithContext("volume " + v->name());
  }
  return Status::OK();
}

}  // namespace blockrelay::replication
