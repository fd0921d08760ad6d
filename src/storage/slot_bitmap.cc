// SlotBitmap: see slot_bitmap.h.

#include "storage/slot_bitmap.h"

#include <algorithm>
#include <bit>

namespace blockrelay::storage {

using format::kBitsPerPage;
using format::kWordsPerPage;

SlotBitmap::Page* SlotBitmap::SharedAllSetPage() {
  // Never written: writers check for it and copy it first. Bits past a
  // volume's last region are set here; every reader masks them.
  static Page* page = [] {
    Page* p = new Page;
    for (auto& w : p->words) w.store(~uint64_t{0});
    return p;
  }();
  return page;
}

SlotBitmap::SlotBitmap(uint64_t region_count)
    : region_count_(region_count),
      page_count_((region_count + kBitsPerPage - 1) / kBitsPerPage),
      pages_(new std::atomic<Page*>[page_count_]),
      unflushed_(new std::atomic<bool>[page_count_]) {
  for (uint64_t i = 0; i < page_count_; ++i) {
    pages_[i].store(nullptr);
    unflushed_[i].store(false);
  }
}

SlotBitmap::~SlotBitmap() {
  for (uint64_t i = 0; i < page_count_; ++i) {
    Page* p = pages_[i].load();
    if (p != nullptr && p != SharedAllSetPage()) delete p;
  }
}

uint64_t SlotBitmap::ValidBitsInPage(uint64_t page) const {
  return std::min<uint64_t>(kBitsPerPage, region_count_ - page * kBitsPerPage);
}

template <typename Fn>
void SlotBitmap::ForEachWord(uint64_t first, uint64_t last, Fn&& fn) const {
  uint64_t r = first;
  while (r <= last) {
    uint64_t page = r / kBitsPerPage;
    uint64_t in_page = r % kBitsPerPage;
    uint64_t bit = in_page % 64;
    uint64_t n = std::min<uint64_t>(64 - bit, last - r + 1);
    uint64_t mask = n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1) << bit;
    if (!fn(page, static_cast<size_t>(in_page / 64), mask)) return;
    r += n;
  }
}

bool SlotBitmap::Test(uint64_t region) const {
  const Page* p = pages_[region / kBitsPerPage].load();
  if (p == nullptr) return false;
  uint64_t in_page = region % kBitsPerPage;
  return (p->words[in_page / 64].load() >> (in_page % 64)) & 1;
}

bool SlotBitmap::AllSet(uint64_t first, uint64_t last) const {
  bool all = true;
  ForEachWord(first, last, [&](uint64_t page, size_t word, uint64_t mask) {
    const Page* p = pages_[page].load();
    if (p == SharedAllSetPage()) return true;
    if (p == nullptr || (p->words[word].load() & mask) != mask) {
      all = false;
      return false;
    }
    return true;
  });
  return all;
}

std::optional<uint64_t> SlotBitmap::NextSet(uint64_t from) const {
  if (from >= region_count_) return std::nullopt;
  for (uint64_t page = from / kBitsPerPage; page < page_count_; ++page) {
    const Page* p = pages_[page].load();
    if (p == nullptr) continue;
    uint64_t base = page * kBitsPerPage;
    uint64_t start = from > base ? from - base : 0;
    if (p == SharedAllSetPage()) return base + start;
    for (uint64_t w = start / 64; w < kWordsPerPage; ++w) {
      uint64_t bits = p->words[w].load();
      if (w == start / 64) bits &= ~uint64_t{0} << (start % 64);
      if (bits != 0) {
        uint64_t r = base + w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
        return r < region_count_ ? std::optional<uint64_t>(r) : std::nullopt;
      }
    }
  }
  return std::nullopt;
}

uint64_t SlotBitmap::CountSet() const {
  uint64_t count = 0;
  for (uint64_t page = 0; page < page_count_; ++page) {
    const Page* p = pages_[page].load();
    if (p == nullptr) continue;
    if (p == SharedAllSetPage()) {
      count += ValidBitsInPage(page);
      continue;
    }
    // Private pages never hold bits past the last region.
    for (const auto& w : p->words) count += static_cast<uint64_t>(std::popcount(w.load()));
  }
  return count;
}

