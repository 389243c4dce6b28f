"""Fault handling of the whole engine on device="cpu": injected store faults (short transfers, EIO, ENOSPC),
signals (SIGINT, SIGKILL), shared and small disks, tmpfs, failed pinning, non-finite gradients, budgets.

One test per behaviour. Store faults go through the native store's test hook
(engine.tiers.store.inject_fault, see tests/test_store.py); signals through child processes.
"""
import copy
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import traceback
import warnings

import pytest
import torch
from safetensors import safe_open

import offload
from offload import _native
from conftest import HP, assert_runs_match, assert_state_close, make_engine, run_reference, train_engine
from models import make_mlp, mlp_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests") + os.pathsep
           + os.environ.get("PYTHONPATH", ""))


def run_dirs(path):
    return sorted(glob.glob(os.path.join(str(path), "offload-run-*")))


def nvme_engine(tmp_path, model=None):
    model = model if model is not None else make_mlp()
    return model, make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path)


def one_step(eng, batch):
    loss = eng(**batch).loss
    eng.backward(loss)
    return eng.step()


# ------------------------------------------------------------------------------------------ store faults

def test_short_write_completion_resubmitted(tmp_path):
    """Short writes (and short reads) during training are completed by resubmitting the rest: the run still
    equals plain torch.optim.AdamW step for step, and every armed fault fired."""
    model, batches = make_mlp(), mlp_batches(4)
    ref = run_reference(model, batches)
    _, eng = nvme_engine(tmp_path, model)
    with eng:
        s = eng.tiers.store
        for k in range(0, 12, 2):
            s.inject_fault(k, short=True, op="write")
        s.inject_fault(1, short=True, op="read")
        got = train_engine(eng, batches)
        assert s.faults_armed == 0
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("thread", ["caller", "optimizer", "optimizer-then-close"])
def test_eio_on_read_names_file_and_offset(tmp_path, thread):
    """EIO on a store read inside a step surfaces as offload.StoreIOError (an OSError) naming the backing
    file and offset, in the caller's thread, with its original type and message; the process lives, close()
    works (and removes the swap files), and a fresh engine loaded from the last checkpoint trains on.
    "caller": the next read after a checkpoint, whichever thread makes it (the next forward's parameter
    reads come first). "optimizer": deterministically on the optimizer thread: deferred mode, the fault is
    armed as the worker starts reading a unit's NVMe states, and the caller makes no reads meanwhile (it
    only calls engine.sync()), so the error must cross threads. "optimizer-then-close": the same, but the
    first engine call after the failure is close(): it raises the error and still removes the hooks from the
    model and the swap files."""
    model, batches = make_mlp(), mlp_batches(4)
    kw = dict(clip_grad_norm=float("inf")) if thread != "caller" else {}
    eng = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path, **kw)
    nvme = eng.tiers.store.run_dirs[0]
    one_step(eng, batches[0])
    eng.save(tmp_path / "ckpt")
    with pytest.raises(offload.StoreIOError) as ei:
        if thread == "caller":
            eng.tiers.store.inject_fault(0, err=errno.EIO, op="read")
            for b in batches[1:]:
                one_step(eng, b)
        else:
            read_states, armed = eng.tiers.read_states, []

            def arm_then_read(u):
                if not armed and threading.current_thread().name == "offload-optim":
                    armed.append(u.name)
                    eng.tiers.store.inject_fault(0, err=errno.EIO, op="read")
                return read_states(u)

            eng.tiers.read_states = arm_then_read
            loss = eng(**batches[1]).loss
            eng.backward(loss)
            eng.step()          # deferred: queues the updates and returns
        eng.close() if thread == "optimizer-then-close" else eng.sync()
    e = ei.value
    assert type(e) is offload.StoreIOError and isinstance(e, OSError)
    assert e.errno == errno.EIO and e.op == "read"
    assert e.filename.startswith(nvme) and os.path.basename(e.filename).startswith("obj-")
    assert f"offset {e.offset}" in str(e) and e.filename in str(e)
    if thread != "caller":
        assert armed and "update_host" in [f.name for f in traceback.extract_tb(e.__traceback__)]
    eng.close()
    eng.close()
    assert not os.path.exists(nvme)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in eng.module.modules())
    fresh = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=tmp_path / "again", **kw)
    with fresh:
        fresh.load(tmp_path / "ckpt")
        assert fresh.steps_applied == 1
        assert all(one_step(fresh, b) for b in batches[1:])


