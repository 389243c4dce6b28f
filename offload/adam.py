"""The native CPU AdamW on torch tensors: validation here, the math in csrc/adam*.cpp.

`adamw_` is one step of torch.optim.AdamW (foreach=False; amsgrad, maximize, capturable off) over flat,
contiguous CPU tensors, in place, with the GIL released. It reproduces torch's fp32 operations in torch's
order (see Note [adam exactness] in csrc/adam.h), so results agree with torch.optim.AdamW to the last ulp or
so; every SIMD level and thread count gives bitwise the same result.
"""
import threading

import torch

from . import _native

_scratch = threading.local()   # per thread: the worker's host updates and the caller's run side by side


def _buffer(name, n):
    """An fp32 buffer of n elements kept per thread under name (reference_adamw_'s denominator, its scaled
    gradient), so that a steady step allocates nothing: it grows to the largest unit updated there, the size
    the temporary had."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        setattr(_scratch, name, buf)
    return buf[:n]


SCALAR_SLOTS = 5


def host_scalar(slot, value, dtype=torch.float32):
    """value in a 0-dim CPU tensor of dtype (that of the tensor the op writes), one of SCALAR_SLOTS kept per
    thread and dtype, for an op that would take a Python number. Given a number, ops such as mul_/div_/add_
    wrap it in a new 0-dim tensor on every call (a host allocation per op, per unit, per step); a 0-dim
    tensor of another dtype is cast by a copy that allocates too. One of the op's own dtype enters as a CPU
    scalar with no copy (on CUDA read when the kernel is launched); torch casts a Python number to that
    dtype the same way before the arithmetic, so the result is bitwise the same. A slot is free again once
    the op has been issued. fp32 and fp64 only: a bf16/fp16 op computes with the double a Python number
    gives (CPU) or its fp32 rounding (CUDA), so a scalar rounded to its own dtype would differ."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"host_scalar: {dtype} would round the scalar before the op does")
    per_dtype = getattr(_scratch, "scalars", None)
    if per_dtype is None:
        per_dtype = _scratch.scalars = {}
    s = per_dtype.get(dtype)
    if s is None:
        s = per_dtype[dtype] = [torch.zeros((), dtype=dtype) for _ in range(SCALAR_SLOTS)]
    return s[slot].fill_(value)


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _bytes(t):
    # A uint8 view shares t's storage (bf16 included, which numpy cannot represent): the kernel writes in
    # place. detach() shares it too, so a parameter can be passed as is, as to torch.optim's kernels.
    return t.detach().view(torch.uint8).numpy()


def _check(t, name, dtypes, numel, problems):
    if not isinstance(t, torch.Tensor):
        problems.append(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        return
    if t.device.type != "cpu":
        problems.append(f"{name}: must be on the CPU, is on {t.device}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        problems.append(f"{name}: dtype {t.dtype} not supported (expected {allowed})")
    if not t.is_contiguous():
        problems.append(f"{name}: must be contiguous (an update to a .contiguous() copy would be lost)")
    if numel is not None and t.numel() != numel:
        problems.append(f"{name}: has {t.numel()} elements, master has {numel}")


def adamw_(master, grad, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, step, out=None, grad_scale=1.0,
           simd="auto"):
    """One AdamW step in place on master, exp_avg, exp_avg_sq; writes master.to(out.dtype) into out if given.

    master, exp_avg, exp_avg_sq: contiguous CPU float32 tensors of the same numel. grad: float32, bfloat16
    or float16, same numel; the update uses grad.float() * grad_scale. out: None or float32/bfloat16/float16
    (bf16/fp16 round to nearest even). step: torch's state["step"] after this update (1 on the first).
    simd: "auto" | "avx512" | "avx2" | "scalar"; a level the CPU lacks raises ValueError.
    Raises ValueError listing every offending tensor or value.
    """
    problems = []
    n = master.numel() if isinstance(master, torch.Tensor) else None
    _check(master, "master", (torch.float32,), None, problems)
    _check(exp_avg, "exp_avg", (torch.float32,), n, problems)
    _check(exp_avg_sq, "exp_avg_sq", (torch.float32,), n, problems)
    _check(grad, "grad", tuple(_DTYPE_NAMES), n, problems)
    if out is not None:
        _check(out, "out", tuple(_DTYPE_NAMES), n, problems)
    if len(betas) != 2:
        problems.append(f"betas: expected (beta1, beta2), got {betas!r}")
    if problems:
        raise ValueError("adamw_: " + "; ".join(problems))
    _native.adamw_step(
        _bytes(master), _bytes(grad), _bytes(exp_avg), _bytes(exp_avg_sq),
        lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=float(eps),
        weight_decay=float(weight_decay), step=int(step), grad_dtype=_DTYPE_NAMES[grad.dtype],
        out=None if out is None else _bytes(out),
        out_dtype="float32" if out is None else _DTYPE_NAMES[out.dtype],
        grad_scale=float(grad_scale), simd=simd)


def grad_sumsq(grad):
    """Sum of squares of a contiguous CPU float32/bfloat16/float16 tensor, in double; inf and nan propagate.

    For global-norm clipping (sqrt of the sum over all units) and non-finite detection. Releases the GIL.
    """
    problems = []
    _check(grad, "grad", tuple(_DTYPE_NAMES), None, problems)
    if problems:
        raise ValueError("grad_sumsq: " + "; ".join(problems))
    return _native.grad_sumsq(_bytes(grad), grad_dtype=_DTYPE_NAMES[grad.dtype])


def reference_adamw_(master, grad, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, step, out=None,
                     grad_scale=1.0):
    """torch.optim.AdamW's own single-tensor arithmetic (foreach=False), op for op, on flat tensors.

    The engine uses it for fp32 runs, where the promise is bitwise equality with torch.optim.AdamW: torch's
    CPU sqrt is not correctly rounded (Note [adam exactness] in csrc/adam.h), so the native kernel can
    differ by an ulp, and AdamW amplifies such differences on parameters whose gradients are mostly zero
    (rare embedding rows). Elementwise ops give the same bits on a flat buffer as per tensor.
    """
    beta1, beta2 = betas
    g = grad if grad.dtype == torch.float32 else grad.float()
    if grad_scale != 1.0:
        g = torch.mul(g, host_scalar(0, grad_scale, g.dtype), out=_buffer("scaled", g.numel()))
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    # torch's ops, in its order; the Scalar overloads (lerp_, addcmul_, addcdiv_) allocate nothing
    master.mul_(host_scalar(1, 1 - lr * weight_decay, master.dtype))
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(host_scalar(2, beta2, exp_avg_sq.dtype)).addcmul_(g, g, value=1 - beta2)
    denom = torch.sqrt(exp_avg_sq, out=_buffer("denom", exp_avg_sq.numel()))
    denom.div_(host_scalar(3, bias_correction2 ** 0.5, denom.dtype)).add_(host_scalar(4, eps, denom.dtype))
    master.addcdiv_(exp_avg, denom, value=-step_size)
    if out is not None:
        out.copy_(master)


def unit_adamw_(master, grad, exp_avg, exp_avg_sq, **kw):
    """The engine's CPU AdamW: torch's arithmetic when everything is fp32 (exact parity), the native
    vectorised kernel when gradients or outputs are half precision (the GPU-training case, where speed
    matters and bf16 rounding dominates any ulp)."""
    out = kw.get("out")
    if grad.dtype == torch.float32 and (out is None or out.dtype == torch.float32):
        reference_adamw_(master, grad, exp_avg, exp_avg_sq, **kw)
    else:
        adamw_(master, grad, exp_avg, exp_avg_sq, **kw)
