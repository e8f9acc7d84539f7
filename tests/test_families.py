"""Every LVLM family vregion supports, end to end on a tiny random checkpoint of it: the layer
map (`vregion layers`), every probe scorer, one region-LoRA step that changes only the region's
layers and the projector, pruning one layer outside the region, save, and a reload with plain
`AutoModelForImageTextToText` that computes what the tuned model computes with that layer
skipped. Refused families are refused by `layer_map`, and so at `base`, with the reason."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vregion.models.layer_map as layer_map_module
from vregion.cli import main
from vregion.models.base import copy_pretrained
from vregion.models.layer_map import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    families_table,
    layer_map,
)
from vregion.models.tiny import FamilyNotInstalledError, tiny_inputs, tiny_lvlm
from vregion.prune import layers_to_prune, prune_llm_layers
from vregion.region.scores import SCORERS, score_layers, skipped_layer
from vregion.train.selective import make_region_trainable, trainable_groups

SUPPORTED = [t for t, spec in ARCHITECTURES.items() if spec.refused is None]
REFUSED = [t for t, spec in ARCHITECTURES.items() if spec.refused is not None]
REGION = [1]  # 1 of 4 layers: the paper's ~25%
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def build(model_type: str, **kwargs) -> torch.nn.Module:
    try:
        return tiny_lvlm(model_type, **kwargs)
    except FamilyNotInstalledError as err:
        pytest.skip(str(err))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_family_in_the_table_has_a_tiny_model():
    assert {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3"} <= set(
        SUPPORTED
    )
    assert {"smolvlm", "paligemma", "gemma3", "mistral3", "internvl"} <= set(SUPPORTED)
    assert REFUSED == ["mllama"]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_family_end_to_end(model_type, tmp_path, capsys):
    original = build(model_type, num_layers=4)
    lm = layer_map(original)
    assert type(original).__name__ == lm.model_class and lm.num_layers == 4
    assert lm.layers is original.get_decoder().layers
    assert lm.lora_targets and lm.image_token_id is not None

    # `vregion layers` on the saved checkpoint (built from its config.json on the meta device).
    original.save_pretrained(tmp_path / "base")
    assert main(["layers", str(tmp_path / "base")]) == 0
    out = capsys.readouterr().out
    assert f"{lm.model_class} ({lm.family}, model_type {model_type}): 4 LLM layers" in out
    for path in (lm.layers_path + ".3", lm.vision_tower_path, lm.projector_path):
        assert path in out

    # Every probe scorer, on the image tokens the family's inputs really carry.
    batch = tiny_inputs(original, with_labels=True)
    assert (batch["input_ids"] == lm.image_token_id).any()
    scorers = [s for s in SCORERS if s != "parameter_change"]
    if not all(hasattr(layer, "self_attn") for layer in lm.layers):  # hybrid LLM (Qwen3.5)
        with pytest.raises(ValueError, match="attention_to_image needs softmax self-attention"):
            score_layers(original, [batch], ["attention_to_image"])
        scorers.remove("attention_to_image")
    scores = score_layers(original, [batch], scorers)
    for name in (*scorers, "block_influence_image", "block_influence_text"):
        assert len(scores[name]) == 4 and all(math.isfinite(v) for v in scores[name]), name
    assert all(v > 0 for v in scores["angular_distance"])
    # Text after the image attends to it in every layer.
    assert all(v > 0 for v in scores.get("attention_to_image", [1]))

    # One region-LoRA step: only the region's layers and the projector change.
    before = snapshot(original)
    peft_model = make_region_trainable(
        copy.deepcopy(original), REGION, lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    lora_modules = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if "lora_" in n}
    present = {n for i in REGION for n, _ in lm.layers[i].named_modules()}
    assert len(lora_modules) == len(REGION) * len(present.intersection(lm.lora_targets)) > 0
    optimizer = torch.optim.AdamW(trainable_groups(peft_model, projector_lr=1e-2, llm_lr=1e-2))
    peft_model.train()
    peft_model(**batch).loss.backward()
    optimizer.step()
    tuned = peft_model.merge_and_unload().eval()
    after = snapshot(tuned)
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    layers = {
        int(k[len(lm.layers_path) + 1 :].split(".")[0])
        for k in changed
        if k.startswith(lm.layers_path + ".")
    }
    assert layers == set(REGION)
    outside = {k for k in changed if not k.startswith(lm.layers_path + ".")}
    assert outside and all(k.startswith(lm.projector_path + ".") for k in outside), outside
    change = score_layers(tuned, [], ["parameter_change"], reference_model=original)
    assert [i for i, v in enumerate(change["parameter_change"]) if v > 0] == REGION

    # Full-weight region tuning: the region's layers and the projector, nothing else.
    full = make_region_trainable(copy.deepcopy(original), REGION, mode="full")
    optimizer = torch.optim.AdamW(trainable_groups(full, projector_lr=1e-2, llm_lr=1e-2))
    full.train()
    full(**batch).loss.backward()
    optimizer.step()
    changed = {k for k, v in full.state_dict().items() if not torch.equal(before[k], v)}
    region_prefixes = tuple(f"{lm.layers_path}.{i}." for i in REGION)
    assert any(k.startswith(lm.projector_path + ".") for k in changed)
    assert {k for k in changed if not k.startswith(lm.projector_path + ".")} == {
        k for k in before if k.startswith(region_prefixes)
    }
    del full

    # Prune the least important layer outside the region (and outside the fixed layers).
    angular = score_layers(tuned, [batch], ["angular_distance"])["angular_distance"]
    remove = layers_to_prune(angular, [*REGION, *lm.fixed_layers], k=1)
    with torch.no_grad():
        with skipped_layer(layer_map(tuned).layers[remove[0]]):
            expected = tuned(**batch, use_cache=False).logits
        full = tuned(**batch, use_cache=False).logits
    pruned = prune_llm_layers(tuned, remove)
    pruned.save_pretrained(tmp_path)

    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(loaded) is type(original)
    assert layer_map(loaded).num_layers == loaded.config.get_text_config().num_hidden_layers == 3
    with torch.no_grad():
        got = loaded.eval()(**batch, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - full).abs().max() > 1e-4  # the removed layer did matter


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_family_says_why_before_any_work(model_type, tmp_path):
    model = build(model_type, num_layers=4)
    reason = ARCHITECTURES[model_type].refused
    with pytest.raises(UnsupportedArchitectureError, match="does not support") as err:
        layer_map(model)
    assert reason in str(err.value)
    with pytest.raises(UnsupportedArchitectureError):
        make_region_trainable(model, REGION)
    # The base stage refuses it from the config alone, before reading weights or writing.
    model.save_pretrained(tmp_path / "in")
    with pytest.raises(UnsupportedArchitectureError, match="cross-attention"):
        copy_pretrained(str(tmp_path / "in"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qwen3_vl_keeps_its_deepstack_layers():
    model = build("qwen3_vl", num_layers=4)
    lm = layer_map(model)
    assert lm.fixed_layers == (0,)  # one deepstack injection, after layer 0
    with pytest.raises(ValueError, match=r"layers \[0\] cannot be pruned: deepstack"):
        prune_llm_layers(model, [0, 2])
    assert layer_map(model).num_layers == 4


def test_an_unlisted_family_is_found_by_discovery(monkeypatch):
    model = build("idefics3", num_layers=2)
    # A copy without the entry: deleting and restoring it would move it to the end of the table.
    unlisted = {k: v for k, v in layer_map_module.ARCHITECTURES.items() if k != "idefics3"}
    monkeypatch.setattr(layer_map_module, "ARCHITECTURES", unlisted)
    with pytest.warns(UserWarning, match="not in vregion's tested families"):
        lm = layer_map(model)
    assert (lm.layers_path, lm.vision_tower_path, lm.projector_path, lm.lm_head_path) == (
        "model.text_model.layers",
        "model.vision_model",
        "model.connector",
        "lm_head",
    )


def test_table_entry_overrides_discovery(monkeypatch):
    model = build("llava", num_layers=2)
    spec = layer_map_module.ArchSpec(
        "LLaVA", projector="model.multi_modal_projector.linear_1", lora_targets=("mlp.up_proj",)
    )
    monkeypatch.setitem(layer_map_module.ARCHITECTURES, "llava", spec)
    lm = layer_map(model)
    assert lm.projector_path == "model.multi_modal_projector.linear_1"
    assert lm.lora_targets == ("mlp.up_proj",)


def test_families_table_lists_every_family(capsys):
    table = families_table()
    rows = table.splitlines()
    assert rows[0].startswith("| Family |") and len(rows) == 2 + len(ARCHITECTURES)
    for model_type, spec in ARCHITECTURES.items():
        row = next(r for r in rows if f"| `{model_type}` |" in r)
        assert spec.family in row
        assert ("| refused |" in row) == (spec.refused is not None)
    assert "`model.text_model.layers`" in next(r for r in rows if "`smolvlm`" in r)
    assert main(["layers", "--families"]) == 0
    assert capsys.readouterr().out.strip() == table
    assert main(["layers"]) == 1
    # The README's table is this table: regenerate it with `vregion layers --families`.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme


def test_a_family_missing_from_transformers_is_named(monkeypatch):
    from vregion.models import tiny

    with pytest.raises(FamilyNotInstalledError, match="no 'no_such_vlm' models"):
        tiny._from_config("no_such_vlm")
    # The families table says so instead of failing.
    monkeypatch.setitem(tiny._BUILDERS, "paligemma", lambda n: tiny._from_config("no_such_vlm"))
    row = next(r for r in families_table().splitlines() if "| `paligemma` |" in r)
    assert "| not in transformers " in row
