"""Layer pruning: which layers go, and a pruned model computes exactly what the original computes
with those layers skipped, with and without the KV cache, and round-trips through save/load."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, LlamaConfig

from vregion.models.layer_map import layer_map
from vregion.models.tiny import tiny_inputs, tiny_lvlm
from vregion.prune import (
    EXPLICIT_REASON,
    RANKED_REASON,
    layers_to_prune,
    plan_pruning,
    prune_config,
    prune_llm_layers,
    temporarily_pruned,
)
from vregion.region.scores import skipped_layer

ATOL = 1e-5
# Layer 0 is among the removed ones: without renumbering, the cache's length (read from slot 0)
# would stay 0 and decoding would go wrong.
CASES = [("llava", [0, 2]), ("qwen2_vl", [0, 3])]


@contextmanager
def skipping(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """The unpruned model with `layers` acting as identity: what pruning must reproduce."""
    with ExitStack() as stack:
        for idx in layers:
            stack.enter_context(skipped_layer(layer_map(model).layers[idx]))
        yield


def original_and_pruned(arch: str, remove: Sequence[int]) -> tuple[torch.nn.Module, ...]:
    original = tiny_lvlm(arch, num_layers=4)
    return original, prune_llm_layers(copy.deepcopy(original), remove)


@pytest.mark.parametrize(("arch", "remove"), CASES)
def test_pruned_forward_equals_original_with_layers_skipped(arch, remove):
    original, pruned = original_and_pruned(arch, remove)
    inputs = tiny_inputs(original)
    with torch.no_grad():
        with skipping(original, remove):
            expected = original(**inputs, use_cache=False).logits
        full = original(**inputs, use_cache=False).logits
        got = pruned(**inputs, use_cache=False).logits

    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - full).abs().max() > 1e-3  # the removed layers did matter
    layers = layer_map(pruned).layers
    assert len(layers) == 2
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    assert pruned.config.text_config.num_hidden_layers == 2


@pytest.mark.parametrize(("arch", "remove"), CASES)
def test_pruned_generate_with_cache_equals_skipped_original_without_cache(arch, remove):
    original, pruned = original_and_pruned(arch, remove)
    inputs = tiny_inputs(original)
    settings = dict(
        max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    with torch.no_grad():
        with skipping(original, remove):
            expected = original.generate(**inputs, use_cache=False, **settings)
        got = pruned.generate(**inputs, use_cache=True, **settings)

    assert got.sequences.shape[1] == inputs["input_ids"].shape[1] + 5
    assert torch.equal(got.sequences, expected.sequences)
    for step_got, step_expected in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_got, step_expected, atol=ATOL, rtol=0)


def test_pruned_prefill_and_decode_step_equal_full_sequence_logits():
    remove = [0, 2]
    original, pruned = original_and_pruned("llava", remove)
    inputs = tiny_inputs(original)
    with torch.no_grad():
        prefill = pruned(**inputs, use_cache=True)
        cached = prefill.past_key_values.get_seq_length()
        next_token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], dim=1)
        step = pruned(
            input_ids=next_token,
            attention_mask=mask,
            past_key_values=prefill.past_key_values,
            use_cache=True,
        )
        whole = {**inputs, "input_ids": torch.cat([inputs["input_ids"], next_token], 1)}
        with skipping(original, remove):
            expected = original(**{**whole, "attention_mask": mask}, use_cache=False).logits

    assert cached == inputs["input_ids"].shape[1]
    assert prefill.past_key_values.get_seq_length() == cached + 1  # the step appended to it
    torch.testing.assert_close(prefill.logits, expected[:, :-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.logits[:, -1], expected[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("arch", "remove"), CASES)
def test_pruned_checkpoint_loads_with_plain_from_pretrained(arch, remove, tmp_path):
    _, pruned = original_and_pruned(arch, remove)
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)

    assert (tmp_path / "model.safetensors").is_file()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    saved_text = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert saved_text["num_hidden_layers"] == 2
    text_config = loaded.config.text_config
    assert text_config.num_hidden_layers == 2 and len(layer_map(loaded).layers) == 2
    if getattr(text_config, "layer_types", None) is not None:
        assert len(text_config.layer_types) == 2
    expected = pruned.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name

    inputs = tiny_inputs(loaded)
    with torch.no_grad():
        want = pruned.generate(**inputs, max_new_tokens=3, do_sample=False)
        out = loaded.eval().generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, want)


def test_prune_config_slices_layer_types_and_moves_sliding_window_threshold():
    model = tiny_lvlm("qwen2_vl", num_layers=5)
    config = model.config.text_config
    # Qwen2 semantics: layers at index >= max_window_layers use sliding-window attention.
    config.max_window_layers = 3
    config.layer_types = ["full_attention"] * 3 + ["sliding_attention"] * 2
    prune_llm_layers(model, [1, 4])

    assert config.num_hidden_layers == 3
    assert config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert config.max_window_layers == 2  # kept layers 0, 2 were below the old threshold
    assert [layer.self_attn.layer_idx for layer in layer_map(model).layers] == [0, 1, 2]


def test_prune_config_renumbers_per_layer_overrides_and_keeps_token_lists():
    config = LlamaConfig(
        num_hidden_layers=3,
        eos_token_id=[2, 3, 4],  # as long as the layer list, but not per layer
        per_layer_config={1: {"intermediate_size": 96}, 2: {"skip": ["mlp"]}},
    )
    prune_config(config, kept=[0, 2])

    assert config.num_hidden_layers == 2
    assert config.eos_token_id == [2, 3, 4]
    assert config.to_dict()["per_layer_config"] == {"1": {"skip": ["mlp"]}}


def test_prune_llm_layers_refuses_bad_indices():
    model = tiny_lvlm("llava", num_layers=3)
    with pytest.raises(ValueError, match=r"out of range"):
        prune_llm_layers(model, [3])
    with pytest.raises(ValueError, match=r"repeated: \[1\]"):
        prune_llm_layers(model, [1, 1])
    with pytest.raises(ValueError, match="all 3"):
        prune_llm_layers(model, [0, 1, 2])
    assert len(layer_map(model).layers) == 3  # nothing was removed by the refused calls


def test_temporarily_pruned_restores_the_whole_model():
    model = tiny_lvlm("qwen2_vl", num_layers=4)
    inputs = tiny_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
        with temporarily_pruned(model, [1, 2]) as pruned:
            assert len(layer_map(pruned).layers) == 2
            assert model.config.text_config.layer_types == ["full_attention"] * 2
            inside = model(**inputs).logits
        after = model(**inputs).logits

    assert (inside - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert model.config.text_config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layer_map(model).layers] == [0, 1, 2, 3]


# --- which layers ---------------------------------------------------------------------------

SCORES = [0.30, 0.02, 0.25, 0.01, 0.20, 0.05, 0.05, 0.40]


def test_layers_to_prune_takes_lowest_scores_outside_region():
    # Layers 3 and 1 score lowest but are in the region; 5 and 6 tie, the shallower wins.
    assert layers_to_prune(SCORES, region=[1, 3], k=1) == [5]
    assert layers_to_prune(SCORES, region=[1, 3], k=3) == [4, 5, 6]
    assert layers_to_prune(SCORES, region=[], k=2) == [1, 3]
    assert layers_to_prune(SCORES, region=[1, 3], k=0) == []


def test_layers_to_prune_never_picks_region_layers():
    region = [0, 2, 4, 6]
    chosen = layers_to_prune(SCORES, region=region, k=4)
    assert chosen == [1, 3, 5, 7]


def test_layers_to_prune_refuses_k_beyond_the_layers_outside_region():
    with pytest.raises(ValueError, match="only 2 of 8 layers are outside"):
        layers_to_prune(SCORES, region=[0, 1, 2, 3, 4, 5], k=3)


def test_explicit_list_overrides_ranking_but_not_the_region():
    assert layers_to_prune(SCORES, region=[1, 3], k=1, explicit=[7, 0]) == [0, 7]
    with pytest.raises(ValueError, match=r"layers \[3\] are in the visual region"):
        layers_to_prune(SCORES, region=[1, 3], k=1, explicit=[0, 3])
    with pytest.raises(ValueError, match=r"layers \[8\] out of range"):
        layers_to_prune(SCORES, region=[1, 3], k=1, explicit=[8])


def test_plan_pruning_records_what_and_why():
    ranked = plan_pruning(SCORES, region=[1, 3], k=2)
    assert ranked.removed == [5, 6] and ranked.removed_scores == [0.05, 0.05]
    assert ranked.kept == [0, 1, 2, 3, 4, 7] and ranked.reason == RANKED_REASON
    record = plan_pruning(SCORES, region=[1, 3], k=2, explicit=[0]).to_dict()
    assert record["reason"] == EXPLICIT_REASON and record["removed_scores"] == [0.30]
    assert record["num_layers_before"] == 8 and record["num_layers_after"] == 7


# --- the speed benchmark ----------------------------------------------------------------------


def test_prune_speed_benchmark_smoke_run(tmp_path):
    out = tmp_path / "speed.json"
    script = Path(__file__).parents[1] / "benchmarks" / "prune_speed.py"
    args = "--tiny --tiny-layers 4 --prune 1 2 --repeats 1 --warmup 0 --batch-size 1"
    args += f" --prompt-len 8 --new-tokens 3 --out {out}"
    done = subprocess.run(
        [sys.executable, str(script), *args.split()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["0", "1", "2"]  # the unpruned baseline is always measured
    assert results["2"]["removed"] == [1, 2] and results["2"]["num_layers"] == 2
    assert results["2"]["ideal_speedup"] == 2.0 and results["0"]["decode_speedup"] == 1.0
    assert all(
        r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in results.values()
    )
