// Lock-free multi-producer event ring the profiler drains (kind, unit, bytes, t_start, t_end).
// Note [trace ring]: producers are the store's completion threads, the AdamW workers and Python (through
// the binding); the consumer is one Python drainer. A bounded MPMC queue in the style of D. Vyukov: each
// slot carries a sequence number, so a producer claims a slot with one fetch_add-free CAS on the tail and
// publishes with a release store; the drainer never blocks producers. When the ring is full the event is
// dropped and counted: tracing must never stall the hot path.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace offload {

enum TraceKind : uint32_t {
  kTraceCompute = 0,
  kTraceH2D = 1,
  kTraceD2H = 2,
  kTraceDiskRead = 3,
  kTraceDiskWrite = 4,
  kTraceOptim = 5,
  kTraceWait = 6,
  kTraceActSwapOut = 7,
  kTraceActSwapIn = 8,
  kTraceOther = 15,
};

struct TraceEvent {
  uint32_t kind;
  uint32_t unit;   // caller's tag: a unit index for the engine, an object id for the store
  uint64_t bytes;
  int64_t t_start;  // now_ns() clock
  int64_t t_end;
};

class TraceRing {
 public:
  explicit TraceRing(size_t capacity);  // rounded up to a power of two, at least 2
  bool record(const TraceEvent& ev) noexcept;  // false (and counted) when full
  size_t drain(std::vector<TraceEvent>& out, size_t max_events = SIZE_MAX);
  uint64_t dropped() const noexcept { return dropped_.load(std::memory_order_relaxed); }
  size_t capacity() const noexcept { return mask_ + 1; }

 private:
  struct Slot {
    std::atomic<uint64_t> seq;
    TraceEvent ev;
  };
  size_t mask_;
  std::unique_ptr<Slot[]> slots_;
  alignas(64) std::atomic<uint64_t> head_{0};  // next to read (single consumer)
  alignas(64) std::atomic<uint64_t> tail_{0};  // next to write
  alignas(64) std::atomic<uint64_t> dropped_{0};
};

}  // namespace offload
