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
from vregion.config import ConfigError, load_params
from vregion.data.dataset import balanced_set
from vregion.devices import pick_device
from vregion.models.base import save_checkpoint
from vregion.models.layer_map import layer_map, parameter_counts
from vregion.models.loading import load_lvlm
from vregion.plots import layer_scores_chart
from vregion.prune import plan_pruning, prune_llm_layers
from vregion.region.scores import score_layers
from vregion.region.select import region_layers
from vregion.train.loop import batches_of
from vregion.train.quick_tune import heal


@flow(name="prune", log_prints=True)
def prune(
    tuned: str,
    data: str,
    region: str,
    out: str,
    metrics: str,
    chart: str,
    params: str = "params.yaml",
) -> dict:
    """Remove the least important layers outside the region.

    Args:
        tuned: tuned (merged) checkpoint to prune
        data: data directory (prepare's and ingest's outputs)
        region: the region stage's region JSON
        out: pruned checkpoint directory to write
        metrics: metrics file to write
        chart: chart of the scores with the protected layers marked, to write
        params: params file
    """
    p = load_params(params)
    layers = region_layers(region)
    protected = layers if p.prune.protect is None else p.prune.protect
    device = pick_device()
    model, processor = load_lvlm(tuned)
    model.to(device).eval()
    lmap = layer_map(model)
    num_layers = lmap.num_layers
    if any(not 0 <= i < num_layers for i in protected):
        raise ConfigError(f"prune.protect: {protected} has layers outside 0..{num_layers - 1}")
    if lmap.fixed_layers:  # layers the family cannot lose, e.g. Qwen3-VL's deepstack layers
        print(f"never pruned in {lmap.family}: {list(lmap.fixed_layers)} ({lmap.fixed_reason})")
        protected = sorted(set(protected) | set(lmap.fixed_layers))
    params_before = parameter_counts(model)["total_params"]
    calibration = balanced_set(p.prune.data, p.prune.samples, p.model.seed, data)
    batches = list(batches_of(processor, calibration, p.model.system_prompt, p.prune.batch_size))
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
    region_after = [plan.kept.index(i) for i in layers if i in plan.kept]
    heal_curve = []
    if p.prune.heal_steps:
        model, heal_curve = heal(model, processor, region_after, p, device, data)
    shutil.rmtree(out, ignore_errors=True)
    save_checkpoint(model.to("cpu"), processor, out)
    layer_scores_chart(
        {p.prune.scorer: scores},
        protected,
        chart,
        title=f"{p.prune.scorer} of the tuned model (orange: protected; removed: {plan.removed})",
    )
    result = {
        **plan.to_dict(),
        "scorer": p.prune.scorer,
        "scores": [round(s, 6) for s in scores],
        "ranking_outside_region": ranking,
        "region": layers,
        "protected": protected,
        "region_after_pruning": region_after,
        "parameters_before": params_before,
        "parameters_after": parameter_counts(model)["total_params"],
        "healing_steps": p.prune.heal_steps,
        "healing_final_loss": heal_curve[-1]["loss"] if heal_curve else None,
        "scored_on": f"{len(calibration)} held-out questions",
    }
    write_json(metrics, result)
    print(f"pruned layers {plan.removed} ({plan.reason}); {len(plan.kept)} of {num_layers} remain")
    return result


if __name__ == "__main__":
    sys.exit(run_stage(prune, __doc__))
