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
import os
import statistics
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from vregion.config import FinetuneConfig, Params
from vregion.data.dataset import RecordDataset, resolve_mix, total_steps, training_loader
from vregion.devices import peak_memory_mb, pick_device, resolve_precision
from vregion.models.layer_map import parameter_counts
from vregion.progress import log_every
from vregion.train.loop import train_steps
from vregion.train.selective import make_region_trainable, trainable_groups

STATE_FILE = "trainable.pt"

RUN_NAME_IGNORES = frozenset(
    {"eval_data", "eval_samples", "eval_batch_size", "num_workers", "placement", "max_failures"}
    | {"use_gpu", "epochs"}
)
"""`FinetuneConfig` fields that leave the trained weights alone (the held-out check, where the
workers run; `epochs` is resolved into `FinetuneJob.steps`): changing them keeps the run name,
so an interrupted run still resumes."""


class FinetuneJob(BaseModel):
    """The stage's `FinetuneConfig`, whole, plus what only the run resolves; picklable (Ray
    ships it to the workers) and JSON-able (`job.json` in every checkpoint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: FinetuneConfig
    """`finetune` of params.yaml as validated; `steps`/`epochs` there are resolved into `steps`."""
    aligned: str
    """Aligned checkpoint directory (absolute: workers run elsewhere)."""
    data_dir: str
    """Where `prepare` and `ingest` wrote the validated records (absolute)."""
    layers: list[int]
    """The region: LLM layers to train (reports/region.json)."""
    steps: int
    """Optimizer steps to run: `config.steps`, or `config.epochs` over the mix's records."""
    dtype: str
    """Master weights' dtype (`model.dtype`); auto: the aligned checkpoint's."""
    system_prompt: str
    """`model.system_prompt`."""
    seed: int
    """Training seed: LoRA initialisation, dropout, batch order (`finetune.seed`, or `model.seed`
    when that is null)."""
    data_seed: int
    """Which records the data mix takes (`model.seed`, as in every other stage)."""

    @classmethod
    def resolve(
        cls, p: Params, layers: list[int], *, aligned: str | Path, data_dir: str | Path
    ) -> FinetuneJob:
        """The job `p` describes for this region, with absolute paths and the step count."""
        f = p.finetune
        data_dir = str(Path(data_dir).resolve())  # Ray workers do not share our working dir
        records = sum(len(part.rows) for part in resolve_mix(f.data, p.model.seed, data_dir))
        return cls(
            config=f,
            aligned=str(Path(aligned).resolve()),
            data_dir=data_dir,
            layers=list(layers),
            steps=total_steps(
                f.steps, f.epochs, records, f.batch_size, f.num_workers, f.grad_accum
            ),
            dtype=p.model.dtype,
            system_prompt=p.model.system_prompt,
            seed=p.model.seed if f.seed is None else f.seed,
            data_seed=p.model.seed,
        )

    def run_name(self) -> str:
        """Same settings, same name: a rerun after an interruption finds and resumes its
        checkpoints. A new aligned model or new records (a rerun of prepare/ingest): a new run."""
        settings = self.model_dump(
            mode="json", exclude={"aligned": True, "data_dir": True, "config": RUN_NAME_IGNORES}
        )
        files = [Path(self.aligned, "model.safetensors")]
        files += [Path(part.records) for part in self.parts()]
        stamps = [f.stat().st_mtime_ns if f.is_file() else 0 for f in files]
        digest = hashlib.sha1(json.dumps([settings, stamps], sort_keys=True).encode()).hexdigest()
        return f"finetune-{digest[:12]}"

    def parts(self):
        """The training mix resolved to record files and rows (`vregion.data.dataset.Part`s)."""
        return resolve_mix(self.config.data, self.data_seed, self.data_dir)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights that train: what a checkpoint needs to resume."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def build_trainable(job: FinetuneJob, device: torch.device):
    """The aligned model with only the region trainable (a PeftModel in LoRA mode)."""
    from vregion.models.loading import load_lvlm

    c = job.config
    model, processor = load_lvlm(job.aligned, dtype=job.dtype)
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = make_region_trainable(
        model,
        job.layers,
        mode=c.mode,
        lora_r=c.lora_r,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        train_vision=c.train_vision,
    )
    return model.to(device), processor


