"""Tiny random LVLMs built from configs, and valid inputs for them: the test suite's models.

Every supported architecture gets a model with a 32-64 wide LLM of a few layers, a 256-token
vocabulary with its image token inside it, and a 2-layer vision tower on 32x32 images, so a
forward + backward pass takes milliseconds on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

TINY_ARCHS = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "mistral3",
    "internvl",
    "llava_next_video",
    "vipllava",
    "aya_vision",
    "cohere2_vision",
    "idefics2",
    "glm4v",
    "qwen3_vl_moe",
    "qwen3_5",
    "mllama",
    "llava_siglip",
)
"""Architectures `tiny_lvlm` builds: a `config.model_type` each, except `llava_siglip` (the
embedded model's layout). `mllama` is built only to show that `layer_map` refuses it."""


class FamilyNotInstalledError(ImportError):
    """The installed transformers has no models of this family."""


VOCAB_SIZE = 256
IMAGE_TOKEN_ID = 255
# Qwen-VL configs also name video and vision start/end tokens; keep them inside the vocabulary.
VIDEO_TOKEN_ID = 254
VISION_START_ID = 252
VISION_END_ID = 253
BOI_TOKEN_ID = 250  # Gemma 3 begin / end of image
EOI_TOKEN_ID = 251
TEXT_TOKEN_MAX = 250
"""Random text tokens are drawn below this, so they never collide with the special ids."""

IMAGE_SIZE = 32
PATCH_SIZE = 8  # LLaVA towers: (32 / 8)^2 = 16 image tokens per tile
QWEN_PATCH_SIZE = 4  # Qwen towers: an 8x8 patch grid, merged 2x2 into 16 image tokens
GEMMA3_IMAGE_TOKENS = 4
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "glm4v")
"""Families fed Qwen-VL style: flattened patches, `image_grid_thw`, token types for M-RoPE."""
LLAVA_NEXT_IMAGE_HW = (32, 64)
"""LLaVA-NeXT test image (height, width): two tiles side by side plus the base view."""


def _llama_text(num_layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _clip_vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )


def _qwen_text(num_layers: int) -> dict:
    # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width) by mrope_section.
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _qwen_special_tokens() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def _llava(num_layers: int) -> PreTrainedModel:
    config = LlavaConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    return LlavaForConditionalGeneration(config)


def _llava_siglip(num_layers: int) -> PreTrainedModel:
    # The embedded model's layout: SigLIP has no CLS token, so every patch is an image token.
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config)


def _llava_next(num_layers: int) -> PreTrainedModel:
    h, w = LLAVA_NEXT_IMAGE_HW
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(num_layers),
        image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [h, w], [w, h]],
    )
    return LlavaNextForConditionalGeneration(config)


def _qwen2_vl(num_layers: int) -> PreTrainedModel:
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,  # the merger's output width: the LLM hidden size
        mlp_ratio=2,
        num_heads=2,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=_qwen_text(num_layers), vision_config=vision, **_qwen_special_tokens()
    )
    return Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl(num_layers: int) -> PreTrainedModel:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,  # the merger's output width: the LLM hidden size
        num_heads=2,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,  # 2x2 merged patches per attention window
        fullatt_block_indexes=[1],
    )
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(num_layers), vision_config=vision, **_qwen_special_tokens()
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _text(num_layers: int, **extra) -> dict:
    """A tiny LLM config as a dict: the family's default text model type fills in the rest."""
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _siglip(patch_size: int = PATCH_SIZE) -> dict:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
    )


def _from_config(model_type: str, **kwargs) -> PreTrainedModel:
    """The family's `*ForConditionalGeneration` from a config built by its model type.

    Raises `FamilyNotInstalledError` when the installed transformers lacks the family.
    """
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except (KeyError, ValueError) as err:
        raise FamilyNotInstalledError(
            f"transformers {transformers.__version__} has no {model_type!r} models: {err}"
        ) from None
    return AutoModelForImageTextToText.from_config(config)


def _llava_onevision(num_layers: int) -> PreTrainedModel:
    return _from_config(
        "llava_onevision",
        vision_config=_siglip(),
        text_config=_text(num_layers),  # Qwen2
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE]],
    )


