// SlotBitmap: the in-memory fine bitmap of one scoreboard slot.
//
// One bit per region, in pages that mirror the on-disk bitmap pages
// (format::kBitsPerPage bits each), so a page flush is a copy. Memory follows
// use (nbdkit common/bitmap/bitmap.h, made sparse):
//   - a page that is all clear is a null pointer (no memory);
//   - a page that is all set points at one shared read-only page (a new
//     slot of a 16 TiB volume that needs a full sync costs a pointer per
//     page, 66 KiB at 64 KiB regions, not 32 MiB);
//   - other pages are allocated, 4064 bytes each, on the first change.
// A fully fragmented 1 TiB volume at 64 KiB regions costs 2,101,088 bytes of
// pages plus 9 bytes of table per page (2.008 MiB in all).
//
// Each page also has an "unflushed" flag: set after a bit of the page
// changes, taken (cleared) by whoever snapshots the page to write it.
//
// Thread safety: Test/AllSet/NextSet/CountSet/SetRange are lock-free and may
// run concurrently with everything. ClearRange/RestoreRange/SnapshotPage
// may run concurrently with the lock-free calls; the Scoreboard serializes
// them against each other (its pages_mu_). LoadPage/LoadAll* are for
// single-threaded initialization only. Word operations are seq_cst: the
// Scoreboard's MarkClean/MarkDirty handshake relies on it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "storage/metadata_format.h"

namespace blockrelay::storage {

class SlotBitmap {
 public:
  explicit SlotBitmap(uint64_t region_count);
  ~SlotBitmap();
  SlotBitmap(const SlotBitmap&) = delete;
  SlotBitmap& operator=(const SlotBitmap&) = delete;

  uint64_t region_count() const { return region_count_; }
  uint64_t page_count() const { return page_count_; }

  bool Test(uint64_t region) const;
  // Whether every region in [first, last] is set. REQUIRES first <= last <
  // region_count().
  bool AllSet(uint64_t first, uint64_t last) const;
  // The first set region >= from, if any.
  std::optional<uint64_t> NextSet(uint64_t from) const;
  uint64_t CountSet() const;
  // Whether the last region (possibly short) is set: for dirty_bytes.
  bool LastSet() const { return Test(region_count_ - 1); }

  // Sets [first, last]; marks changed pages unflushed.
  void SetRange(uint64_t first, uint64_t last);
  // Clears [first, last]; appends to *old the previous value of every word
  // it touched (masked to the range), for RestoreRange. Returns the number
  // of bits that went from set to clear. Marks changed pages unflushed.
  uint64_t ClearRange(uint64_t first, uint64_t last, std::vector<uint64_t>* old);
  // Sets again the bits ClearRange(first, last, &old) cleared.
  void RestoreRange(uint64_t first, uint64_t last, const std::vector<uint64_t>& old);

  // Copies page `page` into `words` (kWordsPerPage), bits past the last
  // region clear.
  void SnapshotPage(uint64_t page, std::span<uint64_t> words) const;
  bool TakeUnflushed(uint64_t page) { return unflushed_[page].exchange(false); }
  void MarkUnflushed(uint64_t page) { unflushed_[page].store(true); }
  bool IsUnflushed(uint64_t page) const { return unflushed_[page].load(); }

  // Initialization (single-threaded): page contents as read from disk.
  void LoadPage(uint64_t page, std::span<const uint64_t> words);
  void LoadPageAllSet(uint64_t page);
  void LoadAllSet();

  // Heap bytes held: page table, flags and allocated pages.
  uint64_t MemoryUsageBytes() const;

 private:
  struct Page {
    std::atomic<uint64_t> words[format::kWordsPerPage];
  };
  static Page* SharedAllSetPage();

  // The page to modify: allocates a null page, copies the shared one.
  Page* WritablePage(uint64_t page);
  // Calls fn(page, word, mask) for every word overlapping [first, last].
  template <typename Fn>
  void ForEachWord(uint64_t first, uint64_t last, Fn&& fn) const;
  uint64_t ValidBitsInPage(uint64_t page) const;

  const uint64_t region_count_;
  const uint64_t page_count_;
  std::unique_ptr<std::atomic<Page*>[]> pages_;
  std::unique_ptr<std::atomic<bool>[]> unflushed_;
  std::mutex alloc_mu_;  // serializes replacing a null/shared page pointer
  std::atomic<uint64_t> allocated_pages_{0};
};

}  // namespace blockrelay::storage
