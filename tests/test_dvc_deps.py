"""dvc.yaml's deps and params cannot go stale: each stage's code deps are the import closure of
its module (stages.deps), a change to any project module makes `dvc status` mark exactly the
stages that import it, every params section a stage reads is declared, and dvc.yaml's `${}`
paths resolve for the stages as DVC resolves them."""

from __future__ import annotations

import ast
import contextlib
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from pipeline_repo import ROOT, init_git_dvc
from pydantic import BaseModel

from stages import _dvcfile, deps


def test_dvc_yaml_code_deps_are_the_import_closures():
    diff = deps.differences()
    assert not diff, f"dvc.yaml's code deps are out of date:\n{diff}"


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "vregion" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "vregion" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from ..c import x\nimport numpy\n")
    (tmp_path / "vregion" / "c.py").write_text("x = 1\n")
    (tmp_path / "vregion" / "unused.py").write_text("")
    found = deps.closure("vregion.sub.a", tmp_path)
    assert found == {
        "vregion/__init__.py",
        "vregion/sub/__init__.py",
        "vregion/sub/a.py",
        "vregion/sub/b.py",
        "vregion/c.py",
    }
    # a folder whose every file is in the closure is one dep; vregion/ is not (unused.py)
    assert deps.as_deps(found, tmp_path) == ["vregion/__init__.py", "vregion/c.py", "vregion/sub"]


def test_modules_that_read_files_beside_them_are_declared():
    """A module that finds files through `__file__` reads them at run time: DATA_FILES must say
    which (or none), so they become deps of the stages that import it."""
    readers = {
        path.relative_to(ROOT).as_posix()
        for package in deps.PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__file__" in path.read_text() and path.parent.name != "__pycache__"
    }
    readers -= {"stages/deps.py", "stages/_dvcfile.py"}  # tools locating dvc.yaml, not inputs
    assert readers <= set(deps.DATA_FILES), sorted(readers - set(deps.DATA_FILES))
    assert any(f.startswith("vregion/eval/tasks/") for f in deps.closure("stages.evaluate"))


def test_rewrite_replaces_only_code_deps():
    text = (ROOT / "dvc.yaml").read_text()
    want = deps.expected()
    assert deps.rewrite(text, want) == text  # up to date: nothing changes
    stale = text.replace("      - stages/region.py\n", "      - vregion/cli.py  # old\n", 1)
    assert stale != text and deps.rewrite(stale, want) == text


# --- params: every section a stage's own code reads is declared -----------------------------


def _fields(model: type[BaseModel]) -> dict[str, object]:
    return {name: f.annotation for name, f in model.model_fields.items()}


