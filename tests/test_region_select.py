"""Region selection: every strategy's invariants (hypothesis) and the lists it gives real depths."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vregion.region.select import (
    AUTHORS_32_LAYER_REGION,
    STRATEGIES,
    RegionChoice,
    choose_region,
    layer_count,
    select_layers,
    uniform_layers,
)

SIZED = ("uniform", "bottom", "top", "middle", "bottom+top", "random", "topk:score")


@st.composite
def layers_and_size(draw):
    """A layer count 1..80 and a size for it, as a count or as a fraction."""
    num_layers = draw(st.integers(1, 80))
    if draw(st.booleans()):
        size = draw(st.integers(1, num_layers))
        return num_layers, size, size
    size = draw(st.floats(0.001, 1.0, allow_nan=False))
    return num_layers, size, max(1, int(size * num_layers + 0.5))


def is_region(chosen: list[int], num_layers: int) -> bool:
    return chosen == sorted(set(chosen)) and all(0 <= i < num_layers for i in chosen)


@given(layers_and_size(), st.sampled_from(SIZED), st.integers(0, 2**31), st.booleans())
def test_sized_strategies_give_the_right_count_sorted_distinct_in_range(
    case, strategy, seed, most_important
):
    num_layers, size, count = case
    scores = {"score": [float((7 * i) % 5) for i in range(num_layers)]}  # ties on purpose
    chosen = select_layers(
        num_layers, strategy, size, scores=scores, most_important=most_important, seed=seed
    )
    assert len(chosen) == count
    assert is_region(chosen, num_layers)


@given(st.integers(1, 80), st.data())
def test_list_and_all(num_layers, data):
    listed = data.draw(st.sets(st.integers(0, num_layers - 1), min_size=1).map(list))
    assert select_layers(num_layers, "list", None, layers=listed) == sorted(listed)
    assert select_layers(num_layers, "list", len(listed), layers=listed) == sorted(listed)
    assert select_layers(num_layers, "all", None) == list(range(num_layers))
    assert select_layers(num_layers, "all", 1.0) == list(range(num_layers))


@given(layers_and_size())
def test_uniform_is_evenly_spaced_and_spread_over_depth(case):
    num_layers, size, count = case
    chosen = select_layers(num_layers, "uniform", size)
    gaps = [b - a for a, b in zip(chosen, chosen[1:], strict=False)]
    assert not gaps or max(gaps) - min(gaps) <= 1
    bin_width = num_layers / count
    assert chosen[0] < bin_width
    assert chosen[-1] >= num_layers - bin_width


@given(layers_and_size())
def test_contiguous_strategies(case):
    num_layers, size, count = case
    assert select_layers(num_layers, "bottom", size) == list(range(count))
    assert select_layers(num_layers, "top", size) == list(range(num_layers - count, num_layers))
    middle = select_layers(num_layers, "middle", size)
    assert middle == list(range(middle[0], middle[0] + count))
    below, above = middle[0], num_layers - 1 - middle[-1]
    assert 0 <= above - below <= 1  # centred; the odd layer out goes above
    both = select_layers(num_layers, "bottom+top", size)
    assert both[: count - count // 2] == list(range(count - count // 2))
    assert both[count - count // 2 :] == list(range(num_layers - count // 2, num_layers))


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [
        (30, [1, 5, 9, 13, 16, 20, 24, 28]),
        (32, [2, 6, 10, 14, 18, 22, 26, 30]),
        (40, [2, 6, 10, 14, 18, 22, 26, 30, 34, 38]),
    ],
)
def test_uniform_quarter_of_real_depths(num_layers, expected):
    assert select_layers(num_layers, "uniform", 0.25) == expected


def test_uniform_is_within_one_layer_of_the_authors_32_layer_region():
    ours = uniform_layers(32, 8)
    assert max(abs(a - b) for a, b in zip(ours, AUTHORS_32_LAYER_REGION, strict=True)) == 1
    assert select_layers(32, "list", 8, layers=AUTHORS_32_LAYER_REGION) == list(
        AUTHORS_32_LAYER_REGION
    )


def test_random_is_seeded():
    assert select_layers(32, "random", 8, seed=3) == select_layers(32, "random", 8, seed=3)
    assert select_layers(32, "random", 8, seed=3) != select_layers(32, "random", 8, seed=4)


def test_topk_takes_the_highest_or_lowest_scores():
    scores = {"bi": [0.1, 0.9, 0.3, 0.8, 0.2, 0.7]}
    assert select_layers(6, "topk:bi", 2, scores=scores) == [1, 3]
    assert select_layers(6, "topk:bi", 2, scores=scores, most_important=False) == [0, 4]
    with pytest.raises(ValueError, match="available scorers: bi"):
        select_layers(6, "topk:angular_distance", 2, scores=scores)
    with pytest.raises(ValueError, match="5 values for 6 layers"):
        select_layers(6, "topk:bi", 2, scores={"bi": [0.1] * 5})


def test_sizes():
    assert layer_count(32, 0.25) == 8
    assert layer_count(30, 0.25) == 8  # 7.5 rounds half up
    assert layer_count(10, 0.01) == 1  # at least one layer
    assert layer_count(10, 1) == 1 and layer_count(10, 1.0) == 10  # int count, float fraction
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="32 layers"):
            layer_count(32, bad)
    with pytest.raises(ValueError, match="32 layers"):
        layer_count(32, 33)
    with pytest.raises(ValueError, match="count between 1 and 32"):
        layer_count(32, 0)
    with pytest.raises(ValueError, match="fraction"):
        layer_count(32, True)


def test_bad_strategies_and_lists():
    with pytest.raises(ValueError, match="valid strategies: uniform, bottom"):
        select_layers(32, "sparse", 8)
    with pytest.raises(ValueError, match="valid strategies"):
        select_layers(32, "topk:", 8)
    with pytest.raises(ValueError, match="out of range: the LLM has 32 layers"):
        select_layers(32, "list", None, layers=[3, 32])
    with pytest.raises(ValueError, match="repeated"):
        select_layers(32, "list", None, layers=[3, 3])
    with pytest.raises(ValueError, match="selects 2"):
        select_layers(32, "list", 3, layers=[3, 4])
    with pytest.raises(ValueError, match="needs a size"):
        select_layers(32, "uniform", None)
    assert {"uniform", "list", "all"} <= set(STRATEGIES)  # registered by @strategy


def test_region_choice_round_trips_through_json():
    choice = choose_region(32, "uniform", 0.25)
    assert choice.layers == [2, 6, 10, 14, 18, 22, 26, 30]
    assert "floor((k + 1/2) * 32 / 8)" in choice.rule
    data = json.loads(choice.to_json())
    assert data["strategy"] == "uniform" and data["size_requested"] == 0.25
    assert RegionChoice.from_json(choice.to_json()) == choice

    ranked = choose_region(4, "topk:bi", 1, scores={"bi": [0.0, 1.0, 0.5, 0.2]})
    assert ranked.layers == [1] and ranked.scorer == "bi"
    assert "highest bi" in ranked.rule


def test_authors_list_maps_to_itself_on_32_layers_and_by_relative_depth_elsewhere():
    assert select_layers(32, "authors", 0.25) == list(AUTHORS_32_LAYER_REGION)
    assert select_layers(30, "authors", 0.25) == [1, 5, 8, 12, 18, 22, 25, 29]
    with pytest.raises(ValueError, match="authors' 8 of 32 layers.*4 distinct layers of 4"):
        select_layers(4, "authors", 0.25)  # 1 of 4 layers asked; the list needs 8


def test_strided_is_llama_factorys_every_fourth_layer_from_layer_3():
    assert select_layers(32, "strided", 0.25) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert select_layers(30, "strided", 0.25) == [2, 5, 8, 11, 14, 17, 20, 23]
