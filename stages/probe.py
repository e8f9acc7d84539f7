"""probe: score every LLM layer (reports/layer_scores.json); the region stage then chooses.

Optionally tunes all layers briefly first (LoRA + projector), as the paper computes its
importance scores on a model tuned on all layers; `parameter_change` compares those tuned
weights with the aligned ones. Writes the per-layer scores as JSON and as a CSV plot. The
region is not chosen here, so that every region strategy and size shares these scores.
"""

from __future__ import annotations

import copy
import sys

import torch
from prefect import flow

from stages._common import run_stage, write_csv, write_json
from vregion.config import load_params
from vregion.data.dataset import RecordDataset, resolve_mix, sample_parts, training_loader
from vregion.devices import pick_device, resolve_precision
from vregion.models.layer_map import layer_map
from vregion.models.loading import load_lvlm
from vregion.region.scores import score_layers
from vregion.train.loop import ImageSet, batches_of, train_steps
from vregion.train.selective import make_region_trainable, trainable_groups

ALIGNED = "models/aligned"
DATA = "data"
SCORES = "reports/layer_scores.json"
SCORES_CSV = "reports/layer_scores.csv"
METRICS = "metrics/probe.json"


def probe_tune(model, processor, data: RecordDataset, p, device, precision):
    """A short all-layer LoRA tuning on a copy; returns the merged tuned model and its curve."""
    lmap = layer_map(model)
    lora = dict(lora_r=p.probe.lora_r, lora_alpha=2 * p.probe.lora_r, lora_dropout=0.05)
    tuned = make_region_trainable(copy.deepcopy(model), range(lmap.num_layers), mode="lora", **lora)
    groups = trainable_groups(tuned, projector_lr=p.probe.tune_lr, llm_lr=p.probe.tune_lr)
    batches = training_loader(
        data, min(p.probe.batch_size, len(data)), device=device, seed=p.model.seed, workers=0
    )
    curve = train_steps(
        tuned,
        batches,
        groups,
        steps=p.probe.tune_steps,
        warmup_ratio=0.1,
        precision=precision,
        device=device,
        desc="probe tuning (all layers)",
    )
    return tuned.merge_and_unload().eval(), curve


@flow(name="probe", log_prints=True)
def probe(params: str = "params.yaml") -> dict:
    p = load_params(params)
    torch.manual_seed(p.model.seed)
    device = pick_device()
    model, processor = load_lvlm(ALIGNED, dtype=p.model.dtype)
    model.to(device)
    subset = sample_parts(
        resolve_mix(p.probe.data, p.model.seed, DATA), p.probe.samples, p.model.seed
    )
    data = ImageSet.from_parts(subset)
    scored, reference, curve = model, None, []
    if p.probe.tune_steps > 0:
        precision = resolve_precision(p.probe.precision, device)
        tune_data = RecordDataset(subset, processor, p.model.system_prompt)
        scored, curve = probe_tune(model, processor, tune_data, p, device, precision)
        reference = model
    batches = list(batches_of(processor, data, p.model.system_prompt, p.probe.batch_size))
    scores = score_layers(scored, batches, p.probe.scorers, reference_model=reference)
    num_layers = layer_map(model).num_layers
    write_json(
        SCORES,
        {
            "num_layers": num_layers,
            "scored_model": "aligned + all-layer probe tuning"
            if reference is not None
            else "aligned",
            "probe_samples": len(data),
            "probe_tune_steps": p.probe.tune_steps,
            "scores": scores,
        },
    )
    rows = [
        {"layer": i, **{k: round(v[i], 6) for k, v in scores.items()}} for i in range(num_layers)
    ]
    write_csv(SCORES_CSV, rows)
    metrics = {
        "num_layers": num_layers,
        "scorers": list(scores),
        "probe_tune_final_loss": curve[-1]["loss"] if curve else None,
    }
    write_json(METRICS, metrics)
    for name, values in scores.items():
        top = sorted(range(num_layers), key=lambda i: -values[i])[:5]
        print(f"{name}: highest-scoring layers {top}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(probe, __doc__))
