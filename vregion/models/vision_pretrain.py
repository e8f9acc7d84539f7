"""Pretrain the embedded model's vision tower without the LLM, as CLIP/SigLIP are for real LVLMs.

No pretrained vision weights exist offline, and a random tower trained only through a frozen
LLM stays nearly blind. So the tower first learns, per patch, the colour, shape and size of the
object under it and where that object's centre lies (labels come from the generator itself):
without the last, position and relation questions stayed at chance for every tuned model. Linear heads read the same features the
LLaVA projector will read (the last encoder hidden state), and are thrown away afterwards.
"""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import torch
from torch import nn

from vregion.data import synthetic
from vregion.devices import autocast
from vregion.progress import track

log = logging.getLogger(__name__)

HEADS = ("color", "shape", "size", "center_x", "center_y")


def _class_counts() -> dict[str, int]:
    # +1: class 0 is background
    return {
        "color": len(synthetic.COLORS) + 1,
        "shape": len(synthetic.SHAPES) + 1,
        "size": len(synthetic.SIZES) + 1,
        "center_x": synthetic.POSITION_BINS + 1,
        "center_y": synthetic.POSITION_BINS + 1,
    }


def make_patch_dataset(
    n_images: int, seed: int, image_size: int, patch_size: int, max_objects: int, image_processor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh synthetic images (own seed stream, never the train/eval split) and per-patch labels."""
    scenes = synthetic.generate_scenes(n_images, seed, image_size, max_objects)
    images = [synthetic.render(s, image_size) for s in scenes]
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    labels: dict[str, list[np.ndarray]] = {h: [] for h in HEADS}
    for s in scenes:
        per_patch = synthetic.patch_labels(s, image_size, patch_size)
        for h in HEADS:
            labels[h].append(np.asarray(per_patch[h]).reshape(-1))
    return pixels, {h: torch.as_tensor(np.stack(v), dtype=torch.long) for h, v in labels.items()}


def patch_features(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, patches, hidden): the last encoder hidden state, which LLaVA feeds its projector."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[-1]


@torch.no_grad()
def patch_accuracy(
    tower: nn.Module, heads: nn.ModuleDict, pixels: torch.Tensor, labels: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Accuracy of each head on patches that hold an object (background excluded)."""
    tower.eval()
    feats = torch.cat(
        [patch_features(tower, pixels[i : i + 128]) for i in range(0, len(pixels), 128)]
    )
    result = {}
    for h in HEADS:
        pred = heads[h](feats).argmax(-1)
        on_object = labels[h] > 0
        result[f"{h}_accuracy"] = float((pred[on_object] == labels[h][on_object]).float().mean())
    return result


def pretrain_tower(
    tower: nn.Module,
    image_processor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    image_size: int,
    patch_size: int,
    max_objects: int,
    seed: int,
    precision: str = "fp32",
    device: torch.device | None = None,
    eval_images: int = 256,
) -> dict[str, float]:
    """Train `tower` in place on per-patch colour/shape/size/object centre; returns held-out
    patch accuracies."""
    device = device or torch.device("cpu")
    counts = _class_counts()
    hidden = tower.config.hidden_size
    torch.manual_seed(seed)
    heads = nn.ModuleDict({h: nn.Linear(hidden, n) for h, n in counts.items()}).to(device)
    # A pool of images re-used across steps: generation is cheap but not free on 2 cores.
    pool = max(batch_size, min(steps * batch_size, 6000))
    base_seed = 7919 * (seed + 1)  # a seed stream of its own, apart from the train/eval splits
    pixels, labels = make_patch_dataset(
        pool, base_seed, image_size, patch_size, max_objects, image_processor
    )
    eval_pixels, eval_labels = make_patch_dataset(
        eval_images, base_seed + 1, image_size, patch_size, max_objects, image_processor
    )
    before = patch_accuracy(tower, heads, eval_pixels, eval_labels)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    tower.train()
    loss_fn = nn.CrossEntropyLoss()
    bar = track(range(steps), desc="pretrain vision tower", unit="step")
    for _ in bar:
        idx = torch.tensor(rng.sample(range(len(pixels)), batch_size))
        with autocast(precision, device):
            feats = patch_features(tower, pixels[idx].to(device))
            loss = sum(
                loss_fn(heads[h](feats).flatten(0, 1).float(), labels[h][idx].flatten().to(device))
                for h in HEADS
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        bar.note(loss=loss.item())
    after = patch_accuracy(tower, heads, eval_pixels, eval_labels)
    tower.eval()
    metrics = {f"before_{k}": v for k, v in before.items()}
    metrics.update(after)
    metrics["chance_color_accuracy"] = 1 / len(synthetic.COLORS)
    metrics["chance_shape_accuracy"] = 1 / len(synthetic.SHAPES)
    metrics["chance_center_accuracy"] = 1 / synthetic.POSITION_BINS
    log.info("vision tower pretraining: %s", metrics)
    return metrics
