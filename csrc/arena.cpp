#include "arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iterator>
#include <stdexcept>
#include <string>
#include <system_error>

#include "common.h"

namespace offload {

namespace {

// Budgets beyond this would overflow the 2 MiB rounding and the over-reservation below.
constexpr uint64_t kMaxBudget = uint64_t(1) << 56;

bool is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

uint64_t checked_budget(uint64_t budget) {
  if (budget == 0 || budget > kMaxBudget)
    throw std::invalid_argument("arena budget must be in [1, 2^56] bytes, got " + std::to_string(budget));
  return budget;
}

}  // namespace

Mapping::Mapping(uint64_t bytes, bool huge_pages) : size_(bytes) {
  // mmap only promises 4 KiB alignment; THP needs 2 MiB-aligned virtual ranges, so reserve one huge page
  // more and trim the unaligned head and the tail. No MAP_NORESERVE: a budget the kernel will not commit
  // should fail here, not OOM-kill the run when the pages are first touched. No MAP_POPULATE: pages are
  // committed when touched, so RSS follows use.
  const uint64_t span = bytes + kArenaMapAlign;
  void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw std::system_error(errno, std::generic_category(),
                            "arena: mmap of " + std::to_string(span) + " bytes");
  const uintptr_t raw = reinterpret_cast<uintptr_t>(p);
  const uintptr_t base = align_up(raw, kArenaMapAlign);
  // munmap of a page-aligned subrange of our own mapping cannot fail.
  if (base > raw) munmap(p, base - raw);
  const uint64_t tail = span - (base - raw) - bytes;
  if (tail) munmap(reinterpret_cast<void*>(base + bytes), tail);
  data_ = reinterpret_cast<uint8_t*>(base);
  huge_pages_ = huge_pages && madvise(data_, bytes, MADV_HUGEPAGE) == 0;
}

Mapping::~Mapping() { munmap(data_, size_); }

Arena::Arena(uint64_t budget, bool huge_pages)
    : map_(std::make_shared<Mapping>(align_up(checked_budget(budget), kArenaMapAlign), huge_pages)),
      budget_(budget),
      capacity_(map_->size()),
      huge_pages_(map_->huge_pages()) {
  free_.emplace(0, budget_);
}

const std::shared_ptr<Mapping>& Arena::live_map() const {
  if (!map_) throw std::invalid_argument("arena is closed");
  return map_;
}

uint64_t Arena::alloc(uint64_t nbytes, uint64_t align) {
  if (!is_pow2(align) || align < kArenaMinAlign || align > kArenaMapAlign)
    throw std::invalid_argument("arena alignment must be a power of two in [64, 2097152], got " +
                                std::to_string(align));
  std::lock_guard<std::mutex> lock(mu_);
  live_map();
  // A size that rounding would overflow is reported as asked: it exceeds any budget either way.
  const uint64_t size = nbytes > UINT64_MAX - align ? nbytes : std::max(align_up(nbytes, align), align);
  auto best = free_.end();
  uint64_t best_start = 0;
  if (size <= budget_ - in_use_) {
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      const uint64_t start = align_up(it->first, align);
      const uint64_t end = it->first + it->second;
      if (start > end || end - start < size) continue;
      // Best fit: the smallest extent that holds the request; ties go to the lowest offset (map order).
      if (best == free_.end() || it->second < best->second) { best = it; best_start = start; }
    }
  }
  if (best == free_.end()) throw ArenaExhausted(size, budget_, in_use_);
  const uint64_t ext_off = best->first, ext_end = best->first + best->second;
  free_.erase(best);
  // Split: the alignment padding in front and the remainder behind stay free.
  if (best_start > ext_off) free_.emplace(ext_off, best_start - ext_off);
  if (ext_end > best_start + size) free_.emplace(best_start + size, ext_end - best_start - size);
  live_.emplace(best_start, size);
  in_use_ += size;
  return best_start;
}

void Arena::free(uint64_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  live_map();
  auto it = live_.find(offset);
  if (it == live_.end())
    throw std::invalid_argument("arena: offset " + std::to_string(offset) + " is not a live allocation");
  uint64_t off = offset, size = it->second;
  live_.erase(it);
  in_use_ -= size;
  auto next = free_.lower_bound(off);
  if (next != free_.end() && off + size == next->first) {
    size += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {
      prev->second += size;
      return;
    }
  }
  free_.emplace_hint(next, off, size);
}

