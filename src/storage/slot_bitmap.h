// SlotBitmap: the in-memory fine bitmap of one scoreboard slot.
//
// One bit per region, in one flat array of ceil(regions / 64) words laid out
// as the on-disk bitmap is: on-disk page p (format::kBitsPerPage bits,
// format::kWordsPerPage = 508 words) is words [508p, 508p + 508), so a page
// snapshot is a word copy. Memory follows use without ever moving bits:
//   - the array is a private anonymous mapping, reserved (address space, no
//     memory) at the first write into the slot. The kernel backs an OS page
//     of it ("chunk", 4 KiB = 32,768 regions) with memory when it is first
//     written. A "touched" bit per chunk records which ones were; readers
//     take an untouched chunk as all clear without reading it, so a clean
//     chunk is never faulted in and a slot that was never written maps
//     nothing at all. Transparent huge pages are refused for the mapping,
//     so one write costs one OS page, not 2 MiB;
//   - an "all set" bit per on-disk page says every region of the page is
//     set without the array holding it: a new all-dirty slot of a 16 TiB
//     volume, or one after a trim of the whole volume, costs flag bits, not
//     32 MiB. SetRange over a whole page sets the bit instead of words. The
//     first clear in such a page writes its words out (all ones) and drops
//     the bit ("materializes").
// Nothing is freed before destruction: a chunk whose bits are all clear
// again stays resident (unmapping it under lock-free writers would lose
// their bits).
//
// A fully fragmented 1 TiB volume at 64 KiB regions holds exactly 2 MiB of
// bits (16,777,216 regions, 512 chunks, every one touched) plus 208 bytes of
// flags (517 all-set and 517 unflushed bits, 512 touched bits, in 64-bit
// words) plus the object itself; see MemoryUsageBytes and
// docs/metadata-format.md.
//
// Each on-disk page also has an "unflushed" flag: set after a bit of the
// page changes, taken (cleared) by whoever snapshots the page to write it.
//
// Thread safety: Test/AllSet/NextSet/CountSet/SetRange are lock-free and may
// run concurrently with everything. ClearRange/RestoreRange/SnapshotPage
// may run concurrently with the lock-free calls; the Scoreboard serializes
// them against each other (its pages_mu_). LoadPage/LoadAll* are for
// single-threaded initialization only. Word and flag operations are
// seq_cst: the Scoreboard's MarkClean/MarkDirty handshake relies on it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "storage/metadata_format.h"

namespace blockrelay::storage {

class SlotBitmap {
 public:
  // REQUIRES region_count >= 1. Allocates the flag words (bad_alloc if that
  // fails); maps nothing yet.
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

  // Sets [first, last]; marks changed pages unflushed. The first write into
  // the slot maps the word array; throws std::bad_alloc if the mapping
  // cannot be made (as allocating a page did before).
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
  bool TakeUnflushed(uint64_t page);
  void MarkUnflushed(uint64_t page) { SetFlag(unflushed(), page); }
  bool IsUnflushed(uint64_t page) const { return TestFlag(unflushed(), page); }

  // Initialization (single-threaded): page contents as read from disk.
  void LoadPage(uint64_t page, std::span<const uint64_t> words);
  void LoadPageAllSet(uint64_t page);
  void LoadAllSet();

  // Bytes of memory the slot holds: this object (the Scoreboard allocates
  // it), the flag words, and every chunk of the word array that has been
  // written (the only ones the kernel has given memory; the rest of the
  // mapping is address space). Allocator headers and kernel page tables
  // are not counted.
  uint64_t MemoryUsageBytes() const;
  // Address space reserved for the word array: 0 until the first write,
  // then ceil(regions / 64) words rounded up to whole OS pages.
  uint64_t ReservedBytes() const;
  // Bytes of the word array the kernel holds in memory now, by mincore(2):
  // lets tests check MemoryUsageBytes against the kernel. 0 when unmapped.
  uint64_t ResidentBytesForTesting() const;

 private:
  std::atomic<uint64_t>* all_set() const { return flags_.get(); }
  std::atomic<uint64_t>* unflushed() const { return flags_.get() + page_flag_words_; }
  std::atomic<uint64_t>* touched() const { return flags_.get() + 2 * page_flag_words_; }
  uint64_t FlagWords() const;
  static bool TestFlag(const std::atomic<uint64_t>* flags, uint64_t i);
  // Sets flag i; a plain load first, so a flag that is already set costs no
  // read-modify-write on a word 63 other pages share.
  static void SetFlag(std::atomic<uint64_t>* flags, uint64_t i);

  // The word array, mapping it first if needed. Never null.
  uint64_t* Array();
  std::atomic_ref<uint64_t> Word(uint64_t w) const;
  // Word w as readers see it: all ones (masked) in an all-set page, zero in
  // an untouched chunk, else the array's word.
  uint64_t LoadWord(uint64_t w) const;
  // Marks the chunk of word w touched, mapping the array first.
  void Touch(uint64_t w);
  // Writes the words of all-set page `page` out and clears its all-set bit.
  // Called by ClearRange only (serialized by the caller).
  void Materialize(uint64_t page);
  // Calls fn(word, mask) for every word overlapping [first, last] until fn
  // returns false.
  template <typename Fn>
  void ForEachWord(uint64_t first, uint64_t last, Fn&& fn) const;
  uint64_t ValidBitsInPage(uint64_t page) const;
  // The bits of word w that are regions (all but the tail of the last word).
  uint64_t ValidMask(uint64_t w) const;
  uint64_t ChunkOf(uint64_t w) const { return w >> chunk_shift_; }

  const uint64_t region_count_;
  const uint64_t page_count_;
  const uint64_t word_count_;
  const uint64_t chunk_shift_;  // log2(words per chunk)
  const uint64_t chunk_count_;
  const uint64_t page_flag_words_;  // ceil(page_count_ / 64)
  // all-set bits (page_flag_words_), unflushed bits (page_flag_words_),
  // touched bits (ceil(chunk_count_ / 64)), in one allocation.
  std::unique_ptr<std::atomic<uint64_t>[]> flags_;
  std::atomic<uint64_t*> words_{nullptr};  // the mapping, or null
};

}  // namespace blockrelay::storage
