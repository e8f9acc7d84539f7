"""The paper's comparisons as a list of pipeline runs: which params each run overrides.

Three sweeps (DESIGN.md §2), each a set of labelled runs:

- `strategies`: 25% of the layers chosen by each rule (uniform, bottom, top, a contiguous
  middle block, bottom+top, random, LLaMA-Factory's strided choice, the authors' 32-layer list
  mapped to this depth, the top-k of every probe scorer) against tuning all layers;
- `sizes`: uniform regions of 1, 2, 4, 8, 16 layers and all of them;
- `pruning`: 0-4 layers removed outside the uniform region, from the region-tuned and from
  the all-layer-tuned model (the evaluate stage's layers-removed curve).

Runs with the same overrides are one run shown in several sweeps (uniform 25% of 30 layers is
the 8-layer run of `sizes` and the region-tuned model of `pruning`), so nothing is trained twice.

    >>> [r.name for r in plan_runs(30, ["angular_distance"], ["sizes"])]
    ['all-layers', 'uniform', 'uniform-1', 'uniform-2', 'uniform-4', 'uniform-16']
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from vregion.region.select import layer_count, select_layers

SWEEPS = ("strategies", "sizes", "pruning")
STRATEGY_SIZE = 0.25
"""The region size of the strategy sweep (the paper's 25%)."""
SIZES = (1, 2, 4, 8, 16)
SEEDED = (
    "all-layers",
    "uniform",
    "bottom",
    "top",
    "middle",
    "random",
    "uniform-1",
    "uniform-2",
    "uniform-4",
    "uniform-16",
)
"""The runs repeated with more training seeds (`--seeds N`): the ones the claims compare. The
uniform and all-layer runs carry both pruning curves."""
PRUNE_CURVE = [0, 1, 2, 3, 4]
COMMON: dict[str, object] = {"evaluate.models": ["tuned"], "evaluate.prune_curve": []}
"""Every run measures its tuned model only: the aligned model is the same in all of them (the
main pipeline measures it), and only the two pruning runs need the layers-removed curve."""


@dataclass
class Run:
    """One DVC experiment of the sweep."""

    name: str
    """Experiment name (`dvc exp run -n`), unique in the sweep and safe as a git ref."""
    overrides: dict[str, object]
    """Param -> value, passed as `dvc exp run -S param=value`."""
    labels: list[tuple[str, str]] = field(default_factory=list)
    """(sweep, label) pairs this run stands for, e.g. ("sizes", "8 layers")."""
    seed: int | None = None
    """Its training seed (`finetune.seed`); None: params.yaml's own (the first seed)."""

    def set_params(self) -> list[str]:
        """The `-S` arguments, values in YAML flow style as DVC parses them."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]


def _name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plan_runs(
    num_layers: int,
    scorers: Sequence[str],
    sweeps: Sequence[str] | None = None,
    seeds: int = 1,
    only: Sequence[str] | None = None,
) -> list[Run]:
    """The runs of `sweeps` (default: all three) for an LLM of `num_layers` layers whose probe
    ran `scorers`, deduplicated: a run shared by several sweeps appears once, with every label.
    `seeds` > 1 repeats the `SEEDED` runs with `finetune.seed` 1 .. seeds-1 (named `<run>-s<k>`,
    queued after every first-seed run), so each claim has a spread over training seeds.
    `only` keeps the runs of these names (and their seed repeats): the few runs one claim
    needs, e.g. `["all-layers", "uniform"]` for retention, before the hours the rest take."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    unknown = set(sweeps or ()) - set(SWEEPS)
    if unknown:
        raise ValueError(f"unknown sweep(s) {sorted(unknown)}; valid: {', '.join(SWEEPS)}")
    uniform_region = select_layers(num_layers, "uniform", STRATEGY_SIZE)
    region_tuned = {"region.strategy": "uniform", "evaluate.prune_curve": PRUNE_CURVE}
    # The paper prunes the all-layer-tuned model the same way: outside the uniform region.
    all_tuned = {
        "region.strategy": "all",
        "prune.protect": uniform_region,
        "evaluate.prune_curve": PRUNE_CURVE,
    }
    wanted: list[tuple[str, str, str, dict]] = []
    if not sweeps or "strategies" in sweeps:
        wanted += [
            ("strategies", "all layers", "all-layers", all_tuned),
            ("strategies", "uniform", "uniform", region_tuned),
        ]
        for strategy in ("bottom", "top", "middle", "bottom+top", "random", "strided"):
            wanted.append(("strategies", strategy, _name(strategy), {"region.strategy": strategy}))
        try:  # the authors' 32-layer list maps to 8 distinct layers only on deep enough LLMs
            select_layers(num_layers, "authors", STRATEGY_SIZE)
            wanted.append(("strategies", "authors", "authors", {"region.strategy": "authors"}))
        except ValueError:
            pass
        for scorer in scorers:
            strategy = f"topk:{scorer}"
            wanted.append(
                ("strategies", strategy, _name(f"top-{scorer}"), {"region.strategy": strategy})
            )
    if not sweeps or "sizes" in sweeps:
        default_count = layer_count(num_layers, STRATEGY_SIZE)
        for n in SIZES:
            if n >= num_layers:
                continue
            if n == default_count:  # the same region as the strategy sweep's uniform run
                wanted.append(
                    ("sizes", f"{n} layer{'s' if n > 1 else ''}", "uniform", region_tuned)
                )
            else:
                over = {"region.strategy": "uniform", "region.amount": n}
                wanted.append(("sizes", f"{n} layer{'s' if n > 1 else ''}", f"uniform-{n}", over))
        wanted.append(("sizes", f"{num_layers} layers (all)", "all-layers", all_tuned))
    if not sweeps or "pruning" in sweeps:
        wanted += [
            ("pruning", "region-tuned (uniform)", "uniform", region_tuned),
            ("pruning", "all-layer-tuned", "all-layers", all_tuned),
        ]
    runs: dict[str, Run] = {}
    for sweep, label, name, over in wanted:
        overrides = {**COMMON, **over}
        run = runs.setdefault(name, Run(name, overrides))
        if run.overrides != overrides:
            raise ValueError(f"two different runs are both named {name!r}")
        if (sweep, label) not in run.labels:
            run.labels.append((sweep, label))
    # The queue runs in this order: the runs most claims need first, so a sweep cut short
    # (hours on 2 cores) has already answered the most.
    first = ["all-layers", "uniform", "bottom", "top", "uniform-1", "uniform-2", "uniform-4"]
    rank = {name: i for i, name in enumerate(first)}
    planned = sorted(runs.values(), key=lambda r: rank.get(r.name, len(first)))
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise ValueError(
                f"no run named {', '.join(unknown)} in these sweeps; valid: "
                + ", ".join(r.name for r in planned)
            )
        planned = [r for r in planned if r.name in only]
    repeats = [
        Run(f"{r.name}-s{k}", {**r.overrides, "finetune.seed": k}, list(r.labels), seed=k)
        for k in range(1, seeds)
        for r in planned
        if r.name in SEEDED
    ]
    return planned + repeats


def set_dotted(params: dict, key: str, value: object) -> None:
    """params["a"]["b"] = value for key "a.b", creating sections as needed."""
    *path, last = key.split(".")
    for part in path:
        params = params.setdefault(part, {})
    params[last] = value


def expected_params(base: dict, run: Run) -> dict:
    """The params a run's experiment must have: `base` (params.yaml) with the overrides."""
    params = json.loads(json.dumps(base))
    for key, value in run.overrides.items():
        set_dotted(params, key, value)
    return params
