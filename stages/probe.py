"""probe: score every LLM layer (reports/layer_scores.json); the region stage then chooses.

Optionally tunes all layers briefly first (LoRA + projector), as the paper computes its
importance scores on a model tuned on all layers; `parameter_change` compares those tuned
weights with the aligned ones. Writes the per-layer scores as JSON and as a CSV plot. The
region is not chosen here, so that every region strategy and size shares these scores.
"""

from __future__ import annotations

import sys

import torch
from prefect import flow

from stages._common import run_stage, write_csv, write_json
from vregion.config import load_params
from vregion.data.dataset import RecordDataset, resolve_mix, sample_parts
from vregion.data.imageset import ImageSet
from vregion.devices import pick_device, resolve_precision
from vregion.models.layer_map import layer_map
from vregion.models.loading import load_lvlm
from vregion.region.scores import score_layers
from vregion.train.loop import batches_of
from vregion.train.quick_tune import probe_tune


@flow(name="probe", log_prints=True)
def probe(
    aligned: str, data: str, scores: str, scores_csv: str, metrics: str, params: str = "params.yaml"
) -> dict:
    """Score every LLM layer.

    Args:
        aligned: aligned checkpoint to score
        data: data directory (prepare's and ingest's outputs)
        scores: layer scores JSON to write
        scores_csv: layer scores CSV (plot) to write
        metrics: metrics file to write
        params: params file
    """
    p = load_params(params)
    torch.manual_seed(p.model.seed)
    device = pick_device()
    model, processor = load_lvlm(aligned, dtype=p.model.dtype)
    model.to(device)
    subset = sample_parts(
        resolve_mix(p.probe.data, p.model.seed, data), p.probe.samples, p.model.seed
    )
    probe_set = ImageSet.from_parts(subset)
    scored, reference, curve = model, None, []
    if p.probe.tune_steps > 0:
        precision = resolve_precision(p.probe.precision, device)
        tune_data = RecordDataset(subset, processor, p.model.system_prompt)
        scored, curve = probe_tune(model, processor, tune_data, p, device, precision)
        reference = model
    batches = list(batches_of(processor, probe_set, p.model.system_prompt, p.probe.batch_size))
    layer_scores = score_layers(scored, batches, p.probe.scorers, reference_model=reference)
    num_layers = layer_map(model).num_layers
    write_json(
        scores,
        {
            "num_layers": num_layers,
            "scored_model": "aligned + all-layer probe tuning"
            if reference is not None
            else "aligned",
            "probe_samples": len(probe_set),
            "probe_tune_steps": p.probe.tune_steps,
            "scores": layer_scores,
        },
    )
    rows = [
        {"layer": i, **{k: round(v[i], 6) for k, v in layer_scores.items()}}
        for i in range(num_layers)
    ]
    write_csv(scores_csv, rows)
    result = {
        "num_layers": num_layers,
        "scorers": list(layer_scores),
        "probe_tune_final_loss": curve[-1]["loss"] if curve else None,
    }
    write_json(metrics, result)
    for name, values in layer_scores.items():
        top = sorted(range(num_layers), key=lambda i: -values[i])[:5]
        print(f"{name}: highest-scoring layers {top}")
    return result


if __name__ == "__main__":
    sys.exit(run_stage(probe, __doc__))
