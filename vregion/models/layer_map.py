"""Where the parts of an LVLM live: LLM decoder layers, vision tower, projector, LM head.

Every later stage (probe scorers, selective tuning, pruning) asks `layer_map(model)` instead of
hard-coding module paths, so supporting a new architecture is one `ARCHITECTURES` entry.
Paths are dotted module names as `model.named_modules()` / `named_parameters()` spell them
(checked against transformers 5.23 source).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in `ARCHITECTURES`."""


@dataclass(frozen=True)
class ArchSpec:
    """Dotted paths, relative to the `*ForConditionalGeneration` model, of one architecture."""

    layers: str
    """The LLM's decoder layers (an `nn.ModuleList`)."""
    vision_tower: str
    """The vision encoder (for Qwen-VL it contains the projector)."""
    projector: str
    """The module that maps vision features into the LLM's embedding space."""
    lm_head: str = "lm_head"
    """The output projection to the vocabulary."""


_LLAVA = ArchSpec(
    layers="model.language_model.layers",
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
)
_QWEN_VL = ArchSpec(
    layers="model.language_model.layers",
    vision_tower="model.visual",
    projector="model.visual.merger",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": _LLAVA,  # LLaVA-1.5 (llava-hf) and the embedded SigLIP + Llama model
    "llava_next": _LLAVA,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
}
"""`config.model_type` -> where its parts live. Add an entry to support a new architecture."""


@dataclass(frozen=True, eq=False)
class LayerMap:
    """The parts of one LVLM that vregion trains, scores and prunes, and their dotted paths.

    Paths are relative to `model` (the object given to `layer_map`, PEFT wrapper included), so
    `f"{layers_path}.{i}."` prefixes exactly the names in `model.named_parameters()`.
    """

    model: nn.Module
    arch: str
    """`config.model_type`, e.g. `llava`, `qwen2_vl`."""
    model_class: str
    """Class name of the underlying transformers model."""
    layers: nn.ModuleList
    layers_path: str
    vision_tower: nn.Module
    vision_tower_path: str
    projector: nn.Module
    projector_path: str
    lm_head: nn.Module
    lm_head_path: str
    text_config: object
    """The LLM's config (`num_hidden_layers`, `hidden_size`, ...)."""
    image_token_id: int | None

    @property
    def num_layers(self) -> int:
        """Number of LLM decoder layers (what region selection and pruning count)."""
        return len(self.layers)


def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformers model inside PEFT wrappers, and the path prefix the wrappers add."""
    prefix = ""
    while hasattr(model, "get_base_model") and hasattr(model, "base_model"):
        # PeftModel -> .base_model (LoraModel) -> .model (the transformers model)
        inner = model.get_base_model()
        prefix += module_prefix(model, inner)
        model = inner
    return model, prefix


def _unsupported(
    model: nn.Module, model_type: str | None, why: str
) -> UnsupportedArchitectureError:
    known = ", ".join(sorted(ARCHITECTURES))
    return UnsupportedArchitectureError(
        f"vregion has no layer map for {type(model).__name__} (model_type={model_type!r}): {why}. "
        f"A layer map needs four modules: the LLM decoder layers (an nn.ModuleList), the vision "
        f"tower, the projector (vision features -> LLM embeddings) and the LM head. "
        f"Supported model types: {known}. To add one, find those modules' dotted names in "
        f"`model.named_modules()` and add an entry to vregion.models.layer_map.ARCHITECTURES, e.g. "
        f'ARCHITECTURES["{model_type or "<model_type>"}"] = ArchSpec(layers="model.language_model.layers", '
        f'vision_tower="model.vision_tower", projector="model.multi_modal_projector").'
    )


def layer_map(model: nn.Module) -> LayerMap:
    """Find the LLM layers, vision tower, projector and LM head of a supported LVLM.

    Accepts the transformers model or a PEFT wrapper around it. Raises
    `UnsupportedArchitectureError` for an architecture without an `ARCHITECTURES` entry or
    whose modules are not where the entry says.
    """
    base, prefix = _unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise _unsupported(base, model_type, "its model type has no entry in ARCHITECTURES")
    parts = {}
    for field_name in ("layers", "vision_tower", "projector", "lm_head"):
        path = getattr(spec, field_name)
        try:
            parts[field_name] = base.get_submodule(path)
        except AttributeError:
            raise _unsupported(
                base, model_type, f"it has no module `{path}` ({field_name})"
            ) from None
    if not isinstance(parts["layers"], nn.ModuleList):
        raise _unsupported(
            base,
            model_type,
            f"`{spec.layers}` is a {type(parts['layers']).__name__}, not a ModuleList",
        )
    return LayerMap(
        model=model,
        arch=model_type,
        model_class=type(base).__name__,
        layers=parts["layers"],
        layers_path=prefix + spec.layers,
        vision_tower=parts["vision_tower"],
        vision_tower_path=prefix + spec.vision_tower,
        projector=parts["projector"],
        projector_path=prefix + spec.projector,
        lm_head=parts["lm_head"],
        lm_head_path=prefix + spec.lm_head,
        text_config=config.get_text_config(),
        image_token_id=getattr(config, "image_token_id", None),
    )


def llm_layer_names(lm: LayerMap, idx: int) -> str:
    """Prefix of LLM layer `idx`'s names in `named_parameters()`, e.g. `model.language_model.layers.3.`."""
    if not 0 <= idx < lm.num_layers:
        raise IndexError(f"layer {idx} out of range: the LLM has {lm.num_layers} layers")
    return f"{lm.layers_path}.{idx}."


