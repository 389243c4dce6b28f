"""Native AdamW (offload.adam) against torch.optim.AdamW(foreach=False), and its SIMD levels against each other.

Tolerance (Note [adam exactness] in csrc/adam.h): exp_avg and exp_avg_sq must equal torch's bitwise; master
within rtol 1e-6 plus an absolute 1e-6 * lr, because torch's CPU sqrt (MKL VML) is not correctly rounded and
its last-ulp difference in the update survives where a weight passes near zero.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from offload import _native
from offload.adam import adamw_, grad_sumsq

LEVELS = ["scalar", "avx2", "avx512"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [0, 1, 7, 15, 16, 17, 33, 1000, 65537]


def _need(level):
    best = _native.simd_level()
    if LEVELS.index(level) > LEVELS.index(best):
        pytest.skip(f"this CPU lacks {level} (best: {best})")


def _state(n, seed):  # master, exp_avg, exp_avg_sq
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-2, torch.rand(n, generator=g) * 1e-4


def _grads(n, steps, dtype, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(n, generator=g) * 10 ** float(torch.randint(-4, 1, (), generator=g))).to(dtype)
            for _ in range(steps)]


def _compare_with_torch(n, grad_dtype, out_dtype, simd, lr, betas, eps, wd, grad_scale=1.0, steps=10,
                        first_step=1, seed=0):
    """Runs torch and adamw_ side by side from step first_step (after torch alone ran the steps before it)."""
    ref = torch.randn(n, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=lr, betas=betas, eps=eps, weight_decay=wd, foreach=False)
    for g in _grads(n, first_step - 1, torch.float32, seed + 7):
        ref.grad = g
        opt.step()
    if first_step > 1:
        s = opt.state[ref]
        assert int(s["step"]) == first_step - 1
        master, m, v = ref.detach().clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()
    else:
        master, m, v = ref.detach().clone(), torch.zeros(n), torch.zeros(n)
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    atol = 1e-6 * lr
    for i, g in enumerate(_grads(n, steps, grad_dtype, seed)):
        before = ref.detach().clone()
        ref.grad = g.float() * grad_scale
        opt.step()
        adamw_(master, g, m, v, lr=lr, betas=betas, eps=eps, weight_decay=wd, step=first_step + i, out=out,
               grad_scale=grad_scale, simd=simd)
        s = opt.state[ref]
        assert torch.equal(m, s["exp_avg"]), f"exp_avg differs at step {first_step + i}"
        assert torch.equal(v, s["exp_avg_sq"]), f"exp_avg_sq differs at step {first_step + i}"
        # An ulp of an update may differ (module docstring): the absolute slack scales with the largest update.
        if n:
            atol = max(atol, 1e-6 * float((ref.detach() - before).abs().max()))
        torch.testing.assert_close(master, ref.detach(), rtol=1e-6, atol=atol)
        if out is not None:
            assert torch.equal(out.view(torch.uint8), master.to(out_dtype).view(torch.uint8))


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("grad_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [None] + DTYPES)
def test_matches_torch_adamw_for_odd_sizes(simd, grad_dtype, out_dtype):
    _need(simd)
    for n in ODD_SIZES:
        _compare_with_torch(n, grad_dtype, out_dtype, simd, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.01,
                            steps=4, seed=n)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 3000), lr=st.floats(1e-5, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       eps=st.sampled_from([1e-8, 1e-6, 1e-3]), wd=st.sampled_from([0.0, 0.01, 0.1]),
       grad_dtype=st.sampled_from(DTYPES), first_step=st.sampled_from([1, 2, 57]), seed=st.integers(0, 2**16))
def test_matches_torch_adamw_hyperparameters(n, lr, beta1, beta2, eps, wd, grad_dtype, first_step, seed):
    _compare_with_torch(n, grad_dtype, torch.bfloat16, "auto", lr, (beta1, beta2), eps, wd, steps=10,
                        first_step=first_step, seed=seed)


def test_matches_torch_adamw_large_odd_size_with_grad_scale():
    _compare_with_torch(1000003, torch.bfloat16, torch.bfloat16, "auto", lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                        wd=0.1, grad_scale=0.37, steps=3, first_step=5)


@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_simd_level_equals_scalar_bitwise(simd):
    _need(simd)
    for n in ODD_SIZES + [200003]:
        for gd in DTYPES:
            for od in DTYPES:
                bufs = {}
                for level in ("scalar", simd):
                    master, m, v = _state(n, n)
                    out = torch.empty(n, dtype=od)
                    for t, g in enumerate(_grads(n, 3, gd, n), start=1):
                        adamw_(master, g, m, v, lr=1e-2, betas=(0.3, 0.99), eps=1e-8, weight_decay=0.1, step=t,
                               out=out, grad_scale=1.5, simd=level)
                    bufs[level] = [x.view(torch.uint8) for x in (master, m, v, out)]
                assert all(torch.equal(a, b) for a, b in zip(bufs["scalar"], bufs[simd])), (n, gd, od)


@pytest.mark.parametrize("simd", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_written_over_the_gradients_equals_a_separate_output(simd, dtype):
    """The engine passes one buffer as grad and out (the update overwrites the gradients it came from):
    bitwise the same master, moments and output as with two buffers, at every SIMD level and over the
    thread split (200003 elements: several chunks and a tail)."""
    _need(simd)
    for n in ODD_SIZES + [200003]:
        got = {}
        for shared in (False, True):
            master, m, v = _state(n, 7)
            g = _grads(n, 1, dtype, 7)[0]
            out = g if shared else torch.empty(n, dtype=dtype)
            adamw_(master, g, m, v, lr=1e-2, betas=(0.3, 0.99), eps=1e-8, weight_decay=0.1, step=2, out=out,
                   grad_scale=1.5, simd=simd)
            got[shared] = [x.view(torch.uint8) for x in (master, m, v, out)]
        assert all(torch.equal(a, b) for a, b in zip(got[False], got[True])), (n, dtype)


def test_output_overlapping_the_gradients_otherwise_is_refused():
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    f = lambda n=4: np.zeros(n, np.float32)  # noqa: E731
    g = np.zeros(8, np.uint16)
    with pytest.raises(ValueError, match="grad and out: buffers overlap"):   # shifted by one element
        _native.adamw_step(f(), g[:4], f(), f(), grad_dtype="bfloat16", out=g[1:5], out_dtype="bfloat16", **kw)
    with pytest.raises(ValueError, match="grad and out: buffers overlap"):   # same bytes, other dtype
        h = np.zeros(4, np.float32)
        _native.adamw_step(f(), h.view(np.uint16)[:4], f(), f(), grad_dtype="bfloat16", out=h.view(np.uint16)[:4],
                           out_dtype="float16", **kw)
    with pytest.raises(ValueError, match="master and grad: buffers overlap"):   # out is grad, and so is master
        m = f()
        _native.adamw_step(m, m, f(), f(), out=m, out_dtype="float32", **kw)


def test_thread_count_does_not_change_result():
    n = 1000003
    results = []
    for threads in (1, 2, 5):
        master, m, v = _state(n, 3)
        g = _grads(n, 1, torch.bfloat16, 3)[0]
        out = torch.empty(n, dtype=torch.bfloat16)
        _native.adamw_step(master.numpy(), g.view(torch.uint8).numpy(), m.numpy(), v.numpy(), lr=1e-3, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, grad_dtype="bfloat16",
                           out=out.view(torch.uint8).numpy(), threads=threads)
        results.append((master, m, v, out, _native.grad_sumsq(g.view(torch.uint8).numpy(), grad_dtype="bfloat16",
                                                              threads=threads)))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][:4], r[:4]))
        assert r[4] == results[0][4]


def test_set_adam_threads():
    before = _native.adam_threads()
    try:
        _native.set_adam_threads(3)
        assert _native.adam_threads() == 3
        with pytest.raises(ValueError, match="n must be >= 1"):
            _native.set_adam_threads(0)
    finally:
        _native.set_adam_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 17, 300001])
def test_grad_sumsq_matches_torch(dtype, n):
    g = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    expect = float((g.double() ** 2).sum())
    assert grad_sumsq(g) == pytest.approx(expect, rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sumsq_propagates_inf_and_nan(dtype):
    g = torch.ones(100003, dtype=dtype)
    g[77777] = -float("inf")
    assert grad_sumsq(g) == float("inf")
    g[5] = float("nan")
    assert np.isnan(grad_sumsq(g))


def _valid(n=10):
    return dict(master=torch.zeros(n), grad=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n))


HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=1)


@pytest.mark.parametrize("change, match", [
    (dict(exp_avg=torch.zeros(11)), "exp_avg: has 11 elements"),
    (dict(exp_avg_sq=torch.zeros(10, dtype=torch.float64)), "exp_avg_sq: dtype torch.float64"),
    (dict(master=torch.zeros(10, dtype=torch.bfloat16)), "master: dtype"),
    (dict(grad=torch.zeros(10, dtype=torch.int32)), "grad: dtype"),
    (dict(grad=torch.zeros(20)[::2]), "grad: must be contiguous"),
    (dict(master=torch.zeros(10, 2).t()), "master: must be contiguous"),
    (dict(out=torch.zeros(9, dtype=torch.bfloat16)), "out: has 9 elements"),
])
def test_bad_tensors_raise_value_error_naming_them(change, match):
    args = {**_valid(), **change}
    with pytest.raises(ValueError, match=match):
        adamw_(args.pop("master"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), **args, **HYPER)


def test_bad_tensors_are_all_listed():
    with pytest.raises(ValueError, match=r"exp_avg: has 3 elements.*grad: dtype torch.int64"):
        adamw_(torch.zeros(4), torch.zeros(4, dtype=torch.int64), torch.zeros(3), torch.zeros(4), **HYPER)


@pytest.mark.parametrize("change, match", [
    (dict(step=0), "step must be >= 1"),
    (dict(lr=-1.0), "lr must be"),
    (dict(beta1=1.0), "beta1 must be in"),
    (dict(eps=float("nan")), "eps must be"),
    (dict(grad_dtype="int8"), "grad_dtype: unsupported dtype"),
    (dict(simd="sse"), "simd: expected"),
    (dict(threads=-1), "threads: must be >= 0"),
])
def test_bad_values_raise_value_error(change, match):
    kw = {**dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1), **change}
    a = [np.zeros(4, np.float32) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        _native.adamw_step(*a, **kw)


def test_native_buffer_checks():
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    f = lambda n=4: np.zeros(n, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="grad: expected 4 bfloat16 elements"):
        _native.adamw_step(f(), f(), f(), f(), grad_dtype="bfloat16", **kw)
    with pytest.raises(ValueError, match="exp_avg: needs a writable buffer"):
        _native.adamw_step(f(), f(), bytes(16), f(), **kw)
    with pytest.raises(ValueError, match="master: byte size 6"):
        _native.adamw_step(np.zeros(6, np.uint8), f(), f(), f(), **kw)
    shared = f()
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq: buffers overlap"):
        _native.adamw_step(f(), f(), shared, shared, **kw)
    with pytest.raises(ValueError, match="out: expected 4 float16 elements"):
        _native.adamw_step(f(), f(), f(), f(), out=f(), out_dtype="float16", **kw)
    with pytest.raises(ValueError, match="grad: expected a buffer"):
        _native.adamw_step(f(), [0.0] * 4, f(), f(), **kw)


@pytest.mark.parametrize("level", LEVELS)
def test_forcing_an_unsupported_simd_level_raises(level):
    if LEVELS.index(level) <= LEVELS.index(_native.simd_level()):
        pytest.skip(f"this CPU supports {level}: nothing to refuse")
    with pytest.raises(ValueError, match="not supported by this CPU"):
        adamw_(**_valid(), **HYPER, simd=level)


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 17, 1000]), lr=st.sampled_from([1e-3, 0.1, 3e-5]), beta2=st.sampled_from([0.999, 0.95]),
       eps=st.sampled_from([1e-8, 1e-3]), wd=st.sampled_from([0.0, 0.01, 0.3]), seed=st.integers(0, 2**16))
def test_reference_adamw_is_torch_adamw_bitwise(n, lr, beta2, eps, wd, seed):
    """The fp32 path (reference_adamw_, what fp32 runs use) equals torch.optim.AdamW(foreach=False) in every
    bit, with its numbers held in reused 0-dim tensors rather than passed as Python floats."""
    from offload.adam import reference_adamw_
    ref = torch.randn(n, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=lr, betas=(0.9, beta2), eps=eps, weight_decay=wd, foreach=False)
    master, m, v = ref.detach().clone(), torch.zeros(n), torch.zeros(n)
    for i, g in enumerate(_grads(n, 6, torch.float32, seed)):
        ref.grad = g
        opt.step()
        reference_adamw_(master, g, m, v, lr=lr, betas=(0.9, beta2), eps=eps, weight_decay=wd, step=i + 1)
        assert torch.equal(master, ref.detach()) and torch.equal(m, opt.state[ref]["exp_avg"])
        assert torch.equal(v, opt.state[ref]["exp_avg_sq"])


def test_reference_adamw_allocates_nothing_in_the_steady_state():
    """After its first call on a thread (scratch buffers), an update allocates no host memory: no wrapped
    Python numbers, no casts of its scalars, no temporaries (every allocation event torch.profiler saw,
    those inside ops included)."""
    from offload.adam import reference_adamw_
    master, m, v = _state(4096, 0)
    g = _grads(4096, 1, torch.float32, 0)[0]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    reference_adamw_(master, g, m, v, step=1, **kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for step in range(2, 6):
            reference_adamw_(master, g, m, v, step=step, **kw)
    from host_overhead import memory_events
    assert memory_events(prof) == []
