"""Scorer and strategy registries: a new one is a function and a decorator, then a valid name."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vregion.config import ConfigError, Params
from vregion.models.layer_map import layer_map
from vregion.models.tiny import tiny_inputs, tiny_lvlm
from vregion.region.registry import check_params, scorer, strategy
from vregion.region.scores import score_layers
from vregion.region.select import choose_region

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# What the README's "Extending" section shows: the whole of a new scorer and a new strategy.
@scorer("test_depth")
def depth(model, batches):
    """Each layer's depth as a fraction: a stand-in with known values."""
    n = layer_map(model).num_layers
    return [i / (n - 1) for i in range(n)]


@strategy("test_every_other")
def every_other(num_layers, count):
    """Every second layer from the top."""
    return list(range(num_layers - 1, -1, -2))[:count]


def test_a_registered_scorer_is_scored_beside_the_built_in_ones():
    model = tiny_lvlm("llava")
    scores = score_layers(model, [tiny_inputs(model)], ["block_influence", "test_depth"])
    assert scores["test_depth"] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert len(scores["block_influence"]) == 4


def test_registered_names_pass_config_validation_and_unknown_ones_are_named():
    ok = Params.model_validate(
        {
            "probe": {"scorers": ["block_influence", "test_depth"]},
            "region": {"strategy": "test_every_other"},
        }
    )
    check_params(ok)  # no error: both names are registered
    with pytest.raises(ConfigError) as err:
        check_params(Params.model_validate({"probe": {"scorers": ["test_depth", "perplexity"]}}))
    message = str(err.value)
    assert "probe.scorers" in message and "'perplexity'" in message
    assert "block_influence" in message and "test_depth" in message  # the known names
    with pytest.raises(ConfigError, match=r"region.strategy: unknown strategy 'sparse'.*uniform"):
        check_params(Params.model_validate({"region": {"strategy": "sparse"}}))


def test_a_registered_strategy_chooses_the_region():
    choice = choose_region(8, "test_every_other", 3)
    assert choice.layers == [3, 5, 7]
    assert "Every second layer" in choice.rule


def test_an_unknown_scorer_stops_the_probe_stage_before_anything_loads(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"probe": {"scorers": ["block_influence", "perplexity"]}}))
    proc = subprocess.run(
        [sys.executable, "-m", "stages.probe", "--params", str(bad)],
        cwd=tmp_path,  # no models/ here: reaching a model load would fail differently
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "probe.scorers: unknown scorer 'perplexity'; known: block_influence" in proc.stderr
    assert "Traceback" not in proc.stderr
