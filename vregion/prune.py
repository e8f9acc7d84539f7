"""Prune LLM decoder layers outside the visual region, leaving an ordinary HF checkpoint.

The paper ranks layers by angular distance on visual data and removes the 1-4 least important
ones, only from outside the visual region, with no healing. `layers_to_prune` picks them,
`prune_llm_layers` removes them in place so that `save_pretrained` writes a checkpoint that plain
`from_pretrained` loads with a smaller `num_hidden_layers`, and `PruneRecord` says what was done.

    >>> layers_to_prune([0.3, 0.1, 0.2, 0.05], region=[3], k=2)
    [1, 2]
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from torch import nn

from vregion.models.layer_map import LayerMap, layer_map

RANKED_REASON = "the k lowest-scoring layers outside the region"
EXPLICIT_REASON = "explicit list"

_INDEX_LIST_FIELDS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "cross_attention_layers")
"""Config fields that list layer *indices* (not one value per layer): renumbered, not sliced.
None of the supported LVLMs' text configs has them; other text configs in transformers 5.23 do."""


# --- which layers -------------------------------------------------------------------------


def _check_indices(layers: Sequence[int], num_layers: int, what: str) -> list[int]:
    """`layers` as ints, refused when not integers, out of range or repeated."""
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise ValueError(f"{what}: layer indices must be ints, got {bad}")
    out_of_range = sorted({int(i) for i in layers if not 0 <= i < num_layers})
    if out_of_range:
        raise ValueError(
            f"{what}: layers {out_of_range} out of range: the LLM has {num_layers} layers "
            f"(0..{num_layers - 1})"
        )
    ints = [int(i) for i in layers]
    repeated = sorted({i for i in ints if ints.count(i) > 1})
    if repeated:
        raise ValueError(f"{what}: layers repeated: {repeated}")
    return ints


def layers_to_prune(
    scores: Sequence[float],
    region: Sequence[int],
    k: int,
    explicit: Sequence[int] | None = None,
) -> list[int]:
    """The `k` layers with the lowest score (angular distance) outside `region`, sorted.

    A low angular distance means the layer barely changes its input, so removing it costs
    least. Ties go to the shallower layer. `explicit` replaces the ranking (and `k`) with a
    given list, which must still avoid the region: pruning inside it would undo the tuning.
    """
    num_layers = len(scores)
    values = [float(s) for s in scores]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"scores must be finite numbers, got {values}")
    region_set = set(_check_indices(region, num_layers, "region"))
    if explicit is not None:
        chosen = _check_indices(explicit, num_layers, "explicit prune list")
        inside = sorted(region_set.intersection(chosen))
        if inside:
            raise ValueError(
                f"explicit prune list: layers {inside} are in the visual region "
                f"{sorted(region_set)}; only layers outside it may be pruned"
            )
        return sorted(chosen)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    outside = [i for i in range(num_layers) if i not in region_set]
    if k > len(outside):
        raise ValueError(
            f"cannot prune {k} layers: only {len(outside)} of {num_layers} layers are outside "
            f"the visual region {sorted(region_set)}"
        )
    ranked = sorted(outside, key=lambda i: (values[i], i))
    return sorted(ranked[:k])


@dataclass(frozen=True)
class PruneRecord:
    """What pruning removed and why: what `metrics/prune.json` reports."""

    removed: list[int]
    """Original indices of the removed LLM layers, sorted."""
    kept: list[int]
    """Original indices of the kept LLM layers, in order; kept[j] is now layer j."""
    removed_scores: list[float]
    """The removed layers' importance scores (angular distance), in `removed` order."""
    reason: str
    """How the layers were chosen: `RANKED_REASON` or `EXPLICIT_REASON`."""

    @property
    def num_layers_before(self) -> int:
        return len(self.removed) + len(self.kept)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "num_layers_before": self.num_layers_before,
            "num_layers_after": len(self.kept),
        }


def plan_pruning(
    scores: Sequence[float],
    region: Sequence[int],
    k: int,
    explicit: Sequence[int] | None = None,
) -> PruneRecord:
    """`layers_to_prune` plus the record of the choice (arguments as in `layers_to_prune`)."""
    removed = layers_to_prune(scores, region, k, explicit)
    return PruneRecord(
        removed=removed,
        kept=[i for i in range(len(scores)) if i not in set(removed)],
        removed_scores=[float(scores[i]) for i in removed],
        reason=EXPLICIT_REASON if explicit is not None else RANKED_REASON,
    )


# --- removing them ------------------------------------------------------------------------


def _kept_layers(num_layers: int, remove: Sequence[int]) -> list[int]:
    removed = set(_check_indices(remove, num_layers, "layers to remove"))
    if len(removed) == num_layers:
        raise ValueError(f"cannot remove all {num_layers} LLM layers")
    return [i for i in range(num_layers) if i not in removed]


