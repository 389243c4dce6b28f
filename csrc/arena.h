// Pinned host arena: one anonymous mapping under an exact byte budget, sub-allocated by offset, plus
// fixed-size slot pools carved from it. No Python here: the binding is bind_arena.cpp, and pinning
// (cudaHostRegister of the whole mapping, once) is done from Python by offload/arena.py.
//
// Note [arena lifetime]: the mapping is owned by a shared_ptr<Mapping>. The Arena holds one reference and
// every ArenaRegion (the buffer behind a Python tensor) holds another, so Arena::close() only drops the
// arena's reference: the pages are unmapped when the last region dies. A tensor can therefore never dangle,
// whatever order Python tears objects down in. After close() the arena hands out nothing new.
//
// Note [arena budget]: the budget is exact. Sizes are charged after rounding up to their alignment, so
// in_use() is the sum of rounded sizes and never exceeds budget(). The mapping itself is the budget
// rounded up to 2 MiB (capacity()), so that transparent huge pages can back all of it; the bytes past the
// budget are never handed out and, being untouched, never become resident (until a pinning registration
// of the whole capacity commits them).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace offload {

constexpr uint64_t kArenaMapAlign = 2ull << 20;  // huge-page size: the mapping's base and size are multiples
constexpr uint64_t kArenaMinAlign = 64;          // a cache line: smaller alignments would split lines
constexpr uint64_t kArenaDefaultAlign = 4096;    // O_DIRECT and DMA want page-aligned buffers

// An anonymous private read/write mapping, 2 MiB aligned, unmapped on destruction.
class Mapping {
 public:
  Mapping(uint64_t bytes, bool huge_pages);  // throws std::system_error when mmap fails
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  uint8_t* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return size_; }
  bool huge_pages() const noexcept { return huge_pages_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  bool huge_pages_ = false;  // madvise(MADV_HUGEPAGE) was accepted (advice, not a guarantee)
};

// A byte range of a mapping that keeps the mapping alive (Note [arena lifetime]).
class ArenaRegion {
 public:
  ArenaRegion(std::shared_ptr<Mapping> map, uint64_t offset, uint64_t nbytes)
      : map_(std::move(map)), offset_(offset), nbytes_(nbytes) {}
  uint8_t* data() const noexcept { return map_->data() + offset_; }
  uint64_t offset() const noexcept { return offset_; }
  uint64_t nbytes() const noexcept { return nbytes_; }

 private:
  std::shared_ptr<Mapping> map_;
  uint64_t offset_, nbytes_;
};

// Thread-safe best-fit sub-allocator over [0, budget) of one mapping.
// Errors: ArenaExhausted when no free extent fits (requested is the rounded size, the bytes the budget
// would be charged); std::invalid_argument for a bad alignment, an unknown offset, an out-of-range region,
// or any use after close().
class Arena {
 public:
  explicit Arena(uint64_t budget, bool huge_pages = true);

  // Returns the offset of nbytes (rounded up to align; 0 bytes count as align bytes so that every live
  // allocation has a distinct offset). align is a power of two in [64, 2 MiB]; since the mapping base is
  // 2 MiB aligned, an aligned offset is an aligned address.
  uint64_t alloc(uint64_t nbytes, uint64_t align = kArenaDefaultAlign);
  void free(uint64_t offset);  // coalesces with free neighbours
  uint64_t size_of(uint64_t offset) const;  // the rounded size charged for a live allocation
  ArenaRegion region(uint64_t offset, uint64_t nbytes) const;  // any range within the budget
  void close();  // idempotent; see Note [arena lifetime]

  uint64_t budget() const noexcept { return budget_; }
  uint64_t capacity() const noexcept { return capacity_; }
  bool huge_pages() const noexcept { return huge_pages_; }
  uint64_t in_use() const;
  uint64_t largest_free() const;
  bool closed() const;
  // Base address, only for registering the whole mapping with CUDA or io_uring. Throws after close().
  uintptr_t address() const;

 private:
  const std::shared_ptr<Mapping>& live_map() const;  // caller holds mu_; throws when closed

  mutable std::mutex mu_;
  std::shared_ptr<Mapping> map_;
  const uint64_t budget_, capacity_;
  const bool huge_pages_;
  uint64_t in_use_ = 0;
  // Free extents by offset, so a freed extent finds its neighbours in O(log n). Best-fit scans them all:
  // the arena holds a few extents per streaming unit, not per tensor, so the list stays short.
  std::map<uint64_t, uint64_t> free_;
  std::unordered_map<uint64_t, uint64_t> live_;  // offset -> rounded size
};

// count equal slots carved from an arena as one allocation, for bounded buffer rings (prefetch, I/O).
// acquire() blocks while every slot is held: back-pressure, never an error.
class SlotPool {
 public:
  SlotPool(std::shared_ptr<Arena> arena, uint64_t slot_bytes, uint32_t count);  // ArenaExhausted if no fit
  ~SlotPool();  // returns the slots' extent to the arena unless it is closed
  SlotPool(const SlotPool&) = delete;
  SlotPool& operator=(const SlotPool&) = delete;

  // A free slot's index; timeout_s < 0 waits forever, otherwise -1 when none freed up in time.
  int64_t acquire(double timeout_s = -1);
  void release(int64_t index);  // std::invalid_argument unless the slot is held
  uint64_t offset(int64_t index) const;  // std::invalid_argument when out of range
  uint64_t slot_bytes() const noexcept { return slot_bytes_; }
  uint64_t stride() const noexcept { return stride_; }  // slot_bytes rounded up to 4 KiB
  uint32_t count() const noexcept { return count_; }
  uint32_t free_count() const;
  const std::shared_ptr<Arena>& arena() const noexcept { return arena_; }

 private:
  std::shared_ptr<Arena> arena_;
  const uint64_t slot_bytes_, stride_;
  const uint32_t count_;
  uint64_t base_ = 0;  // offset of slot 0
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint32_t> free_;  // a stack: the most recently released slot is reused first (warm in cache)
  std::vector<bool> held_;
};

}  // namespace offload
