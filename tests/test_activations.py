"""The activation policies on their own (offload.activations, offload.token_split) and through the engine:
every policy, the token-wise split at 0.25/0.5/0.75 among them, gives the gradients of keeping everything
(fp32, CPU, rel 1e-6) on a small transformer with dropout and on a tiny Hugging Face Llama; the split really
splits (recomputed rows, swapped rows); swaps appear in the trace as their own spans.
"""
import contextlib
import copy
import json
import types

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


def _grads(model, batches, policy, seed=0):
    """Per micro-batch: the loss and every parameter's gradient, under `policy`, from the same RNG seed."""
    model = copy.deepcopy(model)
    hooks = PolicyOnBlocks(model, policy) if policy != "keep" else None
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


@pytest.mark.parametrize("policy", [0.5, "swap"], ids=str)
def test_engine_hf_llama_split_parity(policy, tmp_path):
    model = make_hf("llama")
    batches = hf_batches("llama", 3)
    hp = dict(HP, lr=2e-3)
    ref = run_reference(model, batches, hp=hp)
    got = run_engine(model, batches, mix="cpu", tmp_path=tmp_path, hp=hp, activations=policy)
    assert_runs_match(got, ref, model)


@pytest.mark.parametrize("policy", [0.5, "swap"], ids=str)
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
