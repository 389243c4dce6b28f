"""Command line: `offload train` and `offload timeline` (also as `python -m offload ...`). Errors in the
user's input print one line and exit 2, with no traceback."""
import argparse
import json
import logging
import math
import os
import sys
import time

from .errors import BudgetError, ConfigError
from .sizes import fmt_bytes


def _train_parser(sub):
    p = sub.add_parser("train", help="fine-tune a Hugging Face model folder or a preset on a text file")
    p.add_argument("--model", required=True, help="a Hugging Face model folder, or a preset: tiny, 1b, 3b, 7b, 13b, 70b")
    p.add_argument("--data", required=True, help="a .txt file or a .jsonl file with a 'text' field per line")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps to run (default: one epoch)")
    g.add_argument("--epochs", type=float, help="passes over the data")
    p.add_argument("--save", required=True, help="output directory: checkpoint/, final/ (save_pretrained), train.log")
    p.add_argument("--resume", action="store_true", help="continue from SAVE/checkpoint")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (default 4)")
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


def _load_model(name, seq):
    import torch
    if os.path.isdir(name):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError("loading a model folder needs transformers: pip install transformers") from None
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            raise ConfigError(f"--model {name}: the folder has no weights (*.safetensors)")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--model {name}: {str(e).splitlines()[0]}") from None
        return model, tok
    from .data import ByteTokenizer
    from .presets import build_preset
    model, _ = build_preset(name, max_seq=max(seq, 128))
    return model, ByteTokenizer()


def cmd_train(args):
    import torch
    from tqdm import tqdm

    import offload
    from .data import pack, read_documents

    os.makedirs(args.save, exist_ok=True)
    log_path = os.path.join(args.save, "train.log")
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("offload.train")
    torch.manual_seed(args.seed)
    docs, bad = read_documents(args.data)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        print(f"offload: skipped {len(bad)} bad lines in {args.data} (lines {shown})", file=sys.stderr)
        log.info("skipped %d bad lines: %s", len(bad), bad)
    model, tok = _load_model(args.model, args.seq)
    vocab = model.get_input_embeddings().num_embeddings
    rows = pack(docs, tok, args.seq)
    if int(rows.max()) >= vocab:
        raise ConfigError(f"the tokenizer produces id {int(rows.max())} but the model's vocabulary has {vocab} "
                          f"entries: tokenizer and model do not match")
    micro_per_epoch = max(1, rows.shape[0] // args.batch)
    steps = args.steps or max(1, int(math.ceil((args.epochs or 1.0) * micro_per_epoch / args.grad_accum)))
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    eng = offload.engine(model, optimizer=offload.AdamW(lr=args.lr, weight_decay=args.weight_decay),
                         device=args.device, gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory,
                         nvme=args.nvme, grad_accum=args.grad_accum, clip_grad_norm=args.clip,
                         activations=args.activations, trace=args.trace)
    with eng:
        print(eng.plan)
        log.info("plan:\n%s", eng.plan)
        ckpt = os.path.join(args.save, "checkpoint")
        start = 0
        if args.resume:
            eng.load(ckpt)
            start = eng.steps_applied + eng.steps_skipped
            print(f"offload: resumed from {ckpt} at step {start}")
        gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(rows.shape[0], generator=gen)
        tokens_per_step = args.batch * args.seq * args.grad_accum
        t_fwd = t_bwd = t_step = 0.0
        t0 = time.perf_counter()
        losses = []
        bar = tqdm(total=steps, initial=start, disable=args.no_progress, unit="step", dynamic_ncols=True)
        for step in range(start, steps):
            loss_sum = 0.0
            for k in range(args.grad_accum):
                i = (step * args.grad_accum + k) % micro_per_epoch
                batch = rows[order[i * args.batch:(i + 1) * args.batch]]
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
        wall = time.perf_counter() - t0
        ran = steps - start
        summary = {
            "steps": ran, "tokens": ran * tokens_per_step, "wall_s": round(wall, 3),
            "tokens_per_s": round(ran * tokens_per_step / wall, 1) if wall else None,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "time_s": {"forward": round(t_fwd, 3), "backward": round(t_bwd, 3), "step": round(t_step, 3)},
            "model_state_bytes": dict(eng.plan.bytes), "moved_bytes": dict(eng.tiers.moved),
            "steps_skipped": eng.steps_skipped,
        }
        print("\nwhere bytes and time went:")
        print(f"  model state: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in eng.plan.bytes.items()))
        print(f"  moved: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in eng.tiers.moved.items()))
        print(f"  time: forward {t_fwd:.2f} s, backward {t_bwd:.2f} s, optimizer wait {t_step:.2f} s, "
              f"total {wall:.2f} s ({summary['tokens_per_s']} tokens/s)")
        if losses:
            print(f"  loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {ran} steps")
        print(f"  checkpoint: {ckpt}\n  model: {final}\n  log: {log_path}")
        with open(os.path.join(args.save, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0


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
    summary = timeline.summarize(events)
    print(timeline.format_summary(summary))
    timeline.draw_png(events, args.output, step=args.step)
    print(f"\nwrote {args.output}")
    if args.html:
        timeline.write_html(events, args.html)
        print(f"wrote {args.html}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="offload", description="Fine-tune models larger than GPU memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _timeline_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, BudgetError) as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offload: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
