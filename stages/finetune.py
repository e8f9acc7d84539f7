"""finetune: visual instruction tuning of the region only (models/tuned/), on Ray Train.

Trains the projector and the LLM layers in reports/region.json (LoRA or full weights; with
`region.strategy: all` the same code gives the all-layer baseline). Ray Train runs the loop on
`finetune.num_workers` workers with checkpoints in ray_results/ (or the S3 store when
VREGION_S3_* is set): an interrupted run resumes from its latest checkpoint on the next
`dvc repro`. Exports the PEFT adapter and a merged checkpoint, then checks that the tuned model
sees: held-out accuracy per question kind beside a blind control (images shuffled) and chance.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from prefect import flow

from stages._common import log, run_stage, write_csv, write_json
from vregion.config import ConfigError, Params, load_params
from vregion.data.records import read_jsonl
from vregion.devices import gpu_available, pick_device, resolve_precision
from vregion.distributed import forget_run, local_ray
from vregion.eval.visual import stratified, visual_accuracy
from vregion.models.loading import load_lvlm
from vregion.plots import accuracy_chart
from vregion.train.finetune import FinetuneJob, export_tuned, run_finetune
from vregion.train.loop import ImageSet

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


def build_job(p: Params, layers: list[int]) -> FinetuneJob:
    f = p.finetune
    return FinetuneJob(
        aligned=str(Path(ALIGNED).resolve()),  # Ray workers do not share our working directory
        records=str(Path(DATA, "train", "vqa.jsonl").resolve()),
        image_root=str(Path(DATA).resolve()),
        layers=layers,
        mode=f.mode,
        lora={"r": f.lora_r, "alpha": f.lora_alpha, "dropout": f.lora_dropout},
        projector_lr=f.projector_lr,
        llm_lr=f.llm_lr,
        steps=f.steps,
        batch_size=f.batch_size,
        grad_accum=f.grad_accum,
        warmup_ratio=f.warmup_ratio,
        gradient_checkpointing=f.gradient_checkpointing,
        precision=f.precision,
        system_prompt=p.model.system_prompt,
        seed=p.model.seed,
        checkpoint_every=f.checkpoint_every,
        train_vision=f.train_vision,
        parallel=f.parallel,
    )


def run_name(job: FinetuneJob) -> str:
    """Same job, same name: a rerun after an interruption finds and resumes its checkpoints."""
    settings = {
        k: v for k, v in asdict(job).items() if k not in ("aligned", "records", "image_root")
    }
    aligned = Path(job.aligned, "model.safetensors")
    stamp = aligned.stat().st_mtime_ns if aligned.is_file() else 0  # a new aligned model: new run
    digest = hashlib.sha1(json.dumps([settings, stamp], sort_keys=True).encode()).hexdigest()
    return f"finetune-{digest[:12]}"


def train_metrics(result_metrics: dict, curve: list[dict], job: FinetuneJob, use_gpu: bool) -> dict:
    steps = [row["seconds"] for row in curve[1:]] or [row["seconds"] for row in curve]
    per_step = statistics.median(steps)  # the first step pays for warm-up
    world = result_metrics["world_size"]
    tail = [row["loss"] for row in curve[-10:]]
    return {
        "region": job.layers,
        "region_size": len(job.layers),
        "mode": job.mode,
        "parallel": job.parallel if world > 1 else "none",
        "steps": len(curve),
        "world_size": world,
        "use_gpu": use_gpu,
        "precision": resolve_precision(
            job.precision, pick_device() if use_gpu else torch.device("cpu")
        ),
        "seconds_per_step": round(per_step, 4),
        "samples_per_second": round(job.batch_size * job.grad_accum * world / per_step, 3),
        "train_seconds": round(sum(row["seconds"] for row in curve), 1),
        "peak_memory_mb": result_metrics["peak_memory_mb"],
        "trainable_params": result_metrics["trainable_params"],
        "total_params": result_metrics["total_params"],
        "trainable_percent": result_metrics["trainable_percent"],
        "first_loss": curve[0]["loss"],
        "final_loss": round(sum(tail) / len(tail), 5),
        "resumed_from": result_metrics["resumed_from"],
    }


def check_vision(p: Params) -> dict:
    """Held-out accuracy of the merged tuned model, with the blind control."""
    f = p.finetune
    samples = stratified(list(read_jsonl(f"{DATA}/eval/vqa.jsonl")), f.eval_samples, p.model.seed)
    device = pick_device()
    model, processor = load_lvlm(f"{OUT}/merged")
    model.to(device)
    return visual_accuracy(
        model,
        processor,
        ImageSet.load(samples, DATA),
        p.model.system_prompt,
        batch_size=f.eval_batch_size,
        precision=resolve_precision(f.precision, device),
        device=device,
        seed=p.model.seed,
    )


@flow(name="finetune", log_prints=True)
def finetune(params: str = "params.yaml") -> dict:
    p = load_params(params)
    job = build_job(p, region_layers())
    use_gpu = gpu_available() if p.finetune.use_gpu == "auto" else bool(p.finetune.use_gpu)
    name = run_name(job)
    print(
        f"finetune: {job.mode} on layers {job.layers}, run {name}, {p.finetune.num_workers} worker(s)"
    )
    with tempfile.TemporaryDirectory(prefix="vr", dir="/tmp") as ray_tmp, local_ray(ray_tmp):
        result = run_finetune(
            job, name=name, local_dir=RUNS, num_workers=p.finetune.num_workers, use_gpu=use_gpu
        )
    if result.error is not None:
        raise result.error
    shutil.rmtree(OUT, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        exported = export_tuned(job, ckpt, OUT)
    forget_run(name, RUNS)  # exported: a later run with this name must start afresh
    curve = exported["curve"]
    metrics = train_metrics(result.metrics, curve, job, use_gpu)
    write_csv(CURVE, [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in curve])
    visual = check_vision(p)
    metrics["visual"] = visual
    write_csv(
        ACCURACY,
        [
            {"kind": k, "accuracy": v["accuracy"], "blind": v["blind"], "chance": v["chance"]}
            for k, v in visual.items()
        ],
    )
    accuracy_chart({"tuned": visual}, CHART, title=f"Tuned model ({job.mode}, layers {job.layers})")
    write_json(METRICS, metrics)
    o = visual["overall"]
    log.info(
        "tuned: %.3f s/step, visual accuracy %.3f (blind %.3f, chance %.3f)",
        metrics["seconds_per_step"],
        o["accuracy"],
        o["blind"],
        o["chance"],
    )
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(finetune, __doc__))
