"""finetune: visual instruction tuning of the region only (models/tuned/), on Ray Train.

Trains the projector and the LLM layers in reports/region.json (LoRA or full weights; with
`region.strategy: all` the same code gives the all-layer baseline). Ray Train runs the loop on
`finetune.num_workers` workers with checkpoints in ray_results/ (or the S3 store when
VREGION_S3_* is set): an interrupted run resumes from its latest checkpoint on the next
`dvc repro`. Exports the PEFT adapter and a merged checkpoint, then checks that the tuned model
sees: held-out accuracy per question kind beside a blind control (images shuffled) and chance.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stages._common import log, run_stage, write_csv, write_json
from vregion.config import ConfigError, Params, load_params
from vregion.data.dataset import balanced_parts, resolve_mix
from vregion.devices import pick_device, resolve_precision
from vregion.distributed import forget_run, local_ray, progress_relay
from vregion.eval.visual import visual_accuracy
from vregion.models.loading import load_lvlm
from vregion.plots import accuracy_chart, note_chart
from vregion.train.finetune import (
    FinetuneJob,
    export_tuned,
    job_dataset,
    resolve_use_gpu,
    run_finetune,
)
from vregion.train.loop import ImageSet, deranged, mean_answer_loss

ALIGNED = "models/aligned"
DATA = "data"
REGION = "reports/region.json"
OUT = "models/tuned"
RUNS = "ray_results"
METRICS = "metrics/train.json"
CURVE = "metrics/finetune_loss.csv"
ACCURACY = "metrics/finetune_accuracy.csv"
CHART = "reports/plots/finetune_accuracy.png"


def region_layers(path: str = REGION) -> list[int]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no region yet; run `dvc repro probe` first")
    layers = json.loads(Path(path).read_text()).get("layers")
    if not layers:
        raise ConfigError(f"{path}: no `layers` list (re-run the probe stage)")
    return layers


def train_metrics(
    result_metrics: dict, curve: list[dict], job: FinetuneJob, use_gpu: bool, records: int
) -> dict:
    c = job.config
    steps = [row["seconds"] for row in curve[1:]] or [row["seconds"] for row in curve]
    per_step = statistics.median(steps)  # the first step pays for warm-up
    world = result_metrics["world_size"]
    tail = [row["loss"] for row in curve[-10:]]
    return {
        "region": job.layers,
        "region_size": len(job.layers),
        "data": [d.source for d in c.data],
        "train_records": records,
        "epochs": round(len(curve) * c.batch_size * c.grad_accum * world / records, 3),
        "mode": c.mode,
        "parallel": c.parallel if world > 1 else "none",
        "steps": len(curve),
        "world_size": world,
        "use_gpu": use_gpu,
        "precision": resolve_precision(
            c.precision, pick_device() if use_gpu else torch.device("cpu")
        ),
        "seconds_per_step": round(per_step, 4),
        "samples_per_second": round(c.batch_size * c.grad_accum * world / per_step, 3),
        "train_seconds": round(sum(row["seconds"] for row in curve), 1),
        "peak_memory_mb": result_metrics["peak_memory_mb"],
        "trainable_params": result_metrics["trainable_params"],
        "total_params": result_metrics["total_params"],
        "trainable_percent": result_metrics["trainable_percent"],
        "first_loss": curve[0]["loss"],
        "final_loss": round(sum(tail) / len(tail), 5),
        "resumed_from": result_metrics["resumed_from"],
    }


def check_vision(p: Params) -> tuple[str, dict]:
    """The merged tuned model on held-out records, beside the blind control: accuracy per kind
    when the records carry `choices`, else the answer loss (lower is better)."""
    f = p.finetune
    parts = resolve_mix(f.eval_data, p.model.seed, DATA)
    held_out = ImageSet.from_parts(balanced_parts(parts, f.eval_samples, p.model.seed))
    device = pick_device()
    model, processor = load_lvlm(f"{OUT}/merged")
    model.to(device)
    kw = dict(precision=resolve_precision(f.precision, device), device=device)
    if all(s.choices for s in held_out.samples):
        return "visual", visual_accuracy(
            model,
            processor,
            held_out,
            p.model.system_prompt,
            batch_size=f.eval_batch_size,
            seed=p.model.seed,
            **kw,
        )
    data, n = held_out, len(held_out)
    args = (model, processor, data, p.model.system_prompt)
    loss = mean_answer_loss(*args, batch_size=f.eval_batch_size, **kw)
    blind = mean_answer_loss(
        *args,
        batch_size=f.eval_batch_size,
        images=deranged(data.images, p.model.seed),
        desc="blind",
        **kw,
    )
    return "answer_loss", {"overall": {"loss": round(loss, 5), "blind": round(blind, 5), "n": n}}


# The phases are tasks, so the run page shows where the time went.
@task(name="train", cache_policy=NO_CACHE)
def train(job: FinetuneJob, name: str, use_gpu: bool):
    """The loop on Ray Train workers; rank 0's steps reach this run through the relay."""
    with (
        tempfile.TemporaryDirectory(prefix="vr", dir="/tmp") as ray_tmp,
        local_ray(ray_tmp),
        progress_relay() as relay,
    ):
        result = run_finetune(job, name=name, local_dir=RUNS, use_gpu=use_gpu, progress=relay)
    if result.error is not None:
        raise result.error
    return result


