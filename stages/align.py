"""align: stage-1 alignment, training the projector with the LLM frozen (models/aligned/).

Writes the loss curve (DVC plot) and the held-out caption loss before/after, beside the same
loss with images shuffled across captions, so the metrics show whether the image is used.
"""

from __future__ import annotations

import shutil
import sys

import torch
from prefect import flow

from stages._common import run_stage, write_csv, write_json
from vregion.config import load_params
from vregion.data.records import read_jsonl
from vregion.devices import pick_device, resolve_precision
from vregion.models.base import save_checkpoint
from vregion.models.loading import load_lvlm
from vregion.train.align import train_alignment
from vregion.train.loop import ImageSet

BASE = "models/base"
DATA = "data"
OUT = "models/aligned"
METRICS = "metrics/align.json"
CURVE = "metrics/align_loss.csv"


def image_set(path: str, limit: int | None = None) -> ImageSet:
    samples = list(read_jsonl(path))[:limit]
    return ImageSet.load(samples, DATA)


@flow(name="align", log_prints=True)
def align(params: str = "params.yaml") -> dict:
    p = load_params(params)
    torch.manual_seed(p.model.seed)
    device = pick_device()
    precision = resolve_precision(p.align.precision, device)
    model, processor = load_lvlm(BASE)
    model.to(device)
    train = image_set(f"{DATA}/train/captions.jsonl")
    held_out = image_set(f"{DATA}/eval/captions.jsonl", p.align.eval_samples)
    result = train_alignment(
        model,
        processor,
        train,
        held_out,
        p.align,
        p.model.system_prompt,
        precision=precision,
        device=device,
        seed=p.model.seed,
    )
    shutil.rmtree(OUT, ignore_errors=True)
    save_checkpoint(model.to("cpu"), processor, OUT)
    write_csv(CURVE, result.curve)
    write_json(METRICS, result.metrics)
    return result.metrics


if __name__ == "__main__":
    sys.exit(run_stage(align, __doc__))
