"""Everything measured about one checkpoint, each in a fresh process so peak memory is its own.

A checkpoint gets: held-out visual accuracy per kind with the blind control and chance (the
synthetic set), exact-match accuracy on a LLaVA-format eval set when given, the text-skill
measure, prefill/decode tokens/s, parameter count, size on disk and peak memory.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vregion.data.encode import prompt_batch
from vregion.data.records import read_jsonl
from vregion.data.text_skill import read_text_set, score_text_skill
from vregion.devices import peak_memory_mb, pick_device, resolve_precision
from vregion.eval.speed import generation_speed, parameter_count, size_on_disk
from vregion.eval.visual import open_answer_accuracy, visual_accuracy
from vregion.train.loop import ImageSet


@dataclass
class EvalJob:
    """What to measure on which checkpoint (picklable: paths and ids, not objects)."""

    checkpoint: str
    system_prompt: str
    image_root: str
    vqa: str | None = None
    """Synthetic questions (JSONL with `choices`); None skips visual accuracy."""
    vqa_ids: list[str] | None = None
    """Subset of `vqa` to use (None: all)."""
    llava_eval: str | None = None
    """LLaVA-format eval records (JSONL) scored by exact match, and their image root."""
    llava_image_root: str | None = None
    text_items: str | None = None
    """Text-skill items (JSONL); None skips the text measure."""
    batch_size: int = 16
    precision: str = "auto"
    seed: int = 0
    speed_batch: int = 4
    new_tokens: int = 16
    speed_repeats: int = 3
    extra: dict = field(default_factory=dict)


def _load(job: EvalJob, path: str, root: str, ids: list[str] | None = None) -> ImageSet:
    samples = list(read_jsonl(path))
    if ids is not None:
        keep = set(ids)
        samples = [s for s in samples if s.id in keep]
    return ImageSet.load(samples, root)


def evaluate_checkpoint(job: EvalJob) -> dict:
    """Measure one checkpoint in this process (see module doc)."""
    from vregion.models.layer_map import layer_map
    from vregion.models.loading import load_lvlm

    device = pick_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    precision = resolve_precision(job.precision, device)
    model, processor = load_lvlm(job.checkpoint)
    model.to(device).eval()
    out: dict = {
        "checkpoint": job.checkpoint,
        "num_layers": layer_map(model).num_layers,
        "parameters": parameter_count(model),
        "size_mb": round(size_on_disk(job.checkpoint) / 2**20, 2),
        "precision": precision,
    }
    kw = dict(batch_size=job.batch_size, precision=precision, device=device, seed=job.seed)
    vqa = None
    if job.vqa:
        vqa = _load(job, job.vqa, job.image_root, job.vqa_ids)
        out["visual"] = visual_accuracy(model, processor, vqa, job.system_prompt, **kw)
    if job.llava_eval:
        llava = _load(job, job.llava_eval, job.llava_image_root or job.image_root)
        out["llava_eval"] = open_answer_accuracy(model, processor, llava, job.system_prompt, **kw)
    if job.text_items:
        text = score_text_skill(
            model,
            processor.tokenizer,
            read_text_set(job.text_items),
            job.system_prompt,
            batch_size=job.batch_size,
        )
        out["text"] = {
            "mc_accuracy": round(text["mc_accuracy"], 4),
            "answer_nll": round(text["answer_nll"], 4),
            "mc_items": text["mc_items"],
            "ppl_items": text["ppl_items"],
        }
    if vqa is not None and job.speed_repeats > 0:
        n = min(job.speed_batch, len(vqa))
        # left-padded, as generation needs
        batch = prompt_batch(processor, vqa.samples[:n], vqa.images[:n], job.system_prompt)
        out["speed"] = generation_speed(
            model,
            batch,
            new_tokens=job.new_tokens,
            repeats=job.speed_repeats,
            precision=precision,
            device=device,
        )
    out["peak_memory_mb"] = round(peak_memory_mb(device), 1)
    return out


def evaluate_isolated(job: EvalJob) -> dict:
    """`evaluate_checkpoint` in a fresh spawned process: peak memory is this model's alone."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(evaluate_checkpoint, job).result()


def checkpoint_exists(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()
