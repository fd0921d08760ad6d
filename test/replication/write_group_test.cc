// WriteGroupBuilder and SealedGroup (src/replication/write_group.h): which
// writes of one group are merged (an exact rewrite nothing overlapped since),
// which are kept apart, and the frame a sealed group turns into.
#include "replication/write_group.h"

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include <catch2/catch.hpp>

namespace blockrelay::replication {
namespace {

// `length` bytes of `value`.
Bytes Fill(size_t length, uint8_t value) {
  return Bytes(length, static_cast<std::byte>(value));
}

void AddWrite(WriteGroupBuilder& b, uint32_t volume, uint64_t offset,
              const Bytes& data, storage::WriteSeq wseq = 0) {
  b.Add(OpType::kWrite, volume, offset, data.size(), data, wseq);
}

void AddNoData(WriteGroupBuilder& b, OpType type, uint32_t volume,
               uint64_t offset, uint64_t length, storage::WriteSeq wseq = 0) {
  b.Add(type, volume, offset, length, {}, wseq);
}

// The bytes of a sealed write op.
Bytes DataOf(const SealedGroup& g, const CapturedOp& op) {
  REQUIRE(op.type == OpType::kWrite);
  REQUIRE(op.data_pos + op.length <= g.data.size());
  return Bytes(g.data.begin() + op.data_pos,
               g.data.begin() + op.data_pos + op.length);
}

TEST_CASE("WriteGroupBuilder: an exact rewrite replaces the earlier write's data in place",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(7);
  AddWrite(b, 0, 4096, Fill(512, 0xaa), /*wseq=*/3);
  AddWrite(b, 0, 4096, Fill(512, 0xbb), /*wseq=*/5);
  CHECK(b.data_bytes() == 512);

  auto g = b.Seal();
  CHECK(g->group_seq == 7);
  REQUIRE(g->ops.size() == 1);
  CHECK(g->ops[0].type == OpType::kWrite);
  CHECK(g->ops[0].offset == 4096);
  CHECK(g->ops[0].length == 512);
  CHECK(DataOf(*g, g->ops[0]) == Fill(512, 0xbb));
  CHECK(g->ops[0].wseq == 5);
  CHECK(g->data.size() == 512);
  // Both writes were captured, though only one crosses the wire.
  CHECK(g->bytes_written == 1024);
}

TEST_CASE("WriteGroupBuilder: a merged rewrite keeps the largest WriteSeq",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, 0, Fill(8, 1), /*wseq=*/9);
  AddWrite(b, 0, 0, Fill(8, 2), /*wseq=*/4);
  AddWrite(b, 0, 0, Fill(8, 3), /*wseq=*/6);
  auto g = b.Seal();
  REQUIRE(g->ops.size() == 1);
  CHECK(g->ops[0].wseq == 9);
  CHECK(DataOf(*g, g->ops[0]) == Fill(8, 3));
  CHECK(g->bytes_written == 24);
}

// Goal: merging W3 into W1 would move W3's data before W2, so the downstream
// would end with W2's bytes where W3 wrote.
TEST_CASE("WriteGroupBuilder: a rewrite is not merged once a later op overlapped the write",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, 0, Fill(8, 0xa1), 1);
  OpType middle = OpType::kWrite;
  SECTION("overlapping write") { middle = OpType::kWrite; }
  SECTION("overlapping trim") { middle = OpType::kTrim; }
  SECTION("overlapping zeroing") { middle = OpType::kZero; }
  if (middle == OpType::kWrite) {
    AddWrite(b, 0, 4, Fill(8, 0xb2), 2);
  } else {
    AddNoData(b, middle, 0, 4, 8, 2);
  }
  AddWrite(b, 0, 0, Fill(8, 0xc3), 3);

