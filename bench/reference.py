"""The reference workload, side by side in one run: offload, DeepSpeed ZeRO-3 CPU offload, plain PyTorch.

LLaMA-shaped 3.37B (hidden 3072, intermediate 8192, 28 layers, 24 heads, vocab 32000), bf16, seq 2048,
micro-batch 4, AdamW, GPU capped at --gpu-cap GiB with torch.cuda.set_per_process_memory_fraction.
Each system runs in its own process (clean GPU and host memory); rows share one run id. Recorded with
bench/record.py: step_s (median of the steps after warm-up), tokens_per_s, model_tflops (6 N T +
attention, no recompute), peak_gpu_gib, host_rss_gib, floors from rates measured in this run.

  python bench/reference.py --systems offload,pytorch,deepspeed --steps 8 --warmup 2
  python bench/reference.py --systems offload --cpu-memory 16GiB --nvme /tmp/offload-nvme --bench reference-3.37b-nvme

--device cpu runs the offload worker on the CPU (tiny sizes: how CI tests the scripts built on this one);
--weights random builds the model on the meta device and lets the engine initialise it (RandomInit), so
the host never holds a whole-model copy. A worker killed by --timeout still leaves a row: status "timeout"
with the steps it finished.

Note [step timing]: a training loop reads its loss every step (to log it), which waits for the stream that
computed it and nothing else; work the step left on other streams and threads (offload's CPU AdamW and its
device-side AdamW's state copies) goes on under the next forward, which waits unit by unit for exactly the
updates it needs. --timing loss (the default since 2026-12-02) times that loop: a step lasts from one loss
read to the next. Every system is timed the same way; GPU-resident PyTorch and DeepSpeed leave nothing
behind a step, so for them it is the same as synchronising. window_step_s checks the median: the mean over
the timed steps from the first one's start to a full synchronisation after the last, with offload's queued
updates drained, so a backlog carried past the window is paid inside it (the first timed step starts with
the last warm-up step's backlog, so the window errs long by at most one backlog). --timing device (every
row before 2026-12-02's fourth session) synchronises the whole device around every step, which forbids
that overlap.
"""
import argparse
import faulthandler
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


# Planner switches the offload worker can set (flag, offload.plan constant, its type): the CPU/device AdamW
# split (a sweep), Note [device states after the first step], Note [device-tier update at landing].
PLAN_SWITCHES = (("device_update_share", "DEVICE_UPDATE_SHARE", float),
                 ("promote_arena_units", "PROMOTE_ARENA_UNITS", bool),
                 ("device_tier_at_landing", "DEVICE_TIER_AT_LANDING", bool))


def model_config(a):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                       max_position_embeddings=a.seq, tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa")


def n_params(a):
    h, i, L, v = a.hidden, a.inter, a.layers, a.vocab
    return L * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def rank_world():
    """(rank, world size) of this worker: torchrun's environment, (0, 1) without one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def step_tokens(a):
    """Tokens of one optimizer step: micro-batch x sequence x micro-batches accumulated."""
    return a.mb * a.seq * getattr(a, "grad_accum", 1)


def model_flops(a):
    tokens = step_tokens(a)
    return 6 * n_params(a) * tokens + 12 * a.layers * a.hidden * a.seq * tokens


def build(a, dtype):
    """The model with offload's seeded RandomInit weights, the same for every system. Built on the meta device
    and filled here: transformers' own initialiser draws 3.4B normals one at a time on the CPU, over two
    minutes on the GPU machine, which ate the workers' time limits."""
    import torch
    from transformers import LlamaForCausalLM
    from offload.weights import RandomInit, materialise_buffers
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config(a))
    init = RandomInit()
    for name, p in list(model.named_parameters()):   # a tied tensor once, under its first name (as the engine)
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path)
        data = init.values(name, p, owner).view(p.shape).to(dtype)
        owner._parameters[attr] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    model.tie_weights()   # a tied weight's other owners still hold the meta tensor: tying points them here
    materialise_buffers(model, init)
    return model


def _sync(a):
    import torch
    if a.device == "cuda":
        torch.cuda.synchronize()


