"""finetune: visual instruction tuning of the region only (models/tuned/), on Ray Train.

Trains the projector and the LLM layers in reports/region.json (LoRA or full weights; with
`region.strategy: all` the same code gives the all-layer baseline). Ray Train runs the loop on
`finetune.num_workers` workers with checkpoints in ray_results/ (or the S3 store when
VREGION_S3_* is set): an interrupted run resumes from its latest checkpoint on the next
`dvc repro`. Exports the PEFT adapter and a merged checkpoint, then checks that the tuned model
sees: held-out accuracy per question kind beside a blind control (images shuffled) and chance.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stages._common import log, run_stage, write_csv, write_json
from vregion.config import FinetuneConfig, Params, load_params
from vregion.data.dataset import balanced_set, resolve_mix, total_steps
from vregion.devices import gpu_available, pick_device, resolve_precision
from vregion.distributed import forget_run, local_ray, progress_relay
from vregion.eval.visual import held_out_check
from vregion.models.loading import load_lvlm
from vregion.plots import accuracy_chart, note_chart
from vregion.region.select import region_layers
from vregion.train.finetune import (
    FinetuneJob,
    export_tuned,
    job_dataset,
    run_finetune,
    run_name,
    train_metrics,
)


def build_job(p: Params, layers: list[int], aligned: str, data: str) -> FinetuneJob:
    f = p.finetune
    data_dir = str(Path(data).resolve())  # Ray workers do not share our working directory
    records = sum(len(part.rows) for part in resolve_mix(f.data, p.model.seed, data_dir))
    return FinetuneJob(
        aligned=str(Path(aligned).resolve()),
        data=[m.model_dump() for m in f.data],
        data_dir=data_dir,
        layers=layers,
        mode=f.mode,
        lora={"r": f.lora_r, "alpha": f.lora_alpha, "dropout": f.lora_dropout},
        projector_lr=f.projector_lr,
        llm_lr=f.llm_lr,
        steps=total_steps(f.steps, f.epochs, records, f.batch_size, f.num_workers, f.grad_accum),
        batch_size=f.batch_size,
        grad_accum=f.grad_accum,
        warmup_ratio=f.warmup_ratio,
        gradient_checkpointing=f.gradient_checkpointing,
        precision=f.precision,
        dtype=p.model.dtype,
        system_prompt=p.model.system_prompt,
        seed=p.model.seed,
        checkpoint_every=f.checkpoint_every,
        train_vision=f.train_vision,
        parallel=f.parallel,
        loader_workers=f.loader.workers,
        prefetch_factor=f.loader.prefetch_factor,
        group_by_length=f.loader.group_by_length,
    )


def check_vision(p: Params, checkpoint: str, data: str) -> tuple[str, dict]:
    """The merged tuned model on held-out records, beside the blind control."""
    f = p.finetune
    held_out = balanced_set(f.eval_data, f.eval_samples, p.model.seed, data)
    device = pick_device()
    model, processor = load_lvlm(checkpoint)
    model.to(device)
    return held_out_check(
        model,
        processor,
        held_out,
        p.model.system_prompt,
        batch_size=f.eval_batch_size,
        precision=resolve_precision(f.precision, device),
        device=device,
        seed=p.model.seed,
    )


# The phases are tasks, so the run page shows where the time went.
@task(name="train", cache_policy=NO_CACHE)
def train(job: FinetuneJob, name: str, f: FinetuneConfig, use_gpu: bool, runs: str):
    """The loop on Ray Train workers; rank 0's steps reach this run through the relay."""
    with (
        tempfile.TemporaryDirectory(prefix="vr", dir="/tmp") as ray_tmp,
        local_ray(ray_tmp),
        progress_relay() as relay,
    ):
        result = run_finetune(
            job,
            name=name,
            local_dir=runs,
            num_workers=f.num_workers,
            use_gpu=use_gpu,
            placement_strategy=f.placement,
            max_failures=f.max_failures,
            progress=relay,
        )
    if result.error is not None:
        raise result.error
    return result


@task(name="export", cache_policy=NO_CACHE)
def export(job: FinetuneJob, result, name: str, out: str, runs: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        exported = export_tuned(job, ckpt, out)
    forget_run(name, runs)  # exported: a later run with this name must start afresh
    return exported


@flow(name="finetune", log_prints=True)
def finetune(
    aligned: str,
    data: str,
    region: str,
    out: str,
    runs: str,
    metrics: str,
    curve: str,
    accuracy: str,
    chart: str,
    params: str = "params.yaml",
) -> dict:
    """Tune the region on Ray Train, export, check the tuned model sees.

    Args:
        aligned: aligned checkpoint to tune
        data: data directory (prepare's and ingest's outputs)
        region: the region stage's region JSON
        out: directory for the adapter and the merged checkpoint (out/merged)
        runs: Ray Train's run directory (checkpoints to resume from; not a DVC output)
        metrics: metrics file to write
        curve: loss curve CSV to write
        accuracy: held-out accuracy per question kind, CSV to write
        chart: accuracy chart to write
        params: params file
    """
    p = load_params(params)
    job = build_job(p, region_layers(region), aligned, data)
    use_gpu = gpu_available() if p.finetune.use_gpu == "auto" else bool(p.finetune.use_gpu)
    name = run_name(job)
    print(
        f"finetune: {job.mode} on layers {job.layers}, run {name}, {p.finetune.num_workers} worker(s)"
    )
    result = train(job, name, p.finetune, use_gpu, runs)
    exported = export(job, result, name, out, runs)
    steps = exported["curve"]
    records = len(job_dataset(job, None))
    summary_metrics = train_metrics(result.metrics, steps, job, use_gpu, records)
    write_csv(curve, [{"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in steps])
    measure, held_out = task(check_vision, name="held-out-check", cache_policy=NO_CACHE)(
        p, f"{out}/merged", data
    )
    summary_metrics[measure] = held_out
    if measure == "visual":
        write_csv(
            accuracy,
            [
                {"kind": k, "accuracy": v["accuracy"], "blind": v["blind"], "chance": v["chance"]}
                for k, v in held_out.items()
            ],
        )
        accuracy_chart(
            {"tuned": held_out}, chart, title=f"Tuned model ({job.mode}, layers {job.layers})"
        )
        o = held_out["overall"]
        summary = f"visual accuracy {o['accuracy']:.3f} (blind {o['blind']:.3f}, chance {o['chance']:.3f})"
    else:  # records without choices: the declared outputs say what was measured instead
        o = held_out["overall"]
        write_csv(
            accuracy, [{"kind": "answer_loss", "accuracy": None, "blind": None, "chance": None}]
        )
        note_chart(
            chart,
            f"Held-out answer loss {o['loss']:.3f} (blind {o['blind']:.3f}): "
            "the eval records have no choices, so no accuracy per kind.",
        )
        summary = f"held-out answer loss {o['loss']:.3f} (blind {o['blind']:.3f})"
    write_json(metrics, summary_metrics)
    log.info("tuned: %.3f s/step, %s", summary_metrics["seconds_per_step"], summary)
    return summary_metrics


if __name__ == "__main__":
    sys.exit(run_stage(finetune, __doc__))