def layer_index(lm: LayerMap, name: str) -> int | None:
    """The LLM layer a parameter or module name belongs to, or None if it is outside the layers."""
    head = lm.layers_path + "."
    if not name.startswith(head):
        return None
    idx = name[len(head) :].split(".", 1)[0]
    return int(idx) if idx.isdigit() else None


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    """Dotted name of `module` inside `model` with a trailing dot (`""` for `model` itself)."""
    if module is model:
        return ""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name + "."
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def vision_parameters(lm: LayerMap) -> list[nn.Parameter]:
    """The vision tower's parameters without the projector's.

    Qwen-VL nests its projector (`model.visual.merger`) inside the vision tower, so optimizer
    groups built from `lm.vision_tower.parameters()` and `lm.projector.parameters()` would overlap.
    """
    projector = {id(p) for p in lm.projector.parameters()}
    return [p for p in lm.vision_tower.parameters() if id(p) not in projector]


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def describe(lm: LayerMap) -> str:
    """A table of the map: paths and parameter counts per LLM layer, vision, projector, head."""
    params = {id(p): p.numel() for p in lm.model.parameters()}  # tied tensors counted once
    projector = _param_ids(lm.projector)
    vision = {id(p) for p in vision_parameters(lm)}
    head = _param_ids(lm.lm_head)
    tied = bool(head & _param_ids(lm.model.get_input_embeddings()))
    layers = [_param_ids(layer) for layer in lm.layers]
    in_layers = set().union(*layers)
    other = set(params) - in_layers - vision - projector - head

    nested = projector <= _param_ids(lm.vision_tower)
    rows = [
        (f"LLM layer {i}", llm_layer_names(lm, i).rstrip("."), ids) for i, ids in enumerate(layers)
    ]
    rows += [
        ("vision tower" + (" (w/o projector)" if nested else ""), lm.vision_tower_path, vision),
        ("projector", lm.projector_path, projector),
        ("LM head" + (" (tied to embeddings)" if tied else ""), lm.lm_head_path, head),
        ("other (embeddings, norms)", "", other),
        ("LLM layers, all", lm.layers_path, in_layers),
        ("total", "", set(params)),
    ]
    total = sum(params.values())
    name_w = max(len(label) for label, _, _ in rows)
    path_w = max(len(path) for _, path, _ in rows)
    lines = [
        f"{lm.model_class} (model_type {lm.arch}): {lm.num_layers} LLM layers, "
        f"hidden {getattr(lm.text_config, 'hidden_size', '?')}, image token id {lm.image_token_id}",
        f"{'part':<{name_w}}  {'module path':<{path_w}}  {'params':>12}  {'share':>6}",
    ]
    for label, path, ids in rows:
        n = sum(params[i] for i in ids)
        lines.append(f"{label:<{name_w}}  {path:<{path_w}}  {n:>12,}  {n / total:>6.1%}")
    return "\n".join(lines)
