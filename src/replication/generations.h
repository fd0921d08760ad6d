// Generations at HELLO: what a connecting upstream may do to a downstream.
//
// Every promote starts a new generation (random uuid, counter + 1) on the
// promoted site and keeps the old one in a short history; a downstream
// adopts its upstream's generation and history once it has merged its dirty
// set into the upstream's scoreboard (docs/replication.md, "Generations").
// From the two sides' generations the downstream decides, at every HELLO:
//   same current generation           stream + resync the union of dirty sets
//   downstream fresh (never written)  accept: the initial sync
//   downstream follows this upstream  accept (it wrote nothing of its own)
//   downstream's current in the
//     upstream's history              the downstream is behind (the old
//                                     primary came back): accept, union resync
//   upstream's current in the
//     downstream's history            the upstream is stale (it was not
//                                     demoted after a failover): refuse
//   neither                           split brain: refuse, naming both
// `discard_local` (the operator's `resync --discard-local` on the
// downstream) accepts a stale upstream or a split brain: the downstream's
// independent writes are overwritten by the union resync.
//
// Pure functions; thread safety: value types.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "blockrelay/core/volume.h"

#include "blockrelay/status.h"
#include "blockrelay/storage/generation.h"

namespace blockrelay::replication {

struct GenerationSet {
  storage::Generation current;
  std::vector<storage::Generation> history;  // newest first
  bool operator==(const GenerationSet&) const = default;
};

// "<uuid>:<counter>", e.g. "3f2a...-...:4".
std::string GenerationName(const storage::Generation& g);

// Wire form in HELLO/HELLO_REPLY's generation string: the current
// generation, then the history, comma-separated ("<uuid>:<n>,<uuid>:<n>").
std::string EncodeGenerations(const GenerationSet& set);
// InvalidArgument naming what is wrong (empty, a bad uuid or counter, more
// than kMaxGenerations entries).
inline constexpr size_t kMaxGenerations = 16;
Result<GenerationSet> ParseGenerations(std::string_view text);

enum class GenerationVerdict {
  kSame,
  kInitial,           // the downstream never wrote on its own: initial sync
  kFollower,          // it took writes only from this upstream since they met
  kDownstreamBehind,  // failback: the old primary comes back as downstream
  kDiscardLocal,      // stale or split, but the operator said drop ours
  kUpstreamStale,     // refused
  kSplitBrain,        // refused
};
const char* GenerationVerdictName(GenerationVerdict v);

struct GenerationDecision {
  GenerationVerdict verdict = GenerationVerdict::kSame;
  bool accepted = true;
  std::string message;  // why refused, or what an accepted non-same means
};

struct GenerationSide {
  std::string site;
  GenerationSet generations;
};

// `down_fresh`: the downstream's group was created secondary and has never
// been primary nor adopted a generation, so it holds nothing of its own.
// `down_follows_up`: the downstream has been secondary, taking writes only
// from this upstream, since it last reconciled with it (GroupRole's
// reconciled_with): it holds nothing of its own either, however many
// generations the upstream started meanwhile.
// `discard_local`: the operator ran `resync --discard-local` for this
// upstream on the downstream.
GenerationDecision DecideGenerations(const std::string& group,
                                     const GenerationSide& up,
                                     const GenerationSide& down,
                                     bool down_fresh, bool down_follows_up,
                                     bool discard_local);

// A group's generations: its first volume's (every volume of a group gets
// the same generation at promote and at adoption). nullopt without metadata.
std::optional<GenerationSet> GroupGenerations(
    const std::vector<std::shared_ptr<core::Volume>>& volumes);

// Sets `set` as the generation of every volume of the group, durably
// (storage thread).
Status SetGroupGenerations(const std::vector<std::shared_ptr<core::Volume>>& volumes,
                           const GenerationSet& set);

}  // namespace blockrelay::replication
