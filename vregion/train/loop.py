"""One training loop for every stage: answer-token loss, param groups, cosine schedule, progress.

Alignment (projector only), probe tuning and selective visual instruction tuning differ only in
which parameters train and at which learning rate; they all call `train_steps`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable

import torch
from transformers import get_cosine_schedule_with_warmup

from vregion.data.encode import IGNORE_INDEX, collate
from vregion.data.imageset import ImageSet, take
from vregion.devices import autocast
from vregion.progress import track


def answer_nll_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled positions, and how many there are (from full logits)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return nll, int(mask.sum())


LOSSES = ("labelled", "full")
"""How `answer_nll` gets its logits: the LM head on the labelled positions only, or on every
position (the old way, kept so `benchmarks/selective_step_time.py` can measure the difference)."""


def answer_nll(
    model,
    batch: dict,
    labels: torch.Tensor,
    *,
    precision: str,
    device: torch.device,
    loss: str = "labelled",
) -> tuple[torch.Tensor, int]:
    """`model(**batch)`'s summed next-token NLL over the labelled positions, and their count.

    `loss="labelled"` applies the LM head only to positions whose next token is labelled
    (transformers' boolean `logits_to_keep`): a batch x sequence x vocabulary logits tensor
    (17 GB in fp32 for Llama-3's 128K vocabulary, 16 x 2,048 tokens) is never made. The model is
    still called as a whole, so DDP and FSDP wrappers see their usual forward.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "full":
        with autocast(precision, device):
            logits = model(**batch).logits
        return answer_nll_sums(logits, labels)
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    targets = labels[:, 1:][keep[:, :-1]]  # row-major, the order logits_to_keep returns
    with autocast(precision, device):
        logits = model(**batch, logits_to_keep=keep).logits
    if logits.shape[:-1] != targets.shape:
        if logits.shape[:2] == labels.shape:  # a model that ignores `logits_to_keep`
            return answer_nll_sums(logits, labels)
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for "
            f"{targets.numel()} labelled positions"
        )
    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return nll, targets.numel()


def batches_of(
    processor, data: ImageSet, system_prompt: str, batch_size: int, images: list | None = None
):
    """Model-ready batches over `data` in order (optionally with other `images`)."""
    images = data.images if images is None else images
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        yield collate(processor, data.samples[sl], list(images[sl]), system_prompt)


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
    for batch in track(
        batches_of(processor, data, system_prompt, batch_size, images),
        total=n_batches,
        desc=desc,
        unit="batch",
        leave=False,
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        nll, n = answer_nll(model, batch, labels, precision=precision, device=device)
        total += float(nll)
        count += n
    return total / max(count, 1)


def deranged(images: list, seed: int) -> list:
    """The same images, each moved to another record (blind control: the image no longer fits)."""
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    source = [0] * len(order)
    # Rolling a shuffled order by one is a derangement: no record keeps its own image.
    for a, b in zip(order, order[1:] + order[:1], strict=True):
        source[a] = b
    return take(images, source)


def train_steps(
    model,
    batches: Iterable[dict],
    groups: list[dict],
    *,
    steps: int,
    warmup_ratio: float,
    precision: str,
    device: torch.device,
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,
    desc: str = "train",
    on_step: Callable[[dict, torch.optim.Optimizer, object], None] | None = None,
    start_step: int = 0,
    resume_state: dict | None = None,
    load_optimizer: Callable[[torch.optim.Optimizer, dict], None] | None = None,
    loss: str = "labelled",
) -> list[dict]:
    """Train `groups` (AdamW param groups with their own `lr`) for `steps` optimizer steps.

    `batches` yields model-ready padded batches (with `labels`), `grad_accum` of them per step,
    already positioned after the steps done (`training_loader(start_batch=...)`). Returns one
    row per step: step, loss, lr of the first group, seconds (data waits included). To resume,
    pass the `start_step` done and `resume_state` ({"optimizer", "scheduler"} state dicts);
    `load_optimizer(optimizer, state)` replaces `optimizer.load_state_dict` (FSDP's state is
    keyed by name). `on_step(row, optimizer, scheduler)` runs after every step (e.g. to
    checkpoint). `loss` says how logits are made (see `answer_nll`; `full` only to measure).
    """
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    if resume_state:
        (load_optimizer or type(optimizer).load_state_dict)(optimizer, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
    stream = iter(batches)
    curve: list[dict] = []
    model.train()
    bar = track(
        range(start_step + 1, steps + 1), desc=desc, unit="step", initial=start_step, total=steps
    )
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
            labels = batch.pop("labels")
            nll, n = answer_nll(model, batch, labels, precision=precision, device=device, loss=loss)
            loss_value = nll / max(n, 1) / grad_accum
            loss_value.backward()
            step_loss += loss_value.item()
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
        bar.note(loss=step_loss, lr=row["lr"])
    model.eval()
    return curve
