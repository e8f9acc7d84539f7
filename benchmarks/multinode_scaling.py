"""Throughput of selective tuning with 1 and 2 Ray Train workers on a local 2-node cluster.

    python benchmarks/multinode_scaling.py                       # models/aligned, data/ (dvc repro align)
    python benchmarks/multinode_scaling.py --aligned /path/models/aligned --data-dir /path/data --steps 8

Starts two Ray nodes on 127.0.0.1 through `infra` (one CPU each), then runs the region-LoRA
step (uniform 25% of the LLM layers + projector, the answer-token loss) on the training visual
QA records with 1 worker, then 2 workers spread over both nodes (gloo). Each worker times every
step in four parts:

  data      waiting for the next batch from the DataLoader (records + images + processor)
  compute   forward and backward
  comm      all-reduce of the trainable gradients (one flat tensor), incl. waiting for the
            slower worker; DDP overlaps this with backward in buckets, so this is its upper bound
  optimizer gradient clipping and the AdamW step

1 and 2 workers alternate for `--rounds` rounds, so drift on a shared machine hits both. Reports
samples/s (global batch / median step time over every timed step of every rank and round)
beside the ideal 2x of one worker, and each part's median over the median step (medians of
parts need not add up to 1). On a 2-core machine two workers share the cores, so this
measures overhead, not speed-up. Writes JSON (default benchmarks/results/multinode_scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PARTS = ("data", "compute", "comm", "optimizer")


def timed_worker(config: dict) -> None:
    """Ray Train loop: the finetune step, split into timed parts; rank 0 reports the rows."""
    import ray.train
    import torch
    import torch.distributed as dist

    from vregion.train.finetune import build_trainable, worker_batches
    from vregion.train.loop import answer_nll
    from vregion.train.selective import trainable_groups

    torch.set_num_threads(config["threads"])
    job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cpu")
    torch.manual_seed(job.seed)
    model, processor = build_trainable(job, device)
    groups = trainable_groups(model, projector_lr=job.config.projector_lr, llm_lr=job.config.llm_lr)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    stream = iter(worker_batches(job, processor, device, rank, world, 0))
    model.train()
    rows = []
    for step in range(job.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch = dict(next(stream))
        t1 = time.perf_counter()
        labels = batch.pop("labels")
        nll, n = answer_nll(model, batch, labels, precision=job.config.precision, device=device)
        (nll / max(n, 1)).backward()
        t2 = time.perf_counter()
        if world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p, g in zip(params, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(p)
                offset += g.numel()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        t4 = time.perf_counter()
        rows.append(
            {
                "step": step + 1,
                "data": t1 - t0,
                "compute": t2 - t1,
                "comm": t3 - t2,
                "optimizer": t4 - t3,
                "seconds": t4 - t0,
                "node": ray.get_runtime_context().get_node_id()[:8],
            }
        )
    # Train V2 keeps only metrics reported with a checkpoint: the rows go to a file instead
    # (both nodes run on this machine).
    Path(config["rows_dir"], f"rank-{rank}.json").write_text(json.dumps(rows))


def run_world(args, job, world: int, round_: int) -> list[list[dict]]:
    """One run of `world` workers; each rank's timed rows."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows_dir = Path(args.storage, f"rows-{world}-{round_}")
    rows_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        timed_worker,
        train_loop_config={"job": job, "threads": 1, "rows_dir": str(rows_dir)},
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=False,
            resources_per_worker={"CPU": 1},
            placement_strategy="SPREAD",
        ),
        run_config=RunConfig(name=f"scaling-{world}-{round_}", storage_path=args.storage),
    )
    trainer.fit()
    ranks = [json.loads((rows_dir / f"rank-{r}.json").read_text()) for r in range(world)]
    return [rows[args.warmup :] for rows in ranks]


def summarize(runs: list[list[list[dict]]], batch_size: int, world: int) -> dict:
    """Medians over every timed step of every rank and round."""
    timed = [r for ranks in runs for rows in ranks for r in rows]
    step = statistics.median(r["seconds"] for r in timed)
    parts = {p: statistics.median(r[p] for r in timed) for p in PARTS}
    return {
        "workers": world,
        "nodes_per_round": [len({r["node"] for rows in ranks for r in rows}) for ranks in runs],
        "global_batch": batch_size * world,
        "median_step_seconds": round(step, 4),
        "samples_per_second": round(batch_size * world / step, 3),
        "per_round_samples_per_second": [
            round(
                batch_size
                * world
                / statistics.median(r["seconds"] for rows in ranks for r in rows),
                3,
            )
            for ranks in runs
        ],
        "share_of_step": {p: round(v / step, 3) for p, v in parts.items()},
        "median_seconds": {p: round(v, 4) for p, v in parts.items()},
        "timed_steps": len(timed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aligned", default="models/aligned")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument("--rounds", type=int, default=2, help="1 and 2 workers alternate")
    parser.add_argument("--out", default="benchmarks/results/multinode_scaling.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from infra.environment import apply_defaults

    apply_defaults()
    import ray
    from transformers import AutoConfig

    from infra import ray_nodes
    from infra.process import free_ports
    from vregion.config import Params
    from vregion.region.select import select_layers
    from vregion.train.finetune import FinetuneJob

    layers_total = AutoConfig.from_pretrained(args.aligned).text_config.num_hidden_layers
    finetune = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lora_dropout=0.0,
        precision="fp32",
        loader={"workers": 0},
    )
    job = FinetuneJob.resolve(
        Params.model_validate({"finetune": finetune}),
        select_layers(layers_total, "uniform", 0.25),
        aligned=args.aligned,
        data_dir=args.data_dir,
    )
    temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    port = free_ports(1)[0]
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    load_before = os.getloadavg()
    try:
        ray_nodes.start_cluster(temp, nodes=2, port=port, num_cpus=1)
        ray.init(include_dashboard=False, log_to_driver=False)
        args.storage = str(temp / "runs")
        runs: dict[int, list] = {1: [], 2: []}
        for round_ in range(args.rounds):
            for world in (1, 2):
                began = time.monotonic()
                runs[world].append(run_world(args, job, world, round_))
                print(f"round {round_}, {world} worker(s): {time.monotonic() - began:.0f} s")
        results = [summarize(runs[w], job.config.batch_size, w) for w in (1, 2)]
    finally:
        ray.shutdown()
        ray_nodes.stop_cluster(temp)
    one, two = results
    report = {
        "benchmark": "multinode_scaling",
        "model": args.aligned,  # as given (relative to the repo by default), not this machine's path
        "layers": job.layers,
        "mode": "region LoRA r16 + projector, fp32, answer-token loss",
        "cluster": "2 Ray nodes on 127.0.0.1 (1 CPU each), gloo",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min_before_after": [
                round(load_before[0], 2),
                round(os.getloadavg()[0], 2),
            ],
        },
        "steps_per_run": args.steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "runs": results,
        "ideal_2_worker_samples_per_second": round(2 * one["samples_per_second"], 3),
        "scaling_efficiency": round(two["samples_per_second"] / (2 * one["samples_per_second"]), 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"1 worker {one['samples_per_second']} samples/s; 2 workers {two['samples_per_second']} "
        f"(ideal {report['ideal_2_worker_samples_per_second']}, efficiency "
        f"{report['scaling_efficiency']}); 2-worker step: "
        + ", ".join(f"{p} {v:.0%}" for p, v in two["share_of_step"].items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
