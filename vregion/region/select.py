"""Which LLM layers form the visual region: the paper's sparse uniform choice and its baselines.

`select_layers` returns the sorted layer indices; `choose_region` also records how they were
chosen (a `RegionChoice`, written to `reports/region.json` by the probe stage).

    >>> select_layers(32, "uniform", 0.25)
    [2, 6, 10, 14, 18, 22, 26, 30]
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vregion.config import ConfigError
from vregion.region.registry import STRATEGIES, TOPK_PREFIX, strategy

__all__ = ["STRATEGIES", "TOPK_PREFIX", "choose_region", "select_layers", "strategy"]
# STRATEGIES: the registered names (`@strategy`) plus `topk:<scorer>`, which ranks by a key of
# the `scores` dict, e.g. `topk:block_influence`.

AUTHORS_32_LAYER_REGION = (1, 5, 9, 13, 19, 23, 27, 31)
"""The authors' default region for 32-layer LLMs (as reported; 0-based indexing assumed).

Reproduce it with `select_layers(32, "list", 8, layers=AUTHORS_32_LAYER_REGION)`. It is
symmetric about depth 16 (pairs sum to 32) with gaps 4,4,4,6,4,4,4; `uniform` gives the evenly
spaced list with the same symmetry, [2, 6, ..., 30], which is within one layer of it everywhere.
"""

Size = int | float


def layer_count(num_layers: int, size: Size) -> int:
    """How many layers `size` asks for: a fraction in (0, 1] of `num_layers`, or a count.

    The type decides: an int is a count, a float a fraction, so `1` is one layer and `1.0` all
    of them. A fraction rounds half up (0.25 of 30 layers = 7.5 -> 8) and gives at least one
    layer. A bool is refused: `True` as "one layer" is too easy to write by mistake.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise ValueError(f"size must be a fraction in (0, 1] or a layer count, got {size!r}")
    if not isinstance(size, numbers.Integral):
        size = float(size)
        if not 0.0 < size <= 1.0:
            raise ValueError(
                f"size fraction must be in (0, 1], got {size} (the LLM has {num_layers} layers; "
                f"give an int for a count)"
            )
        return max(1, math.floor(size * num_layers + 0.5))
    if not 1 <= size <= num_layers:
        raise ValueError(
            f"size must be a count between 1 and {num_layers} (the LLM has {num_layers} layers), "
            f"got {size}"
        )
    return int(size)


