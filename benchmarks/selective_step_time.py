"""Step time and peak memory of selective tuning, side by side on the same model and data.

    python benchmarks/selective_step_time.py                     # models/aligned, data/ from `dvc repro align`
    python benchmarks/selective_step_time.py --rounds 3 --steps 6 --batch-size 8

Configurations (all train the projector; the loss is the answer-token loss of visual QA):
  all_lora       LoRA on every LLM layer (the all-layer baseline)
  region_lora    LoRA on the uniform 25% region only (the paper's method)
  region_full    full weights of the region's layers
  projector_only no LLM layer trains; gradients still flow back through every layer (the floor)

Each configuration runs in its own process (so peak memory is its own), round-robin for
`--rounds` rounds so drift on a noisy machine hits all alike; the step time reported is the
median over all timed steps (the first `--warmup` steps of each process are not timed).
Prints ratios against all_lora and writes JSON (default benchmarks/results/selective_step_time.json).
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


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: returns per-step seconds and peak memory."""
    import numpy as np
    import torch

    from vregion.data.dataset import Part, RecordDataset, source_files, training_loader
    from vregion.devices import pick_device, resolve_precision
    from vregion.models.layer_map import layer_map
    from vregion.models.loading import load_lvlm
    from vregion.region.select import select_layers
    from vregion.train.loop import train_steps
    from vregion.train.selective import (
        LoraSettings,
        make_region_trainable,
        parameter_counts,
        trainable_groups,
    )

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
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05)
    model = make_region_trainable(model, layers, mode=mode, lora=lora).to(device)
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
        desc=args.one,
    )
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    )
    return {
        "config": args.one,
        "layers": layers,
        "seconds": [row["seconds"] for row in curve[args.warmup :]],
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
    p.add_argument("--out", default="benchmarks/results/selective_step_time.json")
    p.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
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
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    child_args = [a for a in sys.argv[1:]]
    for r in range(args.rounds):
        for config in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, *child_args, "--one", config],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[config].append(json.loads(line[-1][7:]))
            print(
                f"round {r + 1}/{args.rounds} {config}: median {statistics.median(runs[config][-1]['seconds']):.3f} s/step"
            )
    summary = {}
    for config, rs in runs.items():
        seconds = [s for r in rs for s in r["seconds"]]
        summary[config] = {
            "median_step_seconds": round(statistics.median(seconds), 4),
            "timed_steps": len(seconds),
            "peak_memory_mib": max(r["peak_memory_mib"] for r in rs),
            "trainable_params": rs[0]["trainable_params"],
            "trainable_percent": rs[0]["trainable_percent"],
            "layers": rs[0]["layers"],
        }
    base = summary["all_lora"]
    for s in summary.values():
        s["step_time_vs_all_lora"] = round(
            s["median_step_seconds"] / base["median_step_seconds"], 3
        )
        s["memory_vs_all_lora"] = round(s["peak_memory_mib"] / base["peak_memory_mib"], 3)
    print(
        f"\n{'config':<16}{'s/step':>10}{'x all_lora':>12}{'peak MiB':>10}{'x mem':>8}{'trainable %':>13}"
    )
    for config, s in summary.items():
        print(
            f"{config:<16}{s['median_step_seconds']:>10.3f}{s['step_time_vs_all_lora']:>12.3f}"
            f"{s['peak_memory_mib']:>10.0f}{s['memory_vs_all_lora']:>8.3f}{s['trainable_percent']:>13.3f}"
        )
    result = {
        "command": "python benchmarks/selective_step_time.py " + " ".join(child_args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "one"},
        "memory_note": runs["all_lora"][0]["peak_memory_kind"],
        "results": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
