"""Everything measured about one checkpoint, each in a fresh process so peak memory is its own.

A checkpoint gets, for every held-out set: accuracy per kind with the blind control and chance
when its records carry `choices` (the synthetic questions; the first such set is the headline
`visual`), else exact match of the greedy answer beside the blind control (`open_answer`,
LLaVA-format sets); then the text-skill measure, prefill/decode tokens/s, parameter count, size on disk and peak memory.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from vregion.data.dataset import part_from_dict
from vregion.data.encode import prompt_batch
from vregion.data.imageset import ImageSet
from vregion.data.text_skill import read_text_set
from vregion.devices import peak_memory_mb, pick_device, resolve_precision
from vregion.eval.speed import generation_speed, size_on_disk
from vregion.eval.text_skill import score_text_skill
from vregion.eval.visual import open_answer_accuracy, visual_accuracy
from vregion.models.layer_map import parameter_counts


@dataclass
class EvalJob:
    """What to measure on which checkpoint (picklable: paths and ids, not objects)."""

    checkpoint: str
    system_prompt: str
    sets: dict[str, list[dict]] = field(default_factory=dict)
    """Held-out sets: name -> parts (`part_to_dict`), the same rows for every model."""
    text_items: str | None = None
    """Text-skill items (JSONL); None skips the text measure."""
    batch_size: int = 16
    precision: str = "auto"
    seed: int = 0
    speed_batch: int = 4
    new_tokens: int = 16
    speed_repeats: int = 3
    extra: dict = field(default_factory=dict)


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
        "parameters": parameter_counts(model)["total_params"],
        "size_mb": round(size_on_disk(job.checkpoint) / 2**20, 2),
        "precision": precision,
    }
    kw = dict(batch_size=job.batch_size, precision=precision, device=device, seed=job.seed)
    first = None
    for name, parts in job.sets.items():
        data = ImageSet.from_parts([part_from_dict(d) for d in parts])
        first = first or data
        if all(s.choices for s in data.samples):
            table, rows = visual_accuracy(
                model, processor, data, job.system_prompt, questions=True, **kw
            )
            out.setdefault("visual", table)
            out.setdefault("visual_sets", {})[name] = table
            out.setdefault("questions", {})[name] = rows  # the stage writes them, per question
        else:
            out.setdefault("open_answer", {})[name] = open_answer_accuracy(
                model, processor, data, job.system_prompt, **kw
            )
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
    if first is not None and job.speed_repeats > 0:
        n = min(job.speed_batch, len(first))
        # left-padded, as generation needs
        batch = prompt_batch(processor, first.samples[:n], first.images[:n], job.system_prompt)
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
    """`evaluate_checkpoint` in a process of its own, so peak memory is this model's alone.

    The process forks from a server that has imported this module and the checkpoint's
    transformers code once, so each model after the first starts at once, not after ~3-5 s of
    imports (spawn). The server only imports: it runs no torch op, so it holds no threads."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_preload(job.checkpoint))  # ignored once the server runs
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(evaluate_checkpoint, job).result()


def _preload(checkpoint: str) -> list[str]:
    """Modules the forkserver imports: the caller's main module, or for `python -m stages.X`
    the modules it imports (each child re-runs a module run with -m by name, and runpy warns
    if that module is already imported; its imports loaded, the re-run is cheap), this module,
    and the modeling and processing code of the checkpoint's model types (transformers loads
    them lazily, ~3 s on 2 cores). The server skips a name that does not exist."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    modules = ["__main__"]
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        imported = {_module_of(v) for v in vars(main).values()}
        modules += sorted(m for m in imported if isinstance(m, str) and not m.startswith("_"))
    modules.append(__name__)
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # not a local checkpoint: evaluate_checkpoint reports what is wrong
    types = [config.get("model_type")]
    types += [(config.get(k) or {}).get("model_type") for k in ("text_config", "vision_config")]
    for model_type in filter(None, types):
        name = model_type_to_module_name(model_type)
        modules += [
            f"transformers.models.{name}.{kind}_{name}"
            for kind in ("modeling", "processing", "image_processing", "image_processing_pil")
        ]
    return list(dict.fromkeys(modules))


def _module_of(value) -> str | None:
    return value.__name__ if isinstance(value, ModuleType) else getattr(value, "__module__", None)


def checkpoint_exists(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def add_comparisons(results: dict, base_text: dict | None, baseline: str | None) -> None:
    """Text skill against the base LLM, and visual retention % against `baseline`."""
    ref = results.get(baseline, {}).get("visual") if baseline else None
    for r in results.values():
        if base_text and "text" in r:
            r["text"]["mc_accuracy_vs_base"] = round(
                r["text"]["mc_accuracy"] - base_text["mc_accuracy"], 4
            )
            r["text"]["answer_nll_vs_base"] = round(
                r["text"]["answer_nll"] - base_text["answer_nll"], 4
            )
        if ref and "visual" in r:
            for kind, row in r["visual"].items():
                row["retention_percent"] = round(
                    100 * row["accuracy"] / max(ref[kind]["accuracy"], 1e-9), 2
                )
