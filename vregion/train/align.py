"""Stage 1, alignment: teach the projector to map vision features into the frozen LLM.

The LLM is frozen; the projector trains; the vision tower is frozen unless `vision_lr` > 0.
The held-out caption loss is measured before and after, and again with images shuffled across
captions: if the model uses the image, the shuffled loss stays clearly above the matched one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vregion.config import AlignConfig
from vregion.data.encode import IGNORE_INDEX, collate
from vregion.data.records import Sample
from vregion.devices import autocast
from vregion.models.layer_map import layer_map, vision_parameters

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Records plus their images, loaded once (synthetic images are tiny)."""

    samples: list[Sample]
    images: list  # PIL images or None, aligned with samples

    def batch(self, idx: Sequence[int]) -> tuple[list[Sample], list]:
        return [self.samples[i] for i in idx], [self.images[i] for i in idx]


@dataclass
class AlignResult:
    curve: list[dict] = field(default_factory=list)
    """One row per step: step, loss, lr."""
    metrics: dict = field(default_factory=dict)


def freeze_for_alignment(model, train_vision: bool) -> dict[str, int]:
    """Freeze everything but the projector (and the tower when asked); return parameter counts."""
    lmap = layer_map(model)
    model.requires_grad_(False)
    lmap.projector.requires_grad_(True)
    if train_vision:
        lmap.vision_tower.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def answer_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there are."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return nll, int(mask.sum())


@torch.no_grad()
def caption_loss(
    model,
    processor,
    data: ImageSet,
    system_prompt: str,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    shuffle_images_seed: int | None = None,
) -> float:
    """Mean per-token answer NLL over `data`; with a seed, images are deranged across records."""
    images = list(data.images)
    if shuffle_images_seed is not None:
        order = list(range(len(images)))
        random.Random(shuffle_images_seed).shuffle(order)
        # Rolling a shuffled order by one is a derangement: no record keeps its own image.
        images = [None] * len(order)
        for a, b in zip(order, order[1:] + order[:1], strict=True):
            images[a] = data.images[b]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data.samples), batch_size):
        sl = slice(start, start + batch_size)
        batch = collate(processor, data.samples[sl], images[sl], system_prompt)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(precision, device):
            logits = model(**batch).logits
        nll, n = answer_nll_sums(logits, labels)
        total += float(nll)
        count += n
    return total / max(count, 1)


def train_alignment(
    model,
    processor,
    train: ImageSet,
    held_out: ImageSet,
    cfg: AlignConfig,
    system_prompt: str,
    *,
    precision: str,
    device: torch.device,
    seed: int = 0,
) -> AlignResult:
    """Train the projector in place for `cfg.steps` steps; returns the loss curve and metrics."""
    result = AlignResult()
    counts = freeze_for_alignment(model, train_vision=cfg.vision_lr > 0)
    lmap = layer_map(model)
    groups = [{"params": list(lmap.projector.parameters()), "lr": cfg.lr}]
    if cfg.vision_lr > 0:
        # vision_parameters: Qwen-VL nests its projector inside the tower; no parameter twice.
        groups.append({"params": vision_parameters(lmap), "lr": cfg.vision_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps
    )

    def evaluate(tag: str) -> None:
        kw = dict(batch_size=cfg.batch_size, precision=precision, device=device)
        result.metrics[f"{tag}_caption_loss"] = caption_loss(
            model, processor, held_out, system_prompt, **kw
        )
        result.metrics[f"{tag}_shuffled_image_loss"] = caption_loss(
            model, processor, held_out, system_prompt, shuffle_images_seed=seed, **kw
        )

    evaluate("before")
    rng = random.Random(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="align (projector)", unit="step")
    for step in bar:
        if len(order) < cfg.batch_size:  # epochs of shuffled records
            more = list(range(len(train.samples)))
            rng.shuffle(more)
            order += more
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        samples, images = train.batch(idx)
        batch = {
            k: v.to(device) for k, v in collate(processor, samples, images, system_prompt).items()
        }
        labels = batch.pop("labels")
        model.train()
        with autocast(precision, device):
            logits = model(**batch).logits
        nll, n = answer_nll_sums(logits, labels)
        loss = nll / max(n, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        result.curve.append({"step": step, "loss": round(loss.item(), 5), "lr": lr})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    model.requires_grad_(False)
    evaluate("after")
    m = result.metrics
    m["image_use_gap"] = m["after_shuffled_image_loss"] - m["after_caption_loss"]
    m.update(counts)
    m.update(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seconds_per_step=round(seconds / cfg.steps, 3),
        precision=precision,
        device=device.type,
    )
    log.info("alignment: %s", {k: v for k, v in m.items()})
    return result
