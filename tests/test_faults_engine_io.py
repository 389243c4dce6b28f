"""Reliability cases of the live engine (device="cpu") at the edge between it and the disk and host memory:
bad nvme paths, odd-sized tensors through O_DIRECT, the CPU budget with its page rounding, the staging pool
exhausted by prefetch, io_uring_enter interrupted, and the privacy of swap files. Each test is named for the
case it proves (README "Guarantees").
"""
import copy
import errno
import os
import stat

import pytest
import torch

import offload
from offload import _native
from conftest import HP, assert_runs_match, assert_state_close, make_engine, run_reference, tier_kwargs, train_engine
from models import make_mlp, mlp_batches


def _engine(model, **kw):
    return offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32, **kw)


# ------------------------------------------------------------------------------- 9: nvme path unusable

def _bad_paths(tmp_path):
    """(label, path) that engine() must refuse. Root writes through mode bits, so the unwritable cases are ones
    that fail for root too: /proc (a pseudo-filesystem where nothing can be created) and, for other users, a
    0500 directory."""
    (tmp_path / "plain-file").write_text("x")
    cases = [("missing", tmp_path / "no" / "such" / "dir"),
             ("parent-is-a-file", tmp_path / "plain-file" / "nvme"),
             ("a-file", tmp_path / "plain-file")]
    if os.path.isdir("/proc/self"):
        cases.append(("proc", "/proc"))
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o500)
        cases.append(("mode-0500", ro))
    return cases


@pytest.mark.parametrize("as_list", [False, True])
def test_nvme_path_missing_or_unwritable_named_at_engine(tmp_path, as_list):
    """engine() raises ConfigError (a ValueError) naming the bad nvme path, before anything is created in the
    good path beside it and before the model's parameters are touched."""
    model = make_mlp()
    init = copy.deepcopy(model.state_dict())
    kw = tier_kwargs(model, "nvme", tmp_path)
    good = kw["nvme"]
    for label, bad in _bad_paths(tmp_path):
        kw["nvme"] = [good, str(bad)] if as_list else str(bad)
        with pytest.raises(offload.ConfigError) as ei:
            _engine(model, **kw)
        msg = str(ei.value)
        assert f"nvme path {bad} " in msg, (label, msg)
        assert ("not writable" in msg) == (label in ("proc", "mode-0500")), (label, msg)
        assert os.listdir(good) == [], label
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k]), k


# ------------------------------------------------------------------- 11: odd-sized tensors via O_DIRECT

def test_unaligned_tensor_bytes_round_trip_through_engine(tmp_path):
    """Parameters whose byte sizes are not multiples of the disk's I/O alignment (231x33 fp32 and the like)
    stream through an NVMe tier opened with O_DIRECT: each unit's flat buffer is padded to whole 4 KiB
    blocks, so the I/O is aligned, and arbitrary bit patterns written to every tier come back bit for bit;
    training equals torch.optim.AdamW, and a checkpoint loads back bitwise."""
    model = make_mlp(d_in=33, width=231, depth=4, d_out=5)
    batches = mlp_batches(3, d_in=33, d_out=5)
    sizes = [p.numel() * 4 for p in model.parameters()]
    ref = run_reference(model, batches)
    eng = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path)
    with eng:
        store = eng.tiers.store
        if not store.direct[0]:
            pytest.skip(f"{tmp_path} does not take O_DIRECT: the alignment case cannot arise")
        align = store.alignment[0]
        assert any(n % align for n in sizes), (sizes, align)   # the case really arises
        on_disk = [u for u in eng.units if u.plan.params_home == "nvme" or u.plan.states_home == "nvme"]
        assert on_disk and all(u.numel * 4 % 4096 == 0 for u in on_disk)
        got = train_engine(eng, batches)
        eng.save(tmp_path / "ckpt")
        g = torch.Generator().manual_seed(3)
        for u in on_disk:   # random bits (NaN payloads, denormals included) survive the disk exactly
            vals = [torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32).view(torch.float32)
                    for n in (u.numel, u.numel_train, u.numel_train, u.numel_train)]
            eng.tiers.write_unit(u, *vals)
            back = eng.tiers.read_unit(u)
            assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(vals, back)), u.name
    assert_runs_match(got, ref, model)
    with make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path / "again") as fresh:
        fresh.load(tmp_path / "ckpt")
        assert_state_close(fresh.state_dict(), got.state, model, rtol=0, atol=0)