def test_enospc_mid_step_keeps_last_checkpoint(tmp_path):
    """ENOSPC on a store write mid-step raises a clear StoreIOError; the checkpoint saved before loads and
    equals the state it was saved from."""
    model, batches = make_mlp(), mlp_batches(3)
    _, eng = nvme_engine(tmp_path, model)
    one_step(eng, batches[0])
    saved = eng.state_dict()
    eng.save(tmp_path / "ckpt")
    eng.tiers.store.inject_fault(0, err=errno.ENOSPC, op="write")
    with pytest.raises(offload.StoreIOError) as ei:
        for b in batches[1:]:
            one_step(eng, b)
        eng.sync()
    assert ei.value.errno == errno.ENOSPC and ei.value.op == "write"
    assert "ENOSPC" in str(ei.value) and ei.value.filename in str(ei.value)
    eng.close()
    _, fresh = nvme_engine(tmp_path / "again", model)
    with fresh:
        fresh.load(tmp_path / "ckpt")
        assert_state_close(fresh.state_dict(), saved, model, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- signals

CHILD = textwrap.dedent("""
    import os, sys, json, copy, signal, traceback
    import torch
    from conftest import make_engine, HP
    from models import make_mlp, mlp_batches
    import offload
    # A shell that starts this suite in the background ignores SIGINT, and Python then keeps it ignored:
    # ask for the KeyboardInterrupt behaviour an interactive user gets.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, nvme_root, ckpt, steps, resume, interrupt_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), \\
        sys.argv[5] == "1", int(sys.argv[6])
    torch.manual_seed(0)
    model = make_mlp()
    batches = mlp_batches(steps)
    losses = []
    eng = make_engine(model, mix="nvme", tmp_path=nvme_root)
    code, where = 0, None
    try:
        start = 0
        if resume:
            eng.load(ckpt)
            start = eng.steps_applied
        update, calls = eng.unit_opt.update_host, []
        per_step = sum(1 for u in eng.units if u.trainable and u.plan.states_home != "gpu")
        def update_then_interrupt(u, *a, **k):
            # SIGINT from the optimizer thread as it updates the first unit of step interrupt_at (eager
            # mode: inside that step's backward); the main thread gets KeyboardInterrupt in an engine call.
            calls.append(1)
            if len(calls) == interrupt_at * per_step + 1:
                os.kill(os.getpid(), signal.SIGINT)
            update(u, *a, **k)
        eng.unit_opt.update_host = update_then_interrupt
        for i in range(start, steps):
            loss = eng(**batches[i]).loss
            losses.append((i, loss.item()))
            eng.backward(loss)
            eng.step()
            eng.save(ckpt)
    except KeyboardInterrupt:
        code = 130
        frames = traceback.extract_tb(sys.exc_info()[2])
        where = frames[1].name if len(frames) > 1 else "loop"   # the engine call it interrupted, if any
    finally:
        eng.close()
        json.dump({"where": where, "losses": losses, "left": os.listdir(os.path.join(nvme_root, "nvme"))}, open(out, "w"))
    sys.exit(code)
""")


def _child(tmp_path, name, *args):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / f"{name}.json"
    p = subprocess.run([sys.executable, str(script), str(out), *map(str, args)], env=ENV, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120)
    return p, json.loads(out.read_text())


def test_sigint_during_step_resumes_bitwise(tmp_path):
    """A child checkpointing every step gets SIGINT inside step 3: it handles KeyboardInterrupt, closes the
    engine (no swap files left) and exits 130, not with a crash; a new process resuming from the last
    checkpoint continues the uninterrupted run's loss trajectory bit for bit."""
    steps = 6
    p, full = _child(tmp_path, "full", tmp_path / "a", tmp_path / "a" / "ckpt", steps, 0, -1)
    assert p.returncode == 0, p.stderr[-3000:]
    p, cut = _child(tmp_path, "cut", tmp_path / "b", tmp_path / "b" / "ckpt", steps, 0, 3)
    assert p.returncode == 130, (p.returncode, p.stderr[-3000:])
    # The handler runs at the main thread's next bytecode: nearly always inside engine.backward(), rarely
    # in step() or in the loop between them; any of these is "during step 3".
    assert cut["where"] in ("backward", "step", "loop", "save"), cut["where"]
    assert cut["left"] == [] and full["left"] == []
    p, rest = _child(tmp_path, "rest", tmp_path / "b", tmp_path / "b" / "ckpt", steps, 1, -1)
    assert p.returncode == 0, p.stderr[-3000:]
    start = rest["losses"][0][0]              # the last complete checkpoint: after step 2 (or 3, had the
    assert len(cut["losses"]) == 4 and start in (3, 4), (start, cut["losses"])   # save finished anyway)
    assert start == 3 or cut["where"] == "save"
    joined = cut["losses"][:start] + rest["losses"]
    assert joined == full["losses"]           # floats through JSON: exact equality is bitwise


HOLDER = textwrap.dedent("""
    import sys
    from conftest import make_engine
    from models import make_mlp
    eng = make_engine(make_mlp(), mix="nvme", tmp_path=sys.argv[1])
    print(eng.tiers.store.run_dirs[0], flush=True)
    sys.stdin.read()
""")


def test_restart_after_sigkill_reclaims_stale_swap(tmp_path):
    """A SIGKILLed child leaves its offload-run-* directory behind; the next engine on the same nvme path
    reclaims it, and never touches the directory of a child that is still alive."""
    spawn = lambda: subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    live, doomed = spawn(), spawn()
    try:
        live_dir, dead_dir = live.stdout.readline().strip(), doomed.stdout.readline().strip()
        live_files = sorted(os.listdir(live_dir))
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        assert os.path.isdir(dead_dir) and len(os.listdir(dead_dir)) > 1
        model, batches = make_mlp(), mlp_batches(2)
        _, eng = nvme_engine(tmp_path, model)
        with eng:
            assert eng.tiers.store.reclaimed == 1
            assert not os.path.exists(dead_dir)
            assert sorted(os.listdir(live_dir)) == live_files
            assert set(run_dirs(tmp_path / "nvme")) == {live_dir, eng.tiers.store.run_dirs[0]}
            assert all(one_step(eng, b) for b in batches)
    finally:
        live.stdin.close()
        live.wait(timeout=30)
        if doomed.poll() is None:
            doomed.kill()
    assert run_dirs(tmp_path / "nvme") == []


def test_two_runs_share_an_nvme_path(tmp_path):
    """Two engines on one nvme path (in one process) each get their own offload-run-* directory and both
    equal the reference, interleaved step by step."""
    ma, mb = make_mlp(seed=0), make_mlp(seed=5)
    ba, bb = mlp_batches(3, seed=1), mlp_batches(3, seed=2)
    ra, rb = run_reference(ma, ba), run_reference(mb, bb)
    ea = make_engine(copy.deepcopy(ma), mix="nvme", tmp_path=tmp_path)
    eb = make_engine(copy.deepcopy(mb), mix="nvme", tmp_path=tmp_path)
    with ea, eb:
        da, db = ea.tiers.store.run_dirs[0], eb.tiers.store.run_dirs[0]
        assert da != db and set(run_dirs(tmp_path / "nvme")) == {da, db}
        from conftest import Run
        ga, gb = Run([], [], {}), Run([], [], {})
        for x, y in zip(ba, bb):
            train_engine(ea, [x], run=ga)
            train_engine(eb, [y], run=gb)
    assert_runs_match(ga, ra, ma)
    assert_runs_match(gb, rb, mb)
    assert run_dirs(tmp_path / "nvme") == []


def test_tmpfs_without_odirect_falls_back_with_warning(monkeypatch):
    """An engine whose nvme path is tmpfs (/dev/shm). If the kernel refuses O_DIRECT there, the engine must
    warn "refuses O_DIRECT" and train with buffered I/O. Linux >= 6.6 accepts O_DIRECT on tmpfs, so then
    the refusal is simulated: the engine's store is opened with direct="off" (what the fallback does), and
    the test checks it reports direct False / alignment 1, that buffered unaligned I/O round-trips, and that
    training through it equals the reference."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm")
    import offload.tiers as tiers_mod
    import tempfile
    probe = _native.probe_direct("/dev/shm")
    if probe["direct"]:
        real = tiers_mod.open_store
        monkeypatch.setattr(tiers_mod, "open_store", lambda p, **kw: real(p, direct="off", **kw))
    model, batches = make_mlp(), mlp_batches(3)
    ref = run_reference(model, batches)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng = make_engine(copy.deepcopy(model), mix="nvme", tmp_path=shm)
        with eng:
            s = eng.tiers.store
            assert s.direct == [False] and s.alignment == [1]
            obj = s.create(10_001)
            data = torch.randint(0, 256, (9_999,), dtype=torch.uint8)
            back = torch.zeros_like(data)
            from offload.store import as_buffer
            s.wait(s.submit_write(obj, 1, as_buffer(data)))
            s.wait(s.submit_read(obj, 1, as_buffer(back)))
            assert torch.equal(data, back)
            s.remove(obj)
            got = train_engine(eng, batches)
        assert_runs_match(got, ref, model)
        if not probe["direct"]:
            assert any("refuses O_DIRECT" in str(x.message) for x in w)
        assert run_dirs(os.path.join(shm, "nvme")) == []


def test_memlock_too_low_warns_and_continues(monkeypatch, tmp_path):
    """The host arena's pin registration fails (a fake register returning cudaErrorMemoryAllocation, as under
    a low RLIMIT_MEMLOCK): a PinningWarning, the arena stays unpinned, and training equals the reference."""
    import offload.tiers as tiers_mod
    from offload.arena import HostArena, PinningWarning
    calls = []

    def fake_arena(nbytes, pin=None, **kw):
        a = HostArena(nbytes, pin=True, register=(lambda addr, n: calls.append(n) or 2, lambda addr: 0))
        arenas.append(a)
        return a

    arenas = []
    monkeypatch.setattr(tiers_mod, "HostArena", fake_arena)
    model, batches = make_mlp(), mlp_batches(3)
    ref = run_reference(model, batches)
    with pytest.warns(PinningWarning):
        eng = make_engine(copy.deepcopy(model), mix="cpu", tmp_path=tmp_path)
    with eng:
        assert calls and arenas and not arenas[0].pinned
        got = train_engine(eng, batches)
    assert_runs_match(got, ref, model)


# --------------------------------------------------------------------------------- numbers and budgets

def _moments(eng):
    eng.sync()   # read_unit is the tiers' raw read: queued updates must have landed first
    return [[t.clone() if t is not None else None for t in eng.tiers.read_unit(u)] for u in eng.units]


def _ckpt_moments(d):
    out = {}
    for f in sorted(glob.glob(os.path.join(str(d), "unit-*.safetensors"))):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys() if k.endswith(("::exp_avg", "::exp_avg_sq", "::step"))})
    return out


class _InfWeightGrad(torch.autograd.Function):
    """x * w whose gradient for w is inf, for x finite: poisons one unit's gradients and no other's."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * w, torch.full_like(w, float("inf"))