def _idefics3(num_layers: int, model_type: str = "idefics3") -> PreTrainedModel:
    # 8x8 patches, pixel-shuffled by scale_factor 2 into 16 image tokens.
    vision = _siglip(patch_size=QWEN_PATCH_SIZE)
    del vision["model_type"]
    return _from_config(
        model_type,
        vision_config=vision,
        text_config=_text(num_layers),  # Llama
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        pad_token_id=0,
    )


def _smolvlm(num_layers: int) -> PreTrainedModel:
    return _idefics3(num_layers, "smolvlm")


def _paligemma(num_layers: int) -> PreTrainedModel:
    return _from_config(
        "paligemma",
        vision_config={**_siglip(), "projection_dim": 64},
        text_config=_text(num_layers),  # Gemma
        image_token_index=IMAGE_TOKEN_ID,
        projection_dim=64,
        hidden_size=64,
        vocab_size=VOCAB_SIZE,
    )


def _gemma3(num_layers: int) -> PreTrainedModel:
    layer_types = ["sliding_attention", "full_attention"] * num_layers
    model = _from_config(
        "gemma3",
        vision_config=_siglip(),
        text_config=_text(
            num_layers,
            query_pre_attn_scalar=16,
            sliding_window=512,
            layer_types=layer_types[:num_layers],
        ),
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,  # 4x4 patches average-pooled to 2x2
        boi_token_index=BOI_TOKEN_ID,
        eoi_token_index=EOI_TOKEN_ID,
        image_token_index=IMAGE_TOKEN_ID,
    )
    # transformers initialises the projection matrix to zeros: the image would be invisible
    # and the tower would get no gradient. Random, like a trained projector.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
    return model


def _mistral3(num_layers: int) -> PreTrainedModel:
    # Pixtral: 8x8 patches, merged 2x2 by the projector into 16 image tokens.
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=16,
        image_size=IMAGE_SIZE,
        patch_size=QWEN_PATCH_SIZE,
    )
    return _from_config(
        "mistral3",
        vision_config=vision,
        text_config=_text(num_layers),  # Mistral
        image_token_index=IMAGE_TOKEN_ID,
        spatial_merge_size=2,
    )


def _internvl(num_layers: int) -> PreTrainedModel:
    # 8x8 patches (plus a CLS token the "default" strategy drops), pixel-shuffled to 16 tokens.
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[IMAGE_SIZE, IMAGE_SIZE],
        patch_size=[QWEN_PATCH_SIZE, QWEN_PATCH_SIZE],
    )
    return _from_config(
        "internvl",
        vision_config=vision,
        text_config=_text(num_layers),  # Qwen2
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        downsample_ratio=0.5,
    )


def _qwen3_vl(num_layers: int, model_type: str = "qwen3_vl") -> PreTrainedModel:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,  # an 8x8 grid of learned positions
        deepstack_visual_indexes=[0],  # one deepstack injection: after LLM layer 0
    )
    text = _qwen_text(num_layers)
    text["head_dim"] = 16
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    if model_type == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return _from_config(
        model_type, text_config=text, vision_config=vision, **_qwen_special_tokens()
    )


def _qwen3_5(num_layers: int) -> PreTrainedModel:
    # A hybrid LLM: Gated DeltaNet linear-attention layers alternate with softmax attention.
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
    )
    layer_types = ["linear_attention", "full_attention"] * num_layers
    text = _text(
        num_layers,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=layer_types[:num_layers],
        # Half of head_dim 16 is rotary: 4 frequencies split over (temporal, height, width).
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5,
            "mrope_interleaved": True,
        },
    )
    return _from_config("qwen3_5", text_config=text, vision_config=vision, **_qwen_special_tokens())


def _qwen3_vl_moe(num_layers: int) -> PreTrainedModel:
    model = _qwen3_vl(num_layers, model_type="qwen3_vl_moe")
    return model


def _llava_next_video(num_layers: int) -> PreTrainedModel:
    h, w = LLAVA_NEXT_IMAGE_HW
    return _from_config(
        "llava_next_video",
        vision_config=_clip_vision().to_dict(),
        text_config=_text(num_layers),  # Llama
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[IMAGE_SIZE, IMAGE_SIZE], [h, w], [w, h]],
        vision_feature_layer=-1,
    )


