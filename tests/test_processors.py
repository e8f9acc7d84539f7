"""Processors without torchvision, and the dtype a checkpoint loads in.

Each processor test writes a tiny checkpoint directory the way real ones ship (SmolLM2's tokenizer
with the family's special tokens, the family's image processor, a default model config, the video
processor's config beside the image processor's) and loads it with `load_processor`.
"""

import json
import logging

import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from vregion.config import FinetuneConfig, ModelConfig
from vregion.models import loading
from vregion.models.embedded import load_smollm2_tokenizer
from vregion.models.loading import image_only_class, load_lvlm, load_processor
from vregion.models.tiny import tiny_lvlm
from vregion.train.finetune import FinetuneJob, build_trainable

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PROMPT = "Describe <|vision_start|><|image_pad|><|vision_end|> briefly."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer saved once (reading it from the GGUF file takes seconds)."""
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_smollm2_tokenizer().save_pretrained(out)
    return out


def _tokenizer(tokenizer_dir, special=(), **extra_special):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=extra_special or None)
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    return tok


def _write(out, processor, model_type, image_processor_type=None):
    """Save `processor` with a model config; with `image_processor_type`, in the layout of Hub
    checkpoints: preprocessor_config.json (naming the torchvision class, as they do) and a
    video_preprocessor_config.json instead of a nested processor_config.json."""
    processor.save_pretrained(out)
    AutoConfig.for_model(model_type).save_pretrained(out)
    config = json.loads((out / "processor_config.json").read_text())
    image = config.pop("image_processor")
    video = {k: v for k, v in image.items() if k != "image_processor_type"}
    video["video_processor_type"] = config["processor_class"].replace("Processor", "VideoProcessor")
    if image_processor_type is None:  # transformers 5 layout: one nested processor_config.json
        config.update(image_processor=image, video_processor=video)
    else:
        image.update(image_processor_type=image_processor_type)
        (out / "preprocessor_config.json").write_text(json.dumps(image))
        (out / "video_preprocessor_config.json").write_text(json.dumps(video))
    (out / "processor_config.json").write_text(json.dumps(config))
    return out


def _load(out, caplog):
    if not is_torchvision_available():  # what this test is about: transformers refuses it
        with pytest.raises((ImportError, ValueError)):
            AutoProcessor.from_pretrained(out)
    with caplog.at_level(logging.WARNING, logger="vregion.models.loading"):
        processor = load_processor(out)
    if not is_torchvision_available():
        assert len(caplog.records) == 1 and "image-only" in caplog.records[0].getMessage()
    return processor


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_processor_without_torchvision(arch, tokenizer_dir, tmp_path, caplog):
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[arch])
    image_processor = transformers.Qwen2VLImageProcessorPil()
    built = image_only_class(base)(image_processor, _tokenizer(tokenizer_dir, QWEN_TOKENS))
    out = _write(tmp_path / "ckpt", built, arch, image_processor_type="Qwen2VLImageProcessor")
    processor = _load(out, caplog)
    assert isinstance(processor, base) and "video_processor" not in processor.get_attributes()

    image = Image.new("RGB", (84, 56), "red")  # 6 x 4 patches of 14 px, merged 2 x 2: 6 tokens
    batch = processor(images=[image], text=[QWEN_PROMPT], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert (batch["input_ids"] == processor.image_token_id).sum() == 6
    alone = image_processor(images=[image], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], alone["pixel_values"])
    text = batch["input_ids"][0][batch["input_ids"][0] != processor.image_token_id]
    assert processor.tokenizer.decode(text) == QWEN_PROMPT.replace("<|image_pad|>", "")

    # Saved here, it names the full class and keeps the video config: torchvision machines load
    # the usual processor from it; here it loads image-only again, with the same outputs.
    processor.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "processor_config.json").read_text())
    assert saved["processor_class"] == base.__name__
    assert saved["video_processor"]["video_processor_type"].endswith("VideoProcessor")
    (tmp_path / "again" / "config.json").write_text((out / "config.json").read_text())
    again = load_processor(tmp_path / "again")(
        images=[image], text=[QWEN_PROMPT], return_tensors="pt"
    )
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_pixtral_processor_without_torchvision(tokenizer_dir, tmp_path, caplog):
    # Mistral 3 settings: 14-px patches merged 2 x 2, so one [IMG] per 28 x 28 pixels.
    image_processor = transformers.PixtralImageProcessorPil(size={"longest_edge": 112})
    tokenizer = _tokenizer(tokenizer_dir, ["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    built = loading._pixtral_processor()(
        image_processor, tokenizer, patch_size=14, spatial_merge_size=2
    )
    out = _write(tmp_path / "ckpt", built, "mistral3")
    processor = _load(out, caplog)
    assert (processor.patch_size, processor.spatial_merge_size) == (14, 2)

    image = Image.new("RGB", (112, 56), "blue")  # 4 x 2 merged patches
    batch = processor(images=[image], text=["Look: [IMG] what?"], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    start = ids.index(processor.image_token_id)
    row = [processor.image_token_id] * 4
    expected = row + [processor.image_break_token_id] + row + [processor.image_end_token_id]
    assert ids[start : start + len(expected)] == expected
    assert ids.count(processor.image_token_id) == 8
    alone = image_processor(images=[image], patch_size=28, return_tensors="pt")
    assert torch.equal(batch["pixel_values"], alone["pixel_values"])
    assert batch["image_sizes"].tolist() == [[56, 112]]


# The other families whose processors carry a video processor (SmolVLM's also needs num2words).
OTHERS = {
    "qwen3_vl": ("Qwen2VLImageProcessorPil", QWEN_TOKENS, {}, QWEN_PROMPT, {}),
    "glm4v": (
        "Glm4vImageProcessorPil",
        ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>"]
        + ["<|begin_of_video|>", "<|end_of_video|>"],
        {},
        "See <|begin_of_image|><|image|><|end_of_image|> now.",
        {},
    ),
    "internvl": (
        "GotOcr2ImageProcessorPil",
        [],
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        "See <IMG_CONTEXT> now.",
        {},
    ),
    "llava_onevision": (
        "LlavaOnevisionImageProcessorPil",
        ["<image>", "<video>"],
        {},
        "See <image> now.",
        {"num_image_tokens": 729, "vision_feature_select_strategy": "full"},
    ),
    "llava_next_video": (
        "LlavaNextImageProcessorPil",
        ["<image>", "<video>"],
        {},
        "See <image> now.",
        {"vision_feature_select_strategy": "default", "patch_size": 14},
    ),
}


@pytest.mark.parametrize("arch", list(OTHERS))
def test_other_video_processors_load_image_only(arch, tokenizer_dir, tmp_path, caplog):
    image_cls, special, extra, prompt, settings = OTHERS[arch]
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[arch])
    tokenizer = _tokenizer(tokenizer_dir, special, **extra)
    built = image_only_class(base)(
        image_processor=getattr(transformers, image_cls)(),
        tokenizer=tokenizer,
        video_processor=None,
        **settings,
    )
    processor = _load(_write(tmp_path / "ckpt", built, arch), caplog)
    for name, value in settings.items():  # the processor's own settings survive loading
        assert getattr(processor, name) == value

    image = Image.new("RGB", (64, 48), "green")
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    expected = processor._get_num_multimodal_tokens(image_sizes=[(48, 64)])["num_image_tokens"]
    count = int((batch["input_ids"] == processor.image_token_id).sum())
    # InternVL's count includes its <img> and </img> around the image tokens.
    assert count == expected[0] - (2 if arch == "internvl" else 0)


def test_checkpoint_dtype_is_kept_unless_model_dtype_says_otherwise(tmp_path, monkeypatch):
    tiny_lvlm("llava").to(torch.bfloat16).save_pretrained(tmp_path)
    for dtype, expected in [
        (None, torch.bfloat16),
        ("auto", torch.bfloat16),  # `model.dtype: auto`: not upcast on load
        ("float32", torch.float32),
    ]:
        model, _ = load_lvlm(tmp_path, dtype=dtype, with_processor=False)
        assert {p.dtype for p in model.parameters()} == {expected}, dtype
    assert ModelConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="fp32")

    # finetune's workers load the aligned model in the job's dtype (the checkpoint has no
    # processor here: load the model only).
    monkeypatch.setattr(
        loading, "load_lvlm", lambda path, dtype: load_lvlm(path, dtype, with_processor=False)
    )
    job = dict(aligned=str(tmp_path), data_dir=str(tmp_path), layers=[1], steps=1, seed=0)
    job.update(config=FinetuneConfig(), system_prompt="", data_seed=0)
    for dtype, expected in [("auto", torch.bfloat16), ("float32", torch.float32)]:
        model, _ = build_trainable(FinetuneJob(**job, dtype=dtype), torch.device("cpu"))
        assert {p.dtype for p in model.parameters() if not p.requires_grad} == {expected}
