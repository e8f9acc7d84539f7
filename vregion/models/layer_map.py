"""Where the parts of an LVLM live: LLM decoder layers, vision tower, projector, LM head.

Every later stage (probe scorers, selective tuning, pruning) asks `layer_map(model)` instead of
hard-coding module paths. The parts are found generically: the LLM is `get_decoder()` and its
layers the one `nn.ModuleList` directly inside it; the vision tower is the first of
`VISION_TOWER_NAMES` on the inner model; the projector the first of `PROJECTOR_NAMES` on the
inner model or inside the tower (Qwen-VL's `visual.merger`); the LoRA targets every `nn.Linear`
inside the decoder layers. `ARCHITECTURES` is the table of the families tested here, with
their exceptions to that discovery (paths, LoRA targets, layers that may not be pruned) and the
families vregion refuses, with the reason, before any work is done.
Paths are dotted module names as `model.named_modules()` / `named_parameters()` spell them
(checked against transformers 5.23 source).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model")
"""Attribute names of the vision encoder on the inner model (`model.model`), tried in order."""
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger")
"""Attribute names of the projector, on the inner model or (Qwen-VL) inside the vision tower."""


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is refused, or its parts cannot be found."""


@dataclass(frozen=True)
class ArchSpec:
    """One family in `ARCHITECTURES`: its name and its exceptions to generic discovery.

    Every path is dotted, relative to the `*ForConditionalGeneration` model; `None` means
    "discover it" (see the module docstring).
    """

    family: str = ""
    """Display name, e.g. `LLaVA-OneVision`."""
    layers: str | None = None
    """The LLM's decoder layers (an `nn.ModuleList`)."""
    vision_tower: str | None = None
    """The vision encoder (for Qwen-VL it contains the projector)."""
    projector: str | None = None
    """The module that maps vision features into the LLM's embedding space."""
    lm_head: str | None = None
    """The output projection to the vocabulary."""
    lora_targets: tuple[str, ...] | None = None
    """Linear modules inside a decoder layer that LoRA adapts, e.g. `self_attn.qkv_proj` for a
    fused projection; `None`: every `nn.Linear` in the layers (the paper's seven for Llama)."""
    fixed_layers: Callable[[object], Sequence[int]] | None = None
    """Given the model config, LLM layers that pruning must keep (see `fixed_reason`)."""
    fixed_reason: str = ""
    refused: str | None = None
    """Why vregion cannot work on this family; `layer_map` raises with it."""
    notes: str = ""
    """What differs from a LLaVA-style model, for the families table."""


def _deepstack_layers(config: object) -> range:
    return range(len(config.vision_config.deepstack_visual_indexes))


_DEEPSTACK_REASON = (
    "deepstack adds vision features after each of the first len(deepstack_visual_indexes) "
    "LLM layers, by position: pruning one would move them"
)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llava": ArchSpec("LLaVA-1.5 (also the embedded SigLIP + Llama model)"),
    "llava_next": ArchSpec("LLaVA-NeXT"),
    "llava_onevision": ArchSpec("LLaVA-OneVision"),
    "qwen2_vl": ArchSpec("Qwen2-VL", notes="projector `visual.merger` lives inside the tower"),
    "qwen2_5_vl": ArchSpec("Qwen2.5-VL", notes="projector `visual.merger` lives inside the tower"),
    "qwen3_vl": ArchSpec(
        "Qwen3-VL",
        fixed_layers=_deepstack_layers,
        fixed_reason=_DEEPSTACK_REASON,
        notes="projector `visual.merger`; the deepstack mergers stay with the (frozen) tower; "
        "the first len(deepstack_visual_indexes) layers are never pruned",
    ),
    "qwen3_vl_moe": ArchSpec(
        "Qwen3-VL-MoE",
        fixed_layers=_deepstack_layers,
        fixed_reason=_DEEPSTACK_REASON,
        notes="as Qwen3-VL; the experts are fused weights, not Linear modules, so region LoRA "
        "adapts attention only (full mode trains the experts too)",
    ),
    "qwen3_5": ArchSpec(
        "Qwen3.5",
        notes="hybrid LLM: Gated DeltaNet linear-attention layers (LoRA on `linear_attn.*`) "
        "between softmax-attention layers; `attention_to_image` refuses it (no attention "
        "weights in linear-attention layers), the other scorers work",
    ),
    "glm4v": ArchSpec(
        "GLM-4.1V / GLM-4.5V", notes="fused `mlp.gate_up_proj` is a LoRA target as it is"
    ),
    "idefics2": ArchSpec("Idefics2", notes="projector `connector` is a perceiver resampler"),
    "idefics3": ArchSpec("Idefics3", notes="LLM `text_model`, projector `connector`"),
    "smolvlm": ArchSpec("SmolVLM", notes="LLM `text_model`, projector `connector`"),
    "paligemma": ArchSpec("PaliGemma"),
    "gemma3": ArchSpec("Gemma 3", notes="projector has no Linear module (a weight matrix)"),
    "mistral3": ArchSpec("Mistral 3 (Pixtral tower)"),
    "internvl": ArchSpec("InternVL"),
    "llava_next_video": ArchSpec("LLaVA-NeXT-Video (images)"),
    "vipllava": ArchSpec("VipLLaVA", notes="projector reads several tower layers"),
    "aya_vision": ArchSpec("Aya Vision"),
    "cohere2_vision": ArchSpec("Command A Vision (Cohere2-Vision)"),
    "mllama": ArchSpec(
        "Mllama (Llama 3.2 Vision)",
        refused="its LLM takes the image only through gated cross-attention layers interleaved "
        "in the decoder (text_config.cross_attention_layers), not as image tokens in the "
        "sequence: the image-token scorers (multimodal block influence, attention to image) "
        "have nothing to measure, and the paper's region (sparse self-attention layers that "
        "process image tokens) has no counterpart in it",
    ),
}
"""`config.model_type` -> family and its exceptions to discovery. A model type not listed is
tried by discovery alone (with a warning that it is untested)."""


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
    lora_targets: tuple[str, ...] = ()
    """Linear modules inside a decoder layer that region LoRA adapts, e.g. `self_attn.q_proj`."""
    fixed_layers: tuple[int, ...] = ()
    """LLM layers that pruning must keep whatever their score (`fixed_reason` says why)."""
    fixed_reason: str = ""
    family: str = field(default="")

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
    known = ", ".join(t for t, s in sorted(ARCHITECTURES.items()) if s.refused is None)
    return UnsupportedArchitectureError(
        f"vregion has no layer map for {type(model).__name__} (model_type={model_type!r}): {why}. "
        f"A layer map needs four modules: the LLM decoder layers (an nn.ModuleList), the vision "
        f"tower, the projector (vision features -> LLM embeddings) and the LM head. "
        f"Supported model types: {known}. To add one, find those modules' dotted names in "
        f"`model.named_modules()` and add an entry to vregion.models.layer_map.ARCHITECTURES, e.g. "
        f'ARCHITECTURES["{model_type or "<model_type>"}"] = ArchSpec(layers="model.language_model.layers", '
        f'vision_tower="model.vision_tower", projector="model.multi_modal_projector").'
    )


