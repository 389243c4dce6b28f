"""Command line: `offload train`, `timeline`, `plan` and `probe` (also as `python -m offload ...`). Errors in the
user's input print one line and exit 2, with no traceback."""
import argparse
import json
import logging
import math
import os
import sys
import time

from .errors import BudgetError, ConfigError, DistError
from .sizes import fmt_bytes, parse_size


def _train_parser(sub):
    p = sub.add_parser("train", help="fine-tune a Hugging Face model folder or a preset on a text file")
    p.add_argument("--model", required=True, help="a Hugging Face model folder, or a preset: tiny, 1b, 3b, 7b, 13b, 70b")
    p.add_argument("--data", required=True, help="a .txt file or a .jsonl file with a 'text' field per line")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps to run (default: one epoch)")
    g.add_argument("--epochs", type=float, help="passes over the data")
    p.add_argument("--save", required=True, help="output directory: checkpoint/, final/ (save_pretrained), train.log")
    p.add_argument("--resume", action="store_true", help="continue from SAVE/checkpoint")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="train rank-R LoRA adapters on every linear layer of the blocks (needs peft); the base "
                        "stays frozen and final/ holds the adapters in peft's format")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch and rank (default 4)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=None, help="global gradient-norm clipping")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--gpu-memory", default=None, help="compute-device budget, e.g. 24GiB (default: planned)")
    p.add_argument("--cpu-memory", default=None, help="CPU budget, e.g. 64GiB (default: planned)")
    p.add_argument("--nvme", nargs="*", default=None, help="directories for the disk tier (striped)")
    p.add_argument("--activations", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=None, help="write a Chrome trace of the run here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def _load_model(name, seq, seed):
    """(model on the meta device, tokenizer, weights source): a folder's shards are read by the engine unit by
    unit (Note [meta loading] in weights.py), so a folder larger than host memory can be trained."""
    import torch
    from .weights import Folder, RandomInit
    if os.path.isdir(name):
        from .model_config import load_config
        config = load_config(name)          # unknown architectures are refused here, by model_type
        weights = Folder(name)              # no shards, pickled weights only: refused here
        config._name_or_path = os.path.abspath(name)    # adapters saved later name their base model
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ConfigError(f"--model {name}: model_type {config.model_type!r} has no causal language-model "
                              f"head in transformers ({str(e).splitlines()[0][:120]})") from None
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--model {name}: no usable tokenizer in the folder ({str(e).splitlines()[0][:160]})") from None
        return model, tok, weights
    from transformers import LlamaForCausalLM
    from .data import ByteTokenizer
    from .presets import preset_config
    with torch.device("meta"):
        model = LlamaForCausalLM(preset_config(name, max_seq=max(seq, 128)))
    return model, ByteTokenizer(), RandomInit(seed=seed)


def cmd_train(args):
    import torch
    from tqdm import tqdm

    import offload
    from .data import pack, read_documents
    from .shard import init_from_env

    # Under torchrun: one process per rank, each on its own slice of every batch; rank 0 reports and logs.
    init_from_env(args.device.split(":")[0] if args.device else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = _rank_and_world()
    os.makedirs(args.save, exist_ok=True)
    log_path = os.path.join(args.save, "train.log")
    if rank == 0:
        logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("offload.train")
    torch.manual_seed(args.seed)
    docs, bad = read_documents(args.data)
    if bad and rank == 0:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        print(f"offload: skipped {len(bad)} bad lines in {args.data} (lines {shown})", file=sys.stderr)
        log.info("skipped %d bad lines: %s", len(bad), bad)
    model, tok, weights = _load_model(args.model, args.seq, args.seed)
    vocab = model.get_input_embeddings().num_embeddings
    rows = pack(docs, tok, args.seq)
    if int(rows.max()) >= vocab:
        raise ConfigError(f"the tokenizer produces id {int(rows.max())} but the model's vocabulary has {vocab} "
                          f"entries: tokenizer and model do not match")
    if args.lora is not None:
        from .lora import apply_lora
        model = apply_lora(model, args.lora)
    micro_per_epoch = rows.shape[0] // (args.batch * world)
    if micro_per_epoch == 0:
        raise ConfigError(f"--data holds {rows.shape[0]} sequences of {args.seq} tokens, fewer than one batch of "
                          f"{args.batch} for each of {world} ranks; lower --batch or --seq")
    steps = args.steps or max(1, int(math.ceil((args.epochs or 1.0) * micro_per_epoch / args.grad_accum)))
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    eng = offload.engine(model, optimizer=offload.AdamW(lr=args.lr, weight_decay=args.weight_decay),
                         device=args.device, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                         nvme=args.nvme, grad_accum=args.grad_accum, clip_grad_norm=args.clip,
                         activations=args.activations, trace=_rank_path(args.trace, rank),
                         weights=weights)
    say = print if rank == 0 else (lambda *a, **k: None)
    with eng:
        say(eng.plan)
        log.info("plan:\n%s", eng.plan)
        ckpt = os.path.join(args.save, "checkpoint")
        start = 0
        if args.resume:
            eng.load(ckpt)
            start = eng.steps_applied + eng.steps_skipped
            say(f"offload: resumed from {ckpt} at step {start}")
        gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(rows.shape[0], generator=gen)
        tokens_per_step = args.batch * args.seq * args.grad_accum * world
        t_fwd = t_bwd = t_step = 0.0
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(total=steps, initial=start, disable=args.no_progress or rank != 0, unit="step", dynamic_ncols=True)
        for step in range(start, steps):
            loss_sum = 0.0
            for k in range(args.grad_accum):
                i = (step * args.grad_accum + k) % micro_per_epoch
                first = (i * world + rank) * args.batch     # this rank's slice of the global batch
                batch = rows[order[first:first + args.batch]]
                a = time.perf_counter()
                # HF causal LMs shift labels inside: labels are the inputs themselves.
                out = eng(input_ids=batch[:, :-1], labels=batch[:, :-1])
                b = time.perf_counter()
                eng.backward(out.loss)
                c = time.perf_counter()
                t_fwd += b - a
                t_bwd += c - b
                loss_sum += float(out.loss.detach()) / args.grad_accum
            a = time.perf_counter()
            eng.step()
            t_step += time.perf_counter() - a
            if eng.comm is not None:   # the global batch's loss, as one process would report it
                loss_sum = eng.comm.all_sum([loss_sum], "the step's loss")[0] / world
            losses.append(loss_sum)
            elapsed = time.perf_counter() - t0
            tps = (step - start + 1) * tokens_per_step / elapsed
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tps:.0f}",
                            gpu=fmt_bytes(eng.plan.bytes["gpu"]), cpu=fmt_bytes(eng.plan.bytes["cpu"]),
                            nvme=fmt_bytes(eng.plan.bytes["nvme"]))
            bar.update(1)
            log.info("step %d loss %.6f tokens/s %.1f", step + 1, loss_sum, tps)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
                eng.save(ckpt)
                log.info("checkpoint %s at step %d", ckpt, step + 1)
        bar.close()
        eng.save(ckpt)
        final = os.path.join(args.save, "final")
        eng.save_pretrained(final)
        if rank != 0:
            return 0
        wall = time.perf_counter() - t0
        ran = steps - start
        summary = {
            "steps": ran, "tokens": ran * tokens_per_step, "wall_s": round(wall, 3),
            "tokens_per_s": round(ran * tokens_per_step / wall, 1) if wall else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "time_s": {"forward": round(t_fwd, 3), "backward": round(t_bwd, 3), "step": round(t_step, 3)},
            "model_state_bytes": dict(eng.plan.bytes), "moved_bytes": dict(eng.tiers.moved),
            "steps_skipped": eng.steps_skipped, "ranks": world,
        }
        print("\nwhere bytes and time went:")
        print("  model state: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in eng.plan.bytes.items()))
        print("  moved: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in eng.tiers.moved.items()))
        print(f"  time: forward {t_fwd:.2f} s, backward {t_bwd:.2f} s, optimizer wait {t_step:.2f} s, "
              f"total {wall:.2f} s ({summary['tokens_per_s']} tokens/s)")
        if losses:
            print(f"  loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {ran} steps")
        print(f"  checkpoint: {ckpt}\n  model: {final}\n  log: {log_path}")
        with open(os.path.join(args.save, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _rank_and_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_path(path, rank):
    """Rank 0 writes PATH, rank r PATH with .rank<r> before its extension (each process traces its own run)."""
    if path is None or rank == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"


def _timeline_parser(sub):
    p = sub.add_parser("timeline", help="summarise and draw a trace written with --trace / trace=PATH")
    p.add_argument("trace", help="a trace file (Chrome trace-event JSON); a truncated one is read up to its last event")
    p.add_argument("-o", "--output", default="timeline.png", help="PNG to draw (default timeline.png)")
    p.add_argument("--html", default=None, help="also write a self-contained HTML page with a step selector")
    p.add_argument("--step", type=int, default=None, help="draw only this step's spans (events with args.step)")
    p.set_defaults(func=cmd_timeline)


def cmd_timeline(args):
    from . import timeline

    events = timeline.load_trace(args.trace)
    if args.step is not None:  # fail on a wrong --step before printing anything
        timeline.select_step(timeline.spans(events), args.step)
    meta = timeline.load_meta(args.trace)
    summary = timeline.summarize(events, meta)
    print(timeline.format_summary(summary))
    timeline.draw_png(events, args.output, step=args.step)
    print(f"\nwrote {args.output}")
    if args.html:
        timeline.write_html(events, args.html, meta)
        print(f"wrote {args.html}")
    return 0


def _plan_parser(sub):
    p = sub.add_parser("plan", help="place a model's state on a machine and predict the step time, from its config alone")
    p.add_argument("--model", required=True, help="a Hugging Face model folder or a bare config.json (no weights needed)")
    p.add_argument("--gpu-memory", default=None, help="device budget, e.g. 24GiB (default: the profile's gpu_memory_bytes)")
    p.add_argument("--cpu-memory", default=None, help="CPU budget, e.g. 768GiB (default: the profile's cpu_memory_bytes)")
    p.add_argument("--nvme", nargs="*", default=None, help="directories for the disk tier (default: the profile's nvme_paths)")
    p.add_argument("--machine", default=None, help="a profile written by `offload probe` (or one describing other hardware)")
    p.add_argument("--batch", type=int, default=None, help="sequences per micro-batch (with --seq: predicts compute too)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the config's context length)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=None, help="global gradient-norm clipping (as train --clip: it "
                                                             "keeps every unit's AdamW on the CPU)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the compute device (default cuda)")
    p.add_argument("--ranks", type=int, default=1, help="processes the model is sharded over (torchrun): the "
                                                         "budgets are each rank's, the plan is one rank's share")
    p.set_defaults(func=cmd_plan)


def _budget(value, prof, key, flag):
    if value is not None:
        return parse_size(value, flag)
    if prof.get(key):
        return int(prof[key])
    raise ConfigError(f"{flag} is required (or a --machine profile with {key})")


def plan_from_args(args):
    """The plan `offload plan` prints: plan.engine_placement (through plan_for_batch with --batch), the
    function offload.engine() places with, so it is the plan a run with these budgets gets. Returns (Plan,
    ActivationPlan or None, ModelShape, rates, config, itemsize, units)."""
    from . import plan as planmod
    from .groups import split_units
    from .model_config import build_meta_model, load_config, model_shape
    from .probe import load_profile

    if args.batch is not None and args.batch < 1 or args.grad_accum < 1 or (args.seq is not None and args.seq < 1) \
            or args.ranks < 1:
        raise ConfigError("--batch, --seq, --grad-accum and --ranks must be positive")
    prof = load_profile(args.machine) if args.machine else {}
    gpu_b = _budget(args.gpu_memory, prof, "gpu_memory_bytes", "--gpu-memory")
    cpu_b = _budget(args.cpu_memory, prof, "cpu_memory_bytes", "--cpu-memory")
    nvme = args.nvme if args.nvme is not None else (prof.get("nvme_paths") or None)
    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[args.dtype]
    config = load_config(args.model)
    model = build_meta_model(config)
    units = split_units(model, shards=args.ranks)
    shape = model_shape(model, units, args.seq)
    rates = dict(planmod.DEFAULT_RATES, **{k: v for k, v in prof.items() if v is not None})
    kw = dict(itemsize=itemsize, device=args.device, gpu_budget=gpu_b, cpu_budget=cpu_b, nvme=nvme,
              grad_accum=args.grad_accum, activations="auto", rates=rates, eager=args.clip is None,
              shards=args.ranks, sharded=args.ranks > 1)
    if args.batch is None:
        plan, act = planmod.engine_placement(units, **kw), None
    else:
        plan, act = planmod.plan_for_batch(units, shape, args.batch, micro_batches=args.grad_accum, **kw)
        for u in plan.units:
            if u.activations != "keep":
                u.activations = act.policy
    return plan, act, shape, rates, config, itemsize, units


def cmd_plan(args):
    from . import plan as planmod

    plan, act, shape, rates, config, itemsize, units = plan_from_args(args)
    print(f"model: {config.model_type}, {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden "
          f"{shape.hidden}, {shape.heads} heads, vocab {shape.vocab}), {args.dtype}")
    if act is None or not rates.get("gpu_tflops"):
        plan.predicted_step_s, plan.bottleneck, plan.resource_s = planmod.predict_state_traffic(
            units, plan.units, itemsize, rates)
        print(plan)
        print("compute not priced: " + ("pass --batch (and --seq)" if act is None else "the profile has no gpu_tflops"))
        return 0
    tokens = args.batch * shape.seq * args.grad_accum
    pred = plan.predict(tokens, rates, shape, act, micro_batches=args.grad_accum)
    print(plan)
    eff = rates.get("compute_efficiency", planmod.COMPUTE_EFFICIENCY)
    print(f"activations: {act.policy}, device reserve {fmt_bytes(act.device_bytes)}"
          + (f", block inputs in host memory {fmt_bytes(act.host_bytes)} ({fmt_bytes(act.host_room)} pinned)"
             if act.host_bytes else ""))
    print(f"step of {tokens:,} tokens ({args.batch} x {shape.seq} x {args.grad_accum} micro-batches), "
          f"per resource (they overlap):")
    notes = {"gpu": f"{pred.hardware_flops / 1e12:,.0f} TFLOP at {rates['gpu_tflops']:.1f} TFLOPS x {eff:.2f}",
             "pcie": f"at {rates['pcie_gb_s']:.1f} GB/s", "disk": "at "
             + (f"{rates['disk_read_gb_s']:.1f} GB/s read, {rates['disk_write_gb_s']:.1f} GB/s write"
                if rates.get("disk_read_gb_s") and rates.get("disk_write_gb_s") else f"{rates['disk_gb_s']:.1f} GB/s"),
             "cpu_adam": f"at {rates['cpu_adam_gparams_s']:.2f} G elements/s, sharing host memory with the "
                         f"optimizer's copies"}
    for k, v in pred.resource_s.items():
        print(f"  {k:<9}{v:>10.3f} s  {notes[k]}")
    if pred.cpu_start_s:
        print(f"  the CPU AdamW starts {pred.cpu_start_s:.3f} s into the step, when the first gradients it updates "
              f"land in backward: {pred.cpu_start_s + pred.resource_s['cpu_adam']:.3f} s")
    print(f"predicted step {pred.step_s:.3f} s, bound by {pred.bottleneck}: {tokens / pred.step_s:,.0f} tokens/s, "
          f"{pred.model_tflops:.1f} model TFLOPS (6NT + attention), {pred.hardware_tflops:.1f} with recompute")
    return 0


def _probe_parser(sub):
    p = sub.add_parser("probe", help="measure this machine (memory, AdamW, disks, PCIe, GPU) into a profile")
    p.add_argument("--nvme", nargs="*", default=[], help="directories to measure disk rates on (a temporary file each)")
    p.add_argument("-o", "--output", default="machine.json", help="profile to write (default machine.json)")
    p.add_argument("--quick", action="store_true", help="smaller buffers: a rough profile in seconds")
    p.set_defaults(func=cmd_probe)


def cmd_probe(args):
    from .probe import probe

    prof, rows = probe(args.nvme, quick=args.quick)
    width = max(len(w) for w, _ in rows)
    for what, value in rows:
        print(f"{what:<{width}}  {value}")
    with open(args.output, "w") as f:
        json.dump(prof, f, indent=1)
    print(f"\nmeasured in {prof['probe_s']:.1f} s; wrote {args.output}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="offload", description="Fine-tune models larger than GPU memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _timeline_parser(sub)
    _plan_parser(sub)
    _probe_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, BudgetError) as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except DistError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
