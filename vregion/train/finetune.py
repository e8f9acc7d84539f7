"""Stage 2, visual instruction tuning of the visual region, one process or many (Ray Train).

`finetune_worker` is the per-worker loop: load the aligned model, make only the region (and the
projector) trainable, stream this rank's batches of the data mix through a DataLoader (workers
decode and tokenize; the batch order is seeded and resumes exactly at the step reached), resume
from the latest checkpoint if there is one, train, and checkpoint the trainable weights with the optimizer state through
`ray.train.report`. `run_finetune` starts it on a `TorchTrainer` and `export_tuned` turns the
final checkpoint into a PEFT adapter and a merged HF checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vregion.config import DataMix
from vregion.data.dataset import RecordDataset, resolve_mix, training_loader
from vregion.devices import peak_memory_mb, pick_device, resolve_precision
from vregion.progress import log_every
from vregion.train.loop import train_steps
from vregion.train.selective import (
    LoraSettings,
    make_region_trainable,
    parameter_counts,
    trainable_groups,
)

STATE_FILE = "trainable.pt"


@dataclass
class FinetuneJob:
    """Everything a worker needs, picklable (paths, not objects)."""

    aligned: str
    """Aligned checkpoint directory."""
    data: list[dict]
    """The training mix (`DataMix` fields per entry), resolved in each worker."""
    data_dir: str
    """Where `prepare` and `ingest` wrote the validated records (absolute: workers run elsewhere)."""
    layers: list[int]
    """The region: LLM layers to train."""
    mode: str = "lora"
    lora: dict = field(default_factory=lambda: asdict(LoraSettings()))
    projector_lr: float = 2e-5
    llm_lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    gradient_checkpointing: bool = False
    precision: str = "auto"
    dtype: str = "auto"
    """Master weights' dtype (`model.dtype`); auto: the aligned checkpoint's."""
    system_prompt: str = "Answer briefly."
    seed: int = 0
    checkpoint_every: int = 25
    train_vision: bool = False
    parallel: str = "ddp"
    """How several workers share the model: `ddp` (a full copy each) or `fsdp` (sharded)."""
    loader_workers: int | str = "auto"
    prefetch_factor: int = 2
    group_by_length: bool = False


def run_name(job: FinetuneJob) -> str:
    """Same job, same name: a rerun after an interruption finds and resumes its checkpoints."""
    settings = {k: v for k, v in asdict(job).items() if k not in ("aligned", "data_dir")}
    # A new aligned model or new records (a rerun of prepare/ingest): a new run.
    files = [Path(job.aligned, "model.safetensors")]
    files += [
        Path(part.records)
        for part in resolve_mix([DataMix(**d) for d in job.data], job.seed, job.data_dir)
    ]
    stamps = [f.stat().st_mtime_ns if f.is_file() else 0 for f in files]
    digest = hashlib.sha1(json.dumps([settings, stamps], sort_keys=True).encode()).hexdigest()
    return f"finetune-{digest[:12]}"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights that train: what a checkpoint needs to resume."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_trainable(job: FinetuneJob, device: torch.device):
    """The aligned model with only the region trainable (a PeftModel in LoRA mode)."""
    from vregion.models.loading import load_lvlm

    model, processor = load_lvlm(job.aligned, dtype=job.dtype)
    if job.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = make_region_trainable(
        model,
        job.layers,
        mode=job.mode,
        lora=LoraSettings(**job.lora),
        train_vision=job.train_vision,
    )
    return model.to(device), processor


def job_dataset(job: FinetuneJob, processor) -> RecordDataset:
    """The job's data mix as a streaming dataset (records read by offset, images per batch)."""
    mix = [DataMix(**entry) for entry in job.data]
    return RecordDataset(resolve_mix(mix, job.seed, job.data_dir), processor, job.system_prompt)


def worker_batches(job: FinetuneJob, processor, device, rank: int, world: int, start_step: int):
    """This rank's batches: disjoint shards of each step's global batch, from `start_step` on."""
    return training_loader(
        job_dataset(job, processor),
        job.batch_size,
        device=device,
        rank=rank,
        world=world,
        seed=job.seed,
        start_batch=start_step * job.grad_accum,
        workers=job.loader_workers,
        prefetch_factor=job.prefetch_factor,
        group_by_length=job.group_by_length,
    )