def _model_of(annotation) -> tuple[type[BaseModel] | None, bool]:
    """(the section model an annotation holds, whether it is a dict of them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return _model_of(args[1])[0], True
    if args and origin is not list:  # X | None
        for a in args:
            model, _ = _model_of(a)
            if model:
                return model, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _section_paths(model, prefix=()) -> dict[str, tuple[str, ...]]:
    """{config class name: its path in params} for the classes used once."""
    out, seen = {}, {}
    for name, annotation in _fields(model).items():
        sub, is_dict = _model_of(annotation)
        if sub and not is_dict:
            seen[sub.__name__] = seen.get(sub.__name__, 0) + 1
            out[sub.__name__] = (*prefix, name)
            for k, v in _section_paths(sub, (*prefix, name)).items():
                seen[k] = seen.get(k, 0) + 1
                out[k] = v
    return {k: v for k, v in out.items() if seen[k] == 1}


def _trim(chain: tuple[str, ...], model) -> tuple[str, ...]:
    """The part of an attribute chain that names params (a method or item after it is not)."""
    out = []
    for name in chain:
        if model is None or name not in model.model_fields:
            break
        out.append(name)
        model, is_dict = _model_of(model.model_fields[name].annotation)
        if is_dict:
            return (*out, "*")  # a dict's items: declared per item (e.g. data.sources.${key})
    return tuple(out)


def _chain(node: ast.AST) -> tuple[str | None, tuple[str, ...]]:
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), tuple(reversed(attrs))


def params_read(path: Path, params_model, classes: dict) -> set[tuple[str, ...]]:
    """Every params path the functions of `path` read: attribute chains on a loaded params
    object (`p = load_params(...)`, an argument `p` or annotated with a config class) or on a
    name bound to a part of it (`f = p.finetune`, `d, emb = p.data, p.model.embedded`)."""
    tree = ast.parse(path.read_text())
    found: set[tuple[str, ...]] = set()
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
        roots: dict[str, tuple[str, ...]] = {}
        aliased = set()  # `f = p.finetune` reads nothing yet: what `f` is used for counts
        for arg in fn.args.args + fn.args.kwonlyargs:
            kind = ast.unparse(arg.annotation) if arg.annotation else ""
            if arg.arg == "p" or kind == "Params":
                roots[arg.arg] = ()
            elif kind in classes:
                roots[arg.arg] = classes[kind]
        for node in ast.walk(fn):
            if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                continue
            target, value = node.targets[0], node.value
            pairs = (
                list(zip(target.elts, value.elts, strict=False))
                if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                else [(target, value)]
            )
            for t, v in pairs:
                if not isinstance(t, ast.Name):
                    continue
                if isinstance(v, ast.Call) and getattr(v.func, "id", "") == "load_params":
                    roots[t.id] = ()
                else:
                    base, attrs = _chain(v)
                    if base in roots and attrs:
                        roots[t.id] = roots[base] + attrs
                        aliased.add(id(v))
        inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
        for node in ast.walk(fn):
            if id(node) in aliased:
                continue
            if isinstance(node, ast.Attribute) and id(node) not in inner:
                base, attrs = _chain(node)
                if base in roots:
                    found.add(_trim(roots[base] + attrs, params_model))
            elif isinstance(node, ast.Name) and node.id in roots and id(node) not in inner:
                if roots[node.id] and isinstance(node.ctx, ast.Load):  # a section passed whole
                    found.add(_trim(roots[node.id], params_model))
    return {c for c in found if c}


def _covered(chain: tuple[str, ...], declared: list[tuple[str, ...]]) -> bool:
    return any(
        len(d) <= len(chain) and all(a in (b, "*") for a, b in zip(d, chain, strict=False))
        for d in declared
    )


def test_every_params_section_a_stage_reads_is_declared():
    from vregion.config import Params

    classes = _section_paths(Params)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for stage, module in deps.stage_modules().items():
        spec = stages[stage].get("do") or stages[stage]
        declared = [
            tuple(e.replace("${key}", "*").split("."))
            for e in spec.get("params") or []
            if isinstance(e, str)
        ]
        own = sorted(f for f in deps.closure(module) if f.startswith("stages/"))
        read = set().union(*(params_read(ROOT / f, Params, classes) for f in own))
        gaps = sorted(".".join(c) for c in read if not _covered(c, declared))
        if gaps:
            missing[stage] = gaps
    assert not missing, f"params read but not declared in dvc.yaml (add to `params:`): {missing}"


def test_params_scan_sees_aliases_and_sections_passed_whole(tmp_path):
    from vregion.config import Params

    source = tmp_path / "s.py"
    source.write_text(
        "def run(params):\n"
        "    p = load_params(params)\n"
        "    f, d = p.finetune, p.data\n"
        "    go(f.lora_r, d.sources.get('x'), p.model.embedded.image_size, p.align)\n"
        "def helper(p: Params, cfg: FinetuneConfig):\n"
        "    return p.prune.layers + cfg.loader.workers\n"
    )
    assert params_read(source, Params, _section_paths(Params)) == {
        ("finetune", "lora_r"),
        ("data", "sources", "*"),  # a dict's items: declared one by one
        ("model", "embedded", "image_size"),
        ("align",),  # passed whole to the library
        ("prune", "layers"),
        ("finetune", "loader", "workers"),
    }
    assert _covered(("data", "sources", "*"), [("data", "sources", "*")])
    assert not _covered(("model", "base"), [("model", "seed"), ("align",)])


# --- DVC itself: resolution, and `dvc status` after a one-line change of each module --------


@pytest.fixture(scope="module")
def committed_repo(tmp_path_factory):
    """The project's code, dvc.yaml and params (plus one real source, so ingest@demo exists)
    in a git + DVC repo, every output a placeholder file, every stage committed as if run."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("deps")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in deps.PACKAGES:
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["sources"] = {"demo": {"records": "demo.jsonl", "image_root": "images"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "demo.jsonl").write_text("[]\n")
    init_git_dvc(repo)
    with contextlib.chdir(repo), Repo(str(repo)) as dvc:
        for stage in dvc.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"placeholder of {stage.addressing}\n")
        dvc.commit(force=True)
    return repo


