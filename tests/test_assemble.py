"""A LLaVA assembled from parts (LLM directory, CLIP/SigLIP tower, LLaVA's `mm_projector.bin`):
the embedded model taken apart and reassembled computes the same logits; a CLIP tower with
LLaVA-1.5's options runs; a wrong projector file is refused by name, key and shape. The configs
for real settings (configs/) validate, and their tiny twins run the base stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaForCausalLM,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

from vregion.config import ModelConfig, Params, load_params
from vregion.data.encode import IGNORE_INDEX, encode_sample
from vregion.data.records import Sample
from vregion.models.assemble import (
    PROJECTOR_KEYS,
    ProjectorWeightsError,
    assemble_llava,
    image_processor_for,
    read_projector_weights,
)
from vregion.models.embedded import load_smollm2_tokenizer, tiny_llm
from vregion.models.layer_map import layer_map
from vregion.models.tiny import tiny_inputs, tiny_lvlm
from vregion.region.select import select_layers

MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def save_projector(projector: torch.nn.Module, path, rename=None) -> None:
    """Write a LLaVA projector's weights in LLaVA's layout (.bin or .safetensors)."""
    state = projector.state_dict()
    out = {key: state[name].clone() for key, name in PROJECTOR_KEYS.items()}
    for old, new in (rename or {}).items():
        out[new] = out.pop(old)
    if str(path).endswith(".safetensors"):
        save_file(out, str(path))
    else:
        torch.save(out, path)


@pytest.fixture(scope="module")
def embedded_parts(tiny_embedded_dir, tmp_path_factory):
    """The embedded-tiny model and its parts saved as a user would have them."""
    base, _ = tiny_embedded_dir
    model = AutoModelForImageTextToText.from_pretrained(base).eval()
    processor = AutoProcessor.from_pretrained(base)
    root = tmp_path_factory.mktemp("parts")
    llm = LlamaForCausalLM(model.config.text_config)
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    llm.save_pretrained(root / "llm")
    processor.tokenizer.save_pretrained(root / "llm")
    model.model.vision_tower.save_pretrained(root / "tower")
    save_projector(model.model.multi_modal_projector, root / "mm_projector.bin")
    return model, processor, root


def test_assembled_from_saved_parts_computes_the_embedded_models_logits(embedded_parts):
    original, processor, root = embedded_parts
    model, assembled = assemble_llava(
        root / "llm",
        root / "tower",
        root / "mm_projector.bin",
        vision_feature_layer=original.config.vision_feature_layer,
        vision_feature_select_strategy="full",
    )
    image = Image.new("RGB", (64, 64), "red")
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert assembled.apply_chat_template(MESSAGES, add_generation_prompt=True) == text
    want = processor(text=[text], images=[image], return_tensors="pt")
    got = assembled(text=[text], images=[image], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert model.config.image_token_id == original.config.image_token_id
    with torch.no_grad():
        expected = original(**want).logits
        logits = model(**got).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    # The same projector as safetensors reads the same weights.
    save_projector(original.model.multi_modal_projector, root / "mm_projector.safetensors")
    read = read_projector_weights(root / "mm_projector.safetensors", 192, 64)
    for name, tensor in original.model.multi_modal_projector.state_dict().items():
        assert torch.equal(read[name], tensor)


@pytest.mark.parametrize(
    "change, says",
    [
        (
            {"shape": True},
            r"'model.mm_projector.2.weight' has shape \(64, 32\), expected \(64, 64\)",
        ),
        ({"rename": {"model.mm_projector.2.bias": "model.mm_projector.4.bias"}}, "unexpected"),
        (
            {"drop": "model.mm_projector.0.bias"},
            r"missing key 'model.mm_projector.0.bias' \(expected shape \(64,\)\)",
        ),
    ],
)
def test_wrong_projector_file_is_refused_with_file_key_and_shape(
    llm_and_clip, tmp_path, monkeypatch, change, says
):
    state = torch.load(llm_and_clip / "mm_projector.bin", weights_only=True)
    if change.get("shape"):
        state["model.mm_projector.2.weight"] = torch.zeros(64, 32)
    for old, new in change.get("rename", {}).items():
        state[new] = state.pop(old)
    state.pop(change.get("drop", ""), None)
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)

    def never(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the projector file was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ProjectorWeightsError, match=says) as err:
        assemble_llava(llm_and_clip / "llm", llm_and_clip / "clip", path)
    assert str(path) in str(err.value)


@pytest.fixture(scope="module")
def llm_and_clip(tmp_path_factory):
    """A tiny 32-layer untied Llama with SmolLM2's tokenizer (no image token yet), a tiny full
    CLIP model and a stage-1 projector file for them."""
    root = tmp_path_factory.mktemp("clip-parts")
    tokenizer = load_smollm2_tokenizer()
    llm = tiny_llm(tokenizer, layers=32)
    llm.config.tie_word_embeddings = False  # untied, as Vicuna's
    llm.lm_head.weight = torch.nn.Parameter(llm.lm_head.weight.detach().clone())
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    clip = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(clip).save_pretrained(root / "clip")  # a full CLIP, as openai/clip-vit-* is
    projector = torch.nn.Module()
    projector.linear_1 = torch.nn.Linear(32, 64)
    projector.linear_2 = torch.nn.Linear(64, 64)
    path = root / "mm_projector.bin"
    torch.save({k: projector.state_dict()[n] for k, n in PROJECTOR_KEYS.items()}, path)
    return root


def test_clip_tower_with_llava15_options_runs(llm_and_clip):
    root = llm_and_clip
    model, processor = assemble_llava(
        root / "llm",
        root / "clip",
        root / "mm_projector.bin",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_to_square=True,
        chat_template="vicuna_v1",
    )
    tok = processor.tokenizer
    assert "<image>" in tok.get_vocab() and model.config.text_config.vocab_size == len(tok)
    image_id = model.config.image_token_id
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert not model.get_input_embeddings().weight[image_id].any()
    assert not model.get_output_embeddings().weight[image_id].any()
    assert layer_map(model).num_layers == 32
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == "Answer briefly. USER: <image>\nWhat colour? ASSISTANT:"
    wide = Image.new("RGB", (64, 32), "blue")  # padded to 64x64, then resized to 32x32
    batch = processor(text=[text], images=[wide], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 16  # CLS dropped
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
        features = model.model.get_image_features(batch["pixel_values"]).pooler_output[0]
    assert torch.isfinite(logits).all()
    want = model.model.multi_modal_projector(hidden.hidden_states[-2][:, 1:])[0]
    torch.testing.assert_close(features, want)

    # LLaVA-1.5's conversation format trains on the answers and their end token only.
    turns = [("<image>\nWhat colour?", "Blue."), ("And the shape?", "A square.")]
    conversations = [
        {"from": who, "value": value} for q, a in turns for who, value in (("human", q), ("gpt", a))
    ]
    sample = Sample(id="x", image="x.png", conversations=conversations)
    encoded = encode_sample(processor, sample, wide, "Answer briefly.")
    answers = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    eos = tok.eos_token
    assert tok.decode(answers).split() == [f"Blue.{eos}", "A", f"square.{eos}"]


def test_siglip_with_cls_dropping_strategy_is_refused(embedded_parts):
    _, _, root = embedded_parts
    with pytest.raises(ValueError, match="SigLIP has no CLS token"):
        assemble_llava(root / "llm", root / "tower", vision_feature_select_strategy="default")


# --- configs/: each real setting's config validates, and its tiny twin (the same code path on
# tiny random parts) runs the base stage to a checkpoint plain transformers loads.

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def config_twin(name: str, tmp_path: Path, swap) -> Params:
    """configs/<name> validated, then written to tmp_path/params.yaml with `swap` applied."""
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(raw))
    load_params(tmp_path / "real.yaml")
    swap(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def test_llava15_config_twin_builds_its_base(llm_and_clip, tmp_path, monkeypatch, prefect_harness):
    from stages._common import stage_defaults
    from stages.base import base

    def swap(raw):
        assert raw["model"]["assemble"]["llm"] == "lmsys/vicuna-7b-v1.5"
        raw["model"]["assemble"].update(
            llm=str(llm_and_clip / "llm"),
            vision_tower=str(llm_and_clip / "clip"),
            projector=str(llm_and_clip / "mm_projector.bin"),
        )

    p = config_twin("llava15_7b_665k.yaml", tmp_path, swap)
    monkeypatch.chdir(tmp_path)
    metrics = base(params="params.yaml", **stage_defaults(base))
    assert metrics["projector"].endswith("mm_projector.bin") and metrics["llm_layers"] == 32

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "models/base").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "models/base")
    lm = layer_map(model)
    assert type(model).__name__ == lm.model_class == "LlavaForConditionalGeneration"
    assert lm.num_layers == 32 and lm.layers_path == "model.language_model.layers"
    assert lm.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    region = select_layers(
        lm.num_layers, p.region.strategy, p.region.amount, layers=p.region.layers
    )
    assert region == [1, 5, 9, 13, 19, 23, 27, 31]
    assert model.config.vision_feature_layer == -2
    assert processor.image_processor.do_pad and processor.num_additional_image_tokens == 1
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text.startswith("Answer briefly. USER: <image>\n")
    batch = processor(text=[text], images=[Image.new("RGB", (40, 30))], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_qwen25vl_config_twin_builds_its_base(llm_and_clip, tmp_path, monkeypatch, prefect_harness):
    from stages._common import stage_defaults
    from stages.base import base

    source = tmp_path / "qwen"
    original = tiny_lvlm("qwen2_5_vl", num_layers=28).eval()
    original.save_pretrained(source)
    # Its processor's files, as a checkpoint has them. Built by hand: Qwen2.5-VL's processor
    # needs torchvision for its video half.
    tokenizer = AutoTokenizer.from_pretrained(llm_and_clip / "llm")
    qwen_tokens = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": qwen_tokens})
    tokenizer.save_pretrained(source)
    Qwen2VLImageProcessorPil(patch_size=4, merge_size=2).save_pretrained(source)
    (source / "processor_config.json").write_text('{"processor_class": "Qwen2_5_VLProcessor"}')

    def swap(raw):
        assert raw["model"]["base"] == "Qwen/Qwen2.5-VL-7B-Instruct"
        raw["model"]["base"] = str(source)

    p = config_twin("qwen25vl_7b_665k.yaml", tmp_path, swap)
    monkeypatch.chdir(tmp_path)
    metrics = base(params="params.yaml", **stage_defaults(base))
    out = tmp_path / "models/base"

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    lm = layer_map(model)
    assert type(model).__name__ == lm.model_class == "Qwen2_5_VLForConditionalGeneration"
    assert lm.num_layers == 28
    region = select_layers(
        lm.num_layers, p.region.strategy, p.region.amount, layers=p.region.layers
    )
    assert region == [2, 6, 10, 14, 18, 22, 26]
    batch = tiny_inputs(original)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits)
    # Without torchvision the processor is built image-only and saved; either way the base's
    # processor reads an image and a prompt exactly as the checkpoint's own does.
    from PIL import Image

    from vregion.models.loading import load_processor

    text = ["<|vision_start|><|image_pad|><|vision_end|>What is it?"]
    image = [Image.new("RGB", (16, 16), (200, 30, 30))]
    ours, theirs = (
        load_processor(d)(text=text, images=image, return_tensors="pt") for d in (out, source)
    )
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert "processor_files_copied" not in metrics


def test_assemble_section_and_base_go_together():
    parts = {"llm": "a", "vision_tower": "b"}
    assert ModelConfig(base="assemble", assemble=parts).assemble.vision_feature_layer == -2
    for bad in ({"base": "assemble"}, {"base": "embedded", "assemble": parts}):
        with pytest.raises(ValueError, match="model.base: assemble needs a model.assemble"):
            ModelConfig(**bad)


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_pad_to_square_pads_with_the_mean_colour(tower):
    config = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(image_size=32)
    processor = image_processor_for(config, pad_to_square=True)
    wide = Image.new("RGB", (64, 32), "white")  # padded to 64x64: a mean-colour band above
    pixels = processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :6].abs().max() < 0.02  # the mean colour normalises to ~0
    assert pixels[:, 12:20].min() > 0.9  # white
    plain = image_processor_for(config, pad_to_square=False)
    assert plain(images=[wide], return_tensors="pt")["pixel_values"][0, :, :6].min() > 0.9


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_dvc_repro_assembled_from_parts_with_align_skipped_keeps_the_base(embedded_parts, tmp_path):
    """The paper's start under real DVC: `model.base: assemble` from the saved parts and
    `align.skip`: the aligned model is the base, file for file, and nothing was trained."""
    from pipeline_repo import DVC, make_pipeline_repo, merge, pipeline_env, run
    from safetensors.torch import load_file

    original, _, root = embedded_parts
    (tmp_path / "repo").mkdir()
    repo = make_pipeline_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assemble = {
        "llm": str(root / "llm"),
        "vision_tower": str(root / "tower"),
        "projector": str(root / "mm_projector.bin"),
        "vision_feature_layer": original.config.vision_feature_layer,
        "vision_feature_select_strategy": "full",
    }
    params = merge(
        params, {"model": {"base": "assemble", "assemble": assemble}, "align": {"skip": True}}
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([*DVC, "repro", "align"], repo, pipeline_env(repo), timeout=900)
    assert "Running stage 'base'" in out and "Running stage 'align'" in out
    base, aligned = repo / "models/base", repo / "models/aligned"
    weights = sorted(p.name for p in base.glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in aligned.glob("*.safetensors"))
    for name in weights:
        a, b = load_file(base / name), load_file(aligned / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # one object in DVC's cache serves both outputs: no second copy of the weights there
        size = (base / name).stat().st_size
        cached = [
            f for f in (repo / ".dvc/cache").rglob("*") if f.is_file() and f.stat().st_size == size
        ]
        assert len(cached) == 1, cached
    import json

    assert json.loads((repo / "metrics/align.json").read_text())["skipped"] is True
    model = AutoModelForImageTextToText.from_pretrained(aligned)
    projector = original.model.multi_modal_projector.state_dict()
    for name, tensor in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(tensor, projector[name])  # the stage-1 projector, as published
