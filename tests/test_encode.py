"""Chat encoding: labels cover the answers only, with the real embedded-model processor."""

import torch
from PIL import Image

from vregion.data.encode import IGNORE_INDEX, collate, encode_sample, prompt_batch
from vregion.data.records import Sample


def _sample(turns):
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q})
        conv.append({"from": "gpt", "value": a})
    return Sample(id="s", image="x.png", conversations=conv)


def test_labels_are_exactly_the_answers(tiny_processor):
    tok = tiny_processor.tokenizer
    img = Image.new("RGB", (64, 64))
    s = _sample([("What color is the circle?", "red"), ("And the square?", "blue")])
    e = encode_sample(tiny_processor, s, img, "Answer briefly.")
    answer = [t for t, lab in zip(e["input_ids"], e["labels"], strict=False) if lab != IGNORE_INDEX]
    assert tok.decode(answer) == "red<|im_end|>\nblue<|im_end|>\n"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert e["input_ids"].count(image_id) == 16  # (64 / 16)^2 patches, expanded by the processor
    assert all(
        lab == IGNORE_INDEX
        for t, lab in zip(e["input_ids"], e["labels"], strict=False)
        if t == image_id
    )


def test_collate_pads_right_and_masks_padding(tiny_processor):
    img = Image.new("RGB", (64, 64))
    short = _sample([("Count?", "two")])
    long = _sample([("What shape is the large object on the left?", "triangle")])
    b = collate(tiny_processor, [short, long], [img, img], "Answer briefly.")
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["pixel_values"].shape == (2, 3, 64, 64)
    pad = b["attention_mask"] == 0
    assert pad[0].any() and not pad[1].any()
    assert (b["labels"][pad] == IGNORE_INDEX).all()
    # right padding: once padding starts it does not stop
    first_pad = int(pad[0].float().argmax())
    assert pad[0, first_pad:].all()


def test_prompt_batch_ends_with_generation_prompt(tiny_processor):
    img = Image.new("RGB", (64, 64))
    s = _sample([("What color?", "red")])
    b = prompt_batch(
        tiny_processor, [s, _sample([("A much longer question here?", "no")])], [img, img], "Hi"
    )
    text = tiny_processor.tokenizer.decode(b["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n")
    assert "red" not in text
    assert b["attention_mask"][0, 0] == 0  # left padded for generation
    assert torch.equal(b["attention_mask"][1], torch.ones_like(b["attention_mask"][1]))
