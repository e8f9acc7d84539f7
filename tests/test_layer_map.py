"""Layer maps, tiny models and loading, on every supported architecture (tiny random models)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import vregion.models.layer_map as layer_map_module
from vregion.models.layer_map import (
    ARCHITECTURES,
    ArchSpec,
    UnsupportedArchitectureError,
    describe,
    layer_index,
    layer_map,
    llm_layer_names,
    module_prefix,
    vision_parameters,
)
from vregion.models.loading import CheckpointNotFoundError, empty_lvlm, load_lvlm, load_processor
from vregion.models.tiny import (
    IMAGE_TOKEN_ID,
    TINY_ARCHS,
    FamilyNotInstalledError,
    tiny_inputs,
    tiny_lvlm,
)

# Expected vision tower and projector paths and module classes, read off transformers 5.23.
EXPECTED = {
    "llava": (
        "model.vision_tower",
        "CLIPVisionModel",
        "model.multi_modal_projector",
        "LlavaMultiModalProjector",
    ),
    "llava_next": (
        "model.vision_tower",
        "CLIPVisionModel",
        "model.multi_modal_projector",
        "LlavaNextMultiModalProjector",
    ),
    "llava_onevision": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "LlavaOnevisionMultiModalProjector",
    ),
    "qwen2_vl": (
        "model.visual",
        "Qwen2VisionTransformerPretrainedModel",
        "model.visual.merger",
        "PatchMerger",
    ),
    "qwen2_5_vl": (
        "model.visual",
        "Qwen2_5_VisionTransformerPretrainedModel",
        "model.visual.merger",
        "Qwen2_5_VLPatchMerger",
    ),
    "qwen3_vl": (
        "model.visual",
        "Qwen3VLVisionModel",
        "model.visual.merger",
        "Qwen3VLVisionPatchMerger",
    ),
    "idefics3": (
        "model.vision_model",
        "Idefics3VisionTransformer",
        "model.connector",
        "Idefics3Connector",
    ),
    "smolvlm": (
        "model.vision_model",
        "SmolVLMVisionTransformer",
        "model.connector",
        "SmolVLMConnector",
    ),
    "paligemma": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "PaliGemmaMultiModalProjector",
    ),
    "gemma3": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "Gemma3MultiModalProjector",
    ),
    "mistral3": (
        "model.vision_tower",
        "PixtralVisionModel",
        "model.multi_modal_projector",
        "Mistral3MultiModalProjector",
    ),
    "internvl": (
        "model.vision_tower",
        "InternVLVisionModel",
        "model.multi_modal_projector",
        "InternVLMultiModalProjector",
    ),
    "llava_next_video": (
        "model.vision_tower",
        "CLIPVisionModel",
        "model.multi_modal_projector",
        "LlavaNextVideoMultiModalProjector",
    ),
    "vipllava": (
        "model.vision_tower",
        "CLIPVisionModel",
        "model.multi_modal_projector",
        "VipLlavaMultiModalProjector",
    ),
    "aya_vision": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "AyaVisionMultiModalProjector",
    ),
    "cohere2_vision": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "Cohere2VisionMultiModalProjector",
    ),
    "idefics2": (
        "model.vision_model",
        "Idefics2VisionTransformer",
        "model.connector",
        "Idefics2Connector",
    ),
    "glm4v": ("model.visual", "Glm4vVisionModel", "model.visual.merger", "Glm4vVisionPatchMerger"),
    "qwen3_vl_moe": (
        "model.visual",
        "Qwen3VLMoeVisionModel",
        "model.visual.merger",
        "Qwen3VLMoeVisionPatchMerger",
    ),
    "qwen3_5": (
        "model.visual",
        "Qwen3_5VisionModel",
        "model.visual.merger",
        "Qwen3_5VisionPatchMerger",
    ),
    "llava_siglip": (
        "model.vision_tower",
        "SiglipVisionModel",
        "model.multi_modal_projector",
        "LlavaMultiModalProjector",
    ),
}
LAYERS_PATH = {
    "idefics2": "model.text_model.layers",
    "idefics3": "model.text_model.layers",
    "smolvlm": "model.text_model.layers",
}
"""Where the LLM layers are when not at `model.language_model.layers`."""
MAPPED_ARCHS = [a for a in TINY_ARCHS if not getattr(ARCHITECTURES.get(a), "refused", None)]
"""Tiny models `layer_map` maps (refused families are tested in tests/test_families.py)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MAPPED_ARCHS)
def arch_model(request):
    try:
        return request.param, tiny_lvlm(request.param)
    except FamilyNotInstalledError as err:
        pytest.skip(str(err))