@task(name="export", cache_policy=NO_CACHE)
def export(job: FinetuneJob, result, name: str) -> dict:
    shutil.rmtree(OUT, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        exported = export_tuned(job, ckpt, OUT)
    forget_run(name, RUNS)  # exported: a later run with this name must start afresh
    return exported


@flow(name="finetune", log_prints=True)
def finetune(params: str = "params.yaml") -> dict:
    p = load_params(params)
    job = FinetuneJob.resolve(p, region_layers(), aligned=ALIGNED, data_dir=DATA)
    use_gpu = resolve_use_gpu(p.finetune.use_gpu)
    name = job.run_name()
    print(
        f"finetune: {p.finetune.mode} on layers {job.layers}, run {name}, "
        f"{p.finetune.num_workers} worker(s)"
    )
    result = train(job, name, use_gpu)
    exported = export(job, result, name)
    curve = exported["curve"]
    records = len(job_dataset(job, None))
    metrics = train_metrics(result.metrics, curve, job, use_gpu, records)
    write_csv(CURVE, [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in curve])
    measure, held_out = task(check_vision, name="held-out-check", cache_policy=NO_CACHE)(p)
    metrics[measure] = held_out
    if measure == "visual":
        write_csv(
            ACCURACY,
            [
                {"kind": k, "accuracy": v["accuracy"], "blind": v["blind"], "chance": v["chance"]}
                for k, v in held_out.items()
            ],
        )
        accuracy_chart(
            {"tuned": held_out},
            CHART,
            title=f"Tuned model ({p.finetune.mode}, layers {job.layers})",
        )
        o = held_out["overall"]
        summary = f"visual accuracy {o['accuracy']:.3f} (blind {o['blind']:.3f}, chance {o['chance']:.3f})"
    else:  # records without choices: the declared outputs say what was measured instead
        o = held_out["overall"]
        write_csv(
            ACCURACY, [{"kind": "answer_loss", "accuracy": None, "blind": None, "chance": None}]
        )
        note_chart(
            CHART,
            f"Held-out answer loss {o['loss']:.3f} (blind {o['blind']:.3f}): "
            "the eval records have no choices, so no accuracy per kind.",
        )
        summary = f"held-out answer loss {o['loss']:.3f} (blind {o['blind']:.3f})"
    write_json(METRICS, metrics)
    log.info("tuned: %.3f s/step, %s", metrics["seconds_per_step"], summary)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(finetune, __doc__))