class _GatedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Parameter(torch.ones(32))
        self.net = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)], torch.nn.Linear(32, 8))
        self.poison = False

    def forward(self, x, y):
        x = _InfWeightGrad.apply(x, self.gate) if self.poison else x * self.gate
        pred = self.net(x)
        return torch.nn.functional.mse_loss(pred, y)


def test_nonfinite_gradient_of_device_tier_unit_warns():
    """Eager mode, the only non-finite gradients in a unit whose states are on the compute device, beside
    units with arena states (whose CPU AdamW sees finite gradients and does not warn): step() still warns,
    naming that unit, and counts the skipped step."""
    torch.manual_seed(0)
    model = _GatedMLP()
    n = sum(p.numel() for p in model.parameters())
    batches = mlp_batches(2)
    with offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", dtype=torch.float32,
                        gpu_memory=4 * n + (1 << 16), cpu_memory=None) as eng:
        homes = {u.name: u.plan.states_home for u in eng.units if u.trainable}
        assert homes["<root>"] == "gpu" and "cpu" in homes.values(), homes
        eng.backward(eng(**batches[0]))
        assert eng.step()
        model.poison = True
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng.backward(eng(**batches[1]))
            assert eng.step() is False
            eng.sync()
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and msgs[0].startswith("non-finite gradient in unit <root>:"), msgs
        assert eng.steps_skipped == 1 and eng.steps_applied == 1


