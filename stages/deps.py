"""Each stage's code dependencies: the import closure of its module, for dvc.yaml's `deps:`.

Not a stage: the tool that keeps dvc.yaml's code deps exact, so that no code change leaves a
stale result. A stage depends on every project module it imports, directly or not (package
`__init__` files included, imports inside functions too), plus the data files that code reads
at run time (DATA_FILES). Found by parsing the source (nothing is imported); a directory stands
for its files when the closure holds every file in it.

    python -m stages.deps            each stage's code deps, as dvc.yaml lines
    python -m stages.deps --check    exit 1 when dvc.yaml's code deps differ (prints the fix)
    python -m stages.deps --write    rewrite the code deps in dvc.yaml (the rest is kept)

tests/test_dvc_deps.py fails when dvc.yaml is out of date; `--write` is the fix.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vregion", "stages", "infra")  # the project's own code; anything else is installed
# Files a module reads at run time, beside its own source (found by `__file__` in the module).
DATA_FILES = {
    "vregion/eval/harness.py": ["vregion/eval/tasks"],  # lm-eval / lmms-eval task definitions
    "infra/process.py": [],  # PROJECT_ROOT: where service state lives, no input
}
IGNORED = ("__pycache__",)


def is_code(path: str) -> bool:
    """A dvc.yaml dep that is project code (as opposed to data or a model)."""
    return path.split("/", 1)[0] in PACKAGES


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The source of a dotted module name, if it is the project's."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def imported_modules(path: Path, root: Path = ROOT) -> frozenset[str]:
    """Every project module `path` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, or not
    return frozenset(m for m in found if module_file(m, root) is not None)


def closure(module: str, root: Path = ROOT) -> set[str]:
    """Repo-relative paths of `module`, every project module it imports transitively, their
    packages' `__init__.py`, and the data files they read (DATA_FILES)."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            parent = ".".join(parts[:i])
            if parent not in seen and module_file(parent, root) is not None:
                seen.add(parent)
                todo.append(parent)
        path = module_file(name, root)
        if path is None:
            continue
        for imported in imported_modules(path, root):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    files = {module_file(m, root).relative_to(root).as_posix() for m in seen}
    files.add(module_file(module, root).relative_to(root).as_posix())
    for source in list(files):
        for data in DATA_FILES.get(source, []):
            files.update(_files_under(root / data, root))
    return files


def _files_under(path: Path, root: Path) -> set[str]:
    if path.is_file():
        return {path.relative_to(root).as_posix()}
    return {
        p.relative_to(root).as_posix()
        for p in path.rglob("*")
        if p.is_file() and not any(part in IGNORED for part in p.parts)
    }


def as_deps(files: set[str], root: Path = ROOT) -> list[str]:
    """The closure as dvc.yaml deps: a directory for a folder all of whose files it holds."""
    folders = {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}
    full = {d for d in folders if _files_under(root / d, root) <= files}
    top = {d for d in full if not any(str(p) in full for p in Path(d).parents)}
    singles = {f for f in files if not any(f.startswith(d + "/") for d in top)}
    return sorted(top | singles)


def stage_modules(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """{stage name: the module its cmd runs} for every stage of dvc.yaml."""
    out = {}
    for name, spec in (yaml.safe_load(dvc_yaml.read_text())["stages"]).items():
        cmd = (spec.get("do") or spec)["cmd"]
        match = re.search(r"-m\s+([\w.]+)", cmd)
        if not match:
            raise SystemExit(f"{dvc_yaml}: stage {name}: its cmd runs no `python -m <module>`")
        out[name] = match.group(1)
    return out


def expected(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> dict[str, list[str]]:
    """{stage: the code deps dvc.yaml should list}."""
    return {s: as_deps(closure(m, root), root) for s, m in stage_modules(dvc_yaml).items()}


def declared(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """{stage: the code deps dvc.yaml lists}."""
    out = {}
    for name, spec in (yaml.safe_load(dvc_yaml.read_text())["stages"]).items():
        deps = (spec.get("do") or spec).get("deps") or []
        out[name] = sorted(d for d in deps if isinstance(d, str) and is_code(d))
    return out


def differences(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> str:
    """'' when dvc.yaml's code deps are the closures, else what to paste (or run)."""
    want, have = expected(dvc_yaml, root), declared(dvc_yaml)
    lines = []
    for stage, deps in want.items():
        if have.get(stage) != deps:
            missing = sorted(set(deps) - set(have.get(stage, [])))
            extra = sorted(set(have.get(stage, [])) - set(deps))
            lines.append(f"stage {stage}: missing {missing}, not imported {extra}; its code deps:")
            lines += [f"      - {d}" for d in deps]
    if lines:
        lines.append("(`python -m stages.deps --write` rewrites them in dvc.yaml)")
    return "\n".join(lines)


_KEY = re.compile(r"^(\s*)([\w@-]+):\s*(#.*)?$")


def rewrite(text: str, want: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's code deps replaced by `want[stage]`, placed where its
    first code dep was (else first); every other line, comments included, is kept."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage, in_stages, i = None, False, 0
    while i < len(lines):
        line = lines[i]
        key = _KEY.match(line)
        if key and not key.group(1):
            in_stages, stage = key.group(2) == "stages", None
        elif key and in_stages and len(key.group(1)) == 2:
            stage = key.group(2)
        if not (key and key.group(2) == "deps" and stage in want):
            out.append(line)
            i += 1
            continue
        out.append(line)
        indent = len(key.group(1))
        i += 1
        items, first_code = [], None
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            value = lines[i].strip().removeprefix("- ").split("#")[0].strip()
            if lines[i].lstrip().startswith("- ") and is_code(value):
                first_code = len(items) if first_code is None else first_code
            else:
                items.append(lines[i])
            i += 1
        pad = " " * (indent + 2)
        generated = [f"{pad}- {d}\n" for d in want[stage]]
        at = first_code if first_code is not None else 0
        out += items[:at] + generated + items[at:]
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.deps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is out of date")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    root = args.dvc_yaml.resolve().parent
    want = expected(args.dvc_yaml, root)
    if args.write:
        args.dvc_yaml.write_text(rewrite(args.dvc_yaml.read_text(), want))
        print(f"rewrote the code deps of {len(want)} stages in {args.dvc_yaml}")
        return 0
    if args.check:
        diff = differences(args.dvc_yaml, root)
        print(diff or "dvc.yaml's code deps are up to date")
        return 1 if diff else 0
    for stage, deps in want.items():
        print(f"{stage}:")
        print("".join(f"      - {d}\n" for d in deps), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