SlotBitmap::Page* SlotBitmap::WritablePage(uint64_t page) {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  Page* p = pages_[page].load();
  if (p != nullptr && p != SharedAllSetPage()) return p;
  Page* fresh = new Page;
  if (p == nullptr) {
    for (auto& w : fresh->words) w.store(0);
  } else {
    uint64_t valid = ValidBitsInPage(page);
    for (uint64_t w = 0; w < kWordsPerPage; ++w) {
      uint64_t bits = 0;
      if (w * 64 + 64 <= valid) {
        bits = ~uint64_t{0};
      } else if (w * 64 < valid) {
        bits = (uint64_t{1} << (valid - w * 64)) - 1;
      }
      fresh->words[w].store(bits);
    }
  }
  // Readers that loaded the old pointer still see correct bits: a null page
  // has no set bits to miss, and the shared page is never freed.
  pages_[page].store(fresh);
  allocated_pages_.fetch_add(1);
  return fresh;
}

void SlotBitmap::SetRange(uint64_t first, uint64_t last) {
  ForEachWord(first, last, [&](uint64_t page, size_t word, uint64_t mask) {
    Page* p = pages_[page].load();
    if (p == SharedAllSetPage()) return true;
    if (p != nullptr && (p->words[word].load() & mask) == mask) return true;
    if (p == nullptr) p = WritablePage(page);
    p->words[word].fetch_or(mask);
    unflushed_[page].store(true);
    return true;
  });
}

uint64_t SlotBitmap::ClearRange(uint64_t first, uint64_t last, std::vector<uint64_t>* old) {
  uint64_t cleared = 0;
  ForEachWord(first, last, [&](uint64_t page, size_t word, uint64_t mask) {
    Page* p = pages_[page].load();
    if (p == nullptr) {
      old->push_back(0);
      return true;
    }
    if (p == SharedAllSetPage()) p = WritablePage(page);
    uint64_t prev = p->words[word].fetch_and(~mask) & mask;
    old->push_back(prev);
    if (prev != 0) {
      cleared += static_cast<uint64_t>(std::popcount(prev));
      unflushed_[page].store(true);
    }
    return true;
  });
  return cleared;
}

void SlotBitmap::RestoreRange(uint64_t first, uint64_t last, const std::vector<uint64_t>& old) {
  size_t i = 0;
  ForEachWord(first, last, [&](uint64_t page, size_t word, uint64_t mask) {
    uint64_t bits = old[i++];
    if (bits == 0) return true;
    Page* p = WritablePage(page);
    p->words[word].fetch_or(bits);
    unflushed_[page].store(true);
    return true;
  });
}

void SlotBitmap::SnapshotPage(uint64_t page, std::span<uint64_t> words) const {
  const Page* p = pages_[page].load();
  uint64_t valid = ValidBitsInPage(page);
  for (uint64_t w = 0; w < kWordsPerPage; ++w) {
    uint64_t bits = p == nullptr ? 0 : p->words[w].load();
    if (w * 64 >= valid) {
      bits = 0;
    } else if (w * 64 + 64 > valid) {
      bits &= (uint64_t{1} << (valid - w * 64)) - 1;
    }
    words[w] = bits;
  }
}

void SlotBitmap::LoadPage(uint64_t page, std::span<const uint64_t> words) {
  uint64_t valid = ValidBitsInPage(page);
  bool any = false;
  bool all = true;
  for (uint64_t w = 0; w < kWordsPerPage && w * 64 < valid; ++w) {
    uint64_t want = w * 64 + 64 <= valid ? ~uint64_t{0} : (uint64_t{1} << (valid - w * 64)) - 1;
    if (words[w] != 0) any = true;
    if ((words[w] & want) != want) all = false;
  }
  Page* old = pages_[page].load();
  if (old != nullptr && old != SharedAllSetPage()) {
    delete old;
    allocated_pages_.fetch_sub(1);
  }
  pages_[page].store(nullptr);
  if (all) {
    pages_[page].store(SharedAllSetPage());
  } else if (any) {
    Page* p = WritablePage(page);
    for (uint64_t w = 0; w < kWordsPerPage; ++w) p->words[w].store(words[w]);
  }
}

void SlotBitmap::LoadPageAllSet(uint64_t page) {
  Page* old = pages_[page].load();
  if (old != nullptr && old != SharedAllSetPage()) {
    delete old;
    allocated_pages_.fetch_sub(1);
  }
  pages_[page].store(SharedAllSetPage());
}

void SlotBitmap::LoadAllSet() {
  for (uint64_t page = 0; page < page_count_; ++page) LoadPageAllSet(page);
}

uint64_t SlotBitmap::MemoryUsageBytes() const {
  return page_count_ * (sizeof(std::atomic<Page*>) + sizeof(std::atomic<bool>)) +
         allocated_pages_.load() * sizeof(Page);
}

}  // namespace blockrelay::storage
