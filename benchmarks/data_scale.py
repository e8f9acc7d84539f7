"""Does the data path scale with the work, not the data set? Two sizes side by side.

    python benchmarks/data_scale.py                          # models/base (`dvc repro base`), 1,000 and 10,000 records
    python benchmarks/data_scale.py --sizes 500 5000 --rounds 3

Data: LLaVA-like records (5 question/answer turns each, 336-px JPEGs, one image per record,
every 10th record text-only), written once to `--work` as JSON lists like LLaVA's mix; the
small set is the first records of the large one. For each size, each measurement in its own
process (so peak memory is its own), sizes alternating for `--rounds` rounds, medians:

  ingest   validate the records (headers of every image, in parallel) and index their token
           lengths, as the `ingest@<name>` stage does: records/s, peak RSS
  loader   the training DataLoader alone (default workers, length grouping on): samples/s,
           peak RSS
  train    the finetune worker's loop (uniform 25% region, LoRA r16, the same DataLoader over
           the whole set's index): model samples/s and peak RSS. Both sizes train on the same
           batches (drawn from the small set's records), so a difference in peak memory can
           only come from the data set's size, not from one size happening to draw longer
           sequences in its few timed steps

Also the padding share of the large set's batches with and without length grouping. Prints the
large/small ratios and the loader/model speed ratio; writes JSON
(default benchmarks/results/data_scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("ingest", "loader", "train")
SYSTEM = "Answer briefly."


def write_dataset(work: Path, size: int, seed: int = 0) -> Path:
    """`size` LLaVA-like records and their JPEGs under `work` (reused when already there)."""
    from PIL import Image, ImageDraw

    records = work / f"records_{size}.json"
    images = work / "images"
    if records.is_file():
        return records
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "white", "purple"]
    shapes = ["circle", "square", "triangle"]
    rows = []
    for i in range(size):
        name = f"{i // 1000:03d}/{i:07d}.jpg"
        facts = [(rng.choice(colours), rng.choice(shapes)) for _ in range(rng.randint(1, 4))]
        if i % 10 == 9:  # text-only records, as the 665K mix has
            turns = []
            for t in range(5):
                a, b = rng.randint(1, 99), rng.randint(1, 99)
                turns += [
                    {"from": "human", "value": f"What is {a} plus {b}? Explain briefly."},
                    {"from": "gpt", "value": f"{a} plus {b} is {a + b}." + " Indeed." * (t % 3)},
                ]
            rows.append({"id": f"t{i}", "conversations": turns})
            continue
        path = images / name
        if not path.is_file():
            path.parent.mkdir(exist_ok=True)
            im = Image.new("RGB", (336, 336), (rng.randint(0, 80),) * 3)
            draw = ImageDraw.Draw(im)
            for _ in facts:
                x, y = rng.randint(0, 250), rng.randint(0, 250)
                draw.ellipse((x, y, x + 80, y + 80), fill=tuple(rng.randint(0, 255) for _ in "rgb"))
            im.save(path, quality=90)
        questions = [
            ("How many objects are in the image?", str(len(facts))),
            ("What colour is the first object?", facts[0][0]),
            ("What shape is it?", facts[0][1]),
            ("Describe the scene.", " ".join(f"A {c} {s}." for c, s in facts)),
            ("Is the background dark?", "Yes, it is dark grey." * rng.randint(1, 3)),
        ]
        turns = []
        for t, (q, a) in enumerate(questions):
            turns += [
                {"from": "human", "value": ("<image>\n" if t == 0 else "") + q},
                {"from": "gpt", "value": a},
            ]
        rows.append({"id": f"r{i}", "image": name, "conversations": turns})
    records.write_text(json.dumps(rows))
    return records


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # KiB on Linux


def run_one(args: argparse.Namespace) -> dict:
    """One measurement (`args.one`) on one size, in this process."""
    import numpy as np
    import torch

    from vregion.config import SourceConfig
    from vregion.data.dataset import Part, RecordDataset, training_loader
    from vregion.data.sources import ingest_source
    from vregion.models.loading import load_processor

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    out = work / f"ingested_{args.size}"
    processor = load_processor(args.model)
    if args.one == "ingest":
        cfg = SourceConfig(
            records=str(work / f"records_{args.size}.json"), image_root=str(work / "images")
        )
        m = ingest_source(
            "bench", cfg, processor, out, system_prompt=SYSTEM, max_tokens=4096, workers=8
        )
        return {"records_per_second": m["records_per_second"], "peak_rss_mib": peak_rss_mib()}
    records = out / "records.jsonl"
    part = Part("bench", str(records), str(work / "images"), np.arange(args.size))
    data = RecordDataset([part], processor, SYSTEM)
    device = torch.device("cpu")
    if args.one == "loader":
        loader = training_loader(data, args.batch_size, device=device, seed=0, group_by_length=True)
        batches = iter(loader)
        next(batches)  # the workers' start
        seconds = []
        for _ in range(args.loader_batches):
            t0 = time.perf_counter()
            next(batches)
            seconds.append(time.perf_counter() - t0)
        del batches, loader
        return {
            "samples_per_second": round(args.batch_size / statistics.median(seconds), 2),
            "peak_rss_mib": peak_rss_mib(),
        }
    from functools import partial

    from vregion.data.dataset import ShardedBatchSampler, loader_workers
    from vregion.data.encode import pad_batch, pad_id_of
    from vregion.models.layer_map import layer_map
    from vregion.models.loading import load_lvlm
    from vregion.region.select import select_layers
    from vregion.train.loop import train_steps
    from vregion.train.selective import make_region_trainable, trainable_groups

    # The same batches at both sizes: the sampler draws from the first `small` records only.
    sampler = ShardedBatchSampler(
        data.lengths[: args.small], data.has_image[: args.small], args.batch_size
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_sampler=sampler,
        num_workers=loader_workers("auto", device),
        collate_fn=partial(pad_batch, pad_id=pad_id_of(processor)),
    )
    model, _ = load_lvlm(args.model)
    layers = select_layers(layer_map(model).num_layers, "uniform", 0.25)
    model = make_region_trainable(
        model, layers, mode="lora", lora_r=16, lora_alpha=32, lora_dropout=0.05
    )
    curve = train_steps(
        model,
        loader,
        trainable_groups(model, projector_lr=2e-5, llm_lr=2e-4),
        steps=args.warmup + args.steps,
        warmup_ratio=0.0,
        precision=args.precision,
        device=device,
        desc=f"train ({args.size})",
    )
    per_step = statistics.median(r["seconds"] for r in curve[args.warmup :])
    return {
        "samples_per_second": round(args.batch_size / per_step, 3),
        "seconds_per_step": round(per_step, 4),
        "peak_rss_mib": peak_rss_mib(),
    }


def padding(work: Path, size: int, batch_size: int) -> dict:
    import numpy as np

    from vregion.data.dataset import batch_plan, padding_share

    with np.load(work / f"ingested_{size}" / "records.jsonl.index.npz") as z:
        lengths, has_image = z["lengths"], z["has_image"]
    share = {
        group: padding_share(
            batch_plan(lengths, has_image, batch_size, group_by_length=group), lengths
        )
        for group in (False, True)
    }
    return {
        "padding_share_plain": round(share[False], 4),
        "padding_share_grouped": round(share[True], 4),
        "mean_tokens": round(float(lengths.mean()), 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="models/base", help="checkpoint (default: models/base)")
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], metavar=("SMALL", "LARGE"))
    p.add_argument("--work", default="/tmp/vregion-data-scale", help="where the data set is made")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default: 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed train steps (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first train steps")
    p.add_argument("--loader-batches", type=int, default=30, help="timed loader batches")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--out", default="benchmarks/results/data_scale.json")
    p.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--small", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    if not Path(args.model, "config.json").is_file():
        print(f"error: no checkpoint at {args.model}: run `dvc repro base` first", file=sys.stderr)
        return 2
    work = Path(args.work)
    small, large = sorted(args.sizes)
    t0 = time.perf_counter()
    write_dataset(work, large)
    rows = json.loads((work / f"records_{large}.json").read_text())
    (work / f"records_{small}.json").write_text(json.dumps(rows[:small]))
    print(f"data set: {large} records in {work} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results: dict = {kind: {small: [], large: []} for kind in KINDS}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for r in range(args.rounds):
        for kind in KINDS:  # ingest first: the others read what it writes
            for size in (small, large) if r % 2 == 0 else (large, small):
                cmd = [sys.executable, __file__, "--one", kind, "--size", str(size)]
                cmd += ["--small", str(small)]
                cmd += [a for a in sys.argv[1:]]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                results[kind][size].append(json.loads(line[-1][7:]))
                print(f"round {r + 1} {kind:6s} {size:>6}: {line[-1][7:]}", flush=True)

    def med(kind: str, size: int, key: str) -> float:
        return round(statistics.median(x[key] for x in results[kind][size]), 3)

    summary = {}
    for size in (small, large):
        summary[size] = {
            "ingest_records_per_second": med("ingest", size, "records_per_second"),
            "loader_samples_per_second": med("loader", size, "samples_per_second"),
            "model_samples_per_second": med("train", size, "samples_per_second"),
            "train_peak_rss_mib": med("train", size, "peak_rss_mib"),
            "loader_peak_rss_mib": med("loader", size, "peak_rss_mib"),
            "ingest_peak_rss_mib": med("ingest", size, "peak_rss_mib"),
            **padding(work, size, args.batch_size),
        }
    s, g = summary[small], summary[large]
    ratios = {
        "train_peak_rss_large_over_small": round(
            g["train_peak_rss_mib"] / s["train_peak_rss_mib"], 4
        ),
        "loader_peak_rss_large_over_small": round(
            g["loader_peak_rss_mib"] / s["loader_peak_rss_mib"], 4
        ),
        "loader_over_model_samples_per_second": round(
            g["loader_samples_per_second"] / g["model_samples_per_second"], 2
        ),
    }
    print(f"\n{'':32s}{small:>12}{large:>12}")
    for key in s:
        print(f"{key:32s}{s[key]:>12.4g}{g[key]:>12.4g}")
    for key, value in ratios.items():
        print(f"{key}: {value}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "commit": commit.stdout.strip() or None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "size", "small")},
        "sizes": {str(k): v for k, v in summary.items()},
        "ratios": ratios,
        "runs": {k: {str(n): v for n, v in d.items()} for k, d in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