def _is_token_field(key: str) -> bool:
    # Token ids may be a list (e.g. several eos ids) that happens to be num_layers long.
    return key.endswith(("token_id", "token_ids")) or key == "architectures"


def prune_config(config: object, kept: Sequence[int]) -> None:
    """Make a text config describe only the `kept` layers (original indices, in order).

    Sets `num_hidden_layers`; slices every list with one entry per layer (`layer_types`, and in
    other architectures e.g. `no_rope_layers`, `mlp_layer_types`); renumbers index lists
    (`_INDEX_LIST_FIELDS`) and sparse `per_layer_config` overrides (heterogeneous configs).
    """
    old_n = config.num_hidden_layers
    new_index = {old: new for new, old in enumerate(kept)}
    overrides: dict = {}
    if getattr(config, "is_heterogeneous", False):  # sparse per-layer overrides (transformers 5.23)
        overrides = config.to_dict().get("per_layer_config") or {}
        config.per_layer_config = None  # its layer indices are checked against num_hidden_layers
    for key, value in list(vars(config).items()):
        if key.startswith("_") or not isinstance(value, list | tuple):
            continue
        if key in _INDEX_LIST_FIELDS:
            setattr(config, key, type(value)(new_index[i] for i in value if i in new_index))
        elif len(value) == old_n and not _is_token_field(key):
            setattr(config, key, type(value)(value[i] for i in kept))
    # Qwen2 / Qwen2-VL: layers at index >= max_window_layers use sliding-window attention (when
    # use_sliding_window is on). `layer_types` is what the model reads and is sliced above, but
    # `__post_init__` re-derives layer_types from this threshold when a config lacks them. The
    # kept full-attention layers still come first, so counting them keeps the two consistent.
    max_window = getattr(config, "max_window_layers", None)
    if isinstance(max_window, int) and not isinstance(max_window, bool):
        config.max_window_layers = sum(1 for i in kept if i < max_window)
    config.num_hidden_layers = len(kept)
    if overrides:
        config.per_layer_config = {
            new_index[int(i)]: layer for i, layer in overrides.items() if int(i) in new_index
        } or None


def _text_configs(model: nn.Module, lm: LayerMap) -> list[object]:
    """The distinct config objects that describe the LLM's layers (usually one shared object)."""
    parent = model.get_submodule(lm.layers_path.rpartition(".")[0])
    configs = [lm.text_config, getattr(parent, "config", None)]
    unique: dict[int, object] = {id(c): c for c in configs if c is not None}
    return list(unique.values())


def _renumber(layer: nn.Module, idx: int) -> None:
    """Set every `layer_idx` inside the layer: attention uses it to find its KV-cache slot."""
    for module in layer.modules():
        current = getattr(module, "layer_idx", None)
        if isinstance(current, int) and not isinstance(current, bool):
            module.layer_idx = idx


def prune_llm_layers(model: nn.Module, remove: Sequence[int]) -> nn.Module:
    """Remove the LLM decoder layers `remove` (original indices) in place; returns `model`.

    The layer list keeps the other layers in order, each renumbered 0..n-1 (`layer_idx` of the
    layer and its submodules, so the KV cache fills one slot per remaining layer), and the text
    config is updated by `prune_config`, so `save_pretrained` + `from_pretrained` round-trip.
    Works on any architecture `layer_map` knows, PEFT wrappers included. Refuses the layers the
    layer map marks `fixed_layers` (e.g. Qwen3-VL's deepstack layers).
    """
    lm = layer_map(model)
    kept = _kept_layers(lm.num_layers, remove)
    fixed = sorted(set(lm.fixed_layers).difference(kept))
    if fixed:
        raise ValueError(
            f"{lm.family} layers {fixed} cannot be pruned: {lm.fixed_reason} "
            f"(layers never pruned in this model: {list(lm.fixed_layers)})"
        )
    for idx in sorted(set(range(lm.num_layers)) - set(kept), reverse=True):
        del lm.layers[idx]  # ModuleList renames the rest to 0..n-1
    for new_idx, layer in enumerate(lm.layers):
        _renumber(layer, new_idx)
    for config in _text_configs(model, lm):
        prune_config(config, kept)
    return model


@contextmanager
def temporarily_pruned(model: nn.Module, remove: Sequence[int]) -> Iterator[nn.Module]:
    """Within the block the model runs without `remove`; afterwards it is whole again.

    Shares the weights instead of copying the model, so one loaded checkpoint can be measured
    at several pruning depths (e.g. a speed benchmark on a model that fits in memory once).
    """
    lm = layer_map(model)
    layers = list(lm.layers)
    indices = [
        (module, module.layer_idx)
        for layer in layers
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    configs = [(c, copy.deepcopy(vars(c))) for c in _text_configs(model, lm)]
    try:
        yield prune_llm_layers(model, remove)
    finally:
        del lm.layers[:]
        lm.layers.extend(layers)
        for module, idx in indices:
            module.layer_idx = idx
        for config, saved in configs:
            vars(config).clear()
            vars(config).update(saved)
