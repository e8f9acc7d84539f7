"""Step time and peak memory of selective tuning, side by side on the same model and data.

    python benchmarks/selective_step_time.py                     # models/aligned, data/ from `dvc repro align`
    python benchmarks/selective_step_time.py --rounds 3 --steps 6 --batch-size 8
    python benchmarks/selective_step_time.py --configs region_lora --loss labelled full

Configurations (all train the projector; the loss is the answer-token loss of visual QA):
  all_lora       LoRA on every LLM layer (the all-layer baseline)
  region_lora    LoRA on the uniform 25% region only (the paper's method)
  region_full    full weights of the region's layers
  projector_only no LLM layer trains; gradients still flow back through every layer (the floor)

Losses (`--loss`, one or both; every configuration runs with each):
  labelled  the LM head on the labelled (answer) positions only: what training uses
  full      the LM head on every position, then the loss on the answers (the old way: a
            batch x sequence x vocabulary logits tensor, on a large vocabulary the peak memory)

Each configuration runs in its own process (so peak memory is its own), round-robin for
`--rounds` rounds so drift on a noisy machine hits all alike; the step time reported is the
median over all timed steps (the first `--warmup` steps of each process are not timed).
Prints ratios against all_lora (same loss) and, with both losses, each labelled run's peak
memory against its full-logits twin; writes JSON (default benchmarks/results/selective_step_time.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ("all_lora", "region_lora", "region_full", "projector_only")
LOSSES = ("labelled", "full")  # vregion.train.loop.LOSSES, without importing torch here


def run_name(config: str, loss: str, losses: list[str]) -> str:
    return config if len(losses) == 1 else f"{config}/{loss}"


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: returns per-step seconds and peak memory."""
    import numpy as np
    import torch

    from vregion.data.dataset import Part, RecordDataset, source_files, training_loader
    from vregion.devices import pick_device, resolve_precision
    from vregion.models.layer_map import layer_map, parameter_counts
    from vregion.models.loading import load_lvlm
    from vregion.region.select import select_layers
    from vregion.train.loop import train_steps
    from vregion.train.selective import make_region_trainable, trainable_groups

    torch.manual_seed(0)
    device = pick_device()
    model, processor = load_lvlm(args.model)
    n = layer_map(model).num_layers
    layers = {
        "all_lora": list(range(n)),
        "region_lora": select_layers(n, "uniform", 0.25),
        "region_full": select_layers(n, "uniform", 0.25),
        "projector_only": [],
    }[args.one]
    mode = "full" if args.one in ("region_full", "projector_only") else "lora"
    lora = dict(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05)
    model = make_region_trainable(model, layers, mode=mode, **lora).to(device)
    records, root = source_files("synthetic/train/vqa", args.data)
    rows = np.arange(args.batch_size * (args.warmup + args.steps + 1))
    data = RecordDataset(
        [Part("train", str(records), str(root), rows)], processor, args.system_prompt
    )
    # Loaded on the training thread (workers=0), so the step time includes the data's cost.
    batches = training_loader(data, args.batch_size, device=device, seed=0, workers=0)
    groups = trainable_groups(model, projector_lr=2e-5, llm_lr=2e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    curve = train_steps(
        model,
        batches,
        groups,
        steps=args.warmup + args.steps,
        warmup_ratio=0.0,
        precision=resolve_precision(args.precision, device),
        device=device,
        desc=f"{args.one}/{args.one_loss}",
        loss=args.one_loss,
    )
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    )
    return {
        "config": args.one,
        "loss": args.one_loss,
        "layers": layers,
        "seconds": [row["seconds"] for row in curve[args.warmup :]],
        "losses": [row["loss"] for row in curve],
        "peak_memory_mib": round(peak, 1),
        "peak_memory_kind": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "process max RSS",
        **parameter_counts(model),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="models/aligned", help="checkpoint (default: models/aligned)")
    p.add_argument("--data", default="data", help="prepared data directory (default: data)")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default: 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (default: 5)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed first steps per process (default: 2)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--system-prompt", default="Answer briefly.")
    p.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="default: all four"
    )
    p.add_argument(
        "--loss",
        nargs="+",
        choices=LOSSES,
        default=["labelled"],
        help="labelled (LM head on answer positions only, default) and/or full (every position)",
    )
    p.add_argument("--out", default="benchmarks/results/selective_step_time.json")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--one-loss", choices=LOSSES, default="labelled", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    if not Path(args.model).is_dir():
        print(
            f"error: {args.model} not found: run `dvc repro align` first (or pass --model)",
            file=sys.stderr,
        )
        return 2
    names = {run_name(c, x, args.loss): (c, x) for c in args.configs for x in args.loss}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    child_args = [a for a in sys.argv[1:]]
    for r in range(args.rounds):
        for name, (config, loss) in names.items():
            out = subprocess.run(
                [sys.executable, __file__, *child_args, "--one", config, "--one-loss", loss],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name].append(json.loads(line[-1][7:]))
            median = statistics.median(runs[name][-1]["seconds"])
            print(f"round {r + 1}/{args.rounds} {name}: median {median:.3f} s/step")
    summary = {}
    for name, rs in runs.items():
        seconds = [s for r in rs for s in r["seconds"]]
        summary[name] = {
            "config": names[name][0],
            "loss": names[name][1],
            "median_step_seconds": round(statistics.median(seconds), 4),
            "timed_steps": len(seconds),
            "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
            "trainable_params": rs[0]["trainable_params"],
            "trainable_percent": rs[0]["trainable_percent"],
            "layers": rs[0]["layers"],
        }
    for s in summary.values():
        base = summary.get(run_name("all_lora", s["loss"], args.loss))
        if base is not None:
            s["step_time_vs_all_lora"] = round(
                s["median_step_seconds"] / base["median_step_seconds"], 3
            )
            s["memory_vs_all_lora"] = round(s["peak_memory_mib"] / base["peak_memory_mib"], 3)
        twin = summary.get(run_name(s["config"], "full", args.loss))
        if s["loss"] == "labelled" and twin is not None:
            s["memory_vs_full_loss"] = round(s["peak_memory_mib"] / twin["peak_memory_mib"], 3)
            s["step_time_vs_full_loss"] = round(
                s["median_step_seconds"] / twin["median_step_seconds"], 3
            )
    print(
        f"\n{'run':<24}{'s/step':>10}{'x all_lora':>12}{'peak MiB':>10}{'x mem':>8}"
        f"{'x mem full':>12}{'trainable %':>13}"
    )
    for name, s in summary.items():
        print(
            f"{name:<24}{s['median_step_seconds']:>10.3f}"
            f"{s.get('step_time_vs_all_lora', float('nan')):>12.3f}{s['peak_memory_mib']:>10.0f}"
            f"{s.get('memory_vs_all_lora', float('nan')):>8.3f}"
            f"{s.get('memory_vs_full_loss', float('nan')):>12.3f}{s['trainable_percent']:>13.3f}"
        )
    result = {
        "command": "python benchmarks/selective_step_time.py " + " ".join(child_args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "one_loss")},
        "memory_note": next(iter(runs.values()))[0]["peak_memory_kind"],
        "results": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