def peak_rss_gib():
    """Peak resident set of this process (VmHWM), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def batches(a, device):
    import torch
    g = torch.Generator().manual_seed(1 + 1000 * rank_world()[0])   # each rank its own data
    rows = a.mb * getattr(a, "grad_accum", 1)     # a step's micro-batches, stacked
    return [torch.randint(0, a.vocab, (rows, a.seq), generator=g).to(device) for _ in range(4)]


def cap_gpu(a):
    import torch
    if a.device != "cuda":
        return
    dev = torch.cuda.current_device()      # a rank's own GPU under torchrun
    total = torch.cuda.get_device_properties(dev).total_memory
    if a.gpu_cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_cap * 2**30 / total), dev)


def steady_state_counters():
    """Counters whose growth over steady-state steps means per-step allocation: cudaMalloc'd segments of
    the caching allocator, its allocation requests, live Python blocks and tensors."""
    import gc
    import torch
    st = torch.cuda.memory_stats()
    gc.collect()
    return {"cuda_segments": st.get("segment.all.allocated", 0),
            "cuda_alloc_requests": st.get("allocation.all.allocated", 0),
            "python_blocks": sys.getallocatedblocks(),
            "live_tensors": sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))}


def timed_steps(a, step_fn, counters=None, drain=None, window=None):
    """Times warm-up + steps; with counters (a dict), fills it with the growth of steady_state_counters()
    per timed step. --timing (Note [step timing]): "loss" takes each step's time between the moments its
    loss is read (a host sync on the stream that computed it, as a loop that logs the loss makes), "device"
    synchronises the whole device before and after every step. window (a dict): gets the timed steps' mean
    from the first one's start to a full sync (and drain(): the engine's queued updates) after the last."""
    times, losses = [], []
    data = batches(a, a.device)
    if a.same_batch:      # one batch every step: the loss must fall (bench/scale.py checks that it does)
        data = data[:1]
    counters = counters if a.device == "cuda" else None
    per_step_sync = getattr(a, "timing", "device") == "device"
    t = None
    for i in range(a.warmup + a.steps):
        if per_step_sync or t is None:
            _sync(a)
            t = time.perf_counter()
        if i == a.warmup:
            # With "loss" timing nothing is drained here: the first timed step starts with the backlog the
            # last warm-up step left, as every later one does (drained, it ran 0.52 s against 0.68 s). The
            # window then also pays that backlog once: it errs long.
            if counters is not None:
                before = steady_state_counters()
            t = t_window = time.perf_counter()
        loss = step_fn(data[i % len(data)])
        if per_step_sync:
            _sync(a)
        losses.append(float(loss))
        now = time.perf_counter()
        times.append(now - t)
        t = now
        if rank_world()[0] == 0:
            print(f"  step {i}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
    if a.steps:
        _sync(a)
        if drain is not None:
            drain()
        if window is not None:
            window["window_step_s"] = (time.perf_counter() - t_window) / a.steps
    if counters is not None and a.steps:
        after = steady_state_counters()
        counters.update({k: (after[k] - before[k]) / a.steps for k in after})
    return times[a.warmup:], losses


def run_offload(a):
    import torch
    import offload
    from offload.plan import state_traffic_bytes
    cap_gpu(a)
    from offload.shard import init_from_env
    init_from_env(a.device)      # under torchrun: the process group the engine shards over (gloo / NCCL)
    from offload import plan as plan_mod
    for flag, constant, kind in PLAN_SWITCHES:
        if getattr(a, flag) is not None:
            setattr(plan_mod, constant, kind(getattr(a, flag)))
    weights = None
    if a.weights == "random":
        from transformers import LlamaForCausalLM
        from offload.weights import RandomInit
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config(a))
        weights = RandomInit()
    else:
        model = build(a, torch.bfloat16 if a.device == "cuda" else torch.float32)
    activations, overrides = _policy(a.activations), batch_overrides(a, model)
    if overrides:           # what `offload plan --batch` says a run of this batch needs
        print(f"batch plan: engine(..., activations={overrides['activations']!r}, "
              f"overrides={overrides['overrides']})", flush=True)
        activations = overrides["activations"]
    t = time.perf_counter()
    eng = offload.engine(model, optimizer=offload.AdamW(lr=a.lr, weight_decay=0.0), gpu_memory=f"{a.gpu_cap}GiB",
                         cpu_memory=a.cpu_memory, nvme=a.nvme, activations=activations,
                         trace=a.trace, device=a.device, weights=weights, grad_accum=a.grad_accum,
                         overrides=overrides and overrides["overrides"])
    setup_s = time.perf_counter() - t
    print(eng.plan, flush=True)
    print(f"setup {setup_s:.1f} s", flush=True)
    moved_setup = dict(eng.tiers.moved)

    def step(x):     # grad_accum micro-batches of x's rows, then one optimizer step
        for xs in x.chunk(a.grad_accum):
            out = eng(input_ids=xs, labels=xs)
            eng.backward(out.loss)
        eng.step()
        return out.loss.detach()
    growth, window = {}, {}
    times, losses = timed_steps(a, step, growth, drain=eng.sync, window=window)
    eng.sync()
    print(eng.plan, flush=True)   # again: "auto" writes its per-block choice after the first step
    extra = {**window, "batch_overrides": overrides, "act_plan": [n for n in eng.plan.notes if n.startswith("activations")], "setup_s": round(setup_s, 1),
             "steady_state_growth_per_step": growth, "plan_bytes": eng.plan.bytes, "moved": eng.tiers.moved,
             "moved_steps": {k: v - moved_setup.get(k, 0) for k, v in eng.tiers.moved.items()},
             "predicted_step_s": eng.plan.predicted_step_s, "bottleneck_planned": eng.plan.bottleneck,
             "adam_host_elems": state_traffic_bytes(eng.units, eng.plan.units, eng.plan.itemsize)["adam_elems"]}
    eng.close()
    return times, losses, extra


def batch_overrides(a, model):
    """Where this batch's activations need more of the device than the share the engine keeps for them without
    knowing the batch, or host room for block inputs (plan.plan_for_batch, as `offload plan --batch` prints
    it): {"activations": the policy that plan picked, "overrides": what it adds to engine()'s overrides};
    else None (the engine's own defaults)."""
    if a.device != "cuda" or a.activations != "auto":
        return None
    import torch
    from offload import plan as planmod
    from offload.groups import split_units
    from offload.machine import machine_rates
    from offload.model_config import model_shape
    from offload.sizes import parse_size
    world = rank_world()[1]     # each rank plans its share, as the engine does: the same plan on every rank
    units = split_units(model, shards=world)
    budget = int(a.gpu_cap * 2**30)
    plan, act = planmod.plan_for_batch(
        units, model_shape(model, units, a.seq), a.mb, micro_batches=a.grad_accum, rates=machine_rates(torch.device("cuda", torch.cuda.current_device()), room=budget), itemsize=2,
        device="cuda", gpu_budget=budget, cpu_budget=parse_size(a.cpu_memory, "cpu_memory") if a.cpu_memory else None,
        nvme=a.nvme, grad_accum=a.grad_accum, activations="auto", shards=world, sharded=world > 1)
    if not plan.batch_overrides:
        return None
    return {"activations": act.policy, "overrides": plan.batch_overrides}


def _policy(text):
    """--activations: a policy name, or a float (the token-wise split fraction)."""
    try:
        return float(text)
    except ValueError:
        return text


def run_pytorch(a):
    import torch
    model = build(a, torch.float32).cuda()
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0, fused=True)

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()
    window = {}
    return (*timed_steps(a, step, window=window), window)


def run_deepspeed(a):
    import deepspeed
    import torch
    cap_gpu(a)
    model = build(a, torch.bfloat16)
    model.gradient_checkpointing_enable()
    nvme = a.nvme[0] if a.nvme else None
    opt_dev = {"device": "nvme", "nvme_path": nvme, "pin_memory": True} if nvme else {"device": "cpu", "pin_memory": True}
    cfg = {"train_micro_batch_size_per_gpu": a.mb, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": a.lr, "weight_decay": 0.0}},
           "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                 "offload_optimizer": opt_dev},
           "steps_per_print": 10**9}
    if nvme:
        cfg["aio"] = {"block_size": 1048576, "queue_depth": 16, "thread_count": 1, "single_submit": False,
                      "overlap_events": True}
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

    def step(x):
        out = eng(input_ids=x, labels=x)
        eng.backward(out.loss)
        eng.step()
        return out.loss.detach()
    window = {}
    return (*timed_steps(a, step, window=window), window)


def worker(a):
    import torch
    stacks_after = os.environ.get("OFFLOAD_STACKS_AFTER")
    if stacks_after:   # a worker about to be killed at its timeout first prints where every thread is
        faulthandler.dump_traceback_later(float(stacks_after), exit=False)
    fn = {"offload": run_offload, "pytorch": run_pytorch, "deepspeed": run_deepspeed}[a.worker]
    cuda = a.device == "cuda"
    rank, world = rank_world()
    if cuda:
        if world > 1:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.reset_peak_memory_stats()
    times, losses, extra = fn(a)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    res = {"system": a.worker, "times": times, "losses": losses, "peak_gpu_gib": peak,
           "host_rss_gib": peak_rss_gib(), **extra}
    if world > 1:   # the GPU peak of the fullest rank, host memory of them all (they share the host)
        import torch.distributed as dist
        figures = [None] * world
        dist.all_gather_object(figures, (peak, res["host_rss_gib"]))
        res.update(ranks=world, peak_gpu_gib=max(f[0] for f in figures),
                   host_rss_gib=sum(f[1] for f in figures))
    if rank == 0:   # one write: another rank's teardown messages share the pipe
        sys.stdout.write("RESULT " + json.dumps(res) + "\n")
        sys.stdout.flush()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def measure_rates(device="cuda", nvme=None, a=None):
    """Rates of this machine measured now: PCIe (pinned), bf16 GEMM, CPU AdamW (native), with `a` (the run's
    arguments) the model's own kernels (kernel_times), and with nvme the disk through offload's store on its
    first path (offload.probe.disk_profile: read and write, best over queue depths, and both at once). On
    the CPU only AdamW (and the disk), on a small buffer."""
    import torch
    r = {}
    if nvme:
        from offload.probe import disk_profile
        disk, _, direct = disk_profile(nvme[:1], (1024 if device == "cuda" else 16) << 20)
        r.update(disk, disk_o_direct=float(direct))   # 0: the page cache's rates, not the disk's
    if device != "cuda":
        from offload.probe import adam_native_rate, mem_bandwidth
        r["cpu_adam_gparams_s"] = adam_native_rate(1 << 20)    # no GPU: no PCIe or GEMM rate, no such floors
        r["mem_bw_gb_s"] = mem_bandwidth(16 << 20)
        return r
    n = 1 << 30
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, fn in (("h2d", lambda: d.copy_(h, non_blocking=True)), ("d2h", lambda: h.copy_(d, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        r[f"{name}_gb_s"] = 5 * n / (time.perf_counter() - t) / 1e9
    del h, d
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = x @ x
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
    r["gemm_tflops"] = 20 * 2 * m**3 / (time.perf_counter() - t) / 1e12
    del x, y
    from offload.probe import mem_bandwidth
    r["mem_bw_gb_s"] = mem_bandwidth(512 << 20)
    from offload.adam import adamw_
    k = 100_000_000
    p, mm, v = (torch.zeros(k) for _ in range(3))
    g = torch.randn(k).bfloat16()
    out = torch.empty(k, dtype=torch.bfloat16)
    adamw_(p, g, mm, v, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=1, out=out)
    t = time.perf_counter()
    for s in range(3):
        adamw_(p, g, mm, v, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=s + 2, out=out)
    r["cpu_adam_gparams_s"] = 3 * k / (time.perf_counter() - t) / 1e9
    r.update(host_mix_rates(p, g, mm, v, out))
    if a is not None:
        try:
            r.update(kernel_times(a))
            torch.cuda.empty_cache()   # the layer's memory goes back before the workers start
        except Exception as e:   # a transformers without these classes: the run goes on without this floor
            print(f"warning: the model's kernels could not be timed ({type(e).__name__}: {e}); no gpu_kernels_s "
                  f"floor in this run", file=sys.stderr, flush=True)
    return r


def kernel_times(a, device="cuda"):
    """Seconds this model's own kernels take on this GPU at the run's micro-batch, timed on one decoder layer
    and on the head: block_fwd_s (a forward that records autograd's graph, as a recompute also runs it),
    block_bwd_s (its backward), head_s (the final norm, LM head and loss, forward and backward, and the
    embedding's). The GEMM rate prices every FLOP at a large square matmul's speed, while attention, the
    norms and the elementwise kernels run slower: these make the tighter GPU floor (gpu_kernels_s)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama as ml
    cfg = model_config(a)
    dev, bf16 = torch.device(device), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    layer = ml.LlamaDecoderLayer(cfg, layer_idx=0).to(dev, bf16)
    pos = torch.arange(a.seq, device=dev).unsqueeze(0).expand(a.mb, -1)
    x = torch.randn(a.mb, a.seq, a.hidden, device=dev, dtype=bf16, requires_grad=True)
    cos_sin = ml.LlamaRotaryEmbedding(cfg).to(dev)(x, pos)

    def block():   # attention_mask None: causal SDPA, as the whole model runs it without padding
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out
    dy = torch.randn(a.mb, a.seq, a.hidden, device=dev, dtype=bf16)
    emb = torch.nn.Embedding(a.vocab, a.hidden).to(dev, bf16)
    norm = ml.LlamaRMSNorm(a.hidden, eps=cfg.rms_norm_eps).to(dev, bf16)
    lm = torch.nn.Linear(a.hidden, a.vocab, bias=False).to(dev, bf16)
    ids = torch.randint(0, a.vocab, (a.mb, a.seq), device=dev)

    def head():
        emb(ids).backward(dy)
        logits = lm(norm(x))
        F.cross_entropy(logits.float().view(-1, a.vocab), ids.view(-1)).backward()

    def seconds(fn, n=6):
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n
    def backward_seconds(n=6):   # each backward timed alone, after its own forward
        total = 0.0
        for i in range(n + 1):
            y = block()
            sync()
            t = time.perf_counter()
            y.backward(dy)
            sync()
            total += (time.perf_counter() - t) if i else 0.0   # the first warms up
        return total / n
    return {"block_fwd_s": seconds(block), "block_bwd_s": backward_seconds(), "head_s": seconds(head)}


def _rounded(rates):
    """Rates for a row or the log: two decimals, five below 1 (the kernel times, in seconds)."""
    return {k: round(v, 2 if v >= 1 else 5) for k, v in rates.items()}


def run_policy(a, res):
    """The activation policy offload's worker ran with: the batch plan's where it overrode --activations."""
    return (res.get("batch_overrides") or {}).get("activations", a.activations)


def recomputed_blocks(a, res, system):
    """Blocks whose forward runs twice a step: every layer under the gradient checkpointing that PyTorch and
    DeepSpeed run with here; for offload, what its activation plan says (act_plan, "recompute" and
    "recompute+offload" counts; a token-wise split's partial recompute counts as none, which keeps the floor
    a lower bound)."""
    import re
    if system != "offload":
        return a.layers
    if run_policy(a, res) in ("recompute", "recompute+offload"):
        return a.layers
    n = 0
    for note in res.get("act_plan") or []:
        counts = note.split("):", 1)[-1].split(";", 1)[0]
        n += sum(int(k) for name, k in re.findall(r"(\S+) (\d+)", counts) if name in ("recompute", "recompute+offload"))
    return n


def host_mix_rates(p, g, m, v, out, calls=12, nbytes=1 << 30):
    """Host memory under a step's mix of traffic: the native AdamW (`calls` updates of p's elements) on a
    thread while both PCIe directions copy pinned buffers back to back, as an offloaded step overlaps
    them. host_mix_gb_s: the bytes both moved per second (AdamW's ADAM_HOST_BYTES an element, every DMA
    byte); mix_adam_gparams_s and mix_dma_gb_s: each one's rate under the other's load."""
    import threading
    import torch
    from offload.adam import adamw_
    from offload.plan import ADAM_HOST_BYTES
    h_in, h_out = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    d_in, d_out = (torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    done, adam = threading.Event(), {}

    def run_adam():
        t0 = time.perf_counter()
        for s in range(calls):
            adamw_(p, g, m, v, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=s + 10, out=out)
        adam["s"] = time.perf_counter() - t0
        done.set()
    th = threading.Thread(target=run_adam)
    rounds = []   # end time of each round of copies both ways
    t = time.perf_counter()
    th.start()
    while not done.is_set():
        with torch.cuda.stream(up):
            d_in.copy_(h_in, non_blocking=True)
        with torch.cuda.stream(down):
            h_out.copy_(d_out, non_blocking=True)
        up.synchronize()
        down.synchronize()
        rounds.append(time.perf_counter())
    th.join()
    # only the rounds that ended while AdamW ran: the last one's tail ran without its load
    within = [r for r in rounds if r <= t + adam["s"]] or rounds[:1]
    dma, dma_s = 2 * nbytes * len(within), within[-1] - t
    adam_rate = calls * p.numel() / adam["s"]
    return {"host_mix_gb_s": (adam_rate * ADAM_HOST_BYTES + dma / dma_s) / 1e9,
            "mix_adam_gparams_s": adam_rate / 1e9, "mix_dma_gb_s": dma / dma_s / 1e9}


def floors(a, rates, moved=None, adam_elems=None, system="offload", recomputed=None):
    """Seconds per step each resource needs, from rates measured in this run. gpu_s: the FLOPs with one
    recomputed forward at the bf16 GEMM rate; gpu_kernels_s (where kernel_times ran): every layer's forward
    and backward, `recomputed` layers' forward again, and the head, at the times this model's own kernels
    took in this run, per micro-batch (the GPU's AdamW and copies left out, so it stays a lower bound). For a run that reports what it did (offload: moved, bytes each
    link carried over steps_total steps; adam_elems, elements the CPU AdamW updated a step) the floors are
    of that work: pcie_s the bytes each way over that way's rate, cpu_adam_s those elements at the native
    AdamW's rate, host_mem_s the host memory they touch (ADAM_HOST_BYTES an element, plus every byte DMA
    moves) at the host memory bandwidth: the largest that any mix reached in this run, a torch copy's, the
    native AdamW's (its rate x ADAM_HOST_BYTES) or AdamW and DMA at once (host_mix_rates); on the H200
    machine the copy measures ~80 GB/s, AdamW ~140, so the copy's would make a floor the run beats. The
    largest, so that the floor stays a lower bound whichever mix the step runs. Otherwise the work of ZeRO-3
    CPU offload: params in for forward and backward and gradients out (2 bytes each), AdamW of every
    parameter on the CPU. GPU-resident PyTorch has
    the GPU floor only. Not in `moved`, so not in these floors: activation swaps (runs that swap have
    floors too low by those bytes), while the one-off copy of states promoted after the first step is in
    it (pcie_s too high by that copy over steps_total)."""
    from offload.plan import ADAM_HOST_BYTES
    P = n_params(a)
    tokens = step_tokens(a)
    flops_recompute = 8 * P * tokens + 16 * a.layers * a.hidden * a.seq * tokens
    f = {}
    if rates.get("gemm_tflops"):
        f["gpu_s"] = flops_recompute / (rates["gemm_tflops"] * 1e12)
    if rates.get("block_fwd_s") is not None and recomputed is not None:
        f["gpu_kernels_s"] = getattr(a, "grad_accum", 1) * (
            a.layers * (rates["block_fwd_s"] + rates["block_bwd_s"]) + recomputed * rates["block_fwd_s"]
            + rates["head_s"])
    if system == "pytorch":
        return f
    steps = getattr(a, "steps_total", 1)
    as_run = bool(moved) and adam_elems is not None
    f["cpu_adam_s"] = (adam_elems if as_run else P) / (rates["cpu_adam_gparams_s"] * 1e9)
    if rates.get("h2d_gb_s") and rates.get("d2h_gb_s"):
        if as_run:
            f["pcie_s"] = max(moved["h2d"] / rates["h2d_gb_s"], moved["d2h"] / rates["d2h_gb_s"]) / 1e9 / steps
        else:
            f["pcie_s"] = 3 * 2 * P / (min(rates["h2d_gb_s"], rates["d2h_gb_s"]) * 1e9)
    if as_run and rates.get("mem_bw_gb_s"):
        dma = (moved["h2d"] + moved["d2h"]) / steps
        host_bw = max(rates["mem_bw_gb_s"], rates["cpu_adam_gparams_s"] * ADAM_HOST_BYTES, rates.get("host_mix_gb_s", 0))
        f["host_mem_s"] = (adam_elems * ADAM_HOST_BYTES + dma) / (host_bw * 1e9)
    if moved and (moved.get("disk_read") or moved.get("disk_write")) and rates.get("disk_gb_s"):
        # moved: bytes over the warm-up and timed steps (the worker's moved_steps, setup excluded)
        from offload.plan import disk_seconds   # the planner's formula: floor and prediction agree on it
        f["disk_s"] = disk_seconds(moved["disk_read"], moved["disk_write"], rates) / a.steps_total
    return f


def _json_or_none(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def run_worker(cmd, env, timeout, stream=False):
    """Runs a worker; returns (its stdout and stderr, whether it was killed at timeout seconds). stream: echo
    its lines as they come (long runs show progress); otherwise the caller prints the tail."""
    import threading
    env = dict(env, OFFLOAD_STACKS_AFTER=str(max(5, timeout - 15)))   # worker(): stacks before the kill
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if stream:
                print("  | " + line, end="", flush=True)
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.terminate()     # torchrun passes SIGTERM on to its ranks; SIGKILL would orphan them on the GPUs
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        timed_out = True
    t.join(timeout=10)
    out = "".join(lines)
    if timed_out:
        out += f"\nTIMEOUT after {timeout} s"
    return out, timed_out


def main(argv=None, extra=None, save=True):
    """Runs each of --systems in its own worker and records a row for each (extra: fields added to every
    row; save=False: the caller records them); returns the rows, a failed run's with its "status"."""
    p = argparse.ArgumentParser()
    p.add_argument("--systems", default="offload,pytorch,deepspeed")
    p.add_argument("--worker", default=None)
    p.add_argument("--bench", default="reference-3.37b")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--inter", type=int, default=8192)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mb", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (offload only)")
    p.add_argument("--ranks", type=int, default=1, help="processes under torchrun, one GPU each (offload, deepspeed); "
                   "--mb is per rank")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--gpu-cap", type=float, default=24)
    p.add_argument("--cpu-memory", default=None)
    p.add_argument("--nvme", nargs="*", default=None)
    p.add_argument("--activations", default="auto")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--trace", default=None)
    p.add_argument("--device-update-share", type=float, default=None,
                   help="offload: the share of arena-state AdamW run on the GPU instead of the planner's")
    p.add_argument("--promote-arena-units", type=int, default=None, choices=(0, 1),
                   help="offload: 0 keeps arena states on the host where the first step leaves device room")
    p.add_argument("--device-tier-at-landing", type=int, default=None, choices=(0, 1),
                   help="offload: 0 updates device-tier units at step() from an fp32 gradient buffer each")
    p.add_argument("--disk-gb-s", type=float, default=None, help="measured disk rate for the disk floor")
    p.add_argument("--timeout", type=int, default=900, help="seconds per system (its worker process)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: offload worker only, tiny sizes")
    p.add_argument("--weights", default="materialise", choices=("materialise", "random"),
                   help="random: build on the meta device and let the engine initialise (RandomInit)")
    p.add_argument("--measure-disk", action="store_true", help="measure the disk rate on --nvme in this run")
    p.add_argument("--rates", default=None, help="JSON of rates measured by the caller (skips measuring)")
    p.add_argument("--same-batch", action="store_true", help="train on one batch every step (the loss must fall)")
    p.add_argument("--stream", action="store_true", help="echo the workers' output as it comes")
    p.add_argument("--timing", default="loss", choices=("loss", "device"),
                   help="loss: a step ends when its loss is read (Note [step timing]); device: the whole device "
                        "is synchronised before and after every step")
    a = p.parse_args(argv)
    if a.grad_accum < 1 or a.grad_accum > 1 and set(a.systems.split(",") if not a.worker else [a.worker]) - {"offload"}:
        p.error("--grad-accum: a positive count, with --systems offload only")
    if a.ranks < 1 or a.ranks > 1 and "pytorch" in (a.systems.split(",") if not a.worker else [a.worker]):
        p.error("--ranks: a positive count; GPU-resident PyTorch runs on one GPU only")
    if a.worker:
        return worker(a)
    from record import record, run_id
    rates = json.loads(a.rates) if a.rates else measure_rates(a.device, a.nvme if a.measure_disk else None, a)
    if a.disk_gb_s:
        rates["disk_gb_s"] = a.disk_gb_s
    print("rates:", json.dumps(_rounded(rates)), flush=True)
    rows = []
    for system in a.systems.split(","):
        argv = sys.argv[1:] if argv is None else list(argv)
        keep = [x for i, x in enumerate(argv) if not (x.split("=")[0] in ("--systems", "--rates")
                                                      or (i and argv[i - 1] in ("--systems", "--rates")))]
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", system] + keep
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if a.ranks > 1:      # torchrun: a free rendezvous port of its own, one process per rank
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.ranks)]
            # torchrun would give each rank one OpenMP thread (DeepSpeed's CPU Adam, torch's CPU ops); a rank
            # gets its share of the cores instead, as one process gets them all
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.ranks)))
        elif system == "deepspeed":
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
        print(f"== {system}: {' '.join(cmd)}", flush=True)
        out, timed_out = run_worker(cmd, env, a.timeout, a.stream)
        if not a.stream:
            print("\n".join(out.splitlines()[-40:]), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"{a.bench}-{system}.log"), "w") as f:
                f.write(out)
        res = next((r for r in (_json_or_none(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")) if r),
                   None)
        if res is None:
            done = [l.split() for l in out.splitlines() if l.startswith("  step ")]   # "  step i: T s loss L"
            fail = ({**(extra or {}), "bench": a.bench, "system": system, "status": "timeout" if timed_out else "failed",
                    "error": out.strip().splitlines()[-1][:300] if out.strip() else "no output",
                    "timeout_s": a.timeout, "step_times": [float(d[2]) for d in done],
                    "losses": [float(d[5]) for d in done], "params_B": round(n_params(a) / 1e9, 3),
                    "cpu_memory": a.cpu_memory, "nvme": a.nvme, "mb": a.mb, "seq": a.seq,
                    **({"grad_accum": a.grad_accum} if a.grad_accum > 1 else {}),
                    **({"ranks": a.ranks} if a.ranks > 1 else {}),
                    "rates": _rounded(rates), "run": run_id()})
            rows.append(record(fail) if save else fail)
            continue
        a.steps_total = a.steps + a.warmup
        step_s = statistics.median(res["times"])
        tokens = step_tokens(a) * a.ranks
        # one rank's counters do not price a host that several ranks share (its AdamW cores, its memory):
        # several ranks get no floors rather than wrong ones
        fl = floors(a, rates, res.get("moved_steps") or res.get("moved"), res.get("adam_host_elems"), system,
                    recomputed_blocks(a, res, system)) if a.ranks == 1 else {}
        largest = max(fl, key=fl.get) if fl else None
        row = {"bench": a.bench, "system": {"deepspeed": "deepspeed-zero3-cpu-" + ("nvme" if a.nvme else "cpu"),
                                            "pytorch": "pytorch-gpu-resident"}.get(system, system),
               "run": run_id(), "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
               "model_tflops": round(model_flops(a) * a.ranks / step_s / 1e12, 1),
               "params_B": round(n_params(a) / 1e9, 3),
               "peak_gpu_gib": round(res["peak_gpu_gib"], 2), "host_rss_gib": round(res["host_rss_gib"], 2),
               "floor_s": round(fl[largest], 4) if fl else None,
               "bottleneck": largest.replace("_s", "") if fl else None,
               "measured_over_floor": round(step_s / fl[largest], 3) if fl else None,
               "floors": {k: round(v, 4) for k, v in fl.items()}, "rates": _rounded(rates),
               "losses": [round(x, 4) for x in res["losses"]], "step_times": [round(x, 3) for x in res["times"]],
               "gpu_cap_gib": a.gpu_cap if system != "pytorch" else None, "cpu_memory": a.cpu_memory,
               "activations": run_policy(a, res) if system == "offload" else None}
        row.update(mb=a.mb, seq=a.seq, nvme=a.nvme)
        if a.ranks > 1:
            row.update(ranks=a.ranks, tokens_per_s_per_gpu=round(tokens / a.ranks / step_s, 1))
        if a.grad_accum > 1:
            row["grad_accum"] = a.grad_accum
        if system == "offload":   # the planner switches the run set, as given
            row.update({flag: getattr(a, flag) for flag, _, _ in PLAN_SWITCHES if getattr(a, flag) is not None})
        row["timing"] = a.timing
        for k in ("window_step_s", "setup_s", "plan_bytes", "moved", "moved_steps", "predicted_step_s", "act_plan",
                  "steady_state_growth_per_step", "adam_host_elems", "batch_overrides"):
            if k in res:
                row[k] = res[k]
        if a.same_batch:
            row["loss_falling"] = all(math.isfinite(x) for x in res["losses"]) and all(
                y < x for x, y in zip(res["losses"], res["losses"][1:]))
        row = {**row, **(extra or {})}
        rows.append(record(row) if save else row)
        print(json.dumps(row), flush=True)
    rows_ok = [r for r in rows if "status" not in r]
    base = {r["system"]: r["step_s"] for r in rows_ok}
    if "offload" in base:
        for k, v in base.items():
            if k != "offload":
                print(f"offload vs {k}: {v / base['offload']:.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
