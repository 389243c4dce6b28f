#include <atomic>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "../arena.h"
#include "../common.h"
#include "check.h"

using namespace offload;

static constexpr uint64_t MiB = 1ull << 20;

TEST(arena_exhaustion_reports_size) {
  Arena a(4 * MiB);
  a.alloc(3 * MiB);
  try {
    a.alloc(2 * MiB);
    return check::FAIL;
  } catch (const ArenaExhausted& e) {
    EXPECT(e.requested == 2 * MiB && e.budget == 4 * MiB && e.in_use == 3 * MiB);
  }
  // A request larger than the whole budget reports its own size, not an overflowed rounding of it.
  try {
    a.alloc(UINT64_MAX);
    return check::FAIL;
  } catch (const ArenaExhausted& e) {
    EXPECT(e.requested == UINT64_MAX && e.in_use == 3 * MiB);
  }
  EXPECT(a.in_use() == 3 * MiB);  // a failed request takes nothing
  return check::PASS;
}

TEST(arena_exhaustion_under_fragmentation) {
  Arena a(4 * 4096);
  uint64_t o[4];
  for (auto& x : o) x = a.alloc(4096);
  a.free(o[0]);
  a.free(o[2]);
  EXPECT(a.in_use() == 2 * 4096 && a.largest_free() == 4096);
  try {
    a.alloc(2 * 4096);  // 8 KiB free in total, but not contiguous
    return check::FAIL;
  } catch (const ArenaExhausted& e) {
    EXPECT(e.requested == 2 * 4096 && e.in_use == 2 * 4096);
  }
  return check::PASS;
}

TEST(arena_alignment_honoured) {
  Arena a(8 * MiB);
  EXPECT(a.address() % kArenaMapAlign == 0);
  a.alloc(64, 64);  // leaves the next free byte at 64, so larger alignments need padding
  for (uint64_t align : std::initializer_list<uint64_t>{64, 128, 4096, 65536, 2 * MiB}) {
    uint64_t off = a.alloc(100, align);
    EXPECT(off % align == 0);
    EXPECT((a.address() + off) % align == 0);
    EXPECT(a.size_of(off) == align_up(100, align));  // charged as rounded
  }
  for (uint64_t bad : std::initializer_list<uint64_t>{0, 32, 100, 4 * MiB}) {
    try {
      a.alloc(64, bad);
      return check::FAIL;
    } catch (const std::invalid_argument&) {
    }
  }
  return check::PASS;
}

TEST(arena_free_coalesces_and_reuse_without_growth) {
  Arena a(1 * MiB);
  for (int round = 0; round < 50; ++round) {
    uint64_t offs[16];
    for (int i = 0; i < 16; ++i) offs[i] = a.alloc(4096 * (1 + (i * 7 + round) % 3));
    // Free in an order that leaves holes between live neighbours until the end.
    for (int i = 0; i < 16; i += 2) a.free(offs[i]);
    for (int i = 1; i < 16; i += 2) a.free(offs[i]);
    EXPECT(a.in_use() == 0);
    EXPECT(a.largest_free() == 1 * MiB);
  }
  uint64_t all = a.alloc(1 * MiB);  // the whole budget in one piece: nothing leaked or fragmented
  EXPECT(all == 0 && a.in_use() == 1 * MiB);
  a.free(all);
  return check::PASS;
}

TEST(arena_best_fit_picks_smallest_hole) {
  Arena a(64 * 4096);
  uint64_t o[6];
  const uint64_t sizes[6] = {4, 1, 2, 1, 1, 1};  // pages
  for (int i = 0; i < 6; ++i) o[i] = a.alloc(sizes[i] * 4096);
  a.free(o[0]);  // a 4-page hole
  a.free(o[2]);  // a 2-page hole, between live neighbours
  EXPECT(a.alloc(2 * 4096) == o[2]);
  return check::PASS;
}

TEST(arena_budget_includes_rounding) {
  Arena a(3 * MiB + 100);
  EXPECT(a.budget() == 3 * MiB + 100);
  EXPECT(a.capacity() == 4 * MiB);  // the mapping rounds up; the budget does not
  uint64_t o = a.alloc(1);
  EXPECT(a.size_of(o) == 4096 && a.in_use() == 4096);  // charged as rounded
  a.free(o);
  // The budget is not a multiple of 4 KiB: a request rounded past it is refused even though the mapping
  // would have room.
  try {
    a.alloc(3 * MiB + 1);
    return check::FAIL;
  } catch (const ArenaExhausted& e) {
    EXPECT(e.requested == 3 * MiB + 4096 && e.budget == 3 * MiB + 100);
  }
  EXPECT(a.alloc(3 * MiB) == 0);
  EXPECT(a.alloc(64, 64) == 3 * MiB);  // the 100-byte tail still takes a 64-byte allocation
  return check::PASS;
}

