"""Out-of-memory on the compute device, turned into an error that says which budget to change.

The plan keeps the engine's own device bytes (resident model state, the streaming buffers) within gpu_memory
and leaves a share of it for activations; it cannot bound the activations of a batch nor memory that other
processes take. When the device runs out anyway, the user needs the numbers and the knob: gpu_memory (lower
it and the engine keeps less on the device), the activation policy, or the batch, and where to get a plan
made for that batch (`offload plan --batch`).
"""
import contextlib

import torch

from .errors import DeviceMemoryError
from .sizes import fmt_bytes


def _device_figures(device):
    """"PyTorch holds ... ; the device has ... free of ..." on CUDA, nothing elsewhere."""
    if device.type != "cuda":
        return ""
    alloc, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    try:
        free, total = torch.cuda.mem_get_info(device)
        dev = f"; {device} has {fmt_bytes(free)} free of {fmt_bytes(total)}"
    except RuntimeError:     # the query itself may fail right after an out-of-memory error
        dev = ""
    return f"; PyTorch holds {fmt_bytes(alloc)} allocated, {fmt_bytes(reserved)} reserved{dev}"


def device_memory_error(plan, device, phase, unit_name, act_reserve, cause):
    """A DeviceMemoryError for an out-of-memory `cause` raised in `phase` ("forward", "backward", "step")
    at or after unit `unit_name` (None: before the first unit)."""
    budget = plan.budgets.get("gpu")
    where = f"{phase}" + (f" at unit {unit_name}" if unit_name else "")
    cap = f"gpu_memory={fmt_bytes(budget)}" if budget is not None else "gpu_memory=unbounded"
    msg = (f"out of memory on {device} in {where}, under {cap}: the plan keeps {fmt_bytes(plan.bytes['gpu'])} "
           f"of model state and {fmt_bytes(plan.buffers.get('gpu_stream', 0))} of streaming buffers there and "
           f"leaves {fmt_bytes(act_reserve)} for activations{_device_figures(device)}. Activations or other "
           f"processes need more than is left: lower gpu_memory (the engine then keeps less on the device), use "
           f"activations='recompute', or a smaller batch; `offload plan --batch B --seq S` plans for this batch "
           f"and prints the activations= and overrides that fit it. ({cause})")
    return DeviceMemoryError(msg)


@contextlib.contextmanager
def device_memory_guard(engine, phase):
    """Re-raises a torch.OutOfMemoryError from inside the block as a DeviceMemoryError (cause chained)."""
    try:
        yield
    except DeviceMemoryError:
        raise
    except torch.OutOfMemoryError as e:
        # The unit acquired last locates a forward or backward failure; in step() it says nothing.
        unit = engine.streamer.current if phase != "step" else None
        raise device_memory_error(engine.plan, engine.device, phase, unit.name if unit else None,
                                  engine.act_reserve, str(e).splitlines()[0] if str(e) else type(e).__name__) from e