def _child(module: nn.Module, names: Sequence[str]) -> str | None:
    """The first of `names` that is a direct submodule of `module`."""
    children = dict(module.named_children())
    return next((n for n in names if n in children), None)


def _forward_module(module: nn.Module) -> nn.Module:
    """The module that runs: a PEFT `modules_to_save` wrapper's active copy, else `module`."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and not module.disable_adapters and module.active_adapters:
        return copies[module.active_adapters[0]]
    return module


def _discover(base: nn.Module) -> dict[str, str | None]:
    """Dotted paths of the four parts found by name and structure (None where not found)."""
    paths: dict[str, str | None] = dict.fromkeys(("layers", "vision_tower", "projector", "lm_head"))
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        paths["lm_head"] = module_prefix(base, head).rstrip(".")
    try:
        decoder = base.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        decoder = None
    if decoder is not None and decoder is not base:
        lists = [n for n, m in decoder.named_children() if isinstance(m, nn.ModuleList)]
        if len(lists) == 1:
            paths["layers"] = module_prefix(base, decoder) + lists[0]
    inner_name = _child(base, ("model",))
    inner = base.get_submodule(inner_name) if inner_name else base
    inner_prefix = inner_name + "." if inner_name else ""
    tower = _child(inner, VISION_TOWER_NAMES)
    if tower is not None:
        paths["vision_tower"] = inner_prefix + tower
    projector = _child(inner, PROJECTOR_NAMES)
    if projector is not None:
        paths["projector"] = inner_prefix + projector
    elif tower is not None:
        # A trained tower (PEFT `modules_to_save`) holds the projector in its trainable copy;
        # `get_submodule` resolves the same path to it through the wrapper.
        nested = _child(_forward_module(inner.get_submodule(tower)), PROJECTOR_NAMES)
        if nested is not None:
            paths["projector"] = f"{inner_prefix}{tower}.{nested}"
    return paths


def _linear_names(layers: nn.ModuleList) -> tuple[str, ...]:
    """Every `nn.Linear` inside the decoder layers, by its name within a layer (PEFT-aware)."""
    names: dict[str, None] = {}
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and "lora_" not in name:
                names[name.replace(".base_layer", "")] = None
    return tuple(names)


def _image_token_id(config: object) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def layer_map(model: nn.Module) -> LayerMap:
    """Find the LLM layers, vision tower, projector and LM head of an LVLM.

    Accepts the transformers model or a PEFT wrapper around it. Raises
    `UnsupportedArchitectureError` for a family `ARCHITECTURES` refuses (with the reason) and
    for a model whose parts neither its entry nor discovery can find.
    """
    base, prefix = _unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is not None and spec.refused:
        raise UnsupportedArchitectureError(
            f"vregion does not support {spec.family} ({type(base).__name__}, "
            f"model_type={model_type!r}): {spec.refused}."
        )
    found = _discover(base)
    parts, paths = {}, {}
    for field_name in ("layers", "vision_tower", "projector", "lm_head"):
        path = getattr(spec, field_name, None) if spec is not None else None
        path = path or found[field_name]
        if path is None:
            raise _unsupported(base, model_type, f"no {field_name.replace('_', ' ')} found")
        try:
            parts[field_name] = base.get_submodule(path)
        except AttributeError:
            raise _unsupported(
                base, model_type, f"it has no module `{path}` ({field_name})"
            ) from None
        paths[field_name] = path
    if not isinstance(parts["layers"], nn.ModuleList):
        raise _unsupported(
            base,
            model_type,
            f"`{paths['layers']}` is a {type(parts['layers']).__name__}, not a ModuleList",
        )
    if spec is None:
        warnings.warn(
            f"{type(base).__name__} (model_type={model_type!r}) is not in vregion's tested "
            f"families; its parts were found by discovery: {paths}",
            stacklevel=2,
        )
        spec = ArchSpec(family=model_type or type(base).__name__)
    lora_targets = spec.lora_targets or _linear_names(parts["layers"])
    fixed = tuple(spec.fixed_layers(config)) if spec.fixed_layers else ()
    return LayerMap(
        model=model,
        arch=model_type,
        model_class=type(base).__name__,
        layers=parts["layers"],
        layers_path=prefix + paths["layers"],
        vision_tower=parts["vision_tower"],
        vision_tower_path=prefix + paths["vision_tower"],
        projector=parts["projector"],
        projector_path=prefix + paths["projector"],
        lm_head=parts["lm_head"],
        lm_head_path=prefix + paths["lm_head"],
        text_config=config.get_text_config(),
        image_token_id=_image_token_id(config),
        lora_targets=lora_targets,
        fixed_layers=tuple(i for i in fixed if i < len(parts["layers"])),
        fixed_reason=spec.fixed_reason,
        family=spec.family,
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
        f"{lm.model_class} ({lm.family or lm.arch}, model_type {lm.arch}): {lm.num_layers} LLM "
        f"layers, hidden {getattr(lm.text_config, 'hidden_size', '?')}, "
        f"image token id {lm.image_token_id}",
        f"{'part':<{name_w}}  {'module path':<{path_w}}  {'params':>12}  {'share':>6}",
    ]
    for label, path, ids in rows:
        n = sum(params[i] for i in ids)
        lines.append(f"{label:<{name_w}}  {path:<{path_w}}  {n:>12,}  {n / total:>6.1%}")
    lines.append(f"region LoRA targets in each layer: {', '.join(lm.lora_targets)}")
    if lm.fixed_layers:
        lines.append(f"never pruned: layers {list(lm.fixed_layers)} ({lm.fixed_reason})")
    return "\n".join(lines)


# --- the families table -----------------------------------------------------------------------


def _short_targets(targets: Sequence[str]) -> str:
    """`q_proj, k_proj, ...` when the last name segments are unique, else the full names."""
    short = [t.rsplit(".", 1)[-1] for t in targets]
    return ", ".join(short if len(set(short)) == len(short) else targets)


def families_table() -> str:
    """The supported and refused families as a markdown table, for the README.

    Each supported family's paths and LoRA targets are what `layer_map` finds on its tiny model
    (`vregion.models.tiny`, built on the meta device: nothing is computed), so the table is
    what the code does with the installed transformers, not what a list says it does.
    """
    import torch
    import transformers

    from vregion.models.tiny import TINY_ARCHS, FamilyNotInstalledError, tiny_lvlm

    header = (
        "| Family | `model_type` | Status | LLM layers | Vision tower | Projector "
        "| Region LoRA targets | Notes |"
    )
    lines = [header, "|" + "---|" * 8]
    for model_type, spec in ARCHITECTURES.items():
        cells = ["", "", "", ""]
        status = "supported"
        notes = spec.notes
        if spec.refused:
            status = "refused"
            notes = spec.refused
        elif model_type in TINY_ARCHS:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    lm = layer_map(tiny_lvlm(model_type, num_layers=2))
            except FamilyNotInstalledError:
                status = f"not in transformers {transformers.__version__}"
            else:
                cells = [
                    f"`{lm.layers_path}`",
                    f"`{lm.vision_tower_path}`",
                    f"`{lm.projector_path}`",
                    _short_targets(lm.lora_targets),
                ]
        lines.append(
            f"| {spec.family} | `{model_type}` | {status} | " + " | ".join(cells) + f" | {notes} |"
        )
    return "\n".join(lines)


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """Trainable and total parameters (a tied tensor once) and the trainable share in %.

    The one counter of the library: PEFT's own count for a PeftModel (it also knows quantised
    and DeepSpeed-partitioned parameters), the same sum for any other model.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:  # `parameters()` yields a tied tensor once
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 3),
    }