  auto g = b.Seal();
  REQUIRE(g->ops.size() == 3);
  CHECK(g->ops[0].offset == 0);
  CHECK(DataOf(*g, g->ops[0]) == Fill(8, 0xa1));
  CHECK(g->ops[0].wseq == 1);
  CHECK(g->ops[1].type == middle);
  CHECK(g->ops[1].offset == 4);
  CHECK(g->ops[1].length == 8);
  CHECK(g->ops[2].offset == 0);
  CHECK(DataOf(*g, g->ops[2]) == Fill(8, 0xc3));
  CHECK(g->ops[2].wseq == 3);
}

TEST_CASE("WriteGroupBuilder: an op that only touches the write's edges does not stop a merge",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, 100, Fill(8, 1));
  AddWrite(b, 0, 108, Fill(8, 2));  // starts where it ends
  AddWrite(b, 0, 92, Fill(8, 3));   // ends where it starts
  AddNoData(b, OpType::kTrim, 0, 108, 0);  // empty, at its end
  AddWrite(b, 0, 100, Fill(8, 4));

  auto g = b.Seal();
  REQUIRE(g->ops.size() == 4);
  CHECK(g->ops[0].offset == 100);
  CHECK(DataOf(*g, g->ops[0]) == Fill(8, 4));
  CHECK(g->ops[1].offset == 108);
  CHECK(g->ops[2].offset == 92);
  CHECK(g->ops[3].type == OpType::kTrim);
}

TEST_CASE("WriteGroupBuilder: a write of another length at the same offset is not merged",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, 0, Fill(8, 1));
  AddWrite(b, 0, 0, Fill(4, 2));
  SECTION("two ops") {
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 2);
    CHECK(g->ops[0].length == 8);
    CHECK(DataOf(*g, g->ops[0]) == Fill(8, 1));
    CHECK(g->ops[1].length == 4);
    CHECK(DataOf(*g, g->ops[1]) == Fill(4, 2));
  }
  SECTION("the shorter write overlapped the first, so its rewrite is kept apart too") {
    AddWrite(b, 0, 0, Fill(8, 3));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 3);
    CHECK(DataOf(*g, g->ops[0]) == Fill(8, 1));
    CHECK(DataOf(*g, g->ops[1]) == Fill(4, 2));
    CHECK(DataOf(*g, g->ops[2]) == Fill(8, 3));
  }
}

TEST_CASE("WriteGroupBuilder: trims and zeroings are never merged", "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  SECTION("trim after trim") {
    AddNoData(b, OpType::kTrim, 0, 0, 4096);
    AddNoData(b, OpType::kTrim, 0, 0, 4096);
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 2);
    CHECK(g->ops[0].type == OpType::kTrim);
    CHECK(g->ops[1].type == OpType::kTrim);
    CHECK(g->data.empty());
  }
  SECTION("zeroing after zeroing") {
    AddNoData(b, OpType::kZero, 0, 0, 4096);
    AddNoData(b, OpType::kZero, 0, 0, 4096);
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 2);
    CHECK(g->ops[0].type == OpType::kZero);
    CHECK(g->ops[1].type == OpType::kZero);
  }
  SECTION("write, trim of the same range, the same write again") {
    AddWrite(b, 0, 0, Fill(4096, 1));
    AddNoData(b, OpType::kTrim, 0, 0, 4096);
    AddWrite(b, 0, 0, Fill(4096, 2));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 3);
    CHECK(g->ops[0].type == OpType::kWrite);
    CHECK(g->ops[1].type == OpType::kTrim);
    CHECK(g->ops[2].type == OpType::kWrite);
    CHECK(DataOf(*g, g->ops[2]) == Fill(4096, 2));
  }
  SECTION("a write is not merged into a zeroing of the same range") {
    AddNoData(b, OpType::kZero, 0, 0, 4096);
    AddWrite(b, 0, 0, Fill(4096, 1));
    AddWrite(b, 0, 0, Fill(4096, 2));  // merges into the write, not the zeroing
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 2);
    CHECK(g->ops[0].type == OpType::kZero);
    CHECK(g->ops[1].type == OpType::kWrite);
    CHECK(DataOf(*g, g->ops[1]) == Fill(4096, 2));
  }
}

