#include <thread>

#include "../common.h"
#include "../trace.h"
#include "check.h"

using namespace offload;

TEST(trace_ring_preserves_events_in_order) {
  TraceRing r(8);
  for (uint32_t i = 0; i < 5; ++i) EXPECT(r.record(TraceEvent{kTraceH2D, i, i * 10u, 1, 2}));
  std::vector<TraceEvent> out;
  EXPECT(r.drain(out) == 5);
  for (uint32_t i = 0; i < 5; ++i) EXPECT(out[i].unit == i && out[i].bytes == i * 10u);
  return check::PASS;
}

TEST(trace_ring_full_drops_and_counts) {
  TraceRing r(4);
  for (int i = 0; i < 6; ++i) r.record(TraceEvent{kTraceCompute, 0, 0, 0, 0});
  EXPECT(r.dropped() == 2);
  std::vector<TraceEvent> out;
  EXPECT(r.drain(out) == 4);
  EXPECT(r.record(TraceEvent{kTraceCompute, 7, 0, 0, 0}));  // space again after a drain
  out.clear();
  EXPECT(r.drain(out) == 1 && out[0].unit == 7);
  return check::PASS;
}

TEST(trace_ring_many_producers_lose_nothing) {
  TraceRing r(1 << 16);
  const int threads = 4, per = 10000;
  std::vector<std::thread> ts;
  std::vector<TraceEvent> out;
  std::atomic<bool> done{false};
  std::thread drainer([&] { while (!done.load()) r.drain(out); });
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] { for (int i = 0; i < per; ++i) r.record(TraceEvent{kTraceOther, uint32_t(t), uint64_t(i), 0, 0}); });
  for (auto& t : ts) t.join();
  done = true;
  drainer.join();
  r.drain(out);
  EXPECT(out.size() + r.dropped() == size_t(threads * per));
  EXPECT(r.dropped() == 0);
  std::vector<int64_t> next(threads, 0);  // per producer, events arrive in its own order
  for (auto& e : out) { EXPECT(int64_t(e.bytes) == next[e.unit]); next[e.unit]++; }
  return check::PASS;
}

TEST_MAIN()
