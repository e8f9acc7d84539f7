"""Stage 1, alignment: teach the projector to map vision features into the frozen LLM.

The LLM is frozen; the projector trains; the vision tower is frozen unless `vision_lr` > 0.
The held-out caption loss is measured before and after, and again with images shuffled across
captions: if the model uses the image, the shuffled loss stays clearly above the matched one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from vregion.config import AlignConfig
from vregion.data.dataset import RecordDataset, total_steps, training_loader
from vregion.data.imageset import ImageSet
from vregion.models.layer_map import layer_map, parameter_counts, vision_parameters
from vregion.train.loop import deranged, mean_answer_loss, train_steps

log = logging.getLogger(__name__)


@dataclass
class AlignResult:
    curve: list[dict] = field(default_factory=list)
    """One row per step: step, loss, lr, seconds."""
    metrics: dict = field(default_factory=dict)


def freeze_for_alignment(model, train_vision: bool) -> dict[str, int]:
    """Freeze everything but the projector (and the tower when asked); return parameter counts."""
    lmap = layer_map(model)
    model.requires_grad_(False)
    lmap.projector.requires_grad_(True)
    if train_vision:
        lmap.vision_tower.requires_grad_(True)
    counts = parameter_counts(model)
    return {k: counts[k] for k in ("trainable_params", "total_params")}


def train_alignment(
    model,
    processor,
    train: RecordDataset,
    held_out: ImageSet,
    cfg: AlignConfig,
    system_prompt: str,
    *,
    precision: str,
    device: torch.device,
    seed: int = 0,
) -> AlignResult:
    """Train the projector in place for `cfg.steps` steps (or `cfg.epochs` passes over `train`),
    streaming `train` through a DataLoader; returns the loss curve and metrics."""
    result = AlignResult()
    counts = freeze_for_alignment(model, train_vision=cfg.vision_lr > 0)
    lmap = layer_map(model)
    groups = [{"params": list(lmap.projector.parameters()), "lr": cfg.lr}]
    if cfg.vision_lr > 0:
        # vision_parameters: Qwen-VL nests its projector inside the tower; no parameter twice.
        groups.append({"params": vision_parameters(lmap), "lr": cfg.vision_lr})
    shuffled = deranged(held_out.images, seed)
    kw = dict(batch_size=cfg.batch_size, precision=precision, device=device)

    def evaluate(tag: str) -> None:
        m = result.metrics
        m[f"{tag}_caption_loss"] = mean_answer_loss(
            model, processor, held_out, system_prompt, desc=f"{tag}: caption loss", **kw
        )
        m[f"{tag}_shuffled_image_loss"] = mean_answer_loss(
            model,
            processor,
            held_out,
            system_prompt,
            images=shuffled,
            desc=f"{tag}: shuffled-image loss",
            **kw,
        )

    evaluate("before")
    steps = total_steps(cfg.steps, cfg.epochs, len(train), cfg.batch_size, 1, 1)
    batches = training_loader(
        train,
        cfg.batch_size,
        device=device,
        seed=seed,
        workers=cfg.loader.workers,
        prefetch_factor=cfg.loader.prefetch_factor,
        group_by_length=cfg.loader.group_by_length,
    )
    t0 = time.perf_counter()
    result.curve = train_steps(
        model,
        batches,
        groups,
        steps=steps,
        warmup_ratio=cfg.warmup_ratio,
        precision=precision,
        device=device,
        desc="align (projector)",
    )
    seconds = time.perf_counter() - t0
    model.requires_grad_(False)
    evaluate("after")
    m = result.metrics
    m["image_use_gap"] = m["after_shuffled_image_loss"] - m["after_caption_loss"]
    m.update(counts)
    m.update(
        steps=steps,
        batch_size=cfg.batch_size,
        train_records=len(train),
        seconds_per_step=round(seconds / steps, 3),
        precision=precision,
        device=device.type,
    )
    log.info("alignment: %s", m)
    return result
