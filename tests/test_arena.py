"""Host arena: the native allocator against a Python model, tensor lifetime, slot back-pressure, pinning."""
import gc
import os
import threading
import time
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from offload import _native
from offload.arena import HostArena, PinningWarning
from offload.errors import ArenaExhaustedError

KiB, MiB = 1 << 10, 1 << 20
ALIGNS = [64, 128, 4096, 8192, 65536]


def align_up(x, a):
    return (x + a - 1) // a * a


def rounded(nbytes, align):
    return max(align_up(nbytes, align), align)


def gaps(live, budget):
    """Free extents implied by the live allocations: what a fully coalescing allocator must have."""
    out, pos = [], 0
    for off in sorted(live):
        if off > pos:
            out.append((pos, off - pos))
        pos = off + live[off]
    if pos < budget:
        out.append((pos, budget - pos))
    return out


def fits(gap, size, align):
    start = align_up(gap[0], align)
    return start + size <= gap[0] + gap[1]


ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 96 * KiB), st.sampled_from(ALIGNS)),
    st.tuples(st.just("free"), st.integers(0, 1000), st.just(0))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(budget=st.integers(64 * KiB, 512 * KiB), ops=ops)
def test_alloc_free_matches_model(budget, ops):
    a = _native.Arena(budget, huge_pages=False)
    base = a.address
    live = {}  # offset -> rounded size
    for op, x, align in ops:
        if op == "free":
            if not live:
                continue
            off = sorted(live)[x % len(live)]
            a.free(off)
            del live[off]
        else:
            size, before = rounded(x, align), gaps(live, budget)
            fitting = [g for g in before if fits(g, size, align)]
            try:
                off = a.alloc(x, align)
            except ArenaExhaustedError as e:
                assert not fitting, "refused although a free extent fits: fragmentation or a leak"
                assert (e.requested, e.budget, e.in_use) == (size, budget, sum(live.values()))
                continue
            assert fitting
            assert off % align == 0 and (base + off) % align == 0
            assert a.size_of(off) == size
            # Best fit: the extent it came from is the smallest that fits, the lowest such on a tie.
            home = next(g for g in before if g[0] <= off < g[0] + g[1])
            assert home == min(fitting, key=lambda g: (g[1], g[0]))
            live[off] = size
        assert a.in_use == sum(live.values()) <= budget
        spans = sorted(live.items())
        assert all(o + s <= n for (o, s), (n, _) in zip(spans, spans[1:])), "live allocations overlap"
        assert all(o + s <= budget for o, s in spans)
        assert a.largest_free == max((g[1] for g in gaps(live, budget)), default=0)
    for off in list(live):
        a.free(off)
    assert a.in_use == 0 and a.largest_free == budget
    assert a.alloc(budget // 64 * 64, 64) == 0  # the whole budget in one piece: nothing leaked
    a.close()


def test_native_errors():
    a = _native.Arena(1 * MiB)
    with pytest.raises(ValueError):
        a.free(4096)
    with pytest.raises(ValueError):
        a.alloc(10, 100)  # not a power of two
    with pytest.raises(ValueError):
        a.alloc(10, 32)  # below a cache line
    with pytest.raises(ValueError):
        a.region(MiB - 10, 11)
    with pytest.raises(ValueError):
        _native.Arena(0)
    assert isinstance(a.huge_pages, bool) and a.capacity == 2 * MiB
    a.close()
    with pytest.raises(ValueError):
        a.alloc(64)
    with pytest.raises(ValueError):
        a.address


def test_exhaustion_error_fields():
    with HostArena(1 * MiB, pin=False) as h:
        h.tensor(1000, torch.float32)  # 4000 bytes, charged as 4096
        with pytest.raises(ArenaExhaustedError) as ei:
            h.tensor((512, 512), torch.float32)
        e = ei.value
        assert isinstance(e, MemoryError)
        assert (e.requested, e.budget, e.in_use) == (1 * MiB, 1 * MiB, 4096)
        assert h.bytes_in_use == 4096


def test_tensor_outlives_arena():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # frombuffer warns on non-writable buffers: ours must be writable
        h = HostArena(4 * MiB, pin=False)
        t = h.tensor((3, 5), torch.float64)
        assert t.shape == (3, 5) and t.dtype == torch.float64 and t.is_contiguous()
        assert (t.data_ptr() - h.native.address) % 4096 == 0
        t.copy_(torch.arange(15, dtype=torch.float64).view(3, 5))
    del h
    gc.collect()
    # Fresh mappings would likely reuse the address range if the old one had been unmapped.
    others = [_native.Arena(4 * MiB) for _ in range(4)]
    assert torch.equal(t, torch.arange(15, dtype=torch.float64).view(3, 5))
    t.add_(1)
    assert t[2, 4].item() == 15
    del others


def test_write_through_tensor_reads_back_through_region():
    with HostArena(1 * MiB, pin=False) as h:
        t = h.tensor(1024, torch.bfloat16)
        t.copy_(torch.linspace(-3, 3, 1024, dtype=torch.bfloat16))
        offset = t.data_ptr() - h.native.address
        raw = torch.frombuffer(h.native.region(offset, t.nbytes), dtype=torch.uint8)
        assert torch.equal(raw, t.view(torch.uint8))
        raw[:2] = torch.tensor([0x80, 0x3F], dtype=torch.uint8)  # bf16 1.0, little endian
        assert t[0].item() == 1.0
        mv = memoryview(h.native.region(offset, 16))
        assert mv.format == "B" and not mv.readonly and mv.nbytes == 16


def test_free_reuses_bytes_and_rejects_strangers():
    with HostArena(64 * KiB, pin=False) as h:
        ts = [h.tensor(4096, torch.uint8) for _ in range(16)]
        with pytest.raises(ArenaExhaustedError):
            h.tensor(1, torch.uint8)
        h.free(ts[3][10:])  # any view of the allocation frees it
        with pytest.raises(ValueError):
            h.free(ts[3])
        with pytest.raises(ValueError):
            h.free(torch.zeros(4))
        again = h.tensor((64, 64), torch.uint8)
        assert again.data_ptr() == ts[3].data_ptr()
        h.free(again)
        empty = h.tensor((0, 7), torch.float32)  # still charged 4 KiB, so that its offset is its own
        assert empty.shape == (0, 7) and h.bytes_in_use == 64 * KiB
        h.free(empty)
        for t in ts[:3] + ts[4:]:
            h.free(t)
        assert h.bytes_in_use == 0
        assert h.tensor(64 * KiB, torch.uint8).numel() == 64 * KiB


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rss_grows_with_use_not_budget():
    before = _rss()
    with HostArena(256 * MiB, pin=False) as h:
        assert _rss() - before < 32 * MiB  # reserved, not committed
        t = h.tensor(64 * MiB, torch.uint8)
        t.fill_(1)
        assert _rss() - before >= 60 * MiB


def test_slot_pool_back_pressure():
    with HostArena(1 * MiB, pin=False) as h:
        pool = h.slots(5000, 2)
        assert (pool.slot_bytes, pool.count, pool.free_count) == (5000, 2, 2)
        assert h.bytes_in_use == 2 * 8192
        i0, v0 = pool.acquire()
        i1, v1 = pool.acquire()
        assert v0.dtype == torch.uint8 and v0.numel() == 5000 and {i0, i1} == {0, 1}
        v0.fill_(7)
        assert pool.acquire(timeout_s=0.05) is None
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
        waiter.start()
        time.sleep(0.1)
        assert not got and waiter.is_alive()  # blocked, and without holding the GIL (we are running)
        pool.release(i0)
        waiter.join(5)
        assert got and got[0][0] == i0 and got[0][1][0].item() == 7
        with pytest.raises(ValueError):
            pool.release(5)
        pool.release(i0)
        pool.release(i1)
        with pytest.raises(ValueError):
            pool.release(i1)
        assert pool.free_count == 2
        del pool, got, v0, v1
        gc.collect()
        assert h.bytes_in_use == 0  # the pool's slots went back to the arena


def test_slot_pool_too_big():
    with HostArena(1 * MiB, pin=False) as h:
        with pytest.raises(ArenaExhaustedError) as ei:
            h.slots(512 * KiB, 3)
        assert ei.value.requested == 3 * 512 * KiB and h.bytes_in_use == 0


class FakeCuda:
    def __init__(self, register_error=0):
        self.calls, self.register_error = [], register_error

    def register(self, address, nbytes):
        self.calls.append(("register", address, nbytes))
        return self.register_error

    def unregister(self, address):
        self.calls.append(("unregister", address))
        return 0


def test_pinning_registers_the_budget_once():
    """One registration of the budget rounded to whole pages (not the 2 MiB-rounded mapping: pinning
    commits what it covers, and cpu_memory must hold exactly)."""
    fake = FakeCuda()
    h = HostArena(3 * MiB + 100, pin=True, register=(fake.register, fake.unregister))
    address = h.native.address
    pinned = 3 * MiB + 4096
    assert h.pinned and fake.calls == [("register", address, pinned)] and h.capacity == 4 * MiB
    for _ in range(5):
        h.free(h.tensor(1000, torch.float32))
    h.slots(4096, 4)
    assert len(fake.calls) == 1  # allocations never re-register
    h.close()
    assert fake.calls == [("register", address, pinned), ("unregister", address)] and not h.pinned
    h.close()
    assert len(fake.calls) == 2


def test_pinning_unregisters_when_collected():
    fake = FakeCuda()
    h = HostArena(1 * MiB, pin=True, register=(fake.register, fake.unregister))
    t = h.tensor(10, torch.float32)
    del h
    gc.collect()
    assert [c[0] for c in fake.calls] == ["register", "unregister"]
    t.fill_(1)  # still mapped, just no longer pinned


def test_pinning_failure_warns_and_continues_unpinned():
    fake = FakeCuda(register_error=2)  # cudaErrorMemoryAllocation, as under a low RLIMIT_MEMLOCK
    with pytest.warns(PinningWarning, match="unpinned"):
        h = HostArena(1 * MiB, pin=True, register=(fake.register, fake.unregister))
    assert not h.pinned
    h.tensor(100, torch.float32).fill_(1)
    h.close()
    assert [c[0] for c in fake.calls] == ["register"]  # nothing to unregister


def test_register_exception_propagates_and_closes():
    def boom(address, nbytes):
        raise RuntimeError("no driver")
    with pytest.raises(RuntimeError, match="no driver"):
        HostArena(1 * MiB, pin=True, register=(boom, lambda a: 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_pin_default_is_off_without_cuda():
    fake = FakeCuda()
    with HostArena(1 * MiB, register=(fake.register, fake.unregister)) as h:
        assert not h.pinned and fake.calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pinning_real():
    with HostArena(8 * MiB) as h:
        assert h.pinned
        t = h.tensor(1024, torch.float32)
        assert t.is_pinned()
        t.copy_(torch.arange(1024, dtype=torch.float32))
        g = t.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(g.cpu(), t)
