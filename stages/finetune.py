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

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stages._common import log, run_stage, write_csv, write_json
from vregion.config import Params, load_params
from vregion.data.dataset import balanced_set
from vregion.devices import pick_device, resolve_precision
from vregion.distributed import forget_run, local_ray, progress_relay
from vregion.eval.visual import held_out_check
from vregion.models.loading import load_lvlm
from vregion.plots import accuracy_chart, note_chart
from vregion.region.select import region_layers
from vregion.train.finetune import (
    FinetuneJob,
    export_tuned,
    job_dataset,
    resolve_use_gpu,
    run_finetune,
    train_metrics,
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
def train(job: FinetuneJob, name: str, use_gpu: bool, runs: str):
    """The loop on Ray Train workers; rank 0's steps reach this run through the relay."""
    with (
        tempfile.TemporaryDirectory(prefix="vr", dir="/tmp") as ray_tmp,
        local_ray(ray_tmp),
        progress_relay() as relay,
    ):
        result = run_finetune(job, name=name, local_dir=runs, use_gpu=use_gpu, progress=relay)
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
    job = FinetuneJob.resolve(p, region_layers(region), aligned=aligned, data_dir=data)
    use_gpu = resolve_use_gpu(p.finetune.use_gpu)
    name = job.run_name()
    print(
        f"finetune: {p.finetune.mode} on layers {job.layers}, run {name}, "
        f"{p.finetune.num_workers} worker(s)"
    )
    result = train(job, name, use_gpu, runs)
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
            {"tuned": held_out},
            chart,
            title=f"Tuned model ({p.finetune.mode}, layers {job.layers})",
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
