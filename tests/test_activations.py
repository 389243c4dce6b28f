"""The activation policies on their own (offload.activations, offload.token_split) and through the engine:
every policy, the token-wise split at 0.25/0.5/0.75 among them, gives the gradients of keeping everything
(fp32, CPU, rel 1e-6) on a small transformer with dropout and on a tiny Hugging Face Llama; the split really
splits (recomputed rows, swapped rows); swaps appear in the trace as their own spans.
"""
import contextlib
import copy
import json
import types

from hypothesis import given, strategies as st
import pytest
import torch

import offload
from offload.activations import open_scope
from offload.token_split import leaf_modules
from conftest import HP, assert_runs_match, run_engine, run_reference
from models import hf_batches, make_gpt, make_hf, repeated_blocks, token_batches

POLICIES = ["keep", "recompute", "swap", 0.25, 0.5, 0.75]
GRAD_RTOL = 1e-6


class PolicyOnBlocks:
    """Installs one activation policy on every repeated block the way the engine's streamer does (a scope
    entered in the block's forward pre-hook, left in its forward hook), without the engine: the gradients
    then come straight from autograd."""

    def __init__(self, model, policy):
        self.policy, self.recomputing, self.stack, self.scopes = policy, 0, [], []
        self.units = {}
        self.handles = []
        for i, b in enumerate(repeated_blocks(model)):
            self.units[b] = types.SimpleNamespace(index=i, extra={})
            self.handles.append(b.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(b.register_forward_hook(self._post))

    @contextlib.contextmanager
    def _recompute(self):
        self.recomputing += 1
        try:
            yield
        finally:
            self.recomputing -= 1

    def _pre(self, module, args, kwargs):
        if self.recomputing or not torch.is_grad_enabled():
            return None
        scope = open_scope(self.policy, module, args, kwargs, unit=self.units[module], device=torch.device("cpu"),
                           d2h=None, h2d=None, profiler=None, param_storages=set, on_recompute=self._recompute,
                           prev=None)
        self.stack.append(scope)
        if scope is not None:
            self.scopes.append(scope)
            scope.hooks.__enter__()
        return None

    def _post(self, module, args, output):
        if self.recomputing or not torch.is_grad_enabled():
            return None
        scope = self.stack.pop()
        if scope is not None:
            scope.hooks.__exit__(None, None, None)
            scope.exit()
        return None

    def remove(self):
        for h in self.handles:
            h.remove()


def _grads(model, batches, policy, seed=0, before=None):
    """Per micro-batch: the loss and every parameter's gradient, under `policy`, from the same RNG seed.
    before(model): run once with the policy installed, before the seed is set."""
    model = copy.deepcopy(model)
    hooks = PolicyOnBlocks(model, policy) if policy != "keep" else None
    if before is not None:
        before(model)
    torch.manual_seed(seed)
    out = []
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return out, hooks


def _assert_same_grads(got, ref):
    for step, ((loss, g), (ref_loss, r)) in enumerate(zip(got, ref)):
        assert abs(loss - ref_loss) <= GRAD_RTOL * abs(ref_loss), (step, loss, ref_loss)
        assert g.keys() == r.keys()
        for n in r:
            err = ((g[n] - r[n]).norm() / r[n].norm().clamp_min(1e-30)).item()
            assert err <= GRAD_RTOL, f"step {step} {n}: gradient off by rel {err:.2e}"


def _gpt_with_dropout():
    return make_gpt(dropout=0.1)


def _llama():
    m = make_hf("llama")
    m.config.use_cache = False          # a key/value cache would be appended to again by a recompute
    m.config.attention_dropout = 0.1
    for layer in m.model.layers:
        layer.self_attn.attention_dropout = 0.1
    return m


MODELS = {"gpt": (_gpt_with_dropout, lambda: token_batches(3)),
          "llama": (_llama, lambda: hf_batches("llama", 3))}


@pytest.mark.parametrize("policy", POLICIES[1:], ids=str)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_policy_gradients_equal_keep(name, policy):
    """Loss and every gradient of three micro-batches (the first calibrates the split, the next two use it)
    equal keeping everything within rel 1e-6, with dropout on: a recompute draws the forward's random
    numbers."""
    make, batches = MODELS[name]
    model, data = make(), batches()
    ref, _ = _grads(model, data, "keep")
    got, hooks = _grads(model, data, policy)
    _assert_same_grads(got, ref)
    assert hooks.scopes, "the policy opened no scope"


def test_dropout_matters():
    """Sanity: another RNG seed gives other gradients, so the test above sees a recompute drawing other
    random numbers."""
    model, data = _gpt_with_dropout(), token_batches(1)
    a, _ = _grads(model, data, "keep", seed=0)
    b, _ = _grads(model, data, "keep", seed=1)
    name = "blocks.0.fc.weight"
    assert (a[0][1][name] - b[0][1][name]).norm() > 1e-3 * a[0][1][name].norm()


@pytest.mark.parametrize("policy", ["recompute", 0.5], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_reads_the_host_rng_only_where_the_forward_draws(dropout, policy, monkeypatch):
    """Note [recompute rng]: reading the host generator's state makes a tensor. Without dropout a block
    reads it on its first call only (to learn that its forward leaves it alone); with dropout, at every call,
    and the gradients equal keeping everything."""
    model, data = make_gpt(dropout=dropout), token_batches(4)
    ref, _ = _grads(model, data, "keep")
    real, reads = torch.get_rng_state, []
    monkeypatch.setattr(torch, "get_rng_state", lambda: reads.append(1) or real())
    model = copy.deepcopy(model)
    hooks = PolicyOnBlocks(model, policy)
    torch.manual_seed(0)
    got, per_batch = [], []
    for b in data:
        before = len(reads)
        loss = model(**b).loss
        loss.backward()
        got.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
        per_batch.append(len(reads) - before)
    _assert_same_grads(got, ref)
    assert hooks.scopes
    if dropout:
        assert all(n > 0 for n in per_batch), per_batch
    else:
        assert per_batch[0] > 0 and per_batch[1:] == [0] * (len(data) - 1), per_batch


def test_an_eval_mode_first_call_does_not_hide_training_dropout():
    """Note [recompute rng]: a first call in eval mode with gradients on (a validation loss) draws nothing
    from the host generator; the training calls after it still keep its state, so their recompute draws
    the forward's dropout masks and the gradients equal keeping everything."""
    model, data = _gpt_with_dropout(), token_batches(3)

    def validate(m):
        m.eval()
        m(**data[0]).loss.detach()
        m.train()
    ref, _ = _grads(model, data, "keep")
    got, hooks = _grads(model, data, "recompute", before=validate)
    _assert_same_grads(got, ref)
    uses = [u for unit in hooks.units.values() for u in unit.extra["host_rng"].values()]
    assert {u.draws for u in uses} == {False, True}, [u.draws for u in uses]   # eval: none; training: draws


@pytest.mark.parametrize("name", sorted(MODELS))
def test_split_recomputes_only_dropped_rows_after_attention(name):
    """The calibrated split of a block runs its leaves from the output projection on (after attention) on
    the dropped rows only, swaps only token rows (no whole tensor) and drops the rest; the swapped bytes
    are about a of what "swap" moves for those tensors."""
    make, batches = MODELS[name]
    model, data = make(), batches()
    _, hooks = _grads(model, data[:2], 0.5)
    block, unit = next(iter(hooks.units.items()))
    lay = next(iter(unit.extra["split_layouts"].values()))
    leaves = [type(m).__name__ for m in leaf_modules(block)]
    assert 0 < lay.c < len(leaves), (lay.c, leaves)
    kinds = [k[0] for k in lay.kinds]
    assert "splice" in kinds and "full" in kinds and "whole" not in kinds, kinds
    assert any(len(k) > 2 and k[2] for k in lay.kinds), "no leaf ran on the dropped rows only"


def test_split_swaps_a_fraction_of_the_rows():
    """Under a split the host copies of one block call are the first a of the token rows of the spliced
    tensors: bytes grow with a, and stay below what "swap" stores for the same call."""
    model, data = _gpt_with_dropout(), token_batches(2)
    stored = {}
    for policy in ("swap", 0.25, 0.75):
        _, hooks = _grads(model, data, policy)
        stored[policy] = hooks.scopes[-1].stash.nbytes
    assert 0 < stored[0.25] < stored[0.75] < stored["swap"], stored


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_engine_policy_parity(policy, tmp_path):
    """Through the engine (params streamed from the CPU tier): losses and weights after four AdamW steps
    equal plain PyTorch's."""
    model = make_gpt()
    batches = token_batches(4)
    ref = run_reference(model, batches)
    got = run_engine(model, batches, mix="cpu", tmp_path=tmp_path, activations=policy)
    assert_runs_match(got, ref, model)


def test_auto_puts_block_inputs_in_host_memory_only_when_recompute_would_not_fit(monkeypatch):
    """The first step's "auto" (stream.Streamer._policy, on a GPU): keep while blocks fit, then recompute;
    recompute+offload only when the remaining blocks' inputs alone would overflow the device budget, and
    then for every later block of that step. A stand-in streamer with 10 GiB in use."""
    from offload.stream import Streamer
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 10 << 30)

    def streamer(peak):
        units = [types.SimpleNamespace(kind="block", index=i, plan=types.SimpleNamespace(activations="auto"))
                 for i in range(8)]
        return types.SimpleNamespace(cuda=True, act_decided={}, units=units, pending_device_bytes=0,
                                     act_peak=peak, device=None, plan=types.SimpleNamespace(budgets={"gpu": 24 << 30}))
    s = streamer(1 << 30)                     # 10 + 8 x 1 GiB of activations + headroom fits: keep
    assert Streamer._policy(s, s.units[0], 1 << 30) == "auto" and s.act_decided == {0: "keep"}
    s = streamer(4 << 30)                     # 8 x 4 GiB does not: recompute, whose 8 x 1 GiB inputs fit
    assert Streamer._policy(s, s.units[0], 1 << 30) == "recompute"
    s = streamer(4 << 30)                     # 8 x 2 GiB of inputs would not fit beside the 10 GiB either
    assert Streamer._policy(s, s.units[0], 2 << 30) == "recompute+offload"
    assert Streamer._policy(s, s.units[1], 1) == "recompute+offload"
    assert s.act_decided == {0: "recompute+offload", 1: "recompute+offload"}


def test_recompute_offload_holds_no_block_input_on_the_device(tmp_path):
    """Between a block's forward and its backward, "recompute+offload" keeps the block's gradient-carrying
    inputs only as host copies: the scopes' replays hold placeholders, the stashes hold the bytes."""
    from torch.utils._pytree import tree_flatten
    from conftest import make_engine
    from offload.activations import OffloadedRecomputeScope, _OnHost
    with make_engine(make_gpt(), mix="cpu", tmp_path=tmp_path, activations="recompute+offload") as eng:
        loss = eng(**token_batches(1)[0]).loss
        scopes = [c.scope for calls in eng.streamer.calls.values() for c in calls if c.scope is not None]
        assert scopes and all(isinstance(sc, OffloadedRecomputeScope) for sc in scopes)
        for sc in scopes:
            leaves = tree_flatten((sc.replay.args, sc.replay.kwargs))[0]
            assert not any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
            assert any(isinstance(x, _OnHost) for x in leaves) and sc.stash.nbytes > 0
        ledger = eng.streamer.host_ledger
        assert ledger.live == sum(sc.stash.nbytes for sc in scopes) > 0
        del scopes, sc
        eng.backward(loss)
        assert ledger.live == 0 and ledger.peak > 0   # backward took (and freed) every copy
        assert eng.step()


def test_host_ledger_warns_once_when_copies_outgrow_the_room_cpu_memory_leaves():
    from offload.activations import HostLedger, HostStash
    ledger = HostLedger(room=1000)
    keep = []
    for _ in range(2):
        st = HostStash(torch.device("cpu"), None, None, ledger=ledger)
        st.put(torch.zeros(100))         # 400 bytes each
        keep.append(st)
    assert ledger.live == 800
    with pytest.warns(RuntimeWarning, match=r"hold 1.17 KiB of pinned host memory, more than the 1000 B"):
        st = HostStash(torch.device("cpu"), None, None, ledger=ledger)
        st.put(torch.zeros(100))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once only
        st.put(torch.zeros(100))
    assert st.get(0).shape == (100,) and ledger.live == 1200   # a copy taken back is no longer held
    del st, keep
    import gc
    gc.collect()
    assert ledger.live == 0 and ledger.peak == 1600          # the rest go with their stashes


@pytest.mark.parametrize("policy", ["recompute", "recompute+offload", "swap", 0.5], ids=str)
def test_forward_that_raises_leaves_no_hooks_and_training_goes_on(policy, tmp_path):
    """A block's forward raises (as an out-of-memory error would) after its activation scope's saved-tensor
    hooks were entered: the hooks are left (else every later op on the thread is saved into a dead scope and
    its backward replays the wrong block), the units are given back, and training then equals plain
    PyTorch's on the same batches."""
    from conftest import make_engine, train_engine
    model = make_gpt()
    batches = token_batches(3)
    ref = run_reference(model, batches)
    with make_engine(copy.deepcopy(model), mix="cpu", tmp_path=tmp_path, activations=policy) as eng:
        victim = eng.module.blocks[1]
        real = victim.forward
        victim.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected"))
        with pytest.raises(RuntimeError, match="injected"):
            eng(**batches[0])
        victim.forward = real
        x = torch.ones(3, requires_grad=True)
        (x * x).sum().backward()             # saved by autograd itself, no scope in between
        assert torch.equal(x.grad, 2 * torch.ones(3))
        got = train_engine(eng, batches)
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("policy", [0.5, "swap", "recompute+offload"], ids=str)
def test_engine_hf_llama_split_parity(policy, tmp_path):
    model = make_hf("llama")
    batches = hf_batches("llama", 3)
    hp = dict(HP, lr=2e-3)
    ref = run_reference(model, batches, hp=hp)
    got = run_engine(model, batches, mix="cpu", tmp_path=tmp_path, hp=hp, activations=policy)
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("policy", [0.5, "swap", "recompute+offload"], ids=str)
def test_swaps_are_trace_spans(policy, tmp_path):
    """Activation copies out (forward) and back (backward) are spans of their own lanes, per block, with
    their bytes."""
    path = tmp_path / "t.json"
    model = make_gpt()
    with offload.engine(model, optimizer=offload.AdamW(**HP), device="cpu", activations=policy,
                        trace=str(path)) as eng:
        for b in token_batches(2):
            eng.backward(eng(**b).loss)
            eng.step()
    events = json.loads(path.read_text())["traceEvents"]
    for cat in ("act_swap_out", "act_swap_in"):
        spans = [e for e in events if e.get("cat") == cat]
        assert len(spans) >= 2 * len(model.blocks), (cat, len(spans))
        assert all(e["args"]["bytes"] > 0 and str(e["args"]["unit"]).startswith("blocks.") for e in spans)


def test_float_policy_accepted_and_bad_ones_refused():
    for bad in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="activations"):
            offload.engine(make_gpt(), device="cpu", activations=bad)


