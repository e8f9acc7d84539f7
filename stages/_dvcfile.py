"""dvc.yaml's stage entries with their `${}` references resolved: the stages' command-line
defaults (stages._common.run_stage) and the outputs a stage publishes (stages._visible).

dvc.yaml owns every path: its `vars: - paths:` mapping names each once, and each stage's `cmd`
passes them as arguments. This reads them as DVC does for what dvc.yaml uses (the `vars`
mappings, params.yaml beside dvc.yaml, a foreach stage's `key` and `item`), in milliseconds,
without a DVC repo (a stage run by hand in a scratch directory) and for a source named only in
another params file. tests/test_dvc_deps.py checks the result against DVC's own resolution.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

# dvc.yaml beside the `stages` package: the project this code belongs to (also in the copy
# that a queued DVC experiment runs in).
DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
_REF = re.compile(r"\$\{\s*([A-Za-z_][\w.-]*)\s*\}")


class DvcFileError(ValueError):
    """dvc.yaml lacks what a stage needs, or names something it cannot resolve."""


def load(dvc_yaml: str | Path = DVC_YAML) -> dict:
    return yaml.safe_load(Path(dvc_yaml).read_text()) or {}


def context(doc: dict, root: Path) -> dict:
    """What `${}` can name: params.yaml's keys, then each inline `vars` mapping."""
    params = root / "params.yaml"
    ctx = dict(yaml.safe_load(params.read_text()) or {}) if params.is_file() else {}
    for entry in doc.get("vars") or []:
        if isinstance(entry, dict):
            ctx.update(entry)
    return ctx


def _lookup(ctx: dict, name: str):
    value = ctx
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(name)
        value = value[part]
    return value


def interpolate(value, ctx: dict):
    """`value` with every resolvable `${name}` replaced (in keys too); a string that is one
    reference becomes the referenced value itself; an unknown name is left as written."""
    if isinstance(value, dict):
        return {interpolate(k, ctx): interpolate(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, ctx) for v in value]
    if not isinstance(value, str):
        return value
    whole = _REF.fullmatch(value.strip())
    if whole:
        try:
            return _lookup(ctx, whole.group(1))
        except KeyError:
            return value

    def one(match: re.Match) -> str:
        try:
            return str(_lookup(ctx, match.group(1)))
        except KeyError:
            return match.group(0)

    return _REF.sub(one, value)


def stage(name: str, key: str | None = None, dvc_yaml: str | Path = DVC_YAML) -> dict:
    """Stage `name`'s entry, resolved; for a foreach stage the entry of item `key` (resolved
    from its `do` template, also when params.yaml has no such item)."""
    doc = load(dvc_yaml)
    spec = (doc.get("stages") or {}).get(name)
    if spec is None:
        raise DvcFileError(f"{dvc_yaml}: no stage {name!r}")
    ctx = context(doc, Path(dvc_yaml).parent)
    if "foreach" in spec:
        if key is None:
            raise DvcFileError(f"{dvc_yaml}: stage {name!r} is a foreach stage: name its item")
        items = interpolate(spec["foreach"], ctx)
        ctx = {**ctx, "key": key}
        if isinstance(items, dict) and key in items:
            ctx["item"] = items[key]
        spec = spec["do"]
    return interpolate(spec, ctx)


def paths(dvc_yaml: str | Path = DVC_YAML) -> dict[str, str]:
    """The `paths` mapping of dvc.yaml's `vars`: every path the pipeline reads or writes."""
    ctx = context(load(dvc_yaml), Path(dvc_yaml).parent)
    if not isinstance(ctx.get("paths"), dict):
        raise DvcFileError(f"{dvc_yaml}: no `paths` mapping under `vars`")
    return ctx["paths"]


def command_args(name: str, key: str | None = None, dvc_yaml: str | Path = DVC_YAML) -> list[str]:
    """The arguments dvc.yaml's `cmd` gives `python -m stages.<name>`."""
    cmd = stage(name, key, dvc_yaml).get("cmd")
    if not isinstance(cmd, str):
        raise DvcFileError(f"{dvc_yaml}: stage {name!r} has no single `cmd`")
    unresolved = _REF.findall(cmd)
    if unresolved:
        raise DvcFileError(f"{dvc_yaml}: stage {name!r}: cannot resolve {unresolved} in its cmd")
    argv = shlex.split(cmd)
    module = f"stages.{name}"
    if module not in argv:
        raise DvcFileError(f"{dvc_yaml}: stage {name!r}: its cmd does not run {module}")
    return argv[argv.index(module) + 1 :]


def entry_paths(entries) -> list[str]:
    """The paths of a deps/outs/metrics/plots list (an entry is a path or {path: options})."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]
