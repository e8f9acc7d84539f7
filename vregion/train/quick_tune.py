"""Short LoRA tunings merged back into the model: the probe's all-layer tuning and prune healing.

Both are the same recipe, `lora_tune`: LoRA on some LLM layers plus the full projector, a few
hundred steps of `train_steps`, then the adapter merged so the caller gets a plain model back.
`probe_tune` and `heal` only say which layers, data and settings.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from vregion.config import Params
from vregion.data.dataset import RecordDataset, resolve_mix, training_loader
from vregion.devices import resolve_precision
from vregion.models.layer_map import layer_map
from vregion.train.loop import train_steps
from vregion.train.selective import make_region_trainable, trainable_groups


def lora_tune(
    model: nn.Module,
    layers: Sequence[int],
    data: RecordDataset,
    *,
    lora: dict,
    batch_size: int,
    seed: int,
    workers: int | str,
    projector_lr: float,
    llm_lr: float,
    steps: int,
    warmup_ratio: float,
    precision: str,
    device: torch.device,
    desc: str,
) -> tuple[nn.Module, list[dict]]:
    """LoRA on `layers` (and the projector) of `model` itself, trained `steps` steps on `data`,
    merged back: (the merged model in eval mode, the loss curve). Deep-copy first to keep one.
    `lora`: `make_region_trainable`'s lora_r, lora_alpha and lora_dropout."""
    model = make_region_trainable(model, layers, mode="lora", **lora)
    # The loader after the adapter: LoRA's initialisation draws from torch's global generator.
    batches = training_loader(data, batch_size, device=device, seed=seed, workers=workers)
    groups = trainable_groups(model, projector_lr=projector_lr, llm_lr=llm_lr)
    curve = train_steps(
        model,
        batches,
        groups,
        steps=steps,
        warmup_ratio=warmup_ratio,
        precision=precision,
        device=device,
        desc=desc,
    )
    return model.merge_and_unload().eval(), curve


def probe_tune(model, processor, data: RecordDataset, p: Params, device, precision):
    """A short all-layer LoRA tuning on a copy; returns the merged tuned model and its curve."""
    lmap = layer_map(model)
    lora = dict(lora_r=p.probe.lora_r, lora_alpha=2 * p.probe.lora_r, lora_dropout=0.05)
    return lora_tune(
        copy.deepcopy(model),
        range(lmap.num_layers),
        data,
        lora=lora,
        batch_size=min(p.probe.batch_size, len(data)),
        seed=p.model.seed,
        workers=0,
        projector_lr=p.probe.tune_lr,
        llm_lr=p.probe.tune_lr,
        steps=p.probe.tune_steps,
        warmup_ratio=0.1,
        precision=precision,
        device=device,
        desc="probe tuning (all layers)",
    )


def heal(model, processor, region_after: list[int], p: Params, device, data_dir: str):
    """A short LoRA pass on the pruned model's region (and projector), merged back; trains on
    the finetune data mix under `data_dir`."""
    f = p.finetune
    lora = dict(lora_r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout)
    train = RecordDataset(
        resolve_mix(f.data, p.model.seed, data_dir), processor, p.model.system_prompt
    )
    return lora_tune(
        model,
        region_after,
        train,
        lora=lora,
        batch_size=f.batch_size,
        seed=p.model.seed,
        workers=f.loader.workers,
        projector_lr=f.projector_lr,
        llm_lr=p.prune.heal_lr,
        steps=p.prune.heal_steps,
        warmup_ratio=f.warmup_ratio,
        precision=resolve_precision(f.precision, device),
        device=device,
        desc="healing",
    )