# ------------------------------------------------------------------------------------ auto, after step 1

MiB = 1 << 20


def test_auto_keeps_what_fits_then_swaps_what_hides_then_splits():
    """Eight recomputed blocks of 100 MiB; 250 MiB spare would keep the last two, but one block's worth
    stays free for the swap-in prefetch, so one is kept; a forward of 0.1 s at 10 GB/s hides 0.9 GB
    (8.6 blocks): the seven others are swapped."""
    from offload.act_auto import choose
    got = choose(list(range(8)), 100 * MiB, 0.1, 250 * MiB, 10e9, 1 << 40)
    assert [got[i] for i in range(8)] == ["swap"] * 7 + ["keep"], got
    got = choose(list(range(8)), 100 * MiB, 0.1, 350 * MiB, 10e9, 1 << 40)
    assert [got[i] for i in range(8)] == ["swap"] * 6 + ["keep"] * 2, got


def test_auto_swap_limited_by_hidden_traffic_and_split_takes_the_remainder():
    """Forward 0.05 s at 5 GB/s hides 0.9*250 MB = 225 MB: two 100 MiB blocks swapped whole (209.7 MB), the
    remaining 15.3 MB is 0.15 of a block: one more block splits with a = 0.15, the rest recompute; the three
    are spread over the forward, one recomputed block between each."""
    from offload.act_auto import choose
    got = choose(list(range(6)), 100 * MiB, 0.05, 100 * MiB, 5e9, 1 << 40)
    assert [got[i] for i in range(6)] == ["swap", "recompute", "swap", "recompute", 0.15, "recompute"], got


