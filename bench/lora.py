"""LoRA on a large LLaMA-shaped preset through offload, bf16, on this machine's GPU: step time recorded.

The base model is built on the meta device and given seeded random weights unit by unit straight into its
tiers (offload.weights.RandomInit), so a model larger than host memory never exists in one piece; rank-R
adapters on every linear layer of the blocks are the only trained parameters (the base is streamed
read-only). --preset auto (the default) takes the largest preset whose plan fits this machine's GPU, host
memory (80% of what is available) and --nvme disks. Recorded with bench/record.py: step_s (median after
warm-up), tokens_per_s, model_tflops (4 N T: forward, and backward to the inputs only, since the frozen base
needs no weight gradients; adapters and attention not counted), params_B, peak_gpu_gib, host_rss_gib,
setup_s (random init into the tiers), the plan's bytes per tier.

  python bench/lora.py                                   # largest preset that fits RAM
  python bench/lora.py --nvme /mnt/nvme/offload          # RAM + disk
  python bench/lora.py --preset 13b --steps 4 --seq 2048
"""
import argparse
import os
import resource
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def meta_lora_model(name, rank, seq):
    import torch
    from transformers import LlamaForCausalLM
    from offload.lora import apply_lora
    from offload.presets import preset_config
    config = preset_config(name, max_seq=max(seq, 128))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return apply_lora(model, rank)


def fits(name, a, gpu_budget, cpu_budget):
    """The bf16 plan of preset `name` with LoRA on this machine, or None when it does not fit."""
    from offload.engine import ACTIVATION_SHARE
    from offload.errors import BudgetError
    from offload.groups import split_units
    from offload.plan import plan_placement
    units = split_units(meta_lora_model(name, a.rank, a.seq))
    try:
        plan = plan_placement(units, itemsize=2, device="cuda", gpu_budget=gpu_budget, cpu_budget=cpu_budget,
                              nvme=a.nvme, grad_accum=1, activations=a.activations,
                              act_reserve=int(gpu_budget * ACTIVATION_SHARE))
    except BudgetError:
        return None
    if plan.bytes["nvme"]:
        free = min(shutil.disk_usage(p).free for p in a.nvme) * len(a.nvme)
        if free < plan.bytes["nvme"] * 1.05:
            return None
    return plan


def pick_preset(a, gpu_budget, cpu_budget):
    from offload.presets import PRESETS, param_count, preset_config
    names = sorted((n for n in PRESETS if n != "tiny"), key=lambda n: -param_count(preset_config(n)))
    for name in names:
        if fits(name, a, gpu_budget, cpu_budget) is not None:
            return name
    raise SystemExit("no preset fits this machine's budgets; pass --nvme or a larger --cpu-memory")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="auto", help="1b, 3b, 7b, 13b, 70b or auto (largest that fits)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--mb", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--cpu-memory", default=None, help="host budget (default: 80%% of available memory)")
    p.add_argument("--gpu-memory", default=None, help="GPU budget (default: 90%% of free GPU memory)")
    p.add_argument("--nvme", nargs="*", default=None)
    p.add_argument("--activations", default="auto")
    p.add_argument("--trace", default=None)
    a = p.parse_args()
    import psutil
    import torch
    import offload
    from offload.presets import param_count, preset_config
    from offload.sizes import parse_size
    from offload.weights import RandomInit
    from record import record

    if not torch.cuda.is_available():
        raise SystemExit("bench/lora.py measures a GPU run; no CUDA device here")
    a.nvme = [os.path.abspath(x) for x in a.nvme] if a.nvme else None
    for d in a.nvme or ():
        os.makedirs(d, exist_ok=True)
    gpu_budget = parse_size(a.gpu_memory, "--gpu-memory") or int(torch.cuda.mem_get_info()[0] * 0.9)
    cpu_budget = parse_size(a.cpu_memory, "--cpu-memory") or int(psutil.virtual_memory().available * 0.8)
    name = pick_preset(a, gpu_budget, cpu_budget) if a.preset == "auto" else a.preset
    params = param_count(preset_config(name))
    print(f"preset {name}: {params / 1e9:.2f} B parameters, LoRA rank {a.rank}, bf16", flush=True)

    model = meta_lora_model(name, a.rank, a.seq)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t = time.perf_counter()
    eng = offload.engine(model, optimizer=offload.AdamW(lr=a.lr, weight_decay=0.0), dtype=torch.bfloat16,
                         gpu_memory=gpu_budget, cpu_memory=cpu_budget, nvme=a.nvme, activations=a.activations,
                         trace=a.trace, weights=RandomInit(seed=0))
    setup_s = time.perf_counter() - t
    print(eng.plan, flush=True)
    print(f"setup (random init into the tiers): {setup_s:.1f} s", flush=True)
    g = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().num_embeddings
    data = [torch.randint(0, vocab, (a.mb, a.seq), generator=g) for _ in range(2)]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    with eng:
        for i in range(a.warmup + a.steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            x = data[i % len(data)].cuda()
            out = eng(input_ids=x, labels=x)
            eng.backward(out.loss)
            eng.step()
            eng.sync()
            times.append(time.perf_counter() - t)
            losses.append(float(out.loss))
            print(f"  step {i}: {times[-1]:.2f} s loss {losses[-1]:.4f}", flush=True)
        moved, plan_bytes = dict(eng.tiers.moved), dict(eng.plan.bytes)
    step_s = statistics.median(times[a.warmup:])
    tokens = a.mb * a.seq
    row = {"bench": f"lora-{name}", "system": "offload", "step_s": round(step_s, 3),
           "tokens_per_s": round(tokens / step_s, 1), "model_tflops": round(4 * params * tokens / step_s / 1e12, 2),
           "params_B": round(params / 1e9, 3), "trainable_M": round(trainable / 1e6, 2), "rank": a.rank,
           "seq": a.seq, "mb": a.mb, "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "setup_s": round(setup_s, 1), "plan_bytes": plan_bytes, "moved": moved,
           "predicted_step_s": eng.plan.predicted_step_s, "bottleneck": eng.plan.bottleneck,
           "step_times": [round(x, 3) for x in times], "losses": [round(x, 4) for x in losses],
           "cpu_memory": cpu_budget, "nvme": bool(a.nvme)}
    print(record(row), flush=True)


if __name__ == "__main__":
    main()