TEST(arena_free_unknown_rejected) {
  Arena a(1 * MiB);
  uint64_t o = a.alloc(8192);
  for (uint64_t bad : {o + 4096, uint64_t(999999), uint64_t(1) << 40}) {
    try {
      a.free(bad);
      return check::FAIL;
    } catch (const std::invalid_argument&) {
    }
  }
  a.free(o);
  try {
    a.free(o);  // double free
    return check::FAIL;
  } catch (const std::invalid_argument&) {
  }
  return check::PASS;
}

TEST(arena_region_outlives_close) {
  ArenaRegion* r = nullptr;
  {
    Arena a(1 * MiB);
    uint64_t o = a.alloc(4096);
    r = new ArenaRegion(a.region(o, 4096));
    std::memset(r->data(), 0xab, 4096);
    a.close();
    a.close();  // idempotent
    EXPECT(a.closed());
    try {
      a.alloc(64);
      return check::FAIL;
    } catch (const std::invalid_argument&) {
    }
  }
  // The arena object is gone; the region still owns the mapping (ASan would flag a use after unmap as SEGV).
  EXPECT(r->data()[4095] == 0xab);
  delete r;
  return check::PASS;
}

TEST(arena_region_bounds_checked) {
  Arena a(1 * MiB);
  EXPECT(a.region(0, 1 * MiB).nbytes() == 1 * MiB);
  for (auto [off, n] : {std::pair<uint64_t, uint64_t>{1 * MiB, 1}, {0, 1 * MiB + 1}, {1, UINT64_MAX}}) {
    try {
      a.region(off, n);
      return check::FAIL;
    } catch (const std::invalid_argument&) {
    }
  }
  return check::PASS;
}

TEST(arena_concurrent_alloc_free) {
  auto a = std::make_shared<Arena>(4 * MiB);
  std::vector<std::thread> ts;
  std::atomic<bool> bad{false};
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        uint64_t o = a->alloc(4096 * (1 + (i + t) % 4));
        std::memset(a->region(o, 4096).data(), t, 4096);  // a shared page would be caught by the check
        if (a->region(o, 4096).data()[4095] != uint8_t(t)) bad = true;
        a->free(o);
      }
    });
  for (auto& t : ts) t.join();
  EXPECT(!bad && a->in_use() == 0 && a->largest_free() == 4 * MiB);
  return check::PASS;
}

TEST(slotpool_acquire_blocks_until_release) {
  auto a = std::make_shared<Arena>(1 * MiB);
  SlotPool p(a, 5000, 2);
  EXPECT(p.stride() == 8192 && a->in_use() == 2 * 8192);
  EXPECT(p.offset(1) == p.offset(0) + 8192);
  int64_t s0 = p.acquire(), s1 = p.acquire();
  EXPECT(s0 != s1 && p.free_count() == 0);
  EXPECT(p.acquire(0.0) == -1);
  EXPECT(p.acquire(0.02) == -1);
  std::atomic<int64_t> got{-2};
  std::thread waiter([&] { got = p.acquire(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT(got.load() == -2);  // still blocked: back-pressure, not an error
  p.release(s1);
  waiter.join();
  EXPECT(got.load() == s1 && p.free_count() == 0);
  p.release(s0);
  p.release(s1);
  EXPECT(p.free_count() == 2);
  return check::PASS;
}

TEST(slotpool_release_unknown_rejected) {
  auto a = std::make_shared<Arena>(1 * MiB);
  SlotPool p(a, 4096, 3);
  int64_t s = p.acquire();
  for (int64_t bad : {int64_t(-1), int64_t(3), (s + 1) % 3}) {  // out of range, and in range but not held
    try {
      p.release(bad);
      return check::FAIL;
    } catch (const std::invalid_argument&) {
    }
  }
  p.release(s);
  try {
    p.release(s);  // twice
    return check::FAIL;
  } catch (const std::invalid_argument&) {
  }
  return check::PASS;
}

TEST(slotpool_too_large_reports_exhaustion_and_returns_extent) {
  auto a = std::make_shared<Arena>(1 * MiB);
  try {
    SlotPool p(a, 1 * MiB, 2);
    return check::FAIL;
  } catch (const ArenaExhausted& e) {
    EXPECT(e.requested == 2 * MiB && e.budget == 1 * MiB && e.in_use == 0);
  }
  {
    SlotPool p(a, 1 * MiB, 1);
    EXPECT(a->in_use() == 1 * MiB);
  }
  EXPECT(a->in_use() == 0);  // the pool's destructor gave its extent back
  {
    SlotPool p(a, 4096, 2);
    a->close();  // destroying the pool after the arena closed must not throw
  }
  return check::PASS;
}

TEST_MAIN()
