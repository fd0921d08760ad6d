// SlotBitmap: see slot_bitmap.h.

#include "storage/slot_bitmap.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <new>

namespace blockrelay::storage {

using format::kBitsPerPage;
using format::kWordsPerPage;

namespace {

uint64_t OsPageBytes() {
  static const uint64_t bytes = [] {
    long n = sysconf(_SC_PAGESIZE);
    // A power of two of at least one word on every Linux; 4 KiB if unknown.
    return n >= 8 && std::has_single_bit(static_cast<uint64_t>(n)) ? static_cast<uint64_t>(n)
                                                                   : uint64_t{4096};
  }();
  return bytes;
}

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

}  // namespace

SlotBitmap::SlotBitmap(uint64_t region_count)
    : region_count_(region_count),
      page_count_(DivRoundUp(region_count, kBitsPerPage)),
      word_count_(DivRoundUp(region_count, 64)),
      chunk_shift_(static_cast<uint64_t>(std::countr_zero(OsPageBytes() / 8))),
      chunk_count_(DivRoundUp(word_count_, uint64_t{1} << chunk_shift_)),
      page_flag_words_(DivRoundUp(page_count_, 64)),
      flags_(new std::atomic<uint64_t>[FlagWords()]()) {}

SlotBitmap::~SlotBitmap() {
  uint64_t* words = words_.load();
  if (words != nullptr) munmap(words, ReservedBytes());
}

uint64_t SlotBitmap::FlagWords() const {
  return 2 * page_flag_words_ + DivRoundUp(chunk_count_, 64);
}

bool SlotBitmap::TestFlag(const std::atomic<uint64_t>* flags, uint64_t i) {
  return (flags[i / 64].load() >> (i % 64)) & 1;
}

void SlotBitmap::SetFlag(std::atomic<uint64_t>* flags, uint64_t i) {
  uint64_t bit = uint64_t{1} << (i % 64);
  // Skipping the store when the bit is set is safe for the unflushed flag:
  // the load is then ordered before any TakeUnflushed that would clear it,
  // so that take's snapshot comes after our word change.
  if ((flags[i / 64].load() & bit) == 0) flags[i / 64].fetch_or(bit);
}

bool SlotBitmap::TakeUnflushed(uint64_t page) {
  uint64_t bit = uint64_t{1} << (page % 64);
  return (unflushed()[page / 64].fetch_and(~bit) & bit) != 0;
}

uint64_t* SlotBitmap::Array() {
  uint64_t* words = words_.load();
  if (words != nullptr) return words;
  const uint64_t bytes = chunk_count_ << chunk_shift_ << 3;
  // Address space only: the kernel gives a page memory when it is first
  // written. MAP_NORESERVE keeps the untouched rest out of the commit
  // charge under the default overcommit policy.
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::bad_alloc();
  // One write must cost one OS page, not a 2 MiB huge page. A kernel
  // without THP refuses the advice, which is then moot.
  (void)madvise(m, bytes, MADV_NOHUGEPAGE);
  uint64_t* fresh = static_cast<uint64_t*>(m);
  if (!words_.compare_exchange_strong(words, fresh)) {
    munmap(m, bytes);  // another writer mapped it first; `words` is theirs
    return words;
  }
  return fresh;
}

std::atomic_ref<uint64_t> SlotBitmap::Word(uint64_t w) const {
  // Only called for a word of a touched chunk: the chunk's touched bit was
  // set after the array was published, so the array is there.
  return std::atomic_ref<uint64_t>(words_.load(std::memory_order_acquire)[w]);
}

void SlotBitmap::Touch(uint64_t w) {
  uint64_t c = ChunkOf(w);
  if (TestFlag(touched(), c)) return;
  Array();
  SetFlag(touched(), c);
}

uint64_t SlotBitmap::ValidMask(uint64_t w) const {
  uint64_t tail = region_count_ % 64;
  return w + 1 < word_count_ || tail == 0 ? ~uint64_t{0} : (uint64_t{1} << tail) - 1;
}

uint64_t SlotBitmap::ValidBitsInPage(uint64_t page) const {
  return std::min<uint64_t>(kBitsPerPage, region_count_ - page * kBitsPerPage);
}

uint64_t SlotBitmap::LoadWord(uint64_t w) const {
  if (TestFlag(all_set(), w / kWordsPerPage)) return ValidMask(w);
  // A clear touched bit is read before any write into the chunk (the
  // writer sets it first), so zero is what the word held at this load.
  if (!TestFlag(touched(), ChunkOf(w))) return 0;
  return Word(w).load();
}

template <typename Fn>
void SlotBitmap::ForEachWord(uint64_t first, uint64_t last, Fn&& fn) const {
  uint64_t r = first;
  while (r <= last) {
    uint64_t bit = r % 64;
    uint64_t n = std::min<uint64_t>(64 - bit, last - r + 1);
    uint64_t mask = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1) << bit;
    if (!fn(r / 64, mask)) return;
    r += n;
  }
}