// Goal: the overlap search starts max_length bytes before a new op, so a long
// earlier write that begins far before the new op is still found.
TEST_CASE("WriteGroupBuilder: a short op deep inside a long earlier write stops its merge",
          "[replication]") {
  constexpr uint64_t kLong = 1 << 20;
  // Far from offset 0, so the search window does not reach back to it anyway.
  constexpr uint64_t kBase = 16 * kLong;
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, kBase, Fill(kLong, 1));
  AddWrite(b, 0, kBase - 2 * kLong, Fill(512, 2));  // elsewhere, before it
  SECTION("overlapping near the long write's end") {
    AddWrite(b, 0, kBase + kLong - 512, Fill(512, 3));
    AddWrite(b, 0, kBase, Fill(kLong, 4));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 4);
    CHECK(g->ops[2].offset == kBase + kLong - 512);
    CHECK(g->ops[3].offset == kBase);
    CHECK(DataOf(*g, g->ops[0]) == Fill(kLong, 1));
    CHECK(DataOf(*g, g->ops[3]) == Fill(kLong, 4));
  }
  SECTION("a zero-length trim at the long write's last byte") {
    AddNoData(b, OpType::kTrim, 0, kBase + kLong - 1, 0);
    AddWrite(b, 0, kBase, Fill(kLong, 4));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 4);
    CHECK(g->ops[3].offset == kBase);
  }
  SECTION("after shorter ops in between, the window still reaches back") {
    AddWrite(b, 0, 0, Fill(16, 5));
    AddWrite(b, 0, kBase + kLong - 8, Fill(16, 3));  // overlaps the last 8 bytes
    AddWrite(b, 0, kBase, Fill(kLong, 4));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 5);
    CHECK(g->ops[4].offset == kBase);
    CHECK(DataOf(*g, g->ops[0]) == Fill(kLong, 1));
  }
  SECTION("just past the long write's end: still merged") {
    AddWrite(b, 0, kBase + kLong, Fill(512, 3));
    AddWrite(b, 0, kBase, Fill(kLong, 4));
    auto g = b.Seal();
    REQUIRE(g->ops.size() == 3);
    CHECK(g->ops[0].offset == kBase);
    CHECK(DataOf(*g, g->ops[0]) == Fill(kLong, 4));
    CHECK(g->ops[2].offset == kBase + kLong);
  }
}

TEST_CASE("WriteGroupBuilder: ops of different volumes at the same offset are independent",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(1);
  AddWrite(b, 0, 0, Fill(8, 1), 1);
  AddWrite(b, 1, 0, Fill(8, 2), 2);  // same range, other volume
  AddNoData(b, OpType::kTrim, 1, 0, 64);
  AddWrite(b, 0, 0, Fill(8, 3), 3);

  auto g = b.Seal();
  REQUIRE(g->ops.size() == 3);
  CHECK(g->ops[0].volume == 0);
  CHECK(DataOf(*g, g->ops[0]) == Fill(8, 3));
  CHECK(g->ops[0].wseq == 3);
  CHECK(g->ops[1].volume == 1);
  CHECK(DataOf(*g, g->ops[1]) == Fill(8, 2));
  CHECK(g->ops[2].volume == 1);
  CHECK(g->ops[2].type == OpType::kTrim);

  SECTION("and a write to volume 1 is not merged into volume 0's") {
    WriteGroupBuilder b2;
    b2.Open(2);
    AddWrite(b2, 0, 0, Fill(8, 1));
    AddWrite(b2, 1, 0, Fill(8, 2));
    auto g2 = b2.Seal();
    REQUIRE(g2->ops.size() == 2);
    CHECK(DataOf(*g2, g2->ops[0]) == Fill(8, 1));
    CHECK(DataOf(*g2, g2->ops[1]) == Fill(8, 2));
  }
}

