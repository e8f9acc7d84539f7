"""prune: remove the least important LLM layers outside the visual region (models/pruned/).

Ranks the tuned model's layers by angular distance (or block influence) on calibration records
(`prune.data`: held-out synthetic questions by default, or real records), removes the `prune.layers` lowest outside the region (or `prune.explicit`), and saves
an ordinary HF checkpoint with fewer layers. Region layers are never removed. Healing (a short
LoRA pass on the remaining region) is optional and off by default, as in the paper.
"""

from __future__ import annotations

import shutil
import sys

from prefect import flow

from stages._common import run_stage, write_json
from stages.finetune import region_layers
from vregion.config import ConfigError, Params, load_params
from vregion.data.dataset import RecordDataset, balanced_parts, resolve_mix, training_loader
from vregion.devices import pick_device, resolve_precision
from vregion.models.base import save_checkpoint
from vregion.models.layer_map import layer_map, parameter_counts
from vregion.models.loading import load_lvlm
from vregion.plots import layer_scores_chart
from vregion.prune import plan_pruning, prune_llm_layers
from vregion.region.scores import score_layers
from vregion.train.loop import ImageSet, batches_of, train_steps
from vregion.train.selective import make_region_trainable, trainable_groups

TUNED = "models/tuned/merged"
DATA = "data"
OUT = "models/pruned"
METRICS = "metrics/prune.json"
CHART = "reports/plots/prune_scores.png"


def heal(model, processor, region_after: list[int], p: Params, device):
    """A short LoRA pass on the pruned model's region (and projector), merged back."""
    f = p.finetune
    lora = dict(lora_r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout)
    model = make_region_trainable(model, region_after, mode="lora", **lora)
    train = RecordDataset(resolve_mix(f.data, p.model.seed, DATA), processor, p.model.system_prompt)
    batches = training_loader(
        train, f.batch_size, device=device, seed=p.model.seed, workers=f.loader.workers
    )
    curve = train_steps(
        model,
        batches,
        trainable_groups(model, projector_lr=f.projector_lr, llm_lr=p.prune.heal_lr),
        steps=p.prune.heal_steps,
        warmup_ratio=f.warmup_ratio,
        precision=resolve_precision(f.precision, device),
        device=device,
        desc="healing",
    )
    return model.merge_and_unload(), curve


def calibration_set(p: Params) -> ImageSet:
    """`prune.samples` records of `prune.data`: balanced over kinds when they have kinds."""
    parts = resolve_mix(p.prune.data, p.model.seed, DATA)
    return ImageSet.from_parts(balanced_parts(parts, p.prune.samples, p.model.seed))


@flow(name="prune", log_prints=True)
def prune(params: str = "params.yaml") -> dict:
    p = load_params(params)
    region = region_layers()
    protected = region if p.prune.protect is None else p.prune.protect
    device = pick_device()
    model, processor = load_lvlm(TUNED)
    model.to(device).eval()
    lmap = layer_map(model)
    num_layers = lmap.num_layers
    if any(not 0 <= i < num_layers for i in protected):
        raise ConfigError(f"prune.protect: {protected} has layers outside 0..{num_layers - 1}")
    if lmap.fixed_layers:  # layers the family cannot lose, e.g. Qwen3-VL's deepstack layers
        print(f"never pruned in {lmap.family}: {list(lmap.fixed_layers)} ({lmap.fixed_reason})")
        protected = sorted(set(protected) | set(lmap.fixed_layers))
    params_before = parameter_counts(model)["total_params"]
    data = calibration_set(p)
    batches = list(batches_of(processor, data, p.model.system_prompt, p.prune.batch_size))
    scores = score_layers(model, batches, [p.prune.scorer])[p.prune.scorer]
    try:
        plan = plan_pruning(scores, protected, p.prune.layers, p.prune.explicit)
    except ValueError as err:
        field = "prune.explicit" if p.prune.explicit is not None else "prune.layers"
        raise ConfigError(f"{field}: {err}") from None
    ranking = sorted(
        (i for i in range(num_layers) if i not in set(protected)), key=lambda i: (scores[i], i)
    )
    prune_llm_layers(model, plan.removed)
    region_after = [plan.kept.index(i) for i in region if i in plan.kept]
    heal_curve = []
    if p.prune.heal_steps:
        model, heal_curve = heal(model, processor, region_after, p, device)
    shutil.rmtree(OUT, ignore_errors=True)
    save_checkpoint(model.to("cpu"), processor, OUT)
    layer_scores_chart(
        {p.prune.scorer: scores},
        protected,
        CHART,
        title=f"{p.prune.scorer} of the tuned model (orange: protected; removed: {plan.removed})",
    )
    metrics = {
        **plan.to_dict(),
        "scorer": p.prune.scorer,
        "scores": [round(s, 6) for s in scores],
        "ranking_outside_region": ranking,
        "region": region,
        "protected": protected,
        "region_after_pruning": region_after,
        "parameters_before": params_before,
        "parameters_after": parameter_counts(model)["total_params"],
        "healing_steps": p.prune.heal_steps,
        "healing_final_loss": heal_curve[-1]["loss"] if heal_curve else None,
        "scored_on": f"{len(data)} held-out questions",
    }
    write_json(METRICS, metrics)
    print(f"pruned layers {plan.removed} ({plan.reason}); {len(plan.kept)} of {num_layers} remain")
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(prune, __doc__))