uint64_t Arena::size_of(uint64_t offset) const {
  std::lock_guard<std::mutex> lock(mu_);
  live_map();
  auto it = live_.find(offset);
  if (it == live_.end())
    throw std::invalid_argument("arena: offset " + std::to_string(offset) + " is not a live allocation");
  return it->second;
}

ArenaRegion Arena::region(uint64_t offset, uint64_t nbytes) const {
  std::lock_guard<std::mutex> lock(mu_);
  const auto& map = live_map();
  if (offset > budget_ || nbytes > budget_ - offset)
    throw std::invalid_argument("arena: region [" + std::to_string(offset) + ", +" + std::to_string(nbytes) +
                                ") exceeds the budget of " + std::to_string(budget_) + " bytes");
  return ArenaRegion(map, offset, nbytes);
}

void Arena::close() {
  std::shared_ptr<Mapping> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dropped.swap(map_);
    live_.clear();
    free_.clear();
    in_use_ = 0;
  }
  // The munmap (when no region outlives us) happens here, outside the lock.
}

uint64_t Arena::in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return in_use_;
}

uint64_t Arena::largest_free() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t best = 0;
  for (const auto& e : free_) best = std::max(best, e.second);
  return best;
}

bool Arena::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !map_;
}

uintptr_t Arena::address() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reinterpret_cast<uintptr_t>(live_map()->data());
}

SlotPool::SlotPool(std::shared_ptr<Arena> arena, uint64_t slot_bytes, uint32_t count)
    : arena_(std::move(arena)),
      slot_bytes_(slot_bytes),
      stride_(align_up(slot_bytes, kArenaDefaultAlign)),
      count_(count) {
  if (!arena_) throw std::invalid_argument("SlotPool needs an arena");
  if (slot_bytes == 0 || slot_bytes > kMaxBudget || count == 0)
    throw std::invalid_argument("SlotPool needs slot_bytes in [1, 2^56] and count >= 1, got slot_bytes=" +
                                std::to_string(slot_bytes) + " count=" + std::to_string(count));
  // One extent for all slots: either the whole pool fits or nothing is taken. stride_ * count_ can
  // overflow, so a product past 2^64 saturates to a size the arena refuses with ArenaExhausted.
  const uint64_t total = stride_ > UINT64_MAX / count_ ? UINT64_MAX : stride_ * count_;
  base_ = arena_->alloc(total, kArenaDefaultAlign);
  free_.reserve(count_);
  for (uint32_t i = count_; i-- > 0;) free_.push_back(i);  // slot 0 is handed out first
  held_.assign(count_, false);
}

SlotPool::~SlotPool() {
  // A destructor must not throw: if the arena was closed meanwhile, the extent is already gone with it.
  try {
    if (!arena_->closed()) arena_->free(base_);
  } catch (const std::invalid_argument&) {
  }
}

int64_t SlotPool::acquire(double timeout_s) {
  if (std::isnan(timeout_s)) throw std::invalid_argument("SlotPool.acquire: timeout is NaN");
  // Beyond a year is forever; it also keeps the conversion to the clock's integer ticks from overflowing.
  if (timeout_s > 3.2e7) timeout_s = -1;
  std::unique_lock<std::mutex> lock(mu_);
  auto ready = [this] { return !free_.empty(); };
  if (timeout_s < 0) {
    cv_.wait(lock, ready);
  } else if (!cv_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready)) {
    return -1;
  }
  const uint32_t i = free_.back();
  free_.pop_back();
  held_[i] = true;
  return i;
}

void SlotPool::release(int64_t index) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (index < 0 || index >= int64_t(count_) || !held_[index])
      throw std::invalid_argument("SlotPool: slot " + std::to_string(index) + " is not held");
    held_[index] = false;
    free_.push_back(uint32_t(index));
  }
  cv_.notify_one();
}

uint64_t SlotPool::offset(int64_t index) const {
  if (index < 0 || index >= int64_t(count_))
    throw std::invalid_argument("SlotPool: slot " + std::to_string(index) + " out of range [0, " +
                                std::to_string(count_) + ")");
  return base_ + uint64_t(index) * stride_;
}

uint32_t SlotPool::free_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return uint32_t(free_.size());
}

}  // namespace offload