def test_stage_paths_resolve_as_dvc_resolves_them(committed_repo):
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with contextlib.chdir(committed_repo), Repo(str(committed_repo)) as dvc:
        stages = {s.addressing: s for s in dvc.index.stages}
    assert "ingest@demo" in stages and len(stages) == len(deps.stage_modules())
    for address, stage in stages.items():
        name, _, key = address.partition("@")
        mine = _dvcfile.stage(name, key or None, committed_repo / "dvc.yaml")
        assert mine["cmd"] == stage.cmd, address
        outs = [
            *_dvcfile.entry_paths(mine.get("outs")),
            *_dvcfile.entry_paths(mine.get("metrics")),
            *_dvcfile.entry_paths(mine.get("plots")),
        ]
        assert outs == [str(o) for o in stage.outs], address
        files = [str(d) for d in stage.deps if not isinstance(d, ParamsDependency)]
        assert _dvcfile.entry_paths(mine.get("deps")) == files, address


def test_a_one_line_change_to_any_module_reruns_exactly_its_importers(committed_repo):
    from dvc.repo import Repo

    closures = {s: deps.closure(m) for s, m in deps.stage_modules().items()}
    files = sorted(
        p.relative_to(committed_repo).as_posix()
        for package in deps.PACKAGES
        for p in (committed_repo / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    imported = [f for f in files if any(f in c for c in closures.values())]
    unused = [f for f in files if f not in imported]
    assert "vregion/data/text_skill.py" in imported and "stages/deps.py" in unused

    def touch(paths: list[str]) -> dict[str, bytes]:
        before = {f: (committed_repo / f).read_bytes() for f in paths}
        for f in paths:
            with (committed_repo / f).open("ab") as out:
                out.write(b"\n# changed\n")
        return before

    with contextlib.chdir(committed_repo), Repo(str(committed_repo)) as dvc:
        assert dvc.status() == {}
        # What `dvc status` asks each stage, on one parse of dvc.yaml (status re-parses it per
        # call); checked against `dvc status` itself for the first module.
        stages = list(dvc.index.stages)
        wrong = {}
        for i, f in enumerate(imported):
            before = touch([f])
            with dvc.lock:
                changed = {s.addressing for s in stages if s.changed_deps()}
            if i == 0:
                assert changed == set(dvc.status()), f
            stale = {s.partition("@")[0] for s in changed}
            (committed_repo / f).write_bytes(before[f])
            want = {s for s, c in closures.items() if f in c}
            if stale != want:
                wrong[f] = {"stale": sorted(stale), "importers": sorted(want)}
        assert not wrong, wrong
        before = touch(unused)  # no stage imports these: all at once, nothing reruns
        try:
            assert dvc.status() == {}, unused
        finally:
            for f, data in before.items():
                (committed_repo / f).write_bytes(data)
        assert dvc.status() == {}


def test_each_stage_cmd_passes_every_path_its_flow_takes():
    """`dvc repro` runs each flow with all its path parameters, and `python -m stages.X` by
    hand finds them all in dvc.yaml (read from the source: importing every stage costs torch)."""
    for stage, module in deps.stage_modules().items():
        tree = ast.parse(deps.module_file(module).read_text())
        (flow,) = [
            n
            for n in tree.body
            if isinstance(n, ast.FunctionDef)
            and any("flow" in ast.unparse(d) for d in n.decorator_list)
        ]
        names = [a.arg for a in flow.args.args if a.arg not in ("params", "source")]
        key = "demo" if stage == "ingest" else None
        argv = _dvcfile.command_args(stage, key)
        given = [a[2:].replace("-", "_") for a in argv if a.startswith("--")]
        assert given == names, f"{stage}: dvc.yaml's cmd passes {given}, the flow takes {names}"
    assert _dvcfile.command_args("ingest", "demo")[0] == "demo"
