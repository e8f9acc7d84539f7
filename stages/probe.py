"""probe: score every LLM layer and choose the visual region (reports/region.json).

Optionally tunes all layers briefly first (LoRA + projector), as the paper computes its
importance scores on a model tuned on all layers; `parameter_change` compares those tuned
weights with the aligned ones. Writes the per-layer scores (JSON and a CSV plot), the region
with the rule that chose it, and a chart of every score with the region marked.
"""

from __future__ import annotations

import copy
import random
import sys

import torch
from prefect import flow

from stages._common import run_stage, write_csv, write_json
from vregion.config import ConfigError, load_params
from vregion.data.records import read_jsonl
from vregion.devices import pick_device, resolve_precision
from vregion.models.layer_map import layer_map
from vregion.models.loading import load_lvlm
from vregion.plots import layer_scores_chart
from vregion.region.scores import score_layers
from vregion.region.select import choose_region, layer_count
from vregion.train.loop import ImageSet, batches_of, train_steps
from vregion.train.selective import LoraSettings, make_region_trainable, trainable_groups

ALIGNED = "models/aligned"
DATA = "data"
SCORES = "reports/layer_scores.json"
SCORES_CSV = "reports/layer_scores.csv"
REGION = "reports/region.json"
CHART = "reports/plots/layer_scores.png"
METRICS = "metrics/probe.json"


def probe_subset(n: int, seed: int) -> ImageSet:
    samples = list(read_jsonl(f"{DATA}/train/vqa.jsonl"))
    samples = random.Random(seed).sample(samples, min(n, len(samples)))
    return ImageSet.load(samples, DATA)


def probe_tune(model, processor, data: ImageSet, p, device, precision):
    """A short all-layer LoRA tuning on a copy; returns the merged tuned model and its curve."""
    lmap = layer_map(model)
    lora = LoraSettings(r=p.probe.lora_r, alpha=2 * p.probe.lora_r, dropout=0.05)
    tuned = make_region_trainable(
        copy.deepcopy(model), range(lmap.num_layers), mode="lora", lora=lora
    )
    groups = trainable_groups(tuned, projector_lr=p.probe.tune_lr, llm_lr=p.probe.tune_lr)
    curve = train_steps(
        tuned,
        processor,
        data,
        groups,
        steps=p.probe.tune_steps,
        batch_size=p.probe.batch_size,
        warmup_ratio=0.1,
        system_prompt=p.model.system_prompt,
        precision=precision,
        device=device,
        seed=p.model.seed,
        desc="probe tuning (all layers)",
    )
    return tuned.merge_and_unload().eval(), curve


@flow(name="probe", log_prints=True)
def probe(params: str = "params.yaml") -> dict:
    p = load_params(params)
    torch.manual_seed(p.model.seed)
    device = pick_device()
    model, processor = load_lvlm(ALIGNED)
    model.to(device)
    if p.region.size is not None and p.region.strategy not in ("list", "all"):
        try:  # a bad size fails now, not after minutes of probe tuning and scoring
            layer_count(layer_map(model).num_layers, p.region.size)
        except ValueError as err:
            raise ConfigError(f"region.size: {err}") from None
    data = probe_subset(p.probe.samples, p.model.seed)
    scored, reference, curve = model, None, []
    if p.probe.tune_steps > 0:
        precision = resolve_precision(p.probe.precision, device)
        scored, curve = probe_tune(model, processor, data, p, device, precision)
        reference = model
    batches = list(batches_of(processor, data, p.model.system_prompt, p.probe.batch_size))
    scores = score_layers(scored, batches, p.probe.scorers, reference_model=reference)
    num_layers = layer_map(model).num_layers
    r = p.region
    choice = choose_region(
        num_layers,
        r.strategy,
        r.size,
        scores=scores,
        most_important=r.most_important,
        seed=r.seed,
        layers=r.layers,
    )
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
    write_json(REGION, choice.to_dict())
    rows = [
        {
            "layer": i,
            **{k: round(v[i], 6) for k, v in scores.items()},
            "selected": int(i in choice.layers),
        }
        for i in range(num_layers)
    ]
    write_csv(SCORES_CSV, rows)
    layer_scores_chart(
        {k: scores[k] for k in p.probe.scorers},
        choice.layers,
        CHART,
        title=f"Layer scores ({len(choice.layers)}/{num_layers} selected: {choice.strategy})",
    )
    metrics = {
        "num_layers": num_layers,
        "region": choice.layers,
        "region_size": len(choice.layers),
        "strategy": choice.strategy,
        "probe_tune_final_loss": curve[-1]["loss"] if curve else None,
    }
    write_json(METRICS, metrics)
    print(f"region: {choice.layers} ({choice.rule})")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(probe, __doc__))
