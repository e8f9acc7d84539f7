"""One training loop for every stage: answer-token loss, param groups, cosine schedule, progress.

Alignment (projector only), probe tuning and selective visual instruction tuning differ only in
which parameters train and at which learning rate; they all call `train_steps`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vregion.data.encode import IGNORE_INDEX, collate, load_image
from vregion.data.records import Sample
from vregion.devices import autocast


@dataclass
class ImageSet:
    """Records plus their images, loaded once (synthetic images are tiny)."""

    samples: list[Sample]
    images: list  # PIL images or None, aligned with samples

    @classmethod
    def load(cls, samples: list[Sample], image_root: str | Path) -> ImageSet:
        """The records with their images read from `image_root`."""
        return cls(samples, [load_image(image_root, s) for s in samples])

    def batch(self, idx: Sequence[int]) -> tuple[list[Sample], list]:
        return [self.samples[i] for i in idx], [self.images[i] for i in idx]

    def __len__(self) -> int:
        return len(self.samples)


def answer_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there are."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return nll, int(mask.sum())


def batches_of(
    processor, data: ImageSet, system_prompt: str, batch_size: int, images: list | None = None
):
    """Model-ready batches over `data` in order (optionally with other `images`)."""
    images = data.images if images is None else images
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        yield collate(processor, data.samples[sl], images[sl], system_prompt)


@torch.no_grad()
def mean_answer_loss(
    model,
    processor,
    data: ImageSet,
    system_prompt: str,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    images: list | None = None,
    desc: str = "eval",
) -> float:
    """Mean per-token answer NLL over `data` (token-weighted across batches)."""
    model.eval()
    total, count = 0.0, 0
    n_batches = math.ceil(len(data) / batch_size)
    for batch in tqdm(
        batches_of(processor, data, system_prompt, batch_size, images),
        total=n_batches,
        desc=desc,
        unit="batch",
        leave=False,
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast(precision, device):
            logits = model(**batch).logits
        nll, n = answer_nll_sums(logits, labels)
        total += float(nll)
        count += n
    return total / max(count, 1)


def deranged(images: list, seed: int) -> list:
    """The same images, each moved to another record (blind control: the image no longer fits)."""
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    out = [None] * len(order)
    # Rolling a shuffled order by one is a derangement: no record keeps its own image.
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        out[a] = images[b]
    return out


def train_steps(
    model,
    processor,
    data: ImageSet,
    groups: list[dict],
    *,
    steps: int,
    batch_size: int,
    warmup_ratio: float,
    system_prompt: str,
    precision: str,
    device: torch.device,
    seed: int = 0,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    desc: str = "train",
    on_step: Callable[[dict, torch.optim.Optimizer, object], None] | None = None,
    start_step: int = 0,
    resume_state: dict | None = None,
    load_optimizer: Callable[[torch.optim.Optimizer, dict], None] | None = None,
) -> list[dict]:
    """Train `groups` (AdamW param groups with their own `lr`) for `steps` optimizer steps.

    Each step sees `batch_size * grad_accum` records, drawn in shuffled epochs. Returns one row
    per step: step, loss, lr of the first group, seconds. To resume, pass the `start_step` done
    and `resume_state` ({"optimizer", "scheduler"} state dicts); the data order continues where
    it stopped; `load_optimizer(optimizer, state)` replaces `optimizer.load_state_dict` (FSDP's
    state is keyed by name). `on_step(row, optimizer, scheduler)` runs after every step (e.g.
    to checkpoint).
    """
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    if resume_state:
        (load_optimizer or type(optimizer).load_state_dict)(optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    rng = random.Random(seed)
    order: list[int] = []

    def next_batch() -> list[int]:
        nonlocal order
        if len(order) < batch_size:  # epochs of shuffled records
            more = list(range(len(data)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        return idx

    for _ in range(start_step * grad_accum):  # replay the data order of the steps already done
        next_batch()
    curve: list[dict] = []
    model.train()
    bar = tqdm(
        range(start_step + 1, steps + 1), desc=desc, unit="step", initial=start_step, total=steps
    )
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            idx = next_batch()
            batch = collate(processor, *data.batch(idx), system_prompt)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast(precision, device):
                logits = model(**batch).logits
            nll, n = answer_nll_sums(logits, labels)
            loss = nll / max(n, 1) / grad_accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        row = {
            "step": step,
            "loss": round(step_loss, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        curve.append(row)
        if on_step is not None:
            on_step(row, optimizer, scheduler)
        bar.set_postfix(loss=f"{step_loss:.3f}")
    model.eval()
    return curve
