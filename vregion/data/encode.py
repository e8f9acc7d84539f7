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
    """The record's image as 8-bit RGB, opened only if it lies under `image_root`."""
    from vregion.data.images import open_rgb, resolve_image

    if sample.image is None:
        return None
    return open_rgb(resolve_image(image_root, sample.image))  # a local path or s3:// URL


def _ids(processor, text: str, image: Image.Image | None) -> list[int]:
    kwargs = {"images": [image]} if image is not None else {}
    return processor(text=[text], return_tensors="pt", **kwargs)["input_ids"][0].tolist()


def answer_char_spans(processor, sample: Sample, system_prompt: str | None) -> tuple[str, list]:
    """The rendered conversation and the character span of each answer (gpt turn) in it.

    An answer runs from the end of "the turns before it + the generation prompt" to the end of
    "the turns up to it" (its end-of-turn tokens included). Spans are None when a template
    does not render its prefixes as prefixes of the whole (then token counting is used).
    """
    text = render(processor, to_messages(sample, system_prompt))
    spans = []
    for i, turn in enumerate(sample.conversations):
        if turn["from"] != "gpt":
            continue
        head = render(processor, to_messages(sample, system_prompt, i), True)
        upto = render(processor, to_messages(sample, system_prompt, i + 1))
        if not (text.startswith(head) and text.startswith(upto)):
            return text, None
        spans.append((len(head), len(upto)))
    return text, spans


def encode_sample(
    processor,
    sample: Sample,
    image: Image.Image | None,
    system_prompt: str | None,
    *,
    return_tensors: bool = False,
) -> dict:
    """input_ids and labels (answer tokens only) of one record, image tokens expanded.

    One processor call (image and text together) gives the ids; the answers' token positions
    come from the rendered template's character spans through the tokenizer's offsets, shifted
    by the tokens the processor added for the image (the image sits in the first human turn,
    before every answer). With `return_tensors`, the processor's image tensors (pixel_values,
    image_sizes, ...) are returned too, and ids and labels as 1-D tensors.
    """
    text, spans = answer_char_spans(processor, sample, system_prompt)
    kwargs = {"images": [image]} if image is not None else {}
    out = processor(text=[text], return_tensors="pt", **kwargs)
    full_ids = out["input_ids"][0].tolist()
    labels = _labels_from_spans(processor, text, full_ids, spans) if spans is not None else None
    if labels is None:  # a template whose prefixes do not line up: count tokens per prefix
        labels = _labels_by_prefix_lengths(processor, sample, image, system_prompt, full_ids)
    if not return_tensors:
        return {"input_ids": full_ids, "labels": labels}
    encoded = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    encoded["input_ids"] = torch.tensor(full_ids, dtype=torch.long)
    encoded["labels"] = torch.tensor(labels, dtype=torch.long)
    return encoded


def _labels_from_spans(processor, text: str, full_ids: list[int], spans) -> list[int] | None:
    tok = processor.tokenizer(text, return_offsets_mapping=True)
    text_ids, offsets = tok["input_ids"], tok["offset_mapping"]
    shift = len(full_ids) - len(text_ids)  # tokens the processor added for the image
    if shift < 0:
        return None
    labels = [IGNORE_INDEX] * len(full_ids)
    for start, end in spans:
        for t, (a, _) in enumerate(offsets):
            if start <= a < end:
                if full_ids[t + shift] != text_ids[t]:  # not where we think: count instead
                    return None
                labels[t + shift] = text_ids[t]
    return labels


def _labels_by_prefix_lengths(processor, sample, image, system_prompt, full_ids) -> list[int]:
    labels = [IGNORE_INDEX] * len(full_ids)
    for i, turn in enumerate(sample.conversations):
        if turn["from"] != "gpt":
            continue
        start = len(
            _ids(processor, render(processor, to_messages(sample, system_prompt, i), True), image)
        )
        end = len(
            _ids(processor, render(processor, to_messages(sample, system_prompt, i + 1)), image)
        )
        end = min(end, len(full_ids))
        labels[start:end] = full_ids[start:end]
    return labels


def count_tokens(
    processor, sample: Sample, image: Image.Image | None, system_prompt: str | None
) -> int:
    """Sequence length of a record as the model sees it (image tokens included)."""
    return len(_ids(processor, render(processor, to_messages(sample, system_prompt)), image))


def text_tokens(processor, sample: Sample, system_prompt: str | None) -> int:
    """Tokens of the rendered conversation without the image expansion (tokenizer only)."""
    text = render(processor, to_messages(sample, system_prompt))
    return len(processor.tokenizer(text)["input_ids"])


class ImageTokenCounter:
    """Tokens an image adds to a sequence, by image size (one processor call per new size)."""

    def __init__(self, processor):
        self.processor = processor
        self._by_size: dict[tuple[int, int], int] = {}

    def __call__(self, size: tuple[int, int]) -> int:
        if size not in self._by_size:
            probe = Sample("probe", "probe", [{"from": "human", "value": IMAGE_PLACEHOLDER}])
            text = render(self.processor, to_messages(probe, None))
            with_image = len(_ids(self.processor, text, Image.new("RGB", size)))
            self._by_size[size] = with_image - len(self.processor.tokenizer(text)["input_ids"])
        return self._by_size[size]


def pad_batch(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of `encode_sample(..., return_tensors=True)` outputs.

    input_ids / labels / attention_mask are padded to the longest row; image tensors of the rows
    that have an image are concatenated (zero-padded where sizes differ, e.g. LLaVA-NeXT tiles).
    """
    width = max(len(e["input_ids"]) for e in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e["input_ids"])
        input_ids[row, :n] = e["input_ids"]
        labels[row, :n] = e["labels"]
        attention[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    for key in sorted({k for e in items for k in e} - set(batch)):
        parts = [e[key] for e in items if key in e]
        if all(torch.is_tensor(p) for p in parts):
            batch[key] = _cat_padded(parts)
    return batch


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pad = []
        for d in reversed(range(1, p.dim())):
            pad += [0, shape[d - 1] - p.shape[d]]
        padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(padded)


def pad_id_of(processor) -> int:
    pad_id = processor.tokenizer.pad_token_id
    return processor.tokenizer.eos_token_id if pad_id is None else pad_id


def collate(
    processor,
    samples: Sequence[Sample],
    images: Sequence[Image.Image | None],
    system_prompt: str | None,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids, attention_mask, labels, pixel_values (if any)."""
    encoded = [
        encode_sample(processor, s, im, system_prompt, return_tensors=True)
        for s, im in zip(samples, images, strict=True)
    ]
    return pad_batch(encoded, pad_id_of(processor))


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