def _vipllava(num_layers: int) -> PreTrainedModel:
    return _from_config(
        "vipllava",
        vision_config=_clip_vision().to_dict(),
        text_config=_text(num_layers),  # Llama
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layers=[-2, -1],  # the projector concatenates several tower layers
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )


def _aya_vision(num_layers: int, model_type: str = "aya_vision") -> PreTrainedModel:
    # SigLIP 8x8 patches, pixel-shuffled by downsample_factor 2 into 16 image tokens.
    extra = (
        {"alignment_intermediate_size": 64}
        if model_type == "cohere2_vision"
        else {"adapter_layer_norm_eps": 1e-6, "vision_feature_select_strategy": "full"}
    )
    return _from_config(
        model_type,
        vision_config=_siglip(patch_size=QWEN_PATCH_SIZE),
        text_config=_text(num_layers),  # Cohere 2
        downsample_factor=2,
        **{
            "image_token_id"
            if model_type == "cohere2_vision"
            else "image_token_index": IMAGE_TOKEN_ID
        },
        **extra,
    )


def _cohere2_vision(num_layers: int) -> PreTrainedModel:
    return _aya_vision(num_layers, "cohere2_vision")


def _idefics2(num_layers: int) -> PreTrainedModel:
    # The connector is a perceiver resampler: 16 latents per image, whatever the patch count.
    vision = _siglip()
    del vision["model_type"]
    perceiver = dict(
        hidden_size=64,
        resampler_n_latents=16,
        resampler_depth=1,
        resampler_n_heads=2,
        resampler_head_dim=16,
        num_key_value_heads=1,
    )
    return _from_config(
        "idefics2",
        vision_config=vision,
        perceiver_config=perceiver,
        text_config=_text(num_layers),  # Mistral
        image_token_id=IMAGE_TOKEN_ID,
        pad_token_id=0,
    )


def _glm4v(num_layers: int) -> PreTrainedModel:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        image_size=IMAGE_SIZE,
        patch_size=QWEN_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = _qwen_text(num_layers)
    text["head_dim"] = 16
    # Half of head_dim 16 is rotary: 4 frequencies split over (temporal, height, width).
    text["rope_parameters"] = {
        **text["rope_parameters"],
        "partial_rotary_factor": 0.5,
        "mrope_section": [1, 1, 2],
    }
    return _from_config(
        "glm4v",
        text_config=text,  # GLM-4: fused gate_up_proj
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        image_start_token_id=VISION_START_ID,
        image_end_token_id=VISION_END_ID,
        video_start_token_id=VISION_START_ID,
        video_end_token_id=VISION_END_ID,
    )


def _mllama(num_layers: int) -> PreTrainedModel:
    # Only for the refusal: layer_map refuses Mllama before any input is needed.
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        vision_output_dim=64,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=1,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    text = _text(num_layers, cross_attention_layers=[num_layers - 1])
    return _from_config(
        "mllama", vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID
    )


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "mistral3": _mistral3,
    "internvl": _internvl,
    "llava_next_video": _llava_next_video,
    "vipllava": _vipllava,
    "aya_vision": _aya_vision,
    "cohere2_vision": _cohere2_vision,
    "idefics2": _idefics2,
    "glm4v": _glm4v,
    "qwen3_vl_moe": _qwen3_vl_moe,
    "qwen3_5": _qwen3_5,
    "mllama": _mllama,
    "llava_siglip": _llava_siglip,
}


def tiny_lvlm(arch: str, num_layers: int = 4, seed: int = 0) -> PreTrainedModel:
    """A tiny random LVLM of architecture `arch` (one of `TINY_ARCHS`) with `num_layers` LLM layers.

    fp32, in eval mode; the same `seed` gives the same weights.
    """
    if arch not in _BUILDERS:
        raise ValueError(
            f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}"
        )
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    torch.manual_seed(seed)
    return _BUILDERS[arch](num_layers).eval()


def _image_tokens_llava_next(config, height: int, width: int) -> int:
    # Base view (p*p) + the tiles' features laid out as a (rows*p) x (cols*p) grid with one
    # newline token per row. The test image matches a pinpoint's aspect ratio, so no unpadding.
    p = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(
        (height, width), config.image_grid_pinpoints, config.vision_config.image_size
    )
    return p * p + (rows * p) * (cols * p + 1)


