"""A LLaVA assembled from parts, the paper's starting point: an LLM, a CLIP or SigLIP vision tower
and, optionally, LLaVA's stage-1 projector weights (`mm_projector.bin` or safetensors).

The result is an ordinary `LlavaForConditionalGeneration` plus a `LlavaProcessor` that matches
the tower (image size, patch size, CLS token, LLaVA's pad-to-square) and carries the LLM's chat
template, so `AutoModelForImageTextToText` / `AutoProcessor` load it with no vregion code.
Image processors are the Pillow ones: they build without torchvision.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PretrainedConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from vregion.models.loading import resolve_checkpoint

log = logging.getLogger(__name__)

PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "linear_1.weight",
    "model.mm_projector.0.bias": "linear_1.bias",
    "model.mm_projector.2.weight": "linear_2.weight",
    "model.mm_projector.2.bias": "linear_2.bias",
}
"""LLaVA's `mlp2x_gelu` projector keys (Linear, GELU, Linear) -> transformers' projector names."""

TOWERS = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}

# LLaVA-1.5's `vicuna_v1` conversation: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ...".
# Vicuna's tokenizer ships no chat template, so LLaVA-1.5 needs this one.
VICUNA_V1_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"vicuna_v1": VICUNA_V1_TEMPLATE}
"""Named chat templates for LLMs whose tokenizer has none."""

SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]


class ProjectorWeightsError(ValueError):
    """A projector file that does not hold LLaVA's 2-layer MLP of the right shapes."""


def vision_tower_config(name_or_path: str | Path) -> CLIPVisionConfig | SiglipVisionConfig:
    """The tower's vision config, from a vision-only checkpoint or a full CLIP/SigLIP one."""
    source = resolve_checkpoint(name_or_path)
    config = AutoConfig.from_pretrained(source)
    if config.model_type in ("clip", "siglip"):  # e.g. openai/clip-vit-large-patch14-336
        config = config.vision_config
    if config.model_type not in TOWERS:
        raise ValueError(
            f"{name_or_path}: vision tower of type {config.model_type!r}; assemble takes a CLIP "
            f"or SigLIP checkpoint (full or vision-only)"
        )
    return config