def test_auto_swap_limited_by_host_memory():
    from offload.act_auto import choose
    got = choose(list(range(6)), 100 * MiB, 10.0, 100 * MiB, 10e9, 250 * MiB)
    assert [got[i] for i in range(6)] == ["swap", "recompute", "swap", "recompute", 0.5, "recompute"], got


@given(n=st.integers(1, 64), data=st.data())
def test_spread_positions_are_distinct_in_range_and_evenly_apart(n, data):
    from offload.act_auto import spread
    k = data.draw(st.integers(0, n))
    got = spread(n, k)
    assert len(set(got)) == k and all(0 <= i < n for i in got) and got == sorted(got)
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1
    if k:
        assert got[0] == 0


def test_auto_swaps_nothing_without_room_for_one_swapped_block():
    """Traffic that would hide but less than a block's worth of device memory left: the swap-in prefetch
    would hold a copy beside the block running, over the budget; everything stays recomputed."""
    from offload.act_auto import choose
    for spare in (0, 100 * MiB - 1):
        got = choose(list(range(6)), 100 * MiB, 10.0, spare, 10e9, 1 << 40)
        assert set(got.values()) == {"recompute"}, (spare, got)


def test_auto_nothing_recomputed_changes_nothing():
    from offload.act_auto import choose
    assert choose([], 100 * MiB, 1.0, 1 << 40, 10e9, 1 << 40) == {}


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_pinned_pool_never_hands_out_a_held_buffer_and_reuses_returned_ones(ops):
    """PinnedPool (plain CPU buffers here): a buffer taken is not handed out again until it comes back, with
    the event it came back with; it holds at least what was asked, in pinned_bytes' rounding; a request of a
    size class that has a returned buffer makes none."""
    from offload.activations import PinnedPool
    from offload.sizes import pinned_bytes
    pool = PinnedPool(alloc=lambda n: torch.empty(n, dtype=torch.uint8))
    held, back = [], {}
    for give, n in ops:
        if give and held:
            buf = held.pop(n % len(held))
            ev = object()
            back[buf.data_ptr()] = ev
            pool.give(buf, ev)
            continue
        had = len(pool.free.get(pinned_bytes(n), []))
        made = pool.made
        buf, ev = pool.take(n)
        assert buf.numel() == pinned_bytes(n) >= n
        assert all(buf.data_ptr() != h.data_ptr() for h in held)
        assert pool.made == made + (0 if had else 1)
        assert ev is back.pop(buf.data_ptr(), None)
        held.append(buf)


