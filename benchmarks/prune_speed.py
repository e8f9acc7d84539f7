"""Prefill and decode speed of a model pruned by k LLM layers, side by side with the unpruned one.

    python benchmarks/prune_speed.py                      # models/tuned/merged from `dvc repro finetune`
    python benchmarks/prune_speed.py --tiny               # smoke run: a tiny random LLaVA built from config
    python benchmarks/prune_speed.py --prune 0 1 2 4 --batch-size 4 --prompt-len 64 --new-tokens 32

Which layers go (the speed hardly depends on which, all layers cost the same): the k lowest-scoring
layers outside the region in `--region` (reports/region.json), by the scores the prune stage
measured on the tuned model (`--scores`, metrics/prune.json), or the probe's angular_distance
when given a reports/layer_scores.json. Without scores the last-but-one
layers go first (L-2, L-3, ...; deep layers are the most redundant, the last one is not);
without a region file no layer is protected. `--tiny` uses neither file.

One model is loaded; each depth is measured by removing layers in place and putting them back
(`vregion.prune.temporarily_pruned`, weights shared), depths interleaved for `--repeats` rounds
(order reversed every other round) so drift on a noisy machine hits all alike; medians reported.
Prompts are random text tokens (the vision tower is not pruned, so images would only dilute the
LLM's share). Prefill: one forward over batch x prompt-len tokens with the KV cache, last-position
logits only, as `generate` does. Decode: `generate` of exactly N new tokens (min = max), decode
tokens/s = batch * (N - 1) / (generate time - prefill time): the first new token comes from the
prefill (same rule as vregion/eval/speed.py). Ideal speed-up is L / (L - k): what removing k of
L equally costly layers gives when embeddings, LM head and overheads cost nothing.
Prints the table and writes JSON (default benchmarks/results/prune_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from vregion.devices import pick_device
from vregion.eval.speed import throughput, time_prefill_and_generate
from vregion.models.layer_map import layer_map
from vregion.prune import layers_to_prune, temporarily_pruned


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The model to measure: the checkpoint, or with --tiny a random LLaVA built from config."""
    if args.tiny:
        from vregion.models.tiny import tiny_lvlm

        return tiny_lvlm(args.tiny_arch, num_layers=args.tiny_layers).to(device, dtype)
    from vregion.models.loading import load_lvlm

    model, _ = load_lvlm(args.model, dtype=dtype, device=device, with_processor=False)
    return model


def read_region(path: Path, num_layers: int) -> list[int]:
    """The visual region's layers from the probe stage's region.json; [] without the file."""
    if not path.is_file():
        return []
    region = json.loads(path.read_text())
    if region.get("num_layers", num_layers) != num_layers:
        raise SystemExit(
            f"error: {path} is for a {region['num_layers']}-layer LLM; the model has {num_layers}"
        )
    return list(region["layers"])


def read_scores(path: Path | None, num_layers: int) -> tuple[list[float], str]:
    """Scores per layer from the prune stage's metrics/prune.json (its `scorer`, on the tuned
    model) or the probe's layer_scores.json (angular_distance), else scores that rank the
    last-but-one layers lowest (L-2 first, then L-3, ...; the last layer last)."""
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        scores, scorer = saved.get("scores"), saved.get("scorer", "angular_distance")
        if isinstance(scores, dict):  # layer_scores.json: every probe scorer
            scores = scores.get("angular_distance")
        if scores is not None and len(scores) == num_layers:
            return list(scores), f"{scorer} from {path}"
    depth_first = [float(num_layers - 1 - i) for i in range(num_layers)]
    depth_first[-1] = float(num_layers)
    return depth_first, "last-but-one layers first (no angular_distance scores)"