bool SlotBitmap::Test(uint64_t region) const {
  return (LoadWord(region / 64) >> (region % 64)) & 1;
}

bool SlotBitmap::AllSet(uint64_t first, uint64_t last) const {
  bool all = true;
  ForEachWord(first, last, [&](uint64_t w, uint64_t mask) {
    all = (LoadWord(w) & mask) == mask;
    return all;
  });
  return all;
}

std::optional<uint64_t> SlotBitmap::NextSet(uint64_t from) const {
  if (from >= region_count_) return std::nullopt;
  uint64_t w = from / 64;
  uint64_t first_mask = ~uint64_t{0} << (from % 64);  // for the word of `from` only
  while (w < word_count_) {
    const uint64_t page = w / kWordsPerPage;
    // `from` lies in this page or before it, and the page starts before the
    // last region, so the result is a region.
    if (TestFlag(all_set(), page)) return std::max(from, page * kBitsPerPage);
    const uint64_t c = ChunkOf(w);
    const uint64_t end =
        std::min({(c + 1) << chunk_shift_, (page + 1) * kWordsPerPage, word_count_});
    if (TestFlag(touched(), c)) {
      for (; w < end; ++w) {
        uint64_t bits = Word(w).load() & first_mask;
        first_mask = ~uint64_t{0};
        if (bits != 0) return w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
      }
    }
    w = end;
    first_mask = ~uint64_t{0};
  }
  return std::nullopt;
}

uint64_t SlotBitmap::CountSet() const {
  uint64_t count = 0;
  for (uint64_t page = 0; page < page_count_; ++page) {
    if (TestFlag(all_set(), page)) {
      count += ValidBitsInPage(page);
      continue;
    }
    const uint64_t page_end = std::min((page + 1) * kWordsPerPage, word_count_);
    for (uint64_t w = page * kWordsPerPage; w < page_end;) {
      const uint64_t c = ChunkOf(w);
      const uint64_t end = std::min((c + 1) << chunk_shift_, page_end);
      if (TestFlag(touched(), c)) {
        // The array never holds bits past the last region.
        for (uint64_t i = w; i < end; ++i) {
          count += static_cast<uint64_t>(std::popcount(Word(i).load()));
        }
      }
      w = end;
    }
  }
  return count;
}

void SlotBitmap::SetRange(uint64_t first, uint64_t last) {
  uint64_t r = first;
  while (r <= last) {
    const uint64_t page = r / kBitsPerPage;
    const uint64_t base = page * kBitsPerPage;
    const uint64_t page_last = base + ValidBitsInPage(page) - 1;
    const uint64_t hi = std::min(last, page_last);
    if (TestFlag(all_set(), page)) {
      r = hi + 1;
      continue;
    }
    if (r == base && hi == page_last) {
      // A whole page (a large trim, a full resync) becomes all set without
      // touching the array: its words are ignored from the flag on, until
      // a clear rewrites them. A reader sees either the old bits or all
      // set; both are true at some point of this call.
      bool changes = !AllSet(base, page_last);
      SetFlag(all_set(), page);
      if (changes) SetFlag(unflushed(), page);
      r = hi + 1;
      continue;
    }
    ForEachWord(r, hi, [&](uint64_t w, uint64_t mask) {
      if (TestFlag(touched(), ChunkOf(w))) {
        if ((Word(w).load() & mask) == mask) return true;
      } else {
        Touch(w);  // before the bits: see LoadWord
      }
      Word(w).fetch_or(mask);
      // After the bits: a flush that takes the flag before this point
      // snapshots them, one after it finds the flag set again.
      SetFlag(unflushed(), page);
      return true;
    });
    r = hi + 1;
  }
}

void SlotBitmap::Materialize(uint64_t page) {
  const uint64_t end = std::min((page + 1) * kWordsPerPage, word_count_);
  for (uint64_t w = page * kWordsPerPage; w < end; ++w) {
    Touch(w);
    Word(w).store(ValidMask(w));
  }
  // Readers that saw the bit set never read these words; readers that see
  // it clear find them all set. Writers skip an all-set page, so none
  // changes these words before this point.
  all_set()[page / 64].fetch_and(~(uint64_t{1} << (page % 64)));
}