def test_paths_and_modules_per_architecture(arch_model):
    arch, model = arch_model
    vision_path, vision_cls, projector_path, projector_cls = EXPECTED[arch]
    lm = layer_map(model)
    assert lm.layers_path == LAYERS_PATH.get(arch, "model.language_model.layers")
    assert lm.vision_tower_path == vision_path
    assert lm.projector_path == projector_path
    assert lm.lm_head_path == "lm_head"
    assert lm.layers is model.get_submodule(lm.layers_path)
    assert type(lm.vision_tower).__name__ == vision_cls
    assert type(lm.projector).__name__ == projector_cls
    assert lm.lm_head is model.lm_head
    assert lm.num_layers == lm.text_config.num_hidden_layers == 4
    assert lm.image_token_id == IMAGE_TOKEN_ID
    assert lm.model_class == type(model).__name__
    assert lm.arch == model.config.model_type


def test_layer_prefixes_match_named_parameters(arch_model):
    _, model = arch_model
    lm = layer_map(model)
    names = [n for n, _ in model.named_parameters()]
    for i, layer in enumerate(lm.layers):
        prefix = llm_layer_names(lm, i)
        mine = {n for n in names if n.startswith(prefix)}
        assert mine == {prefix + n for n, _ in layer.named_parameters()}
        assert {layer_index(lm, n) for n in mine} == {i}
    assert layer_index(lm, "lm_head.weight") is None
    with pytest.raises(IndexError):
        llm_layer_names(lm, lm.num_layers)


def test_module_prefix(arch_model):
    _, model = arch_model
    lm = layer_map(model)
    assert module_prefix(model, lm.projector) == lm.projector_path + "."
    assert module_prefix(model, lm.layers[2]) == llm_layer_names(lm, 2)
    assert module_prefix(model, model) == ""
    with pytest.raises(ValueError, match="not a submodule"):
        module_prefix(model, torch.nn.Linear(2, 2))


def test_forward_and_backward(arch_model):
    _, model = arch_model
    inputs = tiny_inputs(model, batch=2, with_labels=True)
    model.zero_grad()
    out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(out.loss)
    out.loss.backward()
    lm = layer_map(model)
    for part in (lm.layers[0], lm.layers[-1], lm.projector, lm.vision_tower):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_vision_parameters_exclude_the_projector(arch_model):
    # Qwen-VL nests the projector in the tower; optimizer groups must not share parameters.
    _, model = arch_model
    lm = layer_map(model)
    vision = {id(p) for p in vision_parameters(lm)}
    projector = {id(p) for p in lm.projector.parameters()}
    assert vision and not vision & projector
    assert vision | projector >= {id(p) for p in lm.vision_tower.parameters()}


def test_describe_counts_every_parameter_once(arch_model):
    _, model = arch_model
    lm = layer_map(model)
    text = describe(lm)
    for path in (lm.vision_tower_path, lm.projector_path, llm_layer_names(lm, 3).rstrip(".")):
        assert path in text
    total = sum(p.numel() for p in model.parameters())
    total_line = next(line for line in text.splitlines() if line.startswith("total "))
    assert f"{total:,}" in total_line
    assert f"region LoRA targets in each layer: {', '.join(lm.lora_targets)}" in text
    assert ("never pruned: layers" in text) == bool(lm.fixed_layers)
    per_layer = sum(p.numel() for p in lm.layers[0].parameters())
    assert f"{per_layer:,}" in text.splitlines()[2]


