"""region: choose the visual region from the probe's layer scores (reports/region.json).

A stage of its own so that changing `region` (a strategy sweep, a size sweep) reruns only this
second-long step and what follows; the probe's minutes of scoring are shared through the DVC
cache. Writes the region with the rule that chose it, and a chart of every score with the
region marked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from stages._common import run_stage, write_json
from vregion.config import ConfigError, load_params
from vregion.plots import layer_scores_chart
from vregion.region.select import choose_region


@flow(name="region", log_prints=True)
def region(scores: str, out: str, chart: str, metrics: str, params: str = "params.yaml") -> dict:
    """Choose the visual region.

    Args:
        scores: the probe's layer scores JSON
        out: region JSON to write
        chart: chart of the scores with the region marked, to write
        metrics: metrics file to write
        params: params file
    """
    p = load_params(params)
    if not Path(scores).is_file():
        raise FileNotFoundError(f"{scores} not found: run `dvc repro probe` first")
    probed = json.loads(Path(scores).read_text())
    num_layers, layer_scores = probed["num_layers"], probed["scores"]
    r = p.region
    # `all` and `list` say which layers themselves; the default amount (0.25) must not refuse them
    amount = None if r.strategy in ("all", "list") else r.amount
    try:
        choice = choose_region(
            num_layers,
            r.strategy,
            amount,
            scores=layer_scores,
            most_important=r.most_important,
            seed=r.seed,
            layers=r.layers,
        )
    except ValueError as err:
        field = "region.layers" if r.strategy == "list" else "region.amount"
        if r.strategy.startswith("topk:"):
            field = "region"  # the amount, or a scorer the probe did not run: the message says
        known = "" if "the LLM has" in str(err) else f" (the LLM has {num_layers} layers)"
        raise ConfigError(f"{field}: {err}{known}") from None
    write_json(out, choice.to_dict())
    layer_scores_chart(
        layer_scores,
        choice.layers,
        chart,
        title=f"Layer scores ({len(choice.layers)}/{num_layers} selected: {choice.strategy})",
    )
    result = {
        "num_layers": num_layers,
        "region": choice.layers,
        "region_size": len(choice.layers),
        "region_percent": round(100 * len(choice.layers) / num_layers, 2),
        "strategy": choice.strategy,
    }
    write_json(metrics, result)
    print(f"region: {choice.layers} ({choice.rule})")
    return result


if __name__ == "__main__":
    sys.exit(run_stage(region, __doc__))