# ------------------------------------------------------------- 12: CPU budget with pinned-page rounding

def test_cpu_budget_too_small_counts_pinned_rounding(tmp_path):
    """Host buffers are padded and rounded up to whole 4 KiB pages (O_DIRECT blocks; pinned registration is
    per page). A cpu_memory that holds the tensors' raw bytes but not the rounded buffers is refused at plan
    time, with the numbers; the rounded total is accepted and is exactly the arena's budget."""
    from offload.sizes import fmt_bytes
    model = make_mlp(d_in=33, width=231, depth=4, d_out=5)
    kw = tier_kwargs(model, "cpu", tmp_path)
    everything = kw["cpu_memory"]
    with _engine(model, **kw) as eng:
        assert eng.plan.bytes["nvme"] == 0 and eng.tiers.arena.budget == everything
        raw = 0   # what the arena holds, counted without padding or page rounding
        for u in eng.units:
            n = sum(s.numel for s in u.slots)
            n_train = sum(s.numel for s in u.slots if s.trainable)
            # params homed on the CPU, states and the gradient buffer (the AdamW output shares it)
            raw += 4 * n * (u.plan.params_home == "cpu") + (12 + 4) * n_train * (u.plan.states_home == "cpu")
    assert 0 < raw < everything
    for short in (raw, everything - 1):
        with pytest.raises(offload.BudgetError) as ei:
            _engine(model, gpu_memory=kw["gpu_memory"], cpu_memory=short)
        msg = str(ei.value)
        assert msg.startswith(f"cpu_memory={fmt_bytes(short)} is ") and f"needs {fmt_bytes(everything)}" in msg, msg

# ---------------------------------------------------------- 15: staging pool exhausted during prefetch

def test_buffer_pool_exhausted_during_prefetch_back_pressure(tmp_path):
    """A live NVMe engine whose disk prefetch distance asks for far more staging slots than the pool holds:
    prefetches beyond the pool are skipped (the unit is read when needed) instead of failing or
    deadlocking; training equals torch.optim.AdamW; every slot is back in the pool after each step; and the
    exhaustion really happened."""
    model, batches = make_mlp(depth=8), mlp_batches(4)
    ref = run_reference(model, batches)
    eng = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path)
    with eng:
        ring = eng.tiers.param_slots
        streamed = [u for u in eng.units if u.plan.params_home == "nvme"]
        assert ring.count and len(streamed) > ring.count + 2
        eng.plan.prefetch_depth, eng.plan.disk_prefetch_depth = 1, len(eng.units)
        refused, real_try = [], ring.try_acquire

        def counting_try(reserve):
            slot = real_try(reserve)
            if slot is None:
                refused.append(reserve)
            return slot

        ring.try_acquire = counting_try
        from conftest import Run
        got = Run([], [], {})
        for b in batches:
            train_engine(eng, [b], run=got)
            eng.sync()
            assert len(ring.free) + len(ring.busy) == ring.count
        got.state = eng.state_dict()
        assert refused
    assert_runs_match(got, ref, model)


# ----------------------------------------------------------------------- 22: private swap files, O_EXCL

def test_swap_files_private_excl_nofollow(tmp_path):
    """Under umask 000 the run directory is still 0700 and every swap file 0600. A symlink or file planted
    at the name of the next swap file makes creating it fail with EEXIST naming that path: the store never
    opens an existing file (O_EXCL) nor follows a link (O_NOFOLLOW), so the link's target is neither created
    nor written, and the planted file keeps its bytes."""
    old = os.umask(0)
    try:
        eng = make_engine(make_mlp(), mix="nvme", tmp_path=tmp_path)
    finally:
        os.umask(old)
    with eng:
        store = eng.tiers.store
        run = store.run_dirs[0]
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
        files = os.listdir(run)
        assert "lock" in files and any(f.startswith("obj-") for f in files)
        for f in files:
            st = os.lstat(os.path.join(run, f))
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, f
        next_id = max(int(f[4:]) for f in files if f.startswith("obj-")) + 1
        target = tmp_path / "victim"
        os.symlink(target, os.path.join(run, f"obj-{next_id}"))
        with pytest.raises(offload.StoreIOError) as ei:
            store.create(8192)
        assert ei.value.errno == errno.EEXIST and ei.value.filename == os.path.join(run, f"obj-{next_id}")
        assert not os.path.lexists(target)
        planted = os.path.join(run, f"obj-{next_id + 1}")
        with open(planted, "wb") as f:
            f.write(b"keep me")
        with pytest.raises(offload.StoreIOError) as ei:
            store.create(8192)
        assert ei.value.errno == errno.EEXIST and ei.value.filename == planted
        assert open(planted, "rb").read() == b"keep me"
        assert all(train_engine(eng, mlp_batches(2)).stepped)   # the engine's own files are unaffected