# ---------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["swap", 0.5, "auto", "recompute", "recompute+offload"], ids=str)
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_bf16_gpu_policy_parity(name, policy, tmp_path):
    """bf16 on the GPU, params streamed from the CPU tier: every policy within the bf16 tolerances of
    test_engine_gpu against an fp32-master autocast reference (copies on the side streams, swap-in prefetch,
    split calibration on the first step and the split after it)."""
    from test_engine_gpu import _bf16_pair, assert_bf16_close
    model = make_gpt() if name == "gpt" else make_hf("llama")
    batches = token_batches(5) if name == "gpt" else hf_batches("llama", 5)
    got, ref = _bf16_pair(model, batches, "cpu", tmp_path, activations=policy)
    assert_bf16_close(got, ref, model)


def _gpu_fp32_runs(model, data, policies, after_step=None):
    """{policy: (losses, state_dict)} of fp32 engines on the GPU, one per policy, over the same batches;
    after_step(policy, engine) runs after each step."""
    results = {}
    for policy in policies:
        eng = offload.engine(copy.deepcopy(model), optimizer=offload.AdamW(**HP), device="cuda",
                             dtype=torch.float32, activations=policy)
        losses = []
        try:
            for b in data:
                loss = eng(**b).loss
                eng.backward(loss)
                eng.step()
                losses.append(loss.item())
                if after_step is not None:
                    after_step(policy, eng)
            results[policy] = (losses, eng.state_dict())
        finally:
            eng.close()
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_split_gradients_equal_swap():
    """fp32 on the GPU: losses and weights after three AdamW steps under the split equal those under "swap"
    (which stores every tensor exactly), up to cuBLAS rounding a matmul on fewer rows differently."""
    model = make_gpt().cuda()
    data = [{k: v.cuda() for k, v in b.items()} for b in token_batches(3)]
    results = _gpu_fp32_runs(model, data, ("swap", 0.5))
    (la, sa), (lb, sb) = results["swap"], results[0.5]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb)), (la, lb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_swap_reuses_its_pinned_buffers_and_equals_keep():
    """fp32 on the GPU under "swap": after the first step every host copy takes a buffer of the engine's
    PinnedPool (none is made), and buffers reused across steps carry the right values: losses and weights
    equal those of "keep" exactly (swap stores every tensor as it is)."""
    model = make_gpt().cuda()
    data = [{k: v.cuda() for k, v in b.items()} for b in token_batches(4)]
    made = []
    results = _gpu_fp32_runs(model, data, ("keep", "swap"),
                             lambda policy, eng: made.append(eng.streamer.host_pool.made) if policy == "swap" else None)
    assert made[0] > 0 and made[1:] == [made[0]] * (len(data) - 1), made
    (la, sa), (lb, sb) = results["keep"], results["swap"]
    assert la == lb
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
