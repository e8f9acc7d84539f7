"""Layer scorers: how much each LLM decoder layer of an LVLM matters, one float per layer.

The paper ranks layers by these to compare importance-based regions with the sparse uniform one,
and prunes by angular distance. All scorers work on any architecture in the layer map:

- hidden-state scorers (`block_influence`, `multimodal_block_influence`, `angular_distance`)
  hook each decoder layer's input and output and compare them token by token;
- `attention_to_image` hooks each layer's self-attention (eager attention, which returns the
  weights) and measures how much text tokens look at image tokens;
- `parameter_change` compares the weights of two models (base vs. tuned);
- `layer_ablation` (beyond the paper) measures the answer-loss increase when a layer is skipped.

Token statistics count real tokens only (`attention_mask == 1`) and are pooled over all tokens of
all batches, so a batch weighs as much as the tokens it holds. Image positions come from the real
image-token mask (`input_ids == image_token_id`), never from fixed offsets.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vregion.models.layer_map import LayerMap, layer_index, layer_map, llm_layer_names
from vregion.progress import track
from vregion.region.registry import SCORERS, scorer
from vregion.train.loop import answer_nll

__all__ = ["SCORERS", "score_layers", "scorer"]

Batch = Mapping[str, object]
"""Keyword arguments for `model(**batch)`; may include `labels` (dropped where not needed)."""

HIDDEN_STATE_SCORERS = ("block_influence", "multimodal_block_influence", "angular_distance")
_ONE_PASS = (*HIDDEN_STATE_SCORERS, "attention_to_image")
"""Built-in scorers that `score_layers` computes together in one hooked pass. Every scorer,
these too, is registered with `@scorer` (`SCORERS` lists the names)."""


# --- reading hook arguments --------------------------------------------------------------


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer was called with, passed positionally or as a keyword."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ValueError("decoder layer called without hidden states (no positional argument)")


def layer_output(output: object) -> torch.Tensor:
    """The hidden states a decoder layer returned: the tensor itself or the first tuple item."""
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def skipped_layer(layer: nn.Module) -> Iterator[None]:
    """Within the block, `layer` returns its input hidden states: the layer acts as identity.

    The layer still runs (its output is discarded); a forward hook swaps the hidden states into
    the output structure, so the model around it sees no difference in types.
    """

    def identity(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        hidden = layer_input(args, kwargs)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    handle = layer.register_forward_hook(identity, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# --- per-batch preparation ----------------------------------------------------------------


@dataclass
class _Masks:
    """Which positions of the current batch are real tokens, image tokens and text tokens."""

    real: torch.Tensor  # (batch, seq) bool
    image: torch.Tensor | None  # (batch, seq) bool, real image tokens; None if not known
    text: torch.Tensor | None  # real non-image tokens


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_inputs(batch: Batch, device: torch.device) -> dict:
    """The batch on `device` without labels (losses are computed here) and without a KV cache."""
    inputs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k != "labels"
    }
    inputs.setdefault("use_cache", False)
    return inputs


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Scores without dropout noise (e.g. LoRA dropout), then every module's mode as it was.

    Per module, because a training setup may keep parts (a frozen tower) in eval mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _prepare(
    batch: Batch, lm: LayerMap, device: torch.device, need_image: bool
) -> tuple[dict, _Masks]:
    """Model inputs on `device`, and the batch's token masks."""
    inputs = _model_inputs(batch, device)
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("layer scoring needs `input_ids` in every batch (to find image tokens)")
    mask = inputs.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    image = text = None
    if lm.image_token_id is not None:
        image = (input_ids == lm.image_token_id) & real
        text = real & ~image
    elif need_image:
        raise ValueError(f"{lm.model_class} has no image_token_id: cannot find image tokens")
    return inputs, _Masks(real=real, image=image, text=text)


# --- running sums -------------------------------------------------------------------------