def read_projector_weights(
    path: str | Path, vision_width: int, llm_width: int
) -> dict[str, torch.Tensor]:
    """LLaVA's stage-1 projector (`mm_projector.bin` or `.safetensors`) in transformers' names.

    Every key of `PROJECTOR_KEYS` must be there with the shape a `vision_width` tower and an
    `llm_width` LLM need, and no other key (a different layout, e.g. `mlp3x_gelu`, is refused,
    not half-loaded). Cheap: the file is checked before any model weight is read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no projector file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ProjectorWeightsError(f"{path}: not a state dict (got {type(state).__name__})")
    shapes = {
        "linear_1.weight": (llm_width, vision_width),
        "linear_1.bias": (llm_width,),
        "linear_2.weight": (llm_width, llm_width),
        "linear_2.bias": (llm_width,),
    }
    layout = "LLaVA's mlp2x_gelu layout (" + ", ".join(PROJECTOR_KEYS) + ")"
    unexpected = sorted(set(state) - set(PROJECTOR_KEYS))
    if unexpected:
        raise ProjectorWeightsError(
            f"{path}: unexpected key(s) {unexpected[:6]}; expected {layout}"
        )
    for key, name in PROJECTOR_KEYS.items():
        want = shapes[name]
        if key not in state:
            raise ProjectorWeightsError(
                f"{path}: missing key {key!r} (expected shape {want}); expected {layout}"
            )
        got = tuple(state[key].shape)
        if got != want:
            raise ProjectorWeightsError(
                f"{path}: key {key!r} has shape {got}, expected {want} (tower width "
                f"{vision_width} -> LLM width {llm_width}: trained for another LLM or tower?)"
            )
    return {name: state[key] for key, name in PROJECTOR_KEYS.items()}


def image_processor_for(tower: CLIPVisionConfig | SiglipVisionConfig, pad_to_square: bool):
    """Pixel preprocessing as the tower was trained with; LLaVA's pad-to-square if asked.

    CLIP: resize the short side and centre-crop (CLIP means/stds). SigLIP: resize to the square
    input (means/stds 0.5). Padding fills with the mean colour, as LLaVA's `expand2square`.
    """
    side = tower.image_size
    if tower.model_type == "clip_vision_model":
        return LlavaImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            do_pad=pad_to_square,
        )
    if not pad_to_square:
        return SiglipImageProcessorPil(size={"height": side, "width": side})
    return LlavaImageProcessorPil(
        size={"height": side, "width": side},
        do_center_crop=False,
        image_mean=SIGLIP_MEAN_STD,
        image_std=SIGLIP_MEAN_STD,
        do_pad=True,
    )


def _check_options(tower: PretrainedConfig, layer: int, strategy: str) -> None:
    if tower.model_type == "siglip_vision_model" and strategy == "default":
        raise ValueError(
            "vision_feature_select_strategy 'default' drops the first image token, CLIP's CLS; "
            "SigLIP has no CLS token, so it would drop a real patch: use 'full' with SigLIP"
        )
    depth = tower.num_hidden_layers
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(
            f"vision_feature_layer {layer} is outside the tower's hidden states "
            f"(-{depth + 1}..{depth}: embeddings + {depth} layers)"
        )


def assemble_llava(
    llm: str | Path,
    vision_tower: str | Path,
    projector: str | Path | None = None,
    *,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: Literal["default", "full"] = "default",
    pad_to_square: bool = False,
    image_token: str = "<image>",
    chat_template: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA from an LLM and a CLIP/SigLIP tower (HF ids or directories) and its processor.

    `projector`: LLaVA's stage-1 weights; None initialises the projector randomly (seeded), and
    then stage 1 (align) must train it. `vision_feature_layer` / `_select_strategy`: which tower
    output the projector sees (LLaVA-1.5: the second-to-last layer, CLS dropped: -2, "default").
    `chat_template`: a name in `CHAT_TEMPLATES`, a Jinja template, or None for the LLM
    tokenizer's own. The image token is added to the tokenizer if missing (its embedding row
    zero, so it is never a likely output). Options are checked before any weight is read.
    """
    llm_source = resolve_checkpoint(llm)
    tower_config = vision_tower_config(vision_tower)
    _check_options(tower_config, vision_feature_layer, vision_feature_select_strategy)
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(llm_source)
    template = CHAT_TEMPLATES.get(chat_template, chat_template) or tokenizer.chat_template
    if not template:
        raise ValueError(
            f"{llm}: the tokenizer has no chat template; set chat_template (one of "
            f"{sorted(CHAT_TEMPLATES)} or a Jinja template)"
        )
    if projector is not None:
        llm_width = AutoConfig.from_pretrained(llm_source).get_text_config().hidden_size
        projector_weights = read_projector_weights(projector, tower_config.hidden_size, llm_width)

    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:  # Llama/Vicuna: pad with unk, as LLaVA does
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.chat_template = template
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    causal = AutoModelForCausalLM.from_pretrained(llm_source, dtype=torch_dtype)
    old_vocab = causal.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_vocab:
        causal.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # zero, not sampled: a sampled output row gets real logits
            causal.get_input_embeddings().weight[old_vocab:] = 0
            causal.get_output_embeddings().weight[old_vocab:] = 0  # untied LLMs (Vicuna)
    tower = TOWERS[tower_config.model_type].from_pretrained(
        resolve_checkpoint(vision_tower), config=tower_config, dtype=torch_dtype
    )

    cls_tokens = 1 if tower_config.model_type == "clip_vision_model" else 0
    patches = (tower_config.image_size // tower_config.patch_size) ** 2
    dropped = 1 if vision_feature_select_strategy == "default" else 0
    text_config = causal.config
    config = LlavaConfig(
        vision_config=tower_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=patches + cls_tokens - dropped,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    config.pad_token_id = tokenizer.pad_token_id
    # Built on the meta device and filled with the loaded parts: a 7B LLM is never initialised
    # randomly nor held twice.
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = causal.model
    model.lm_head = causal.lm_head
    model.model.vision_tower = tower
    torch.manual_seed(seed)
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(torch_dtype)
    if projector is not None:
        model.model.multi_modal_projector.load_state_dict(projector_weights)
    model.tie_weights()
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:  # a part transformers lays out differently from the parts loaded above
        raise RuntimeError(f"assembled model has weights left unset: {on_meta[:5]}")

    model.generation_config = causal.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [image_token_id]  # never generate a placeholder
    processor = LlavaProcessor(
        image_processor=image_processor_for(tower_config, pad_to_square),
        tokenizer=tokenizer,
        patch_size=tower_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=cls_tokens,
        chat_template=template,
        image_token=image_token,
    )
    log.info(
        "assembled LLaVA: %s + %s, projector %s",
        llm,
        vision_tower,
        projector or "random (align must train it)",
    )
    return model.eval(), processor
