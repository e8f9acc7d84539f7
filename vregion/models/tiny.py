"""Tiny random LVLMs built from configs, and valid inputs for them: the test suite's models.

Every supported architecture gets a model with a 32-64 wide LLM of a few layers, a 256-token
vocabulary with its image token inside it, and a 2-layer vision tower on 32x32 images, so a
forward + backward pass takes milliseconds on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from transformers import (
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

TINY_ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_siglip")
"""Architectures `tiny_lvlm` builds; `llava_siglip` is the embedded model's layout."""

VOCAB_SIZE = 256
IMAGE_TOKEN_ID = 255
# Qwen-VL configs also name video and vision start/end tokens; keep them inside the vocabulary.
VIDEO_TOKEN_ID = 254
VISION_START_ID = 252
VISION_END_ID = 253
TEXT_TOKEN_MAX = 250
"""Random text tokens are drawn below this, so they never collide with the special ids."""

IMAGE_SIZE = 32
PATCH_SIZE = 8  # LLaVA towers: (32 / 8)^2 = 16 image tokens per tile
QWEN_PATCH_SIZE = 4  # Qwen towers: an 8x8 patch grid, merged 2x2 into 16 image tokens
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


_BUILDERS = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
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
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        v = config.vision_config
        grid = IMAGE_SIZE // v.patch_size
        # Qwen-VL takes pixels already cut into flattened patches: (patches, C * T * P * P).
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
        pixel_values = torch.randn(batch * grid * grid, patch_dim, generator=gen)
        extra["image_grid_thw"] = torch.tensor([[1, grid, grid]] * batch)
        n_image = grid * grid // v.spatial_merge_size**2
    elif model_type == "llava_next":
        h, w = LLAVA_NEXT_IMAGE_HW
        tiles = image_size_to_num_patches((h, w), config.image_grid_pinpoints, IMAGE_SIZE)
        pixel_values = torch.randn(batch, tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        extra["image_sizes"] = torch.tensor([[h, w]] * batch)
        n_image = _image_tokens_llava_next(config, h, w)
    elif model_type == "llava":
        side = config.vision_config.image_size  # any LLaVA, e.g. the embedded model's 64 px
        pixel_values = torch.randn(batch, 3, side, side, generator=gen)
        # One token per patch: "default" drops CLIP's CLS token, "full" SigLIP has none.
        n_image = (side // config.vision_config.patch_size) ** 2
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
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        # transformers 5.x needs the token modality (0 text, 1 image) to build M-RoPE positions.
        inputs["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    if with_labels:
        inputs["labels"] = input_ids.masked_fill(input_ids == config.image_token_id, -100)
    return inputs
