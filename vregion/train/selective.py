"""Make only the visual region trainable: the projector plus the chosen LLM layers.

Two modes, as in the paper: LoRA on all linear modules of the selected layers only (the
authors' setting: q, k, v, o, gate, up, down; other families' names come from the layer map), or full weights of those layers. Everything else is
frozen: the other LLM layers, embeddings, LM head, and the vision tower unless asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from vregion.models.layer_map import layer_map, vision_parameters

LINEAR_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The paper's seven modules (Llama names). The targets actually used are the layer map's
`lora_targets`: every linear module of the family's decoder layers, or its table entry's list."""


def region_target_regex(
    layers_path: str, layers: Sequence[int], targets: Sequence[str] = LINEAR_MODULES
) -> str:
    """PEFT target regex: the linear modules `targets` (names inside a decoder layer, e.g.
    `self_attn.q_proj`) of exactly these LLM layers.

    Anchored on the LLM's layer path so a vision encoder's `layers.N.self_attn.q_proj` (CLIP,
    SigLIP) never matches, which `layers_pattern="layers"` alone would allow.
    """
    idx = "|".join(str(i) for i in sorted(set(layers)))
    mods = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?{re.escape(layers_path)}\.({idx})\.({mods})"


def make_region_trainable(
    model: nn.Module,
    layers: Sequence[int],
    *,
    mode: str = "lora",
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_dropout: float | None = None,
    train_vision: bool = False,
) -> nn.Module:
    """Return the model to train (a PeftModel in `lora` mode) with only the region trainable.

    `lora_r`, `lora_alpha` and `lora_dropout` are required in `lora` mode (no defaults here:
    they come from the config, e.g. `FinetuneConfig`'s fields of the same names). The projector
    is trained in full in both modes (in LoRA mode as a PEFT `modules_to_save`, so the adapter
    alone restores it), and so is the vision tower with `train_vision`. `layers` may be empty:
    projector-only tuning.
    """
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    lmap = layer_map(model)
    bad = [i for i in layers if not 0 <= i < lmap.num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the LLM has {lmap.num_layers} layers")
    model.requires_grad_(False)
    if mode == "full":
        for i in layers:
            lmap.layers[i].requires_grad_(True)
        lmap.projector.requires_grad_(True)
        if train_vision:
            for p in vision_parameters(lmap):
                p.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    missing = [
        k
        for k, v in (("lora_r", lora_r), ("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout))
        if v is None
    ]
    if missing:
        raise ValueError(f"mode 'lora' needs {', '.join(missing)}")
    if not layers:
        # PEFT needs at least one target: an empty region is projector-only, done without LoRA.
        return make_region_trainable(model, [], mode="full", train_vision=train_vision)
    to_save = [lmap.projector_path]
    if train_vision:
        # Qwen-VL's projector (`visual.merger`) lives inside the tower, and the tower's trainable
        # copy holds one of its own. A second, nested copy of the projector would sit off the
        # forward path (no gradient: the projector would silently stop training) and its keys
        # would not reload with `PeftModel.from_pretrained`: save the tower alone.
        nested = lmap.projector_path.startswith(lmap.vision_tower_path + ".")
        to_save = [lmap.vision_tower_path] + ([] if nested else to_save)
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=region_target_regex(lmap.layers_path, layers, lmap.lora_targets),
        modules_to_save=to_save,
        bias="none",
    )
    return get_peft_model(model, config)


def trainable_groups(model: nn.Module, projector_lr: float, llm_lr: float) -> list[dict]:
    """AdamW groups: projector (and vision) at `projector_lr`, LLM layers / LoRA at `llm_lr`."""
    lmap = layer_map(model)
    projector = {id(p) for p in lmap.projector.parameters()}
    vision = {id(p) for p in vision_parameters(lmap)}
    slow, fast = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # modules_to_save copies live beside the original module; match by path too.
        if id(p) in projector or id(p) in vision or lmap.projector_path in name:
            slow.append(p)
        else:
            fast.append(p)
    groups = [{"params": slow, "lr": projector_lr, "name": "projector"}]
    if fast:
        groups.append({"params": fast, "lr": llm_lr, "name": "llm"})
    return groups