def finetune_worker(config: dict) -> None:
    """Ray Train per-worker loop (also runs as a single process without Ray)."""
    import ray.train
    import ray.train.torch

    job = FinetuneJob(**config["job"])
    if config.get("threads"):  # Ray pins OMP threads to 1 per worker unless told otherwise
        torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("progress") is not None and rank == 0:  # ranks step together: one reports
        from vregion import progress
        from vregion.distributed import worker_progress

        progress.reporters.append(worker_progress(config["progress"], config["log_every"]))
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed)
    model, processor = build_trainable(job, device)
    counts = parameter_counts(model)
    start_step, resume = 0, None
    curve: list[dict] = []  # the whole loss curve travels with each checkpoint
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        # A directory of this worker's own: `as_directory()` shares one per node, and a second
        # worker there may download into it again while the first is still reading.
        with tempfile.TemporaryDirectory(prefix="vr-resume-") as d:
            checkpoint.to_directory(d)
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["weights"], strict=False)
        start_step, resume = (
            saved["step"],
            {"optimizer": saved["optimizer"], "scheduler": saved["scheduler"]},
        )
        curve.extend(saved["curve"])
    sharded = world > 1 and job.parallel == "fsdp"
    trained, load_optimizer = model, None
    if sharded:  # sharding replaces the parameters: the optimizer groups come after it
        from vregion.train import sharding

        trained = model = sharding.shard_model(model)
        load_optimizer = lambda opt, state: sharding.load_full_optimizer_state(model, opt, state)  # noqa: E731
    elif world > 1:
        trained = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    groups = trainable_groups(model, projector_lr=job.projector_lr, llm_lr=job.llm_lr)
    from vregion.train.sharding import resident_params

    counts["worker_resident_params"] = resident_params(model)
    precision = resolve_precision(job.precision, device)

    def on_step(row: dict, optimizer, scheduler) -> None:
        curve.append(row)
        if row["step"] % job.checkpoint_every and row["step"] != job.steps:
            # No report between checkpoints: each one is a barrier across workers (~0.4 s on a
            # busy 2-core CPU). The loss curve travels with the checkpoints instead.
            return
        metrics = {
            **row,
            **counts,
            "resumed_from": start_step,
            "world_size": world,
            "peak_memory_mb": round(peak_memory_mb(device), 1),
        }
        if sharded:  # gathering the shards is a collective: every rank takes part
            weights = sharding.full_trainable_state(model)
            optimizer_state = sharding.full_optimizer_state(model, optimizer)
        elif rank == 0:  # every rank holds the same weights (DDP); one copy is enough
            weights, optimizer_state = trainable_state(model), optimizer.state_dict()
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save(
                    {
                        "weights": weights,
                        "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict(),
                        "step": row["step"],
                        "curve": curve,
                    },
                    Path(d) / STATE_FILE,
                )
                (Path(d) / "job.json").write_text(json.dumps(asdict(job)))
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            )

    train_steps(
        trained,
        worker_batches(job, processor, device, rank, world, start_step),
        groups,
        steps=job.steps,
        warmup_ratio=job.warmup_ratio,
        precision=precision,
        device=device,
        grad_accum=job.grad_accum,
        desc=f"finetune (worker {rank})",
        on_step=on_step,
        start_step=start_step,
        resume_state=resume,
        load_optimizer=load_optimizer,
    )


def run_finetune(
    job: FinetuneJob,
    *,
    name: str,
    local_dir: str | Path,
    num_workers: int = 1,
    use_gpu: bool = False,
    train_fn=finetune_worker,
    cpus_per_worker: int | None = None,
    placement_strategy: str = "PACK",
    max_failures: int = 2,
    progress=None,
):
    """Run `train_fn` (the finetune loop) on a TorchTrainer; returns the Ray `Result`.

    Reusing `name` with the same storage resumes that run from its latest checkpoint. On CPU
    each worker gets `cpus_per_worker` cores (default: the Ray cluster's CPUs split evenly).
    `placement_strategy="SPREAD"` puts the workers on different nodes where it can. A worker
    group that fails (a worker or its node lost) restarts from the latest checkpoint up to
    `max_failures` times. `progress`: a `vregion.distributed.progress_relay()` queue for rank
    0's progress events.
    """
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from vregion.distributed import run_config

    resources, threads = None, None
    if not use_gpu:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        threads = cpus_per_worker or max(1, cpus // num_workers)
        resources = {"CPU": threads}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={
            "job": asdict(job),
            "threads": threads,
            "progress": progress,
            "log_every": log_every(),
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=run_config(name, local_dir, max_failures=max_failures),
    )
    return trainer.fit()


def export_tuned(job: FinetuneJob, checkpoint_dir: str | Path, out_dir: str | Path) -> dict:
    """Final weights → `out_dir/adapter` (PEFT, LoRA mode) and `out_dir/merged` (plain HF)."""
    from vregion.models.base import save_checkpoint

    saved = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    model, processor = build_trainable(job, torch.device("cpu"))
    missing = set(saved["weights"]) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint weights not in the model: {sorted(missing)[:3]}")
    model.load_state_dict(saved["weights"], strict=False)
    out_dir = Path(out_dir)
    if job.mode == "lora":
        model.save_pretrained(out_dir / "adapter")
        model = model.merge_and_unload()
    model.requires_grad_(False)
    save_checkpoint(model, processor, out_dir / "merged")
    return {"step": saved["step"], "adapter": job.mode == "lora", "curve": saved["curve"]}


def train_metrics(
    result_metrics: dict, curve: list[dict], job: FinetuneJob, use_gpu: bool, records: int
) -> dict:
    """metrics/train.json: the run's speed, memory, parameter counts and loss, from the final
    Ray result's metrics and the whole loss curve."""
    steps = [row["seconds"] for row in curve[1:]] or [row["seconds"] for row in curve]
    per_step = statistics.median(steps)  # the first step pays for warm-up
    world = result_metrics["world_size"]
    tail = [row["loss"] for row in curve[-10:]]
    return {
        "region": job.layers,
        "region_size": len(job.layers),
        "data": [d["source"] for d in job.data],
        "train_records": records,
        "epochs": round(len(curve) * job.batch_size * job.grad_accum * world / records, 3),
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