# -------------------------------------------------------------- 16: io_uring_enter EINTR / EAGAIN / EBUSY

@pytest.mark.skipif("io_uring" not in _native.store_backends(), reason="built without liburing")
def test_io_uring_enter_eintr_eagain_retried_no_completion_lost(tmp_path):
    """io_uring_enter itself (not a completion) fails with EINTR, EAGAIN or EBUSY on submission and while
    the completion thread waits, during every step of a live NVMe engine on the io_uring backend: each call
    is retried, no request is lost or doubled (training equals torch.optim.AdamW, which it could not if a
    read or write went missing), and every armed fault fired. The hook fails the call before it enters the
    kernel, since io_uring bypasses libc (csrc/store_uring.cpp, Note [uring depth])."""
    model, batches = make_mlp(), mlp_batches(3)
    ref = run_reference(model, batches)
    with make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path) as eng:
        store = eng.tiers.store
        if store.backend != "io_uring":
            pytest.skip("io_uring ring setup refused here (kernel.io_uring_disabled?)")
        from conftest import Run
        got = Run([], [], {})
        for b, err in zip(batches, (errno.EINTR, errno.EAGAIN, errno.EBUSY)):
            store.inject_enter_fault(err, submits=4, waits=4)
            train_engine(eng, [b], run=got)
            eng.sync()
            assert store.enter_faults_armed == 0, err
        got.state = eng.state_dict()
        with pytest.raises(ValueError, match="EINTR, EAGAIN or EBUSY"):
            store.inject_enter_fault(errno.EIO, submits=1)
    assert_runs_match(got, ref, model)


# ------------------------------------------------------- 13: RLIMIT_MEMLOCK too low for io_uring buffers

MEMLOCK_CHILD = """
import copy, json, resource, sys, warnings
from conftest import make_engine, run_reference, train_engine
from models import make_mlp, mlp_batches
resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))   # the ring fits, the arena does not
model, batches = make_mlp(), mlp_batches(3)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    eng = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=sys.argv[1])
with eng:
    backend, arena = eng.tiers.store.backend, eng.tiers.arena.budget
    got = train_engine(eng, batches)
ref = run_reference(model, batches)
same = all(abs(a - b) <= 1e-6 + 1e-5 * abs(b) for a, b in zip(got.losses, ref.losses))
print(json.dumps({"backend": backend, "arena": arena, "warnings": [str(x.message) for x in w], "same": same,
                  "stepped": got.stepped}))
"""


@pytest.mark.skipif("io_uring" not in _native.store_backends(), reason="built without liburing")
def test_memlock_too_low_unregistered_buffers_with_warning(tmp_path):
    """A process whose RLIMIT_MEMLOCK (64 KiB) cannot cover the host arena: io_uring refuses to register it as
    fixed buffers, the engine warns and uses plain reads and writes, and training equals the reference. The
    limit binds only without CAP_IPC_LOCK, which a root test drops from the child's bounding set."""
    import json
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    preexec = None
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_CAPBSET_DROP, CAP_IPC_LOCK = 24, 14

        def preexec():
            # Out of the bounding set, root's exec'd child has no CAP_IPC_LOCK, so the limit binds.
            if libc.prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK)")
    p = subprocess.run([sys.executable, "-c", MEMLOCK_CHILD, str(tmp_path)], env=env, cwd=str(tmp_path),
                       preexec_fn=preexec, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["backend"] != "io_uring":
        pytest.skip("io_uring ring setup refused here (kernel.io_uring_disabled?)")
    assert out["arena"] > 64 << 10
    assert any("could not register the host arena" in m for m in out["warnings"]), out["warnings"]
    assert out["same"] and all(out["stepped"]), out