def tiny_inputs(
    model: PreTrainedModel,
    batch: int = 2,
    text_len: int = 8,
    seed: int = 0,
    with_labels: bool = False,
) -> dict[str, torch.Tensor]:
    """Valid inputs for `model(**inputs)` of a tiny model: one image per sample and its tokens.

    Works for every `tiny_lvlm` and any LLaVA-1.5-style model (e.g. the embedded one). Text
    tokens are random ids in [3, 250), below every special id of the tiny vocabulary.

    Each sequence is `text_len // 2` text tokens, the image's placeholder tokens (as many as the
    architecture turns the image into), then the rest of the text. Adds `pixel_values`,
    `attention_mask`, and per architecture `image_sizes` (LLaVA-NeXT) or `image_grid_thw` and
    `mm_token_type_ids` (Qwen-VL). With `with_labels`, `labels` copies `input_ids` with image
    positions set to -100, so the model returns a loss.
    """
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    model_type = config.model_type
    extra: dict[str, torch.Tensor] = {}
    if model_type in QWEN_VL_TYPES:
        v = config.vision_config
        grid = IMAGE_SIZE // v.patch_size
        # Qwen-VL takes pixels already cut into flattened patches: (patches, C * T * P * P).
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        pixel_values = torch.randn(batch * grid * grid, patch_dim, generator=gen)
        extra["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
        n_image = grid * grid // v.spatial_merge_size**2
    elif model_type in ("llava_next", "llava_next_video", "llava_onevision"):
        h, w = LLAVA_NEXT_IMAGE_HW if model_type != "llava_onevision" else (IMAGE_SIZE, IMAGE_SIZE)
        tiles = image_size_to_num_patches((h, w), config.image_grid_pinpoints, IMAGE_SIZE)
        pixel_values = torch.randn(batch, tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        extra["image_sizes"] = torch.tensor([[h, w]] * batch)
        n_image = _image_tokens_llava_next(config, h, w)
    elif model_type == "idefics2":
        v = config.vision_config
        pixel_values = torch.randn(batch, 1, 3, v.image_size, v.image_size, generator=gen)
        n_image = config.perceiver_config.resampler_n_latents
    elif model_type in ("aya_vision", "cohere2_vision"):
        v = config.vision_config
        pixel_values = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)
        n_image = (v.image_size // v.patch_size) ** 2 // config.downsample_factor**2
    elif model_type in ("idefics3", "smolvlm"):
        # (batch, images per sample, C, H, W); the pixel-shuffled patch grid gives the tokens.
        v = config.vision_config
        pixel_values = torch.randn(batch, 1, 3, v.image_size, v.image_size, generator=gen)
        n_image = (v.image_size // v.patch_size) ** 2 // config.scale_factor**2
    elif model_type == "internvl":
        pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        n_image = config.image_seq_length
    elif model_type == "mistral3":
        pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        extra["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * batch)
        side = IMAGE_SIZE // config.vision_config.patch_size // config.spatial_merge_size
        n_image = side * side
    elif model_type in ("llava", "vipllava", "paligemma", "gemma3"):
        side = config.vision_config.image_size  # any LLaVA, e.g. the embedded model's 64 px
        pixel_values = torch.randn(batch, 3, side, side, generator=gen)
        # One token per patch: "default" drops CLIP's CLS token, "full" SigLIP has none;
        # Gemma 3 average-pools the patch grid down to mm_tokens_per_image.
        n_image = getattr(config, "mm_tokens_per_image", None) or (
            (side // config.vision_config.patch_size) ** 2
        )
    else:
        raise ValueError(f"tiny_inputs does not know how to feed a {model_type!r} model")

    before = text_len // 2
    text = torch.randint(3, TEXT_TOKEN_MAX, (batch, text_len), generator=gen)
    image = torch.full((batch, n_image), config.image_token_id)
    input_ids = torch.cat([text[:, :before], image, text[:, before:]], dim=1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
        **extra,
    }
    if model_type in QWEN_VL_TYPES:
        # transformers 5.x needs the token modality (0 text, 1 image) to build M-RoPE positions.
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    if model_type in ("paligemma", "gemma3"):
        # Gemma-based models attend bidirectionally within the image (PaliGemma also within the
        # prefix) and need the token types to do so when training.
        inputs["token_type_ids"] = (input_ids == config.image_token_id).long()
    if with_labels:
        inputs["labels"] = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    return inputs