def job_dataset(job: FinetuneJob, processor) -> RecordDataset:
    """The job's data mix as a streaming dataset (records read by offset, images per batch)."""
    return RecordDataset(job.parts(), processor, job.system_prompt)


def worker_batches(job: FinetuneJob, processor, device, rank: int, world: int, start_step: int):
    """This rank's batches: disjoint shards of each step's global batch, from `start_step` on."""
    c = job.config
    return training_loader(
        job_dataset(job, processor),
        c.batch_size,
        device=device,
        rank=rank,
        world=world,
        seed=job.seed,
        start_batch=start_step * c.grad_accum,
        workers=c.loader.workers,
        prefetch_factor=c.loader.prefetch_factor,
        group_by_length=c.loader.group_by_length,
    )


def finetune_worker(config: dict) -> None:
    """Ray Train per-worker loop (also runs as a single process without Ray)."""
    import ray.train
    import ray.train.torch

    job: FinetuneJob = config["job"]
    c = job.config
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
    sharded = world > 1 and c.parallel == "fsdp"
    trained, load_optimizer = model, None
    if sharded:  # sharding replaces the parameters: the optimizer groups come after it
        from vregion.train import sharding

        trained = model = sharding.shard_model(model)
        load_optimizer = lambda opt, state: sharding.load_full_optimizer_state(model, opt, state)  # noqa: E731
    elif world > 1:
        trained = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    groups = trainable_groups(model, projector_lr=c.projector_lr, llm_lr=c.llm_lr)
    from vregion.train.sharding import resident_params

    counts["worker_resident_params"] = resident_params(model)
    precision = resolve_precision(c.precision, device)

    def on_step(row: dict, optimizer, scheduler) -> None:
        curve.append(row)
        if row["step"] % c.checkpoint_every and row["step"] != job.steps:
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
                (Path(d) / "job.json").write_text(job.model_dump_json())
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            )

    train_steps(
        trained,
        worker_batches(job, processor, device, rank, world, start_step),
        groups,
        steps=job.steps,
        warmup_ratio=c.warmup_ratio,
        precision=precision,
        device=device,
        grad_accum=c.grad_accum,
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
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    train_fn=finetune_worker,
    cpus_per_worker: int | None = None,
    placement_strategy: str | None = None,
    max_failures: int | None = None,
    progress=None,
):
    """Run `train_fn` (the finetune loop) on a TorchTrainer; returns the Ray `Result`.

    `num_workers`, `use_gpu`, `placement_strategy` and `max_failures` default to the job's
    config (`num_workers`, `use_gpu` with `auto` resolved, `placement`, `max_failures`). Reusing `name` with the same storage resumes that run from its latest checkpoint. On CPU
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

    c = job.config
    num_workers = num_workers or c.num_workers
    use_gpu = resolve_use_gpu(c.use_gpu) if use_gpu is None else use_gpu
    placement_strategy = placement_strategy or c.placement
    max_failures = c.max_failures if max_failures is None else max_failures
    resources, threads = None, None
    if not use_gpu:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        threads = cpus_per_worker or max(1, cpus // num_workers)
        resources = {"CPU": threads}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={
            "job": job,
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


def resolve_use_gpu(setting: str | bool) -> bool:
    """`finetune.use_gpu`: `auto` means when this machine has CUDA."""
    from vregion.devices import gpu_available

    return gpu_available() if setting == "auto" else bool(setting)


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
    if job.config.mode == "lora":
        # PEFT writes the base's path into adapter_config.json and the model card: name it as
        # the stage is given it (relative to the working directory, the repo for `dvc repro`),
        # not by this clone's absolute path, so two clones write the same adapter.
        base = os.path.relpath(job.aligned)
        model.peft_config["default"].base_model_name_or_path = base
        inner = model.get_base_model()  # the card reads both of its names
        inner.config._name_or_path = inner.name_or_path = base
        model.save_pretrained(out_dir / "adapter")
        model = model.merge_and_unload()
    model.requires_grad_(False)
    save_checkpoint(model, processor, out_dir / "merged")
    return {"step": saved["step"], "adapter": job.config.mode == "lora", "curve": saved["curve"]}


def train_metrics(
    result_metrics: dict, curve: list[dict], job: FinetuneJob, use_gpu: bool, records: int
) -> dict:
    """metrics/train.json: the run's speed, memory, parameter counts and loss, from the final
    Ray result's metrics and the whole loss curve."""
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
