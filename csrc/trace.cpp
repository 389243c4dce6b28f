#include "trace.h"

namespace offload {

TraceRing::TraceRing(size_t capacity) {
  size_t cap = 2;
  while (cap < capacity) cap <<= 1;
  mask_ = cap - 1;
  slots_.reset(new Slot[cap]);
  for (size_t i = 0; i < cap; ++i) slots_[i].seq.store(i, std::memory_order_relaxed);
}

bool TraceRing::record(const TraceEvent& ev) noexcept {
  uint64_t pos = tail_.load(std::memory_order_relaxed);
  for (;;) {
    Slot& s = slots_[pos & mask_];
    uint64_t seq = s.seq.load(std::memory_order_acquire);
    int64_t diff = int64_t(seq) - int64_t(pos);
    if (diff == 0) {
      // Slot free for this lap: claim it; on a lost race pos is reloaded by the CAS and we retry.
      if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
        s.ev = ev;
        s.seq.store(pos + 1, std::memory_order_release);  // publish to the drainer
        return true;
      }
    } else if (diff < 0) {
      dropped_.fetch_add(1, std::memory_order_relaxed);  // full: the drainer is a lap behind
      return false;
    } else {
      pos = tail_.load(std::memory_order_relaxed);
    }
  }
}

size_t TraceRing::drain(std::vector<TraceEvent>& out, size_t max_events) {
  size_t n = 0;
  uint64_t pos = head_.load(std::memory_order_relaxed);
  while (n < max_events) {
    Slot& s = slots_[pos & mask_];
    uint64_t seq = s.seq.load(std::memory_order_acquire);
    if (int64_t(seq) - int64_t(pos + 1) < 0) break;  // not yet published
    out.push_back(s.ev);
    s.seq.store(pos + mask_ + 1, std::memory_order_release);  // free for the next lap
    ++pos;
    ++n;
  }
  head_.store(pos, std::memory_order_relaxed);
  return n;
}

}  // namespace offload
