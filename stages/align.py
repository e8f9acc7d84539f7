"""align: stage-1 alignment, training the projector with the LLM frozen (models/aligned/).

Trains on `align.data` (the synthetic captions, or LLaVA-Pretrain-style caption records from
`data.sources`), streamed through a DataLoader. Writes the loss curve (DVC plot) and the
held-out caption loss before/after, beside the same loss with images shuffled across captions,
so the metrics show whether the image is used. `align.skip: true` keeps the base's trained
projector: models/aligned is models/base, its files hard-linked, and nothing trains.
"""

from __future__ import annotations

import shutil
import sys

import torch
from prefect import flow

from stages._common import run_stage, write_csv, write_json
from vregion.config import load_params
from vregion.data.dataset import RecordDataset, resolve_mix, sample_parts
from vregion.data.imageset import ImageSet
from vregion.devices import pick_device, resolve_precision
from vregion.models.base import EMBEDDED, link_checkpoint, save_checkpoint
from vregion.models.loading import load_lvlm
from vregion.train.align import train_alignment

CURVE_FIELDS = ["step", "loss", "lr", "seconds"]


def keep_base(embedded: bool, base: str, out: str, metrics_file: str, curve: str) -> dict:
    """`out` = `base` (hard links), an empty curve, metrics that say so."""
    metrics = {
        "skipped": True,
        "reason": "align.skip: the base checkpoint's projector is kept as it is",
        "steps": 0,
        "trainable_params": 0,
        **link_checkpoint(base, out),
    }
    if embedded:
        print("warning: align.skip with the embedded base keeps its untrained projector")
    write_csv(curve, [], fields=CURVE_FIELDS)
    write_json(metrics_file, metrics)
    return metrics


@flow(name="align", log_prints=True)
def align(
    base: str, data: str, out: str, metrics: str, curve: str, params: str = "params.yaml"
) -> dict:
    """Stage-1 alignment: train the projector.

    Args:
        base: base checkpoint to align
        data: data directory (prepare's and ingest's outputs)
        out: aligned checkpoint directory to write
        metrics: metrics file to write
        curve: loss curve CSV to write
        params: params file
    """
    p = load_params(params)
    if p.align.skip:
        return keep_base(p.model.base in EMBEDDED, base, out, metrics, curve)
    torch.manual_seed(p.model.seed)
    device = pick_device()
    precision = resolve_precision(p.align.precision, device)
    model, processor = load_lvlm(base, dtype=p.model.dtype)
    model.to(device)
    seed = p.model.seed
    train = RecordDataset(resolve_mix(p.align.data, seed, data), processor, p.model.system_prompt)
    held_out = ImageSet.from_parts(
        sample_parts(resolve_mix(p.align.eval_data, seed, data), p.align.eval_samples, seed)
    )
    result = train_alignment(
        model,
        processor,
        train,
        held_out,
        p.align,
        p.model.system_prompt,
        precision=precision,
        device=device,
        seed=seed,
    )
    result.metrics["data"] = [m.source for m in p.align.data]
    shutil.rmtree(out, ignore_errors=True)
    save_checkpoint(model.to("cpu"), processor, out)
    write_csv(curve, result.curve)
    write_json(metrics, result.metrics)
    return result.metrics


if __name__ == "__main__":
    sys.exit(run_stage(align, __doc__))