def test_layer_count_follows_num_layers():
    lm = layer_map(tiny_lvlm("qwen2_vl", num_layers=2))
    assert lm.num_layers == lm.text_config.num_hidden_layers == 2


def test_tiny_models_are_seeded():
    a, b, c = tiny_lvlm("llava", seed=1), tiny_lvlm("llava", seed=1), tiny_lvlm("llava", seed=2)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_lvlm("gpt2")


def test_peft_wrapped_model_keeps_parameter_names():
    model = get_peft_model(
        tiny_lvlm("llava"),
        LoraConfig(r=4, target_modules=r".*language_model\.layers\.(1|3)\.self_attn\.(q|v)_proj"),
    )
    lm = layer_map(model)
    assert lm.layers_path == "base_model.model.model.language_model.layers"
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and {layer_index(lm, n) for n in lora} == {1, 3}
    assert all(n.startswith(llm_layer_names(lm, layer_index(lm, n))) for n in lora)


def test_unsupported_architecture_says_what_is_needed():
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    with pytest.raises(UnsupportedArchitectureError) as err:
        layer_map(LlamaForCausalLM(config))
    message = str(err.value)
    for needed in (
        "LlamaForCausalLM",
        "'llama'",
        "ModuleList",
        "vision tower",
        "projector",
        "LM head",
        "ARCHITECTURES",
        "ArchSpec(",
    ):
        assert needed in message


def test_registry_entry_with_wrong_path_fails_clearly(monkeypatch):
    bad = ArchSpec(
        layers="model.text_model.layers",
        vision_tower="model.vision_tower",
        projector="model.multi_modal_projector",
    )
    monkeypatch.setitem(layer_map_module.ARCHITECTURES, "llava", bad)
    with pytest.raises(UnsupportedArchitectureError, match="no module `model.text_model.layers`"):
        layer_map(tiny_lvlm("llava"))


# ---- loading -------------------------------------------------------------------------------------


def test_save_and_reload_gives_same_logits(tmp_path):
    model = tiny_lvlm("llava_siglip")
    model.save_pretrained(tmp_path)
    reloaded, processor = load_lvlm(tmp_path, with_processor=False)
    assert processor is None
    assert type(reloaded) is type(model) and not reloaded.training
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, reloaded(**inputs).logits)
    assert layer_map(reloaded).num_layers == 4


def test_qwen_reload_and_dtype(tmp_path):
    model = tiny_lvlm("qwen2_5_vl")
    model.save_pretrained(tmp_path)
    reloaded, _ = load_lvlm(str(tmp_path), dtype="bfloat16", with_processor=False)
    assert reloaded.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_lvlm(tmp_path, dtype="float7", with_processor=False)


def test_reload_with_processor(tmp_path, tiny_processor):
    tiny_lvlm("llava_siglip").save_pretrained(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no processor"):
        load_lvlm(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    _, processor = load_lvlm(tmp_path)
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(load_processor(tmp_path)) is type(processor)


def test_missing_directory_and_uncached_id_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        load_lvlm(tmp_path / "nope")
    with pytest.raises(CheckpointNotFoundError, match="no config.json"):
        load_lvlm(tmp_path)
    monkeypatch.setattr("vregion.models.loading.is_offline_mode", lambda: True)
    with pytest.raises(CheckpointNotFoundError) as err:
        load_lvlm("vregion-test/no-such-model")
    message = str(err.value)
    assert "'vregion-test/no-such-model'" in message
    assert "local checkpoint directory" in message and "HF_HUB_OFFLINE" in message


def test_empty_lvlm_has_the_architecture_without_weights(tmp_path):
    model = tiny_lvlm("llava_next")
    model.save_pretrained(tmp_path)
    empty = empty_lvlm(tmp_path)
    assert all(p.device.type == "meta" for p in empty.parameters())
    assert sum(p.numel() for p in empty.parameters()) == sum(p.numel() for p in model.parameters())
    assert layer_map(empty).layers_path == "model.language_model.layers"
