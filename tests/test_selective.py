"""Selective tuning: only the projector and the region's layers change; frozen weights stay bit-identical."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from vregion.models.layer_map import ARCHITECTURES, layer_map, parameter_counts
from vregion.models.tiny import FamilyNotInstalledError, tiny_inputs, tiny_lvlm
from vregion.train.selective import (
    make_region_trainable,
    region_target_regex,
    trainable_groups,
)


def _train(model, inputs, steps=3, lr=1e-2):
    groups = trainable_groups(model, projector_lr=lr, llm_lr=lr)
    opt = torch.optim.AdamW(groups)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**inputs).loss.backward()
        opt.step()
    model.eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_layers(before, after, layers_path):
    changed = set()
    for k in before:
        if not torch.equal(before[k], after[k]):
            changed.add(k)
    per_layer = {
        int(k[len(layers_path) + 1 :].split(".")[0])
        for k in changed
        if k.startswith(layers_path + ".")
    }
    return changed, per_layer


@pytest.mark.parametrize("arch", ["llava", "llava_siglip", "qwen2_vl"])
def test_lora_region_changes_only_region_layers_and_projector(arch):
    torch.manual_seed(0)
    model = tiny_lvlm(arch, num_layers=4)
    lmap = layer_map(model)
    before = _snapshot(model)
    peft_model = make_region_trainable(
        model, [1, 3], mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0
    )
    # LoRA only on layers 1 and 3 of the LLM; nothing in the vision tower.
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora_names and all(
        f"{lmap.layers_path}.1." in n or f"{lmap.layers_path}.3." in n for n in lora_names
    )
    assert len({n.split(".lora_")[0] for n in lora_names}) == 2 * 7  # 7 linear modules x 2 layers
    _train(peft_model, tiny_inputs(model, with_labels=True))
    merged = peft_model.merge_and_unload()
    after = _snapshot(merged)
    assert after.keys() == before.keys()
    changed, per_layer = _changed_layers(before, after, lmap.layers_path)
    assert per_layer == {1, 3}
    non_layer = {k for k in changed if not k.startswith(lmap.layers_path + ".")}
    assert non_layer and all(k.startswith(lmap.projector_path) for k in non_layer)


def test_full_mode_trains_whole_region_layers_only():
    model = tiny_lvlm("llava", num_layers=4)
    lmap = layer_map(model)
    before = _snapshot(model)
    model = make_region_trainable(model, [0, 2], mode="full")
    counts = parameter_counts(model)
    assert 0 < counts["trainable_percent"] < 100
    _train(model, tiny_inputs(model, with_labels=True))
    changed, per_layer = _changed_layers(before, _snapshot(model), lmap.layers_path)
    assert per_layer == {0, 2}
    # every parameter of a selected layer moved (full weights, not an adapter)
    for i in (0, 2):
        for name, _ in lmap.layers[i].named_parameters():
            assert f"{lmap.layers_path}.{i}.{name}" in changed
    assert all(k.startswith((lmap.layers_path, lmap.projector_path)) for k in changed)


def test_region_regex_never_matches_vision_layers():
    import re

    model = tiny_lvlm("llava", num_layers=4)
    lmap = layer_map(model)
    pattern = re.compile(region_target_regex(lmap.layers_path, [0, 1, 2, 3]))
    matched = [n for n, _ in model.named_modules() if pattern.fullmatch(n)]
    assert len(matched) == 4 * 7
    assert not any("vision" in n for n in matched)


def test_out_of_range_layer_is_refused_with_the_layer_count():
    with pytest.raises(ValueError, match="4 layers"):
        make_region_trainable(tiny_lvlm("llava", num_layers=4), [5])


@pytest.mark.parametrize("train_vision", [False, True], ids=["tower-frozen", "tower-trained"])
@pytest.mark.parametrize(
    "model_type", [t for t, spec in ARCHITECTURES.items() if spec.refused is None]
)
def test_lora_adapter_trains_the_projector_and_reloads_as_merged(
    model_type, train_vision, tmp_path
):
    """Qwen-VL nests its projector in the tower: with the tower trained too, the projector must
    still train, and the adapter must reload with plain PEFT to the merged checkpoint."""
    from peft import PeftModel

    torch.set_num_threads(1)  # tiny ops on a busy CPU
    try:
        original = tiny_lvlm(model_type, num_layers=2)
    except FamilyNotInstalledError as err:
        pytest.skip(str(err))
    lm = layer_map(original)
    before = _snapshot(original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_region_trainable(
            copy.deepcopy(original),
            [1],
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            train_vision=train_vision,
        )
    groups = {g["name"]: {id(p) for p in g["params"]} for g in trainable_groups(model, 1e-2, 1e-2)}
    projector = {id(p) for p in layer_map(model).projector.parameters() if p.requires_grad}
    assert projector and projector <= groups["projector"]
    _train(model, tiny_inputs(original, with_labels=True), steps=1)
    model.save_pretrained(tmp_path)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()

    def changed(prefix: str) -> bool:
        return any(not torch.equal(before[k], merged[k]) for k in before if k.startswith(prefix))

    assert changed(lm.projector_path + "."), "the projector did not train"
    tower = [k for k in before if k.startswith(lm.vision_tower_path + ".")]
    tower = [k for k in tower if not k.startswith(lm.projector_path + ".")]
    assert any(not torch.equal(before[k], merged[k]) for k in tower) == train_vision
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).merge_and_unload()
    got = reloaded.state_dict()
    assert got.keys() == merged.keys()
    assert all(torch.equal(got[k], merged[k]) for k in got)