@pytest.mark.parametrize("clip", [None, float("inf")])
def test_nonfinite_gradient_step_skipped_and_counted(tmp_path, clip):
    """A step with a non-finite loss is skipped: step() returns False, steps_skipped counts it, a
    RuntimeWarning names the first unit, and weights, moments and step counts (engine state and a
    checkpoint's exp_avg/exp_avg_sq/step tensors) are exactly those from before. Eager (no clipping) and
    deferred (clip_grad_norm) modes."""
    model, batches = make_mlp(), mlp_batches(3)
    kw = {} if clip is None else dict(clip_grad_norm=clip)
    eng = make_engine(copy.deepcopy(model), mix="cpu+nvme", tmp_path=tmp_path, **kw)
    with eng:
        assert one_step(eng, batches[0])
        before, before_sd = _moments(eng), eng.state_dict()
        eng.save(tmp_path / "a")
        loss = eng(**batches[1]).loss * float("inf")
        # the first unit whose gradients are checked: in backward order, the first with host-side states
        # (device-tier units are only checked as a whole by step())
        host = [u for u in reversed(eng.units) if u.trainable and u.plan.states_home != "gpu"]
        first = (host[0] if clip is None else next(u for u in eng.units if u in host)).name if host else None
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            eng.backward(loss)
            assert eng.step() is False
            eng.sync()
        msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == 1 and msgs[0].startswith(f"non-finite gradient in unit {first}:"), (first, msgs)
        eng.sync()
        assert eng.steps_skipped == 1 and eng.steps_applied == 1
        assert_state_close(eng.state_dict(), before_sd, model, rtol=0, atol=0)
        for a, b in zip(before, _moments(eng)):
            for x, y in zip(a, b):
                assert (x is None and y is None) or torch.equal(x, y)
        eng.save(tmp_path / "b")
        ca, cb = _ckpt_moments(tmp_path / "a"), _ckpt_moments(tmp_path / "b")
        assert ca.keys() == cb.keys() and any(k.endswith("::exp_avg") for k in ca)
        assert all(torch.equal(ca[k], cb[k]) for k in ca)
        assert one_step(eng, batches[2])     # training goes on
        got = eng.state_dict()
    # the whole run equals the reference that never saw batch 1
    assert_state_close(got, run_reference(model, batches, skip=(1,)).state, model)