@dataclass
class _Tally:
    """Per-layer sum of a per-token quantity and how many tokens went into it."""

    num_layers: int
    sums: list[float] = field(init=False)
    counts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sums = [0.0] * self.num_layers
        self.counts = [0] * self.num_layers

    def add(self, layer: int, values: torch.Tensor) -> None:
        self.sums[layer] += float(values.double().sum())
        self.counts[layer] += values.numel()

    def means(self, what: str) -> list[float]:
        if any(n == 0 for n in self.counts):
            raise ValueError(f"no {what} in the batches: cannot score layers on them")
        return [s / n for s, n in zip(self.sums, self.counts, strict=True)]


def _cosine_and_angle(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cosine and angle (radians) between two (..., hidden) tensors, in fp32.

    The angle is 2·atan2(‖a−b‖, ‖a+b‖) of the unit vectors a, b: equal to arccos(clamp(cos))
    but exact near 0, where arccos of a rounded cosine would report ~1e-4 for identical vectors.
    """
    a = nn.functional.normalize(h_in.float(), dim=-1)
    b = nn.functional.normalize(h_out.float(), dim=-1)
    cos = (a * b).sum(-1)
    angle = 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return cos, angle


def _image_share(weights: torch.Tensor, masks: _Masks) -> torch.Tensor:
    """Attention mass each real text query puts on image keys, averaged over heads: 1-D."""
    if weights.shape[-1] != masks.real.shape[1] or weights.shape[-2] != masks.real.shape[1]:
        raise ValueError(
            f"attention weights {tuple(weights.shape)} do not match the batch's "
            f"{tuple(masks.real.shape)} tokens (a cache or sliding window in use?)"
        )
    image_keys = masks.image[:, None, None, :].to(weights.dtype)  # (batch, 1, 1, keys)
    share = (weights.float() * image_keys).sum(-1).mean(1)  # (batch, queries)
    return share[masks.text]


# --- attention implementation switch -----------------------------------------------------


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT wrappers (they do not forward attention settings)."""
    while hasattr(model, "get_base_model"):
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
    return model


@contextmanager
def eager_text_attention(model: nn.Module) -> Iterator[None]:
    """Within the block the LLM uses eager attention, which returns attention weights.

    SDPA and flash attention never materialise the weights (transformers 5.x returns None for
    them). Only the text model is switched, via `set_attn_implementation({"text_config": ...})`;
    the vision tower keeps its faster kernel. The previous implementation is restored on exit.
    """
    base = _unwrapped(model)
    config = base.config
    text_config = config.get_text_config()
    key = next((k for k in config.sub_configs if getattr(config, k) is text_config), None)
    before = text_config._attn_implementation

    def set_text(implementation: str) -> None:
        base.set_attn_implementation(implementation if key is None else {key: implementation})

    set_text("eager")
    try:
        yield
    finally:
        set_text(before)


# --- hook-based pass ----------------------------------------------------------------------


@dataclass
class _ProbeTallies:
    """Everything one hooked pass over the batches measures, per layer."""

    influence: _Tally  # 1 - cos, all real tokens
    angular: _Tally  # angle / pi, all real tokens
    influence_image: _Tally
    influence_text: _Tally
    attention_image: _Tally  # share of attention on image keys, per text query


def _attention_module(layer: nn.Module, idx: int) -> nn.Module:
    attention = getattr(layer, "self_attn", None)
    if attention is None:
        raise ValueError(
            f"attention_to_image needs softmax self-attention in every LLM layer, and layer {idx} "
            f"({type(layer).__name__}) has no `self_attn` module (a linear-attention or "
            f"convolution layer of a hybrid LLM): choose another scorer for this model"
        )
    return attention


def _probe_pass(
    model: nn.Module, batches: Iterable[Batch], *, hidden: bool, attention: bool, multimodal: bool
) -> _ProbeTallies:
    """One forward per batch with hooks that tally every requested per-layer statistic."""
    lm = layer_map(model)
    n = lm.num_layers
    tallies = _ProbeTallies(*(_Tally(n) for _ in range(5)))
    device = _model_device(model)
    state: dict = {}  # the current batch's masks and each layer's input, set as the pass runs

    def make_hooks(idx: int):
        def save_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state[idx] = layer_input(args, kwargs)

        def compare(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            masks: _Masks = state["masks"]
            h_in, h_out = state.pop(idx), layer_output(output)
            if h_out.shape[:2] != masks.real.shape:
                raise ValueError(
                    f"layer {idx} hidden states {tuple(h_out.shape)} do not line up with the "
                    f"batch's {tuple(masks.real.shape)} tokens"
                )
            cos, angle = _cosine_and_angle(h_in, h_out)
            tallies.influence.add(idx, 1 - cos[masks.real])
            tallies.angular.add(idx, angle[masks.real] / math.pi)
            if multimodal:
                tallies.influence_image.add(idx, 1 - cos[masks.image])
                tallies.influence_text.add(idx, 1 - cos[masks.text])

        def attention_share(module: nn.Module, args: tuple, output: object) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise RuntimeError(
                    f"layer {idx}'s attention returned no weights: eager attention is required"
                )
            tallies.attention_image.add(idx, _image_share(weights, state["masks"]))

        return save_input, compare, attention_share

    with ExitStack() as stack:
        if attention:
            stack.enter_context(eager_text_attention(model))
        for idx, layer in enumerate(lm.layers):
            save_input, compare, attention_share = make_hooks(idx)
            if hidden:
                handles = [
                    layer.register_forward_pre_hook(save_input, with_kwargs=True),
                    layer.register_forward_hook(compare, with_kwargs=True),
                ]
                for handle in handles:
                    stack.callback(handle.remove)
            if attention:
                handle = _attention_module(layer, idx).register_forward_hook(attention_share)
                stack.callback(handle.remove)
        with torch.inference_mode(), _eval_mode(model):
            for batch in track(batches, desc="scoring layers", unit="batch", leave=False):
                inputs, state["masks"] = _prepare(batch, lm, device, need_image=multimodal)
                model(**inputs)
    return tallies


# --- public scorers -----------------------------------------------------------------------


@scorer("block_influence")
def block_influence(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 − mean over real tokens of cos(h_in, h_out)."""
    tallies = _probe_pass(model, batches, hidden=True, attention=False, multimodal=False)
    return tallies.influence.means("tokens")


@scorer("angular_distance")
def angular_distance(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Mean over real tokens of arccos(cos(h_in, h_out)) / π per layer, in [0, 1]."""
    tallies = _probe_pass(model, batches, hidden=True, attention=False, multimodal=False)
    return tallies.angular.means("tokens")


def _multimodal_results(tallies: _ProbeTallies) -> dict[str, list[float]]:
    image = tallies.influence_image.means("image tokens")
    text = tallies.influence_text.means("text tokens")
    return {
        "multimodal_block_influence": [(i + t) / 2 for i, t in zip(image, text, strict=True)],
        "block_influence_image": image,
        "block_influence_text": text,
    }


@scorer("multimodal_block_influence")
def multimodal_block_influence(
    model: nn.Module, batches: Iterable[Batch]
) -> dict[str, list[float]]:
    """Block Influence on image tokens and on text tokens separately, and their average.

    Returns `multimodal_block_influence` (the average, what the paper ranks by) and the parts
    `block_influence_image` and `block_influence_text`.
    """
    tallies = _probe_pass(model, batches, hidden=True, attention=False, multimodal=True)
    return _multimodal_results(tallies)


@scorer("attention_to_image")
def attention_to_image(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Per layer, the share of text tokens' attention mass that lands on image tokens.

    For every real text query position: the attention weights on image-token keys summed,
    averaged over heads; then the mean over all text queries of all batches. Text before the
    image counts too (its share is 0 under causal attention), so the score is the average over
    the whole text, as in the paper's "attention text tokens pay to the image". Padding keys
    carry no weight and padding queries are skipped. Runs the LLM with eager attention.
    """
    tallies = _probe_pass(model, batches, hidden=False, attention=True, multimodal=True)
    return tallies.attention_image.means("text tokens")


def _answer_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token NLL over the labelled tokens of all batches."""
    device = _model_device(model)
    total, count = 0.0, 0
    with torch.inference_mode(), _eval_mode(model):
        for batch in batches:
            if "labels" not in batch:
                raise ValueError("layer_ablation needs `labels` in every batch")
            labels = batch["labels"].to(device)
            inputs = _model_inputs(batch, device)
            nll, n = answer_nll(model, inputs, labels, precision="fp32", device=device)
            total += float(nll)
            count += n
    if count == 0:
        raise ValueError("layer_ablation: the batches have no labelled tokens")
    return total / count


@scorer("layer_ablation")
def layer_ablation(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """Per layer, the increase in answer loss when that layer alone is skipped (identity).

    Beyond the paper: a direct, task-level importance. Costs one pass for the baseline and one
    per layer. Batches need `labels` (-100 where no loss is taken).
    """
    batches = list(batches)
    lm = layer_map(model)
    baseline = _answer_loss(model, batches)
    increases = []
    for layer in track(lm.layers, desc="layer ablation", unit="layer"):
        with skipped_layer(layer):
            increases.append(_answer_loss(model, batches) - baseline)
    return increases


# --- parameter change ---------------------------------------------------------------------


def _refuse_unmerged_adapters(model: nn.Module, which: str) -> None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no adapters
        return
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            raise ValueError(
                f"{which} has an unmerged PEFT adapter at {name}: its weights are not the tuned "
                f"ones. Merge first (`model.merge_and_unload()` or `model.merge_adapter()`)."
            )


def _layer_parameters(model: nn.Module, which: str) -> list[dict[str, torch.Tensor]]:
    """Each LLM layer's parameters keyed by their name inside the layer.

    PEFT's `base_layer.` segment is dropped and adapter weights skipped, so a merged PEFT model
    matches a plain one name for name.
    """
    _refuse_unmerged_adapters(model, which)
    lm = layer_map(model)
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(lm.num_layers)]
    for name, param in model.named_parameters():
        idx = layer_index(lm, name)
        if idx is None or ".lora_" in name:
            continue
        local = name[len(llm_layer_names(lm, idx)) :].replace("base_layer.", "")
        layers[idx][local] = param.detach()
    return layers


def _check_same_layout(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    if len(a) != len(b):
        raise ValueError(f"models differ in LLM layer count: {len(a)} vs {len(b)}")
    for idx, (pa, pb) in enumerate(zip(a, b, strict=True)):
        if pa.keys() != pb.keys():
            only = sorted(pa.keys() ^ pb.keys())
            raise ValueError(f"LLM layer {idx} parameters differ between the models: {only}")
        for name in pa:
            if pa[name].shape != pb[name].shape:
                raise ValueError(
                    f"LLM layer {idx} parameter {name} has shape {tuple(pa[name].shape)} vs "
                    f"{tuple(pb[name].shape)}"
                )


def _layer_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> tuple:
    """Relative, L2 and angular change of one layer's parameters, all tensors as one vector."""
    diff_sq = norm_a_sq = norm_b_sq = 0.0
    for name, w in before.items():
        w = w.double()
        w2 = after[name].to(w.device).double()
        diff_sq += float((w2 - w).square().sum())
        norm_a_sq += float(w.square().sum())
        norm_b_sq += float(w2.square().sum())
    norm_a, norm_b = math.sqrt(norm_a_sq), math.sqrt(norm_b_sq)
    # Angle between the unit vectors via 2·atan2(|â−b̂|, |â+b̂|): exactly 0 for identical weights.
    unit_diff_sq = unit_sum_sq = 0.0
    for name, w in before.items():
        a = w.double() / max(norm_a, 1e-300)
        b = after[name].to(w.device).double() / max(norm_b, 1e-300)
        unit_diff_sq += float((a - b).square().sum())
        unit_sum_sq += float((a + b).square().sum())
    angle = 2 * math.atan2(math.sqrt(unit_diff_sq), math.sqrt(unit_sum_sq))
    l2 = math.sqrt(diff_sq)
    relative = l2 / norm_a if norm_a > 0 else (0.0 if l2 == 0 else math.inf)
    return relative, l2, angle / math.pi


def parameter_change(model_a: nn.Module, model_b: nn.Module) -> dict[str, list[float]]:
    """How far each LLM layer's weights moved from `model_a` (W, base) to `model_b` (W′, tuned).

    Per layer, over all its parameters concatenated into one vector:
    `parameter_change` = ‖W′−W‖/‖W‖, `parameter_change_l2` = ‖W′−W‖,
    `parameter_change_angular` = arccos(cos(W, W′)) / π. Parameters are matched by name; either
    model may be a plain transformers model or a PEFT model whose adapters are merged. Raises
    ValueError when the layer counts, parameter names or shapes differ.
    """
    before = _layer_parameters(model_a, "model_a")
    after = _layer_parameters(model_b, "model_b")
    _check_same_layout(before, after)
    changes = [_layer_change(a, b) for a, b in zip(before, after, strict=True)]
    return {
        "parameter_change": [c[0] for c in changes],
        "parameter_change_l2": [c[1] for c in changes],
        "parameter_change_angular": [c[2] for c in changes],
    }


@scorer("parameter_change")
def _parameter_change_scorer(
    model: nn.Module, batches: Iterable[Batch], reference_model: nn.Module | None
) -> dict[str, list[float]]:
    """`parameter_change` as a scorer: `model` (tuned) against `reference_model` (base)."""
    if reference_model is None:
        raise ValueError("parameter_change needs reference_model (the weights before tuning)")
    return parameter_change(reference_model, model)


# --- everything at once -------------------------------------------------------------------


def score_layers(
    model: nn.Module,
    batches: Iterable[Batch],
    scorers: Sequence[str],
    reference_model: nn.Module | None = None,
) -> dict[str, list[float]]:
    """Run the named scorers (any name in `SCORERS`) with as few passes over `batches` as possible.

    The hidden-state scorers and `attention_to_image` share one hooked pass; every other scorer
    runs on its own: `layer_ablation` takes 1 + num_layers passes; `parameter_change` compares
    `model` (tuned) with `reference_model` (base) and reads no batches; a scorer registered
    elsewhere gets `(model, batches)`, plus `reference_model` if it has that parameter.
    Besides one key per scorer, the result holds
    `block_influence_image` / `block_influence_text` with `multimodal_block_influence` and
    `parameter_change_l2` / `parameter_change_angular` with `parameter_change`.
    """
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        raise ValueError(
            f"unknown scorer(s) {unknown}; valid scorers: {', '.join(SCORERS.names())}"
        )
    if "parameter_change" in scorers and reference_model is None:  # before the long passes
        raise ValueError("parameter_change needs reference_model (the weights before tuning)")
    wanted = set(scorers)
    batches = list(batches)  # several passes may read them
    results: dict[str, list[float]] = {}

    hidden = bool(wanted & set(HIDDEN_STATE_SCORERS))
    attention = "attention_to_image" in wanted
    if hidden or attention:
        multimodal = attention or "multimodal_block_influence" in wanted
        tallies = _probe_pass(
            model, batches, hidden=hidden, attention=attention, multimodal=multimodal
        )
        if "block_influence" in wanted:
            results["block_influence"] = tallies.influence.means("tokens")
        if "multimodal_block_influence" in wanted:
            results.update(_multimodal_results(tallies))
        if "angular_distance" in wanted:
            results["angular_distance"] = tallies.angular.means("tokens")
        if attention:
            results["attention_to_image"] = tallies.attention_image.means("text tokens")
    for name in dict.fromkeys(scorers):  # every other scorer on its own, in the order asked
        if name in _ONE_PASS:
            continue
        fn = SCORERS.get(name)
        takes_reference = "reference_model" in inspect.signature(fn).parameters
        out = fn(model, batches, reference_model) if takes_reference else fn(model, batches)
        results.update(out if isinstance(out, dict) else {name: list(out)})
    return results
