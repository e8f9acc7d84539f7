"""Layer scorers on tiny random LVLMs, checked on constructions whose answers are known."""

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from vregion.models.layer_map import layer_map
from vregion.models.tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_lvlm
from vregion.region.scores import (
    SCORERS,
    angular_distance,
    attention_to_image,
    block_influence,
    layer_ablation,
    layer_input,
    layer_output,
    multimodal_block_influence,
    parameter_change,
    score_layers,
    skipped_layer,
)

ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
PAD = 0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    return tiny_lvlm("llava")


def image_at(model, rows: list[tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    """LLaVA inputs whose row r is `before` text tokens, the image, `after` text tokens, `pad` pads.

    Rows are (before, after, pad); positive pad pads on the right, negative on the left.
    """
    base = tiny_inputs(model, batch=len(rows))
    n_image = int((base["input_ids"][0] == IMAGE_TOKEN_ID).sum())
    gen = torch.Generator().manual_seed(1)
    ids, masks = [], []
    for before, after, pad in rows:
        text = torch.randint(3, 250, (before + after,), generator=gen)
        row = torch.cat([text[:before], torch.full((n_image,), IMAGE_TOKEN_ID), text[before:]])
        pads = torch.full((abs(pad),), PAD)
        mask = torch.ones(len(row), dtype=torch.long)
        if pad >= 0:
            row, mask = torch.cat([row, pads]), torch.cat([mask, torch.zeros_like(pads)])
        else:
            row, mask = torch.cat([pads, row]), torch.cat([torch.zeros_like(pads), mask])
        ids.append(row)
        masks.append(mask)
    assert len({len(r) for r in ids}) == 1, "rows must have equal padded length"
    return {
        "input_ids": torch.stack(ids),
        "attention_mask": torch.stack(masks),
        "pixel_values": base["pixel_values"],
    }


def row(batch: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Row r of a batch with its padding cut off."""
    keep = batch["attention_mask"][r].bool()
    return {
        "input_ids": batch["input_ids"][r : r + 1, keep],
        "attention_mask": batch["attention_mask"][r : r + 1, keep],
        "pixel_values": batch["pixel_values"][r : r + 1],
    }


# --- hidden-state scorers -----------------------------------------------------------------


def test_hidden_states_read_from_positional_or_keyword_arguments():
    h = torch.randn(1, 2, 4)
    assert layer_input((h,), {}) is h
    assert layer_input((), {"hidden_states": h}) is h
    assert layer_output(h) is h
    assert layer_output((h, None)) is h
    with pytest.raises(ValueError, match="hidden states"):
        layer_input((), {"attention_mask": None})


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_layer_has_zero_influence_and_angle(arch):
    model = tiny_lvlm(arch)
    batches = [tiny_inputs(model)]
    with skipped_layer(layer_map(model).layers[1]):
        scores = score_layers(
            model, batches, ["block_influence", "angular_distance", "multimodal_block_influence"]
        )
    for name, values in scores.items():
        assert values[1] == pytest.approx(0.0, abs=1e-5), name
        assert all(v > 1e-3 for i, v in enumerate(values) if i != 1), (name, values)


def test_single_scorers_match_score_layers(llava):
    batches = [tiny_inputs(llava, seed=3)]
    together = score_layers(llava, batches, SCORERS.names()[:4])
    assert block_influence(llava, batches) == pytest.approx(together["block_influence"])
    assert angular_distance(llava, batches) == pytest.approx(together["angular_distance"])
    assert attention_to_image(llava, batches) == pytest.approx(together["attention_to_image"])
    parts = multimodal_block_influence(llava, batches)
    for key in ("multimodal_block_influence", "block_influence_image", "block_influence_text"):
        assert parts[key] == pytest.approx(together[key])
    mean = [
        (i + t) / 2
        for i, t in zip(parts["block_influence_image"], parts["block_influence_text"], strict=True)
    ]
    assert parts["multimodal_block_influence"] == pytest.approx(mean)


def test_batches_are_weighted_by_their_token_count(llava):
    short = image_at(llava, [(1, 1, 0)])  # 18 tokens
    long = image_at(llava, [(2, 12, 0)])  # 30 tokens
    n_short, n_long = short["input_ids"].numel(), long["input_ids"].numel()
    both = block_influence(llava, [short, long])
    a, b = block_influence(llava, [short]), block_influence(llava, [long])
    pooled = [(x * n_short + y * n_long) / (n_short + n_long) for x, y in zip(a, b, strict=True)]
    assert both == pytest.approx(pooled, abs=1e-6)


def test_multimodal_influence_follows_the_real_image_mask(llava):
    # Image at offset 1 in row 0 (right-padded by 4) and offset 5 in row 1.
    batch = image_at(llava, [(1, 3, 4), (5, 3, 0)])
    together = multimodal_block_influence(llava, [batch])
    row_by_row = multimodal_block_influence(llava, [row(batch, 0), row(batch, 1)])
    for key, values in together.items():
        assert values == pytest.approx(row_by_row[key], abs=1e-5), key

    # Against a direct computation from the model's own hidden states (the last entry of
    # `hidden_states` is after the final norm, so layers 0..L-2 only).
    with torch.inference_mode():
        hs = llava(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    image = (batch["input_ids"] == IMAGE_TOKEN_ID) & real
    for i in range(len(hs) - 2):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)
        assert together["block_influence_image"][i] == pytest.approx(
            float(1 - cos[image].mean()), abs=1e-5
        )
        assert together["block_influence_text"][i] == pytest.approx(
            float(1 - cos[real & ~image].mean()), abs=1e-5
        )


# --- attention to image -------------------------------------------------------------------


def test_attention_to_image_is_zero_when_the_image_follows_all_text(llava):
    after_text = image_at(llava, [(8, 0, 0), (8, 0, 0)])
    assert attention_to_image(llava, [after_text]) == [0.0] * 4  # causal: no text sees it
    before_text = image_at(llava, [(0, 8, 0), (0, 8, 0)])
    assert all(v > 0.1 for v in attention_to_image(llava, [before_text]))


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_attention_to_image_with_uniform_attention_is_the_image_share_of_keys(arch):
    # Zero queries make every attention score equal, so each text query spreads its attention
    # evenly over the real keys it may see: its image share is (#image keys)/(#keys) so far.
    model = tiny_lvlm(arch)
    attention = layer_map(model).layers[2].self_attn
    with torch.no_grad():
        attention.q_proj.weight.zero_()
        if attention.q_proj.bias is not None:
            attention.q_proj.bias.zero_()
    if arch == "llava":
        batch = image_at(model, [(2, 6, 0), (3, 2, -3)])  # row 1 left-padded: pads are masked
    else:
        batch = tiny_inputs(model)
    real = batch["attention_mask"].bool()
    image = (batch["input_ids"] == IMAGE_TOKEN_ID) & real
    shares = []
    for r in range(real.shape[0]):
        seen_real = real[r].cumsum(0)
        seen_image = image[r].cumsum(0)
        for p in torch.nonzero(real[r] & ~image[r]).flatten():
            shares.append(float(seen_image[p] / seen_real[p]))
    expected = sum(shares) / len(shares)
    scores = attention_to_image(model, [batch])
    assert scores[2] == pytest.approx(expected, abs=1e-5)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored


def test_a_layer_whose_attention_masks_image_keys_scores_zero(llava):
    batch = tiny_inputs(llava, text_len=10)
    image_keys = batch["input_ids"] == IMAGE_TOKEN_ID

    def hide_image(module, args, kwargs):
        mask = kwargs["attention_mask"]  # eager: additive float mask (batch, 1, queries, keys)
        kwargs["attention_mask"] = mask.masked_fill(
            image_keys[:, None, None, :], torch.finfo(mask.dtype).min
        )
        return args, kwargs

    attention = layer_map(llava).layers[1].self_attn
    handle = attention.register_forward_pre_hook(hide_image, with_kwargs=True)
    try:
        scores = attention_to_image(llava, [batch])
    finally:
        handle.remove()
    assert scores[1] == 0.0
    assert all(v > 0.1 for i, v in enumerate(scores) if i != 1)


def test_image_scorers_need_image_tokens(llava):
    text_only = {"input_ids": torch.randint(3, 250, (1, 6))}
    with pytest.raises(ValueError, match="no image tokens"):
        multimodal_block_influence(llava, [text_only])


# --- parameter change ---------------------------------------------------------------------


def test_parameter_change_is_zero_against_itself_and_local_to_a_perturbed_layer(llava):
    same = parameter_change(llava, llava)
    assert set(same) == {"parameter_change", "parameter_change_l2", "parameter_change_angular"}
    for values in same.values():
        assert values == [0.0] * 4

    tuned = copy.deepcopy(llava)
    with torch.no_grad():
        layer_map(tuned).layers[2].mlp.down_proj.weight.add_(0.01)
    changed = parameter_change(llava, tuned)
    for name, values in changed.items():
        assert values[2] > 0, name
        assert [v for i, v in enumerate(values) if i != 2] == [0.0] * 3, name


@pytest.mark.filterwarnings("ignore:All adapters are already merged")
def test_parameter_change_matches_merged_peft_models(llava):
    lora = LoraConfig(
        r=4,
        target_modules=["q_proj", "down_proj"],
        layers_to_transform=[1],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(copy.deepcopy(llava), lora)
    with pytest.raises(ValueError, match="unmerged PEFT adapter"):
        parameter_change(llava, peft_model)

    peft_model.merge_adapter()  # merged in place: names keep PEFT's `base_layer.`
    in_place = parameter_change(llava, peft_model)
    merged = parameter_change(llava, peft_model.merge_and_unload())
    for name in merged:
        assert in_place[name] == pytest.approx(merged[name]), name
        assert merged[name][1] > 0
        assert [v for i, v in enumerate(merged[name]) if i != 1] == [0.0] * 3


def test_parameter_change_refuses_different_models(llava):
    with pytest.raises(ValueError, match="layer count: 4 vs 3"):
        parameter_change(llava, tiny_lvlm("llava", num_layers=3))
    with pytest.raises(ValueError, match="parameters differ"):
        parameter_change(llava, tiny_lvlm("qwen2_vl"))  # Qwen2 attention has biases


# --- layer ablation -----------------------------------------------------------------------


def test_skipping_an_identity_layer_costs_nothing(llava):
    batches = [tiny_inputs(llava, with_labels=True)]
    with skipped_layer(layer_map(llava).layers[2]):
        increases = layer_ablation(llava, batches)
    assert increases[2] == pytest.approx(0.0, abs=1e-6)
    assert all(abs(v) > 1e-4 for i, v in enumerate(increases) if i != 2)


def test_layer_ablation_needs_labels(llava):
    with pytest.raises(ValueError, match="labels"):
        layer_ablation(llava, [tiny_inputs(llava)])


# --- score_layers -------------------------------------------------------------------------


def test_score_layers_refuses_unknown_scorers_and_a_missing_reference(llava):
    with pytest.raises(ValueError, match="valid scorers: block_influence"):
        score_layers(llava, [], ["block_influence", "perplexity"])
    with pytest.raises(ValueError, match="reference_model"):
        score_layers(llava, [], ["parameter_change"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_scorer_runs_on_every_architecture(arch):
    model = tiny_lvlm(arch)
    batches = [
        tiny_inputs(model, with_labels=True),
        tiny_inputs(model, batch=1, seed=1, with_labels=True),
    ]
    scores = score_layers(model, batches, SCORERS, reference_model=tiny_lvlm(arch, seed=1))
    assert set(SCORERS) <= set(scores)
    for name, values in scores.items():
        assert len(values) == 4, name
        assert all(math.isfinite(v) for v in values), (name, values)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_peft_model_in_train_mode_is_scored_without_dropout_and_left_as_it_was(llava):
    lora = LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(llava), lora)
    peft_model.train()
    layer_map(peft_model).vision_tower.eval()  # a frozen tower kept in eval mode stays so
    batches = [tiny_inputs(llava)]
    first = score_layers(peft_model, batches, ["block_influence", "attention_to_image"])
    second = score_layers(peft_model, batches, ["block_influence", "attention_to_image"])
    assert first == second  # dropout off while scoring
    assert peft_model.training and not layer_map(peft_model).vision_tower.training
    assert peft_model.get_base_model().config.text_config._attn_implementation == "sdpa"
