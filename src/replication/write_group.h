// WriteGroupBuilder and SealedGroup: the writes of one consistency group
// between two group boundaries.
//
// The builder collects writes in the order they completed locally; a write
// of exactly the same bytes as an earlier write of the same group (same
// volume, offset and length) that no later operation overlapped replaces the
// earlier one's data in place, so a hot block rewritten many times inside
// one group crosses the wire once (issue 4: "overwrites of the same bytes
// inside one group are sent once"). Sealing gives an immutable SealedGroup
// that every link of the group shares.
//
// Thread safety: the builder is guarded by its owner (ReplicationGroup);
// a SealedGroup is immutable.
#pragma once

#include <algorithm>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "blockrelay/storage/scoreboard.h"
#include "replication/protocol.h"

namespace blockrelay::replication {

struct CapturedOp {
  OpType type = OpType::kWrite;
  uint32_t volume = 0;
  uint64_t offset = 0;
  uint64_t length = 0;
  size_t data_pos = 0;  // into SealedGroup::data, kWrite only
  // Scoreboard WriteSeq the downstream's acknowledgement may clear up to.
  storage::WriteSeq wseq = 0;
};

struct SealedGroup {
  uint64_t group_seq = 0;  // 0 for resync data
  uint32_t flags = 0;      // kGroupDurable, kGroupResync
  std::vector<CapturedOp> ops;
  Bytes data;
  uint64_t bytes_written = 0;  // bytes of the writes captured, before dedup
  // Set instead of ops for an online-verify request, which travels in
  // sequence with the groups (protocol.h, VerifyRequest).
  std::shared_ptr<const VerifyRequest> verify;
  // Set instead of ops for a GENERATION frame (protocol.h,
  // GenerationUpdate): the new generations, as HELLO carries them.
  std::shared_ptr<const std::string> generation;
  std::chrono::steady_clock::time_point opened;
  // Set on a copy without `data` (Stripped()): the write data's size.
  bool stripped = false;
  uint64_t stripped_data_bytes = 0;

  // Bytes of write data the group carries (or carried, once stripped).
  uint64_t data_bytes() const { return stripped ? stripped_data_bytes : data.size(); }

  // The same group without its write data: what a link keeps of a group its
  // downstream has received but not yet made durable (the ranges and
  // WriteSeqs, to clear scoreboard bits at the durable acknowledgement).
  // REQUIRES: !verify.
  std::shared_ptr<const SealedGroup> Stripped() const {
    auto g = std::make_shared<SealedGroup>();
    g->group_seq = group_seq;
    g->flags = flags;
    g->ops = ops;
    g->bytes_written = bytes_written;
    g->opened = opened;
    g->stripped = true;
    g->stripped_data_bytes = data_bytes();
    return g;
  }

  // The frame for `link_seq`, op data pointing into this group.
  WriteGroup ToFrame(uint64_t link_seq) const {
    assert(!stripped && "a stripped group has no data to send");
    WriteGroup g;
    g.link_seq = link_seq;
    g.group_seq = group_seq;
    g.flags = flags;
    g.ops.reserve(ops.size());
    for (const auto& op : ops) {
      Op o;
      o.type = op.type;
      o.volume = op.volume;
      o.offset = op.offset;
      o.length = op.length;
      if (op.type == OpType::kWrite) {
        o.data = std::span<const std::byte>(data).subspan(op.data_pos, op.length);
      }
      g.ops.push_back(o);
    }
    return g;
  }
  // Memory held, for queue accounting.
  uint64_t footprint() const {
    return data.size() + ops.size() * sizeof(CapturedOp) + 64;
  }
};

class WriteGroupBuilder {
 public:
  bool empty() const { return group_.ops.empty(); }
  uint64_t data_bytes() const { return group_.data.size(); }
  uint64_t seq() const { return group_.group_seq; }
  std::chrono::steady_clock::time_point opened() const { return group_.opened; }
  bool durable() const { return group_.flags & kGroupDurable; }

  void Open(uint64_t seq) {
    group_ = SealedGroup{};
    group_.group_seq = seq;
    group_.opened = std::chrono::steady_clock::now();
    // Room for about as much as the last group held: growing the buffer
    // write by write copies it again at every doubling and touches fresh
    // pages each time (a profile of 4 KiB writes at QD32 showed both).
    group_.data.reserve(std::min<uint64_t>(last_data_bytes_ + last_data_bytes_ / 4,
                                           kMaxReserveBytes));
    latest_.clear();
    max_length_ = 0;
  }

  void MarkDurable() { group_.flags |= kGroupDurable; }

  void Add(OpType type, uint32_t volume, uint64_t offset, uint64_t length,
           std::span<const std::byte> data, storage::WriteSeq wseq) {
    if (group_.ops.empty()) group_.opened = std::chrono::steady_clock::now();
    group_.bytes_written += length;
    const Key key{volume, offset};
    if (type == OpType::kWrite) {
      auto it = latest_.find(key);
      if (it != latest_.end()) {
        CapturedOp& prev = group_.ops[it->second];
        if (prev.type == OpType::kWrite && prev.length == length) {
          std::memcpy(group_.data.data() + prev.data_pos, data.data(), length);
          prev.wseq = std::max(prev.wseq, wseq);
          return;
        }
      }
    }
    ForgetOverlapping(volume, offset, length);
    CapturedOp op{type, volume, offset, length, 0, wseq};
    if (type == OpType::kWrite) {
      op.data_pos = group_.data.size();
      group_.data.insert(group_.data.end(), data.begin(), data.end());
    }
    latest_[key] = group_.ops.size();
    group_.ops.push_back(op);
    max_length_ = std::max(max_length_, length);
  }

  std::shared_ptr<const SealedGroup> Seal() {
    last_data_bytes_ = group_.data.size();
    auto sealed = std::make_shared<SealedGroup>(std::move(group_));
    group_ = SealedGroup{};
    latest_.clear();
    max_length_ = 0;
    return sealed;
  }

 private:
  using Key = std::pair<uint32_t, uint64_t>;  // volume, offset

  // Earlier ops overlapping a new one may no longer take a rewrite in
  // place: the rewrite would move before the new op.
  void ForgetOverlapping(uint32_t volume, uint64_t offset, uint64_t length) {
    const uint64_t end = offset + std::max<uint64_t>(length, 1);
    const uint64_t from = offset > max_length_ ? offset - max_length_ : 0;
    auto it = latest_.lower_bound({volume, from});
    while (it != latest_.end() && it->first.first == volume &&
           it->first.second < end) {
      const CapturedOp& op = group_.ops[it->second];
      if (op.offset + std::max<uint64_t>(op.length, 1) > offset) {
        it = latest_.erase(it);
      } else {
        ++it;
      }
    }
  }

  static constexpr uint64_t kMaxReserveBytes = 16ull << 20;

  SealedGroup group_;
  std::map<Key, size_t> latest_;  // op index of the latest op at an offset
  uint64_t max_length_ = 0;
  uint64_t last_data_bytes_ = 0;  // of the group sealed last
};

}  // namespace blockrelay::replication