TEST_CASE("WriteGroupBuilder: MarkDurable sets kGroupDurable on the sealed group",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(3);
  AddWrite(b, 0, 0, Fill(8, 1));
  CHECK_FALSE(b.durable());
  SECTION("durable") {
    b.MarkDurable();
    CHECK(b.durable());
    auto g = b.Seal();
    CHECK(g->flags == kGroupDurable);
    CHECK_FALSE(b.durable());
  }
  SECTION("not durable") {
    auto g = b.Seal();
    CHECK(g->flags == 0);
  }
}

TEST_CASE("WriteGroupBuilder: Seal leaves an empty builder and an unchanging sealed group",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(5);
  AddWrite(b, 0, 0, Fill(8, 1), 1);
  CHECK_FALSE(b.empty());
  CHECK(b.seq() == 5);
  auto first = b.Seal();

  CHECK(b.empty());
  CHECK(b.data_bytes() == 0);
  CHECK(b.seq() == 0);

  // The same range again: a new op of the next group, not a rewrite of the
  // sealed one.
  b.Open(6);
  CHECK(b.seq() == 6);
  AddWrite(b, 0, 0, Fill(8, 2), 2);
  auto second = b.Seal();

  REQUIRE(first->ops.size() == 1);
  CHECK(first->group_seq == 5);
  CHECK(DataOf(*first, first->ops[0]) == Fill(8, 1));
  CHECK(first->ops[0].wseq == 1);
  CHECK(first->bytes_written == 8);
  REQUIRE(second->ops.size() == 1);
  CHECK(second->group_seq == 6);
  CHECK(DataOf(*second, second->ops[0]) == Fill(8, 2));
  CHECK(second->ops[0].data_pos == 0);
  CHECK(second->bytes_written == 8);
}

TEST_CASE("SealedGroup: ToFrame gives each write a view of its captured data",
          "[replication]") {
  WriteGroupBuilder b;
  b.Open(11);
  AddWrite(b, 2, 512, Fill(100, 0x11));
  AddNoData(b, OpType::kTrim, 0, 8192, 4096);
  AddWrite(b, 0, 0, Fill(300, 0x22));
  AddNoData(b, OpType::kZero, 1, 0, 65536);
  AddWrite(b, 2, 512, Fill(100, 0x33));  // merged into the first op
  b.MarkDurable();
  auto g = b.Seal();

  WriteGroup f = g->ToFrame(42);
  CHECK(f.link_seq == 42);
  CHECK(f.group_seq == 11);
  CHECK(f.flags == kGroupDurable);
  REQUIRE(f.ops.size() == g->ops.size());
  REQUIRE(f.ops.size() == 4);
  for (size_t i = 0; i < f.ops.size(); ++i) {
    INFO("op " << i);
    const CapturedOp& c = g->ops[i];
    const Op& o = f.ops[i];
    CHECK(o.type == c.type);
    CHECK(o.volume == c.volume);
    CHECK(o.offset == c.offset);
    CHECK(o.length == c.length);
    if (c.type == OpType::kWrite) {
      REQUIRE(o.data.size() == c.length);
      CHECK(Bytes(o.data.begin(), o.data.end()) == DataOf(*g, c));
      // A view into the sealed group, not a copy.
      CHECK(o.data.data() == g->data.data() + c.data_pos);
    } else {
      CHECK(o.data.empty());
    }
  }
  CHECK(Bytes(f.ops[0].data.begin(), f.ops[0].data.end()) == Fill(100, 0x33));
  CHECK(Bytes(f.ops[2].data.begin(), f.ops[2].data.end()) == Fill(300, 0x22));

  // A second frame of the same group, for another link.
  WriteGroup f2 = g->ToFrame(1);
  CHECK(f2.link_seq == 1);
  CHECK(f2.ops[0].data.data() == f.ops[0].data.data());
}

}  // namespace
}  // namespace blockrelay::replication