def prompt_batch(model, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random text-token prompts, avoiding every special token id named in the config."""
    config = model.config
    text = config.get_text_config()
    special = set()
    for cfg in (config, text):
        for key, value in cfg.to_dict().items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                special.update(value if isinstance(value, list) else [value])
    allowed = torch.tensor([i for i in range(text.vocab_size) if i not in special])
    gen = torch.Generator().manual_seed(0)
    input_ids = allowed[torch.randint(len(allowed), (batch, length), generator=gen)]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = torch.zeros_like(input_ids)  # all text
    return {k: v.to(device) for k, v in inputs.items()}


def summarize(timings: dict[int, list[tuple[float, float]]], plan: dict, args) -> dict:
    """Median throughputs per depth and their ratios to the unpruned model."""
    rows = {}
    for k, runs in timings.items():
        rows[k] = {
            "removed": plan[k],
            "num_layers": plan["num_layers"] - k,
            **throughput(
                statistics.median(p for p, _ in runs),
                statistics.median(t for _, t in runs),
                args.batch_size,
                args.batch_size * args.prompt_len,
                args.new_tokens,
            ),
            "ideal_speedup": round(plan["num_layers"] / (plan["num_layers"] - k), 4),
            "runs": [[round(p, 5), round(t, 5)] for p, t in runs],
        }
    base = rows[0]
    for row in rows.values():
        for what in ("prefill", "decode"):
            key = f"{what}_tokens_per_s"
            row[f"{what}_speedup"] = round(row[key] / base[key], 4)
    return rows


def print_table(rows: dict[int, dict]) -> None:
    print(
        f"\n{'k':>3}{'layers':>8}  {'removed':<18}{'prefill tok/s':>14}{'x k=0':>8}"
        f"{'decode tok/s':>14}{'x k=0':>8}{'ideal':>8}"
    )
    for k, r in rows.items():
        print(
            f"{k:>3}{r['num_layers']:>8}  {str(r['removed']):<18}{r['prefill_tokens_per_s']:>14.1f}"
            f"{r['prefill_speedup']:>8.3f}{r['decode_tokens_per_s']:>14.1f}"
            f"{r['decode_speedup']:>8.3f}{r['ideal_speedup']:>8.3f}"
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="models/tuned/merged", help="checkpoint directory")
    p.add_argument("--tiny", action="store_true", help="random tiny LLaVA instead of --model")
    p.add_argument("--tiny-arch", default="llava", help="architecture of the --tiny model")
    p.add_argument("--tiny-layers", type=int, default=8, help="LLM layers of the --tiny model")
    p.add_argument("--region", default="reports/region.json", help="layers never pruned")
    p.add_argument(
        "--scores",
        default="metrics/prune.json",
        help="layer scores: metrics/prune.json (prune stage) or reports/layer_scores.json",
    )
    p.add_argument("--prune", type=int, nargs="+", default=[0, 1, 2, 4], help="k values")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all depths")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--out", default="benchmarks/results/prune_speed.json")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (the first token comes from the prefill)")
    if not args.tiny and not Path(args.model).is_dir():
        print(
            f"error: {args.model} not found: run `dvc repro finetune` first, pass --model, "
            f"or use --tiny for a smoke run",
            file=sys.stderr,
        )
        return 2

    device = pick_device()
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model = load_model(args, device, getattr(torch, dtype_name)).eval()
    lmap = layer_map(model)
    num_layers = lmap.num_layers
    region = [] if args.tiny else read_region(Path(args.region), num_layers)
    protected = sorted({*region, *lmap.fixed_layers})  # e.g. Qwen3-VL's deepstack layers
    scores, ranking = read_scores(None if args.tiny else Path(args.scores), num_layers)
    depths = sorted({0, *args.prune})
    plan: dict = {k: layers_to_prune(scores, protected, k) for k in depths}
    plan["num_layers"] = num_layers
    inputs = prompt_batch(model, args.batch_size, args.prompt_len, device)
    print(
        f"{type(model).__name__}: {num_layers} LLM layers, {dtype_name} on {device}, "
        f"region {region or 'none'}; removal order: {ranking}"
    )

    timings: dict[int, list[tuple[float, float]]] = {k: [] for k in depths}
    for r in range(args.warmup + args.repeats):
        seconds: dict[int, float] = {}
        for k in depths if r % 2 == 0 else reversed(depths):
            with temporarily_pruned(model, plan[k]):
                prefill, total = time_prefill_and_generate(model, inputs, args.new_tokens, device)
            if r >= args.warmup:
                timings[k].append((prefill, total))
            seconds[k] = total
        label = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.repeats}"
        print(f"{label}: generate " + ", ".join(f"k={k} {t:.3f} s" for k, t in seconds.items()))
    rows = summarize(timings, plan, args)
    print_table(rows)
    result = {
        "command": "python benchmarks/prune_speed.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "settings": {**vars(args), "dtype": dtype_name},
        "model_class": type(model).__name__,
        "num_layers": num_layers,
        "region": region,
        "removal_order": ranking,
        "results": {str(k): row for k, row in rows.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