def test_disk_too_small_refused_at_engine(tmp_path, monkeypatch):
    """os.statvfs reports 1 MiB free on the nvme path: engine() raises BudgetError naming the path and both
    sizes, before any file is created there."""
    model = make_mlp(width=512)
    from conftest import tier_kwargs
    kw = tier_kwargs(model, "nvme", tmp_path)
    real = os.statvfs

    class Small:
        f_bavail, f_frsize, f_bsize = 256, 4096, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Small() if os.fspath(p) == kw["nvme"] else real(p))
    with pytest.raises(offload.BudgetError) as ei:
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", **kw)
    msg = str(ei.value)
    from offload.groups import split_units
    from offload.plan import plan_placement
    from offload.sizes import fmt_bytes
    need = plan_placement(split_units(model), itemsize=4, device="cpu", gpu_budget=kw["gpu_memory"],
                          cpu_budget=kw["cpu_memory"], nvme=[kw["nvme"]], grad_accum=1,
                          activations="auto").bytes["nvme"]
    assert need > 1 << 20
    assert f"nvme {kw['nvme']}: 1.00 MiB free, the plan puts {fmt_bytes(need)} there" in msg, msg
    assert os.listdir(kw["nvme"]) == []


def test_cpu_budget_too_small_refused(tmp_path):
    """cpu_memory far below what the plan needs (no NVMe to spill to): BudgetError at construction with
    the numbers in it, and nothing created in the working directory or the nvme path."""
    from conftest import tier_kwargs
    model = make_mlp()
    before = os.listdir(tmp_path)
    W = tier_kwargs(model, "cpu", tmp_path)["gpu_memory"]      # enough compute memory to stream through
    with pytest.raises(offload.BudgetError) as ei:
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", gpu_memory=W, cpu_memory=4096)
    msg = str(ei.value)
    assert "cpu_memory=4.00 KiB" in msg and "KiB" in msg.split("cpu_memory=4.00 KiB", 1)[1], msg
    (tmp_path / "nvme").mkdir()
    with pytest.raises(offload.BudgetError) as ei:   # even with NVMe: the staging buffers need host memory
        offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", gpu_memory=W, cpu_memory=4096,
                       nvme=str(tmp_path / "nvme"))
    assert "cpu_memory=4.00 KiB" in str(ei.value), str(ei.value)
    assert os.listdir(tmp_path / "nvme") == [] and sorted(os.listdir(tmp_path)) == sorted(before + ["nvme"])