uint64_t SlotBitmap::ClearRange(uint64_t first, uint64_t last, std::vector<uint64_t>* old) {
  uint64_t cleared = 0;
  ForEachWord(first, last, [&](uint64_t w, uint64_t mask) {
    const uint64_t page = w / kWordsPerPage;
    if (TestFlag(all_set(), page)) Materialize(page);
    if (!TestFlag(touched(), ChunkOf(w))) {
      old->push_back(0);
      return true;
    }
    uint64_t prev = Word(w).fetch_and(~mask) & mask;
    old->push_back(prev);
    if (prev != 0) {
      cleared += static_cast<uint64_t>(std::popcount(prev));
      SetFlag(unflushed(), page);
    }
    return true;
  });
  return cleared;
}

void SlotBitmap::RestoreRange(uint64_t first, uint64_t last, const std::vector<uint64_t>& old) {
  size_t i = 0;
  ForEachWord(first, last, [&](uint64_t w, uint64_t /*mask*/) {
    uint64_t bits = old[i++];
    if (bits == 0) return true;
    const uint64_t page = w / kWordsPerPage;
    if (TestFlag(all_set(), page)) return true;
    Touch(w);  // set already: the bits were cleared from this chunk
    Word(w).fetch_or(bits);
    SetFlag(unflushed(), page);
    return true;
  });
}

void SlotBitmap::SnapshotPage(uint64_t page, std::span<uint64_t> words) const {
  for (uint64_t i = 0; i < kWordsPerPage; ++i) {
    uint64_t w = page * kWordsPerPage + i;
    words[i] = w < word_count_ ? LoadWord(w) & ValidMask(w) : 0;
  }
}

void SlotBitmap::LoadPage(uint64_t page, std::span<const uint64_t> words) {
  const uint64_t base = page * kWordsPerPage;
  const uint64_t n = std::min<uint64_t>(kWordsPerPage, word_count_ - base);
  bool all = true;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t want = ValidMask(base + i);
    if ((words[i] & want) != want) all = false;
  }
  if (all) {
    // The array's words of the page are ignored until Materialize
    // rewrites them.
    SetFlag(all_set(), page);
    return;
  }
  all_set()[page / 64].fetch_and(~(uint64_t{1} << (page % 64)));
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t w = base + i;
    uint64_t bits = words[i] & ValidMask(w);
    if (bits != 0) Touch(w);
    // An untouched chunk is all zero already.
    if (TestFlag(touched(), ChunkOf(w))) Word(w).store(bits);
  }
}

void SlotBitmap::LoadPageAllSet(uint64_t page) { SetFlag(all_set(), page); }

void SlotBitmap::LoadAllSet() {
  for (uint64_t i = 0; i < page_flag_words_; ++i) {
    uint64_t pages = std::min<uint64_t>(64, page_count_ - i * 64);
    all_set()[i].store(pages == 64 ? ~uint64_t{0} : (uint64_t{1} << pages) - 1);
  }
}

uint64_t SlotBitmap::ReservedBytes() const {
  return words_.load() == nullptr ? 0 : chunk_count_ << chunk_shift_ << 3;
}

uint64_t SlotBitmap::MemoryUsageBytes() const {
  uint64_t touched_chunks = 0;
  const uint64_t touched_words = DivRoundUp(chunk_count_, 64);
  for (uint64_t i = 0; i < touched_words; ++i) {
    touched_chunks += static_cast<uint64_t>(std::popcount(touched()[i].load()));
  }
  return sizeof(SlotBitmap) + FlagWords() * sizeof(uint64_t) + touched_chunks * OsPageBytes();
}

uint64_t SlotBitmap::ResidentBytesForTesting() const {
  uint64_t* words = words_.load();
  if (words == nullptr) return 0;
  const uint64_t bytes = ReservedBytes();
  const uint64_t pages = bytes / OsPageBytes();
  std::unique_ptr<unsigned char[]> vec(new unsigned char[pages]);
  if (mincore(words, bytes, vec.get()) != 0) return ~uint64_t{0};
  uint64_t resident = 0;
  for (uint64_t i = 0; i < pages; ++i) resident += vec[i] & 1;
  return resident * OsPageBytes();
}

}  // namespace blockrelay::storage