@strategy("uniform")
def uniform_layers(num_layers: int, count: int) -> list[int]:
    """`count` layers spread evenly over depth: the middle layer of each of `count` equal bins.

    Rule: idx_k = floor((k + 1/2) · L / n) for k = 0..n-1 (L layers, n chosen), computed in
    integers. The depth is cut into n bins of L/n layers and each bin contributes its centre, so
    consecutive gaps are floor(L/n) or ceil(L/n) (they differ by at most 1), the first index is
    below L/n and the last at least L − L/n, and the choice is symmetric about depth L/2 whenever
    n divides L. At 25%:

    - 30 layers (8):  [1, 5, 9, 13, 16, 20, 24, 28]
    - 32 layers (8):  [2, 6, 10, 14, 18, 22, 26, 30]
    - 40 layers (10): [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]

    The authors' 32-layer default (`AUTHORS_32_LAYER_REGION`, 1,5,9,13,19,23,27,31) is not
    evenly strided (13 -> 19); bin centres are the evenly strided list closest to it.
    """
    # Centres rather than bin starts (floor(k·L/n)): starts always take layer 0 and leave the
    # top L/n - 1 layers out, biasing the region downwards.
    return [(2 * k + 1) * num_layers // (2 * count) for k in range(count)]


@strategy("bottom")
def bottom_layers(num_layers: int, count: int) -> list[int]:
    """The first `count` layers (closest to the embeddings)."""
    return list(range(count))


@strategy("top")
def top_layers(num_layers: int, count: int) -> list[int]:
    """The last `count` layers (closest to the LM head)."""
    return list(range(num_layers - count, num_layers))


@strategy("middle")
def middle_layers(num_layers: int, count: int) -> list[int]:
    """A contiguous block of `count` layers centred at depth (L−1)/2 (lower when it cannot be)."""
    start = (num_layers - count) // 2
    return list(range(start, start + count))


@strategy("authors")
def authors_layers(num_layers: int, count: int) -> list[int]:
    """The authors' 32-layer region (`AUTHORS_32_LAYER_REGION`) mapped to this depth: layer i of
    32 becomes the layer at the same relative depth, floor((i + 1/2) · L / 32). 30 layers:
    [1, 5, 8, 12, 18, 22, 25, 29]. It is 8 layers (25%), so `count` must be 8."""
    mapped = sorted({(2 * i + 1) * num_layers // 64 for i in AUTHORS_32_LAYER_REGION})
    if count != len(AUTHORS_32_LAYER_REGION) or len(mapped) != count:
        raise ValueError(
            f"strategy 'authors' is the authors' 8 of 32 layers; here it maps to {len(mapped)} "
            f"distinct layers of {num_layers}, and {count} were asked for (set region.amount "
            "to 8, on an LLM of at least 16 layers)"
        )
    return mapped


@strategy("strided")
def strided_layers(num_layers: int, count: int) -> list[int]:
    """Every k-th layer from layer k-1, k = L // count (LLaMA-Factory's strided freeze-tuning
    selection: at 25% of 32 layers, every 4th from layer 3: [3, 7, ..., 31]). Unlike `uniform`
    it starts at the bin's end, not its centre: 30 layers, 8 chosen gives [2, 5, ..., 23]."""
    stride = max(1, num_layers // count)
    return list(range(stride - 1, num_layers, stride))[:count]


@strategy("bottom+top")
def bottom_and_top_layers(num_layers: int, count: int) -> list[int]:
    """ceil(count/2) layers from the bottom and floor(count/2) from the top."""
    from_top = count // 2
    return bottom_layers(num_layers, count - from_top) + top_layers(num_layers, from_top)


@strategy("random")
def random_layers(num_layers: int, count: int, seed: int) -> list[int]:
    """`count` distinct layers drawn uniformly at random; the same seed gives the same layers."""
    return sorted(random.Random(seed).sample(range(num_layers), count))


@strategy("list")
def listed_layers(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """Explicit layers, checked: integers, in range, no repeats. Returned sorted."""
    if not layers:
        raise ValueError("strategy 'list' needs a non-empty `layers`")
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise ValueError(f"layer indices must be ints, got {bad}")
    out_of_range = [i for i in layers if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(
            f"layers {out_of_range} out of range: the LLM has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )
    if len(set(layers)) != len(layers):
        repeated = sorted({i for i in layers if list(layers).count(i) > 1})
        raise ValueError(f"layers repeated in the list: {repeated}")
    return sorted(int(i) for i in layers)


@strategy("all")
def all_layers(num_layers: int) -> list[int]:
    """Every layer (the all-layer baseline)."""
    return list(range(num_layers))


def top_scored_layers(
    num_layers: int,
    count: int,
    scorer: str,
    scores: Mapping[str, Sequence[float]] | None,
    most_important: bool,
) -> list[int]:
    """The `count` layers with the highest (or, with `most_important=False`, lowest) scores.

    Ties go to the shallower layer, so the choice is deterministic.
    """
    available = sorted(scores) if scores else []
    if not scores or scorer not in scores:
        raise ValueError(
            f"strategy '{TOPK_PREFIX}{scorer}' needs scores[{scorer!r}]; available scorers: "
            f"{', '.join(available) or 'none (pass scores=...)'}"
        )
    values = [float(v) for v in scores[scorer]]
    if len(values) != num_layers:
        raise ValueError(f"scores[{scorer!r}] has {len(values)} values for {num_layers} layers")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"scores[{scorer!r}] contains NaN: {values}")
    sign = -1.0 if most_important else 1.0
    ranked = sorted(range(num_layers), key=lambda i: (sign * values[i], i))
    return sorted(ranked[:count])


def select_layers(
    num_layers: int,
    strategy: str,
    size: Size | None,
    *,
    scores: Mapping[str, Sequence[float]] | None = None,
    most_important: bool = True,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> list[int]:
    """The sorted, distinct LLM layer indices (0-based) that `strategy` picks.

    Args:
        num_layers: how many decoder layers the LLM has.
        strategy: a name in `STRATEGIES`: `uniform` (see `uniform_layers`), `bottom`, `top`,
            `middle`, `authors`, `strided`, `bottom+top`, `random` (seeded), `list` (the given `layers`), `all`, any
            `@strategy` registered elsewhere, or `topk:<scorer>` (ranked by `scores[<scorer>]`).
        size: a fraction in (0, 1] of `num_layers` or a layer count (see `layer_count`). May be
            None for `list` and `all`; if given there, it must agree with what they select.
        scores: per-layer scores by scorer name (`score_layers`' result), for `topk:`.
        most_important: `topk:` takes the highest scores (True) or the lowest (False).
        seed: the `random` strategy's seed.
        layers: the explicit layers of the `list` strategy.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if strategy.startswith(TOPK_PREFIX) and len(strategy) > len(TOPK_PREFIX):
        fn, scorer = top_scored_layers, strategy[len(TOPK_PREFIX) :]
    elif strategy in STRATEGIES:
        fn, scorer = STRATEGIES.get(strategy), None
    else:
        raise ValueError(
            f"unknown strategy {strategy!r}; valid strategies: "
            f"{', '.join([*STRATEGIES.names(), f'{TOPK_PREFIX}<scorer>'])}"
        )
    # A strategy takes the `region.*` settings it names as keyword parameters.
    wanted = inspect.signature(fn).parameters
    options = {"seed": seed, "scores": scores, "most_important": most_important, "layers": layers}
    kwargs = {k: v for k, v in options.items() if k in wanted}
    if scorer is not None:
        kwargs["scorer"] = scorer
    if "count" not in wanted:  # the strategy fixes the layers itself (`list`, `all`)
        chosen = _checked(fn(num_layers, **kwargs), num_layers, strategy)
        if size is not None and layer_count(num_layers, size) != len(chosen):
            raise ValueError(
                f"size {size!r} means {layer_count(num_layers, size)} of {num_layers} layers but "
                f"strategy {strategy!r} selects {len(chosen)}"
            )
        return chosen
    if size is None:
        raise ValueError(f"strategy {strategy!r} needs a size (fraction or layer count)")
    count = layer_count(num_layers, size)
    return _checked(fn(num_layers, count, **kwargs), num_layers, strategy)


def _checked(chosen: Sequence[int], num_layers: int, strategy: str) -> list[int]:
    """A strategy's choice sorted; a registered strategy that returns repeats or indices out of
    range is a bug in it, named here rather than found later in training."""
    chosen = sorted(int(i) for i in chosen)
    if len(set(chosen)) != len(chosen) or not all(0 <= i < num_layers for i in chosen):
        raise ValueError(
            f"strategy {strategy!r} returned {chosen}: not distinct layers of 0..{num_layers - 1}"
        )
    return chosen


@dataclass(frozen=True)
class RegionChoice:
    """The selected visual region and how it was chosen: what `reports/region.json` holds."""

    layers: list[int]
    """Sorted 0-based LLM layer indices."""
    strategy: str
    """The `select_layers` strategy, e.g. `uniform` or `topk:angular_distance`."""
    size_requested: Size | None
    """The size as given: a fraction, a count, or None (`list`, `all`)."""
    num_layers: int
    """How many LLM layers the model has."""
    rule: str
    """One sentence saying how the layers were chosen."""
    scorer: str | None = None
    """For `topk:` strategies, the scorer whose scores ranked the layers."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RegionChoice:
        return cls(**json.loads(text))


def _rule(
    strategy: str, chosen: list[int], num_layers: int, most_important: bool, seed: int
) -> str:
    n = len(chosen)
    if strategy.startswith(TOPK_PREFIX):
        which = "highest" if most_important else "lowest"
        return f"The {n} of {num_layers} layers with the {which} {strategy[len(TOPK_PREFIX) :]} scores."
    rules = {
        "uniform": f"{n} of {num_layers} layers spread evenly over depth: the centre of each of "
        f"{n} equal bins, floor((k + 1/2) * {num_layers} / {n}) for k = 0..{n - 1}.",
        "bottom": f"The bottom {n} of {num_layers} layers.",
        "top": f"The top {n} of {num_layers} layers.",
        "middle": f"A contiguous block of {n} of {num_layers} layers centred at mid-depth.",
        "bottom+top": f"The bottom {n - n // 2} and the top {n // 2} of {num_layers} layers.",
        "random": f"{n} of {num_layers} layers drawn at random with seed {seed}.",
        "list": f"An explicit list of {n} of {num_layers} layers.",
        "all": f"All {num_layers} layers.",
    }
    doc = (inspect.getdoc(STRATEGIES.get(strategy)) or "").split("\n")[0]
    return rules.get(strategy) or f"{n} of {num_layers} layers by strategy {strategy!r}: {doc}"


def choose_region(
    num_layers: int,
    strategy: str,
    size: Size | None,
    *,
    scores: Mapping[str, Sequence[float]] | None = None,
    most_important: bool = True,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> RegionChoice:
    """`select_layers` plus a record of the choice (arguments as in `select_layers`)."""
    chosen = select_layers(
        num_layers,
        strategy,
        size,
        scores=scores,
        most_important=most_important,
        seed=seed,
        layers=layers,
    )
    return RegionChoice(
        layers=chosen,
        strategy=strategy,
        size_requested=size,
        num_layers=num_layers,
        rule=_rule(strategy, chosen, num_layers, most_important, seed),
        scorer=strategy[len(TOPK_PREFIX) :] if strategy.startswith(TOPK_PREFIX) else None,
    )


def region_layers(path: str | Path) -> list[int]:
    """The region's layers from a `reports/region.json` the region stage wrote."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no region yet; run `dvc repro region` first")
    layers = json.loads(Path(path).read_text()).get("layers")
    if not layers:
        raise ConfigError(f"{path}: no `layers` list (re-run the region stage)")
    return layers
