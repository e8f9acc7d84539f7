"""Turn records into model inputs with the model's own processor and chat template.

Labels cover only the assistant's answer tokens (and its end-of-turn token), so the loss
measures answers, not the prompt or the image placeholders. The same code serves any processor
whose `apply_chat_template` understands `{"type": "image"}` items (LLaVA, LLaVA-NeXT, Qwen2-VL,
the embedded model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vregion.data.records import IMAGE_PLACEHOLDER, Sample

IGNORE_INDEX = -100


def to_messages(sample: Sample, system_prompt: str | None, upto: int | None = None) -> list[dict]:
    """Chat messages for the first `upto` turns of a record (all when None).

    The `<image>` placeholder in a human turn becomes an image item at the same place.
    """
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for turn in sample.conversations[:upto]:
        role = "user" if turn["from"] == "human" else "assistant"
        content: list[dict] = []
        for i, piece in enumerate(turn["value"].split(IMAGE_PLACEHOLDER)):
            if i > 0:
                content.append({"type": "image"})
            piece = piece.strip()  # templates put their own separators around images
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def load_image(image_root: str | Path, sample: Sample) -> Image.Image | None:
    if sample.image is None:
        return None
    with Image.open(Path(image_root) / sample.image) as im:
        return im.convert("RGB")


def _ids(processor, text: str, image: Image.Image | None) -> list[int]:
    kwargs = {"images": [image]} if image is not None else {}
    return processor(text=[text], return_tensors="pt", **kwargs)["input_ids"][0].tolist()


def encode_sample(
    processor, sample: Sample, image: Image.Image | None, system_prompt: str | None
) -> dict[str, list[int]]:
    """input_ids and labels (answer tokens only) of one record, image tokens expanded."""
    full_ids = _ids(processor, render(processor, to_messages(sample, system_prompt)), image)
    labels = [IGNORE_INDEX] * len(full_ids)
    for i, turn in enumerate(sample.conversations):
        if turn["from"] != "gpt":
            continue
        # Answer span = tokens between "prompt up to this turn + generation prompt" and "up to its end".
        start = len(
            _ids(processor, render(processor, to_messages(sample, system_prompt, i), True), image)
        )
        end = len(
            _ids(processor, render(processor, to_messages(sample, system_prompt, i + 1)), image)
        )
        end = min(end, len(full_ids))
        labels[start:end] = full_ids[start:end]
    return {"input_ids": full_ids, "labels": labels}


def count_tokens(
    processor, sample: Sample, image: Image.Image | None, system_prompt: str | None
) -> int:
    """Sequence length of a record as the model sees it (image tokens included)."""
    return len(_ids(processor, render(processor, to_messages(sample, system_prompt)), image))


def collate(
    processor,
    samples: Sequence[Sample],
    images: Sequence[Image.Image | None],
    system_prompt: str | None,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids, attention_mask, labels, pixel_values (if any)."""
    encoded = [encode_sample(processor, s, im, system_prompt) for s, im in zip(samples, images, strict=True)]
    width = max(len(e["input_ids"]) for e in encoded)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    present = [im for im in images if im is not None]
    if present:
        pixels = processor.image_processor(images=present, return_tensors="pt")
        batch.update({k: v for k, v in pixels.items()})
    return batch


def prompt_batch(
    processor,
    samples: Sequence[Sample],
    images: Sequence[Image.Image | None],
    system_prompt: str | None,
) -> dict[str, torch.Tensor]:
    """Left-padded generation prompts (every turn but the last answer) for greedy decoding."""
    texts = [
        render(processor, to_messages(s, system_prompt, len(s.conversations) - 1), True)
        for s in samples
    ]
    present = [im for im in images if im is not None]
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        kwargs = {"images": present} if present else {}
        return processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side
