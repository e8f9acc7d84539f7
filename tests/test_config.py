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


PARAMS_YAML_DIFFERS = {
    # The schema's defaults are the embedded default run's values (vregion/config.py's module
    # docstring); params.yaml departs from them only here, on purpose:
    "evaluate.samples": (
        2400,  # 400 questions per kind: the sweep's paired intervals resolve ~2 points ...
        None,  # ... while a real evaluation scores every held-out record
    ),
    "data.eval_images": (
        1200,  # enough held-out images for 400 questions of every kind ...
        300,  # ... the schema's smaller set keeps a run from bare defaults quick
    ),
    "evaluate.lm_eval.tasks": (
        ["vregion_text_mc"],  # the demo runs the shipped task ...
        [],  # ... but the harnesses are an optional install (`make install EVAL=0`): opt-in
    ),
    "evaluate.lmms_eval.tasks": (["vregion_vqa"], []),  # the same, for lmms-eval
    "evaluate.lm_eval.batch_size": (
        8,  # lm-eval's text tasks batch well ...
        1,  # ... the default is one both harnesses accept (lmms-eval's llava_hf refuses more)
    ),
    "evaluate.lmms_eval.limit": (
        120,  # free generation on a CPU is the slow part of the demo ...
        None,  # ... a real run scores the whole task
    ),
}


def _leaves(value, prefix=""):
    """Dotted path -> value for every field of a dumped config."""
    if isinstance(value, dict) and value:
        out = {}
        for key, sub in value.items():
            out.update(_leaves(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def test_params_yaml_values_are_the_schema_defaults():
    """One set of defaults: params.yaml agrees with the schema except where listed (and why)."""
    ours = _leaves(load_params(ROOT / "params.yaml").model_dump(mode="json"))
    defaults = _leaves(Params().model_dump(mode="json"))
    assert ours.keys() == defaults.keys()
    differs = {k: (ours[k], defaults[k]) for k in ours if ours[k] != defaults[k]}
    unexplained = {k: v for k, v in differs.items() if PARAMS_YAML_DIFFERS.get(k) != v}
    assert not unexplained, (
        f"params.yaml vs schema default, not in PARAMS_YAML_DIFFERS: {unexplained}"
    )
    stale = set(PARAMS_YAML_DIFFERS) - set(differs)
    assert not stale, f"PARAMS_YAML_DIFFERS lists values that now agree: {stale}"


def test_config_is_a_leaf_that_loads_without_torch():
    """`load_params` (every stage's first step, `report`'s only heavy one) imports no torch."""
    import subprocess
    import sys

    code = (
        "import sys; import vregion.config as c; "
        f"c.load_params({str(ROOT / 'params.yaml')!r}); "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "ours = [m for m in sys.modules if m.startswith('vregion') and m != 'vregion.config']; "
        "assert not heavy, heavy; assert ours == ['vregion'], ours"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # No timing bound (a busy machine would make it flaky): without torch, transformers and
    # peft it takes about 0.3 s (pydantic and yaml), where they alone took 4 s.
    assert out.returncode == 0, out.stderr


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
