// SlotBitmap: the flat word array with all-set, touched and unflushed flags:
// exact memory figures, agreement with a plain bit vector, and concurrent
// use as the Scoreboard makes it.

#include <unistd.h>

#include <array>
#include <atomic>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "storage/metadata_format.h"
#include "storage/slot_bitmap.h"

namespace blockrelay::storage {
namespace {

using format::kBitsPerPage;
using format::kWordsPerPage;

constexpr uint64_t kKiB = 1ull << 10;
constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kTiB = 1ull << 40;
constexpr uint64_t kRegions1TiB = kTiB / (64 * kKiB);  // 16,777,216

uint64_t OsPage() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

// The flag words of a 1 TiB slot at 64 KiB regions: 517 on-disk pages give
// 9 words of all-set bits and 9 of unflushed bits; the 2 MiB array has 512
// OS pages of 4 KiB, 8 words of touched bits. 26 words, 208 bytes.
uint64_t FlagBytes1TiB() { return (9 + 9 + (2 * kMiB / OsPage() + 63) / 64) * 8; }

// A plain bit vector with the same page layout, to check SlotBitmap against.
struct Model {
  explicit Model(uint64_t n) : bits(n) {}
  std::vector<bool> bits;
  void Set(uint64_t a, uint64_t b, bool v) {
    for (uint64_t r = a; r <= b; ++r) bits[r] = v;
  }
  std::vector<uint64_t> Page(uint64_t page) const {
    std::vector<uint64_t> words(kWordsPerPage);
    for (uint64_t i = 0; i < kBitsPerPage; ++i) {
      uint64_t r = page * kBitsPerPage + i;
      if (r < bits.size() && bits[r]) words[i / 64] |= uint64_t{1} << (i % 64);
    }
    return words;
  }
};

std::vector<uint64_t> Snapshot(const SlotBitmap& bm, uint64_t page) {
  std::vector<uint64_t> words(kWordsPerPage);
  bm.SnapshotPage(page, words);
  return words;
}

TEST_CASE("SlotBitmap: fully fragmented 1 TiB slot fits in 2 MiB plus flags", "[scoreboard]") {
  // Goal: issue 3's "at most 2 MiB per slot". One dirty region in every
  // on-disk page also dirties every OS page of the array.
  SlotBitmap bm(kRegions1TiB);
  REQUIRE(bm.page_count() == 517);
  for (uint64_t p = 0; p < bm.page_count(); ++p) bm.SetRange(p * kBitsPerPage, p * kBitsPerPage);
  CHECK(bm.CountSet() == 517);
  uint64_t bytes = bm.MemoryUsageBytes();
  INFO(bytes << " bytes; sizeof(SlotBitmap) " << sizeof(SlotBitmap));
  CHECK(bm.ReservedBytes() == 2 * kMiB);
  CHECK(bm.ResidentBytesForTesting() == 2 * kMiB);  // the kernel agrees
  CHECK(bytes == 2 * kMiB + FlagBytes1TiB() + sizeof(SlotBitmap));
  CHECK(bytes <= 2 * kMiB + 288);  // 208 bytes of flags + a 64-byte object (x86-64)
}

TEST_CASE("SlotBitmap: 1% of a 1 TiB slot dirty at random costs the whole 2 MiB plus flags",
          "[scoreboard]") {
  // Goal: with ~330 dirty regions per 4 KiB OS page, scattered dirt touches
  // every page: the same figure as fully fragmented, no more.
  SlotBitmap bm(kRegions1TiB);
  std::mt19937_64 rng(1);
  for (uint64_t i = 0; i < kRegions1TiB / 100; ++i) {
    uint64_t r = rng() % kRegions1TiB;
    bm.SetRange(r, r);
  }
  CHECK(bm.ResidentBytesForTesting() == 2 * kMiB);
  CHECK(bm.MemoryUsageBytes() == 2 * kMiB + FlagBytes1TiB() + sizeof(SlotBitmap));
}

TEST_CASE("SlotBitmap: 1% of a 1 TiB slot dirtied by writes in one place costs six OS pages",
          "[scoreboard]") {
  // Goal: written as the Scoreboard sets bits for writes, one 4 MiB intent
  // extent (64 regions) at a time; a single SetRange over whole pages would
  // cost less (see "setting whole pages").
  SlotBitmap bm(kRegions1TiB);
  const uint64_t n = (kRegions1TiB + 99) / 100;  // 167,773 regions, ~10 GiB
  for (uint64_t r = 0; r < n; r += 64) bm.SetRange(r, std::min(r + 63, n - 1));
  CHECK(bm.CountSet() == n);
  CHECK(bm.NextSet(n) == std::nullopt);
  const uint64_t chunks = (n + OsPage() * 8 - 1) / (OsPage() * 8);  // 6 with 4 KiB pages
  CHECK(bm.ResidentBytesForTesting() == chunks * OsPage());
  CHECK(bm.MemoryUsageBytes() == chunks * OsPage() + FlagBytes1TiB() + sizeof(SlotBitmap));
}

TEST_CASE("SlotBitmap: an all-clean or all-dirty 1 TiB slot costs only its flags",
          "[scoreboard]") {
  SlotBitmap clean(kRegions1TiB);
  SlotBitmap dirty(kRegions1TiB);
  dirty.LoadAllSet();
  CHECK(clean.CountSet() == 0);
  CHECK(clean.NextSet(0) == std::nullopt);
  CHECK(dirty.CountSet() == kRegions1TiB);
  CHECK(dirty.AllSet(0, kRegions1TiB - 1));
  CHECK(dirty.NextSet(12345) == 12345u);
  CHECK(Snapshot(dirty, 516)[15] == ~uint64_t{0});  // the last page has 16 words
  CHECK(Snapshot(dirty, 516)[16] == 0);
  for (const SlotBitmap* bm : {&clean, &dirty}) {
    CHECK(bm->ReservedBytes() == 0);  // not even address space
    CHECK(bm->MemoryUsageBytes() == FlagBytes1TiB() + sizeof(SlotBitmap));
  }
}

TEST_CASE("SlotBitmap: setting whole pages costs no memory", "[scoreboard]") {
  // Goal: a trim of the whole volume (mkfs discards it) or a full resync
  // of a clean 1 TiB slot sets all-set bits, not 2 MiB of words; only a
  // partial page at the edge of the range is written out.
  SlotBitmap bm(kRegions1TiB);
  const uint64_t idle = bm.MemoryUsageBytes();
  bm.SetRange(5, kRegions1TiB - 1);
  CHECK(bm.CountSet() == kRegions1TiB - 5);
  CHECK(bm.NextSet(0) == 5u);
  CHECK(bm.IsUnflushed(0));
  CHECK(bm.IsUnflushed(516));
  CHECK(bm.MemoryUsageBytes() == idle + OsPage());  // page 0's words: the first OS page
  for (uint64_t p = 0; p < bm.page_count(); ++p) (void)bm.TakeUnflushed(p);
  bm.SetRange(0, kRegions1TiB - 1);
  CHECK(bm.AllSet(0, kRegions1TiB - 1));
  CHECK(bm.IsUnflushed(0));  // regions 0..4 changed
  CHECK_FALSE(bm.IsUnflushed(1));  // nothing changed: no page write
  CHECK(bm.MemoryUsageBytes() == idle + OsPage());
}

TEST_CASE("SlotBitmap: the first clear in an all-set page writes out only that page",
          "[scoreboard]") {
  SlotBitmap bm(kRegions1TiB);
  bm.LoadAllSet();
  const uint64_t idle = bm.MemoryUsageBytes();
  const uint64_t r = 3 * kBitsPerPage + 100;
  std::vector<uint64_t> old;
  CHECK(bm.ClearRange(r, r, &old) == 1);
  CHECK_FALSE(bm.Test(r));
  CHECK(bm.CountSet() == kRegions1TiB - 1);
  CHECK(bm.NextSet(r) == r + 1);
  // Page 3 is words 1524..2031: the second and third OS pages of 4 KiB.
  if (OsPage() == 4096) CHECK(bm.MemoryUsageBytes() == idle + 2 * 4096);
  CHECK(bm.ResidentBytesForTesting() == bm.MemoryUsageBytes() - idle);
  // Page 2's tail shares an OS page with page 3 but is still all set.
  CHECK(Snapshot(bm, 2) == std::vector<uint64_t>(kWordsPerPage, ~uint64_t{0}));
  CHECK(bm.IsUnflushed(3));
  CHECK_FALSE(bm.IsUnflushed(2));
  std::vector<uint64_t> page3 = Snapshot(bm, 3);
  CHECK(page3[1] == ~(uint64_t{1} << 36));
  bm.RestoreRange(r, r, old);
  CHECK(bm.AllSet(0, kRegions1TiB - 1));
}

TEST_CASE("SlotBitmap: a 16 TiB slot costs flag bits until it is written", "[scoreboard]") {
  // Goal: DESIGN's 16 TiB case stays sensible: kilobytes for a clean or
  // all-dirty slot, one OS page per scattered write, 32 MiB of bits (plus
  // flags) at worst at 64 KiB regions.
  const uint64_t regions = 16 * kTiB / (64 * kKiB);
  SlotBitmap bm(regions);
  REQUIRE(bm.page_count() == 8257);
  // 8257 pages: 130 + 130 words; 8192 OS pages of array: 128 words.
  const uint64_t flags = (130 + 130 + (32 * kMiB / OsPage() + 63) / 64) * 8;
  CHECK(bm.MemoryUsageBytes() == flags + sizeof(SlotBitmap));
  const uint64_t stride = 40 * OsPage() * 8;  // regions per 40 OS pages
  for (uint64_t i = 0; i < 100; ++i) bm.SetRange(i * stride, i * stride);
  CHECK(bm.ReservedBytes() == 32 * kMiB);
  CHECK(bm.MemoryUsageBytes() == flags + sizeof(SlotBitmap) + 100 * OsPage());
  CHECK(bm.ResidentBytesForTesting() == 100 * OsPage());

  SlotBitmap dirty(regions);
  dirty.LoadAllSet();
  CHECK(dirty.CountSet() == regions);
  CHECK(dirty.MemoryUsageBytes() == flags + sizeof(SlotBitmap));
}

TEST_CASE("SlotBitmap: a 16 TiB slot at 4 KiB regions reserves 512 MiB but holds what it wrote",
          "[scoreboard]") {
  const uint64_t regions = 16 * kTiB / (4 * kKiB);  // 2^32
  SlotBitmap bm(regions);
  REQUIRE(bm.page_count() == 132105);
  // 132,105 pages: 2065 + 2065 words; 131,072 OS pages of array: 2048 words.
  const uint64_t flags = (2065 + 2065 + (512 * kMiB / OsPage() + 63) / 64) * 8;
  CHECK(bm.MemoryUsageBytes() == flags + sizeof(SlotBitmap));  // 48 KiB
  bm.SetRange(regions - 1, regions - 1);
  CHECK(bm.LastSet());
  CHECK(bm.NextSet(0) == regions - 1);
  CHECK(bm.ReservedBytes() == 512 * kMiB);
  CHECK(bm.ResidentBytesForTesting() == OsPage());
  CHECK(bm.MemoryUsageBytes() == flags + sizeof(SlotBitmap) + OsPage());
}

TEST_CASE("SlotBitmap: clearing one all-set slot leaves another all-set slot untouched",
          "[scoreboard]") {
  SlotBitmap a(100000);
  SlotBitmap b(100000);
  a.LoadAllSet();
  b.LoadAllSet();
  CHECK(a.CountSet() == 100000);
  CHECK(a.MemoryUsageBytes() == sizeof(SlotBitmap) + 3 * 8);  // 4 pages, 4 OS pages
  std::vector<uint64_t> old;
  CHECK(a.ClearRange(10, 19, &old) == 10);
  CHECK(a.CountSet() == 99990);
  CHECK(b.CountSet() == 100000);
  CHECK(a.NextSet(10) == 20u);
  a.RestoreRange(10, 19, old);
  CHECK(a.AllSet(0, 99999));
}

TEST_CASE("SlotBitmap: snapshots hide bits past the last region", "[scoreboard]") {
  SlotBitmap bm(70);
  bm.LoadAllSet();
  std::vector<uint64_t> words = Snapshot(bm, 0);
  CHECK(words[0] == ~uint64_t{0});
  CHECK(words[1] == (uint64_t{1} << 6) - 1);
  CHECK(words[2] == 0);
  CHECK(bm.NextSet(70) == std::nullopt);
  std::vector<uint64_t> old;
  bm.ClearRange(0, 0, &old);  // writes the page out: the tail stays clear
  CHECK(bm.CountSet() == 69);
  CHECK(Snapshot(bm, 0)[1] == (uint64_t{1} << 6) - 1);
}

TEST_CASE("SlotBitmap: random operations agree with a plain bit vector, snapshots included",
          "[scoreboard]") {
  // Goal: every read (Test, AllSet, NextSet, CountSet, SnapshotPage) agrees
  // with a bit vector after any mix of writes and loads, across page and
  // OS-page boundaries; and a flush of the unflushed pages always brings a
  // "disk" copy up to date (no change escapes its page's flag).
  for (uint64_t regions : std::vector<uint64_t>{1, 63, 64, 65, kBitsPerPage, kBitsPerPage + 1,
                                                70000, 200000}) {
    INFO("regions " << regions);
    std::mt19937_64 rng(regions);
    SlotBitmap bm(regions);
    Model model(regions);
    std::vector<std::vector<uint64_t>> disk(bm.page_count(),
                                            std::vector<uint64_t>(kWordsPerPage));
    auto random_range = [&](uint64_t* a, uint64_t* b) {
      uint64_t len = 1 + rng() % (rng() % 4 == 0 ? regions : std::min<uint64_t>(regions, 200));
      *a = rng() % (regions - len + 1);
      *b = *a + len - 1;
    };
    for (int step = 0; step < 400; ++step) {
      uint64_t a = 0;
      uint64_t b = 0;
      switch (rng() % 8) {
        case 0:
        case 1:
        case 2:
          random_range(&a, &b);
          bm.SetRange(a, b);
          model.Set(a, b, true);
          break;
        case 3:
        case 4: {
          random_range(&a, &b);
          std::vector<uint64_t> old;
          uint64_t expected = 0;
          for (uint64_t r = a; r <= b; ++r) expected += model.bits[r];
          CHECK(bm.ClearRange(a, b, &old) == expected);
          if (rng() % 3 == 0) {
            bm.RestoreRange(a, b, old);
          } else {
            model.Set(a, b, false);
          }
          break;
        }
        case 5: {
          // A load replaces page and "disk" alike (as at start-up).
          uint64_t page = rng() % bm.page_count();
          uint64_t first = page * kBitsPerPage;
          uint64_t last = std::min(regions, first + kBitsPerPage) - 1;
          if (rng() % 2 == 0) {
            bm.LoadPageAllSet(page);
            model.Set(first, last, true);
          } else {
            std::vector<uint64_t> words(kWordsPerPage);
            int kind = static_cast<int>(rng() % 3);
            for (auto& w : words) w = kind == 0 ? 0 : kind == 1 ? ~uint64_t{0} : rng() & rng();
            bm.LoadPage(page, words);
            for (uint64_t r = first; r <= last; ++r) {
              uint64_t i = r - first;
              model.bits[r] = (words[i / 64] >> (i % 64)) & 1;
            }
          }
          disk[page] = model.Page(page);
          break;
        }
        case 6:
          for (uint64_t p = 0; p < bm.page_count(); ++p) {
            if (bm.TakeUnflushed(p)) disk[p] = Snapshot(bm, p);
          }
          break;
        default: {
          uint64_t from = rng() % regions;
          std::optional<uint64_t> want;
          for (uint64_t r = from; r < regions && !want; ++r) {
            if (model.bits[r]) want = r;
          }
          CHECK(bm.NextSet(from) == want);
          random_range(&a, &b);
          bool all = true;
          for (uint64_t r = a; r <= b; ++r) all = all && model.bits[r];
          CHECK(bm.AllSet(a, b) == all);
          break;
        }
      }
    }
    uint64_t count = 0;
    size_t wrong = 0;
    for (uint64_t r = 0; r < regions; ++r) {
      count += model.bits[r];
      wrong += bm.Test(r) != model.bits[r];
    }
    CHECK(wrong == 0);
    CHECK(bm.CountSet() == count);
    CHECK(bm.LastSet() == model.bits[regions - 1]);
    for (uint64_t p = 0; p < bm.page_count(); ++p) {
      INFO("page " << p);
      CHECK(Snapshot(bm, p) == model.Page(p));
      if (bm.TakeUnflushed(p)) disk[p] = Snapshot(bm, p);
      CHECK(disk[p] == model.Page(p));
    }
    // What is counted as memory is what the kernel holds, plus the flags.
    const uint64_t os_pages = ((regions + 63) / 64 * 8 + OsPage() - 1) / OsPage();
    CHECK(bm.MemoryUsageBytes() - bm.ResidentBytesForTesting() ==
          sizeof(SlotBitmap) + 8 * (2 * ((bm.page_count() + 63) / 64) + (os_pages + 63) / 64));
  }
}

TEST_CASE("SlotBitmap: concurrent SetRange, ClearRange and reads lose no bit and miss no flush",
          "[scoreboard]") {
  // Goal: the Scoreboard's use under load. Writer threads set bits in even
  // words while, in odd words of the same pages and OS pages, one thread
  // clears, restores and sets (its own model says what they must hold), a
  // flusher snapshots unflushed pages into a "disk" copy (the two share a
  // mutex, as under the Scoreboard's pages_mu), and a reader checks that
  // every bit a writer has finished setting reads as set. Half the pages
  // start all set, so clears write pages out while writers run.
  constexpr uint64_t kRegions = 6 * kBitsPerPage + 1000;
  constexpr int kWriters = 3;
  constexpr int kPerWriter = 3000;
  SlotBitmap bm(kRegions);
  for (uint64_t p = 0; p < bm.page_count(); p += 2) bm.LoadPageAllSet(p);
  Model odd(kRegions);  // the clearer's bits (odd words only)
  for (uint64_t r = 0; r < kRegions; ++r) {
    odd.bits[r] = (r / 64) % 2 == 1 && bm.Test(r);
  }
  std::vector<std::vector<uint64_t>> disk(bm.page_count());
  for (uint64_t p = 0; p < bm.page_count(); ++p) disk[p] = Snapshot(bm, p);

  // Writer t's i-th region, in an even word.
  auto writer_region = [](int t, int i) {
    uint64_t x = (static_cast<uint64_t>(t) * 7919 + static_cast<uint64_t>(i) * 104729) %
                 (kRegions / 128);
    return x * 128 + static_cast<uint64_t>(i % 64);
  };
  std::array<std::atomic<int>, kWriters> done{};
  std::atomic<bool> stop{false};
  std::atomic<int> lost{0};
  std::mutex pages_mu;

  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerWriter; ++i) {
        uint64_t r = writer_region(t, i);
        bm.SetRange(r, std::min(r + static_cast<uint64_t>(i % 3), r / 64 * 64 + 63));
        done[static_cast<size_t>(t)].store(i + 1);
      }
    });
  }
  std::thread reader([&] {
    std::mt19937_64 rng(7);
    while (!stop.load()) {
      int t = static_cast<int>(rng() % kWriters);
      int n = done[static_cast<size_t>(t)].load();
      if (n == 0) continue;
      uint64_t r = writer_region(t, static_cast<int>(rng() % static_cast<uint64_t>(n)));
      if (!bm.Test(r) || !bm.AllSet(r, r) || bm.NextSet(r) != r) lost.fetch_add(1);
      (void)bm.CountSet();
    }
  });
  std::thread clearer([&] {
    std::mt19937_64 rng(8);
    std::vector<uint64_t> old;
    for (int i = 0; i < 20000; ++i) {
      uint64_t w = (rng() % (kRegions / 128)) * 2 + 1;  // an odd word
      uint64_t a = w * 64 + rng() % 64;
      uint64_t b = std::min(a + rng() % 64, std::min(w * 64 + 63, kRegions - 1));
      if (a > b) continue;
      std::lock_guard<std::mutex> lock(pages_mu);
      if (rng() % 3 == 0) {
        bm.SetRange(a, b);
        odd.Set(a, b, true);
        continue;
      }
      old.clear();
      bm.ClearRange(a, b, &old);
      if (rng() % 4 == 0) {
        bm.RestoreRange(a, b, old);
      } else {
        odd.Set(a, b, false);
      }
    }
  });
  std::thread flusher([&] {
    while (!stop.load()) {
      {
        std::lock_guard<std::mutex> lock(pages_mu);
        for (uint64_t p = 0; p < bm.page_count(); ++p) {
          if (bm.TakeUnflushed(p)) disk[p] = Snapshot(bm, p);
        }
      }
      std::this_thread::yield();
    }
  });
  for (auto& t : threads) t.join();
  clearer.join();
  stop.store(true);
  reader.join();
  flusher.join();

  CHECK(lost.load() == 0);
  size_t missing = 0;
  size_t wrong_odd = 0;
  for (int t = 0; t < kWriters; ++t) {
    for (int i = 0; i < kPerWriter; ++i) missing += !bm.Test(writer_region(t, i));
  }
  for (uint64_t r = 0; r < kRegions; ++r) {
    if ((r / 64) % 2 == 1) wrong_odd += bm.Test(r) != odd.bits[r];
  }
  CHECK(missing == 0);
  CHECK(wrong_odd == 0);
  size_t stale = 0;
  for (uint64_t p = 0; p < bm.page_count(); ++p) {
    if (bm.TakeUnflushed(p)) disk[p] = Snapshot(bm, p);
    stale += disk[p] != Snapshot(bm, p);
  }
  CHECK(stale == 0);
}

}  // namespace
}  // namespace blockrelay::storage
