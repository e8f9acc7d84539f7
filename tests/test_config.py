"""params.yaml parsing: defaults, documentation, and errors that say what to fix."""

from pathlib import Path

import pytest
import yaml

from vregion.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_are_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Every section of params.yaml is a typed section; nothing is silently ignored.
    assert set(raw) == set(Params.model_fields)
    assert params.model.base == "embedded"


def test_every_field_has_a_docstring():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")

    walk(Params)


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"align": {"steps": 0}}, ["align.steps", "trains nothing", "align.skip"]),
        ({"align": {"steps": -1}}, ["align.steps", "greater than or equal to 0"]),
        ({"align": {"stepz": 3}}, ["align.stepz", "Extra inputs"]),
        ({"align": {"precision": "fp8"}}, ["align.precision", "fp8"]),
        ({"model": {"embedded": {"image_size": 60}}}, ["multiple of patch_size"]),
        ({"nonsense": {}}, ["nonsense"]),
    ],
)
def test_wrong_values_name_the_field(tmp_path, patch, words):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(patch))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    for w in words:
        assert w in str(err.value)
    assert str(path) in str(err.value)


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "preset", sorted((ROOT / "configs" / "benchmarks").glob("*.yaml")), ids=lambda p: p.stem
)
def test_benchmark_presets_are_valid_and_their_command_sets_exactly_them(preset, tmp_path):
    """Each preset's header command (`dvc exp run -S key=value ...`) sets the values its body
    lists, and params.yaml with them applied is valid."""
    import shlex

    text = preset.read_text()
    (command,) = [line[1:].strip() for line in text.splitlines() if "dvc exp run" in line]
    words = shlex.split(command)
    commanded = {}
    for flag, assignment in zip(words, words[1:], strict=False):
        if flag == "-S":
            key, value = assignment.split("=", 1)
            commanded[key] = yaml.safe_load(value)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    assert commanded == flat(yaml.safe_load(text))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in commanded.items():
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(tmp_path / "params.yaml")
