"""A sweep's finished runs: DVC experiments, and the records of them the sweep keeps in git.

Experiments are listed from their git refs (`dvc.repo.experiments.utils.exp_refs`, what
`dvc exp list --all-commits` reads), their params
with `dvc.api.params_show` and their metrics files with `dvc.api.read`: `dvc.api.metrics_show`
keeps numbers only, and the report needs the lists too (the region, the pruning curve).

Experiment refs live in one clone until `dvc exp push`, so each finished experiment is also
copied, verbatim, into a run record (`results/runs/<name>/`, `RunRecord`): committed with the
report, it carries the run to every clone of the branch, and the sweep there reruns only what
no record holds.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import dvc.api
import yaml
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.repo.experiments.utils import exp_refs

from vregion.eval.questions import parse_question_results
from vregion.sweep.plan import Run, expected_params

log = logging.getLogger(__name__)


def head_commit(repo: str | Path) -> str:
    """The commit checked out in `repo` (the baseline its experiments are queued on)."""
    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.scm.get_rev()


def stages_upto(repo: str | Path, target: str) -> list[str]:
    """The names of stage `target` and of every stage it depends on, as dvc.yaml chains them."""
    with Repo(str(repo)) as dvc_repo:
        return sorted(s.name for s in dvc_repo.stage.collect(target, with_deps=True))


def locked_outputs(lock_text: str | None, stages: Sequence[str]) -> dict[str, str] | None:
    """{output path: hash} of `stages` in a dvc.lock's text; None without a lock or a stage."""
    locked = (yaml.safe_load(lock_text) or {}).get("stages", {}) if lock_text else {}
    if any(name not in locked for name in stages):
        return None
    return {o["path"]: o.get("md5") for name in stages for o in locked[name].get("outs", [])}


def pipeline_inputs(repo: str | Path) -> list[str]:
    """dvc.yaml and every path a stage of it depends on (code, params.yaml, data), as DVC
    resolves them: what must be unchanged for an experiment to stand for this commit's run."""
    with Repo(str(repo)) as dvc_repo:
        deps = {dep.def_path for stage in dvc_repo.index.stages for dep in stage.deps}
    return ["dvc.yaml", *sorted(deps)]


def same_pipeline(repo: str | Path, commit: str, head: str, inputs: Sequence[str]) -> bool:
    """Whether `commit` holds the same `inputs` (`pipeline_inputs`) as `head` in git. Paths
    git does not track (DVC outputs) are compared through the code and params that make them."""
    if commit == head:
        return True
    diff = subprocess.run(
        ["git", "diff", "--quiet", commit, head, "--", *inputs], cwd=repo, capture_output=True
    )
    if diff.returncode > 1:  # an unknown commit (a shallow clone): not provably the same
        return False
    return diff.returncode == 0


class Experiment(NamedTuple):
    name: str
    rev: str
    """the experiment's commit (what it committed: params, metrics)"""
    ref: str
    """its git ref, which names it to `dvc exp remove` whatever the checked-out commit"""
    baseline: str
    """the commit it was queued on"""


def experiments(repo: str | Path, baseline: str | None = None) -> list[Experiment]:
    """The experiments whose baseline commit runs the same pipeline as HEAD (`same_pipeline`),
    HEAD's own first, then the newest. A commit that touched only the README, tests or the
    sweep's own code keeps every finished run; one that changed a stage's code or params.yaml
    starts afresh. `baseline`: a commit other than HEAD (the one a running sweep queued its
    experiments on)."""
    with Repo(str(repo)) as dvc_repo:
        scm = dvc_repo.scm
        head = baseline or scm.get_rev()
        # the experiments' git refs, read without DVC's repo lock (`experiments.ls` takes it
        # and a running `dvc exp run` holds it), so a report can be written mid-sweep
        listed = [
            Experiment(ref.name, rev, str(ref), ref.baseline_sha)
            for ref in exp_refs(scm)
            if (rev := scm.get_ref(str(ref)))
        ]
        times = {e.rev: scm.resolve_commit(e.rev).commit_time for e in listed}
    inputs = pipeline_inputs(repo)
    same = {b for b in {e.baseline for e in listed} if same_pipeline(repo, b, head, inputs)}
    return sorted(
        (e for e in listed if e.baseline in same),
        key=lambda e: (e.baseline != head, -times[e.rev]),
    )


def committed_params(repo: str | Path, rev: str) -> dict | None:
    """params.yaml as experiment commit `rev` holds it, or None if it has none."""
    try:
        return dvc.api.params_show("params.yaml", repo=str(repo), rev=rev)
    except DvcException:
        return None


def committed_metrics(repo: str | Path, rev: str, path: str) -> dict | None:
    """A metrics JSON file as experiment commit `rev` holds it, or None if it has none."""
    text = _read(repo, rev, path)
    return json.loads(text) if text is not None else None


def _read(repo: str | Path, rev: str, path: str) -> str | None:
    try:
        return dvc.api.read(path, repo=str(repo), rev=rev)
    except (DvcException, FileNotFoundError):
        return None


RECORD = "run.json"


class RunRecord(NamedTuple):
    """A finished run as the sweep keeps it in git: a folder holding what its experiment
    committed (params.yaml, the metrics files the report reads, the per-question results, at
    their paths in the repo) and `run.json` naming the experiment's commit and baseline."""

    name: str
    rev: str
    """the experiment's commit (it may exist only where the run was made)"""
    baseline: str
    """the commit the experiment was queued on (on the branch, so every clone has it)"""
    path: Path

    def read(self, file: str) -> str | None:
        target = self.path / file
        return target.read_text() if target.is_file() else None

    def params(self) -> dict | None:
        text = self.read("params.yaml")
        return yaml.safe_load(text) if text is not None else None

    def metrics(self, file: str) -> dict | None:
        text = self.read(file)
        return json.loads(text) if text is not None else None

    def questions(self, file: str) -> list[dict] | None:
        text = self.read(file)
        return parse_question_results(text, str(self.path / file)) if text is not None else None


def record_experiments(
    repo: str | Path,
    runs: Sequence[Run],
    base_params: dict,
    metric_files: Mapping[str, str],
    records: str | Path,
    questions: str | None = None,
    baseline: str | None = None,
    shared: Sequence[str] = (),
) -> list[str]:
    """Copy each finished experiment of `runs` (its params are the run's, it has every file of
    `metric_files`, its baseline runs this commit's pipeline: `experiments`) that no valid
    record holds yet (`finished`) into `records`/<name>/: params.yaml, dvc.lock, those files,
    and `questions`/index.json with the files it lists. A record is written whole or not at
    all. Returns the names recorded now."""
    records = Path(repo) / records
    have = finished(repo, runs, base_params, metric_files, records, baseline, shared)
    by_name = {r.name: r for r in runs}
    written: list[str] = []
    for exp in experiments(repo, baseline):
        run = by_name.get(exp.name)
        if run is None or exp.name in have or exp.name in written:
            continue
        # judged by the same parse `finished` applies to the copy, so a record once written
        # counts (a different parse could rewrite it at every tick)
        params = _read(repo, exp.rev, "params.yaml")
        if params is None or yaml.safe_load(params) != expected_params(base_params, run):
            continue
        files = {f: _read(repo, exp.rev, f) for f in ["dvc.lock", *metric_files.values()]}
        if not all(files.values()):
            continue
        files["params.yaml"] = params
        index = questions and _read(repo, exp.rev, f"{questions}/index.json")
        if index:
            files[f"{questions}/index.json"] = index
            for name in json.loads(index)["files"]:
                text = _read(repo, exp.rev, f"{questions}/{name}")
                if text is not None:
                    files[f"{questions}/{name}"] = text
        meta = {"name": exp.name, "rev": exp.rev, "baseline": exp.baseline}
        files[RECORD] = json.dumps(meta, indent=2) + "\n"
        staging = records / f".{exp.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for file, text in files.items():
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            (staging / file).write_text(text)
        shutil.rmtree(records / exp.name, ignore_errors=True)  # a stale record of this name
        staging.rename(records / exp.name)
        written.append(exp.name)
    return written


def finished(
    repo: str | Path,
    runs: Sequence[Run],
    base_params: dict,
    metric_files: Mapping[str, str],
    records: str | Path,
    baseline: str | None = None,
    shared: Sequence[str] = (),
) -> dict[str, RunRecord]:
    """{run name: record} for the records in `records` of `runs` that count on this commit:
    the run's params, every file of `metric_files`, a baseline whose pipeline is HEAD's (or
    `baseline`'s: `same_pipeline`), and the `shared` stages' outputs of this workspace's
    dvc.lock (the runs are compared with each other, so they must tune the same aligned
    model: one rebuilt on another CPU is not the same, `README` Determinism). A record made by
    other code, params or shared outputs does not count, and the run is made again."""
    folder = Path(repo) / records
    by_name = {r.name: r for r in runs}
    head = baseline or head_commit(repo)
    inputs: list[str] | None = None
    lock = Path(repo) / "dvc.lock"
    ours = locked_outputs(lock.read_text() if lock.is_file() else None, shared)
    done: dict[str, RunRecord] = {}
    for meta_file in sorted(folder.glob(f"*/{RECORD}")):
        if meta_file.parent.name not in by_name:
            continue
        run = by_name[meta_file.parent.name]
        try:
            meta = json.loads(meta_file.read_text())
            record = RunRecord(run.name, meta["rev"], meta["baseline"], meta_file.parent)
            params = record.params()
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            log.warning(
                "%s: unreadable run record (%s); %s will be made again",
                meta_file.parent,
                err,
                run.name,
            )
            continue
        if meta.get("name") != run.name or params != expected_params(base_params, run):
            continue
        if not all(record.read(f) is not None for f in metric_files.values()):
            continue
        if shared and (ours is None or locked_outputs(record.read("dvc.lock"), shared) != ours):
            continue
        inputs = inputs if inputs is not None else pipeline_inputs(repo)
        if same_pipeline(repo, record.baseline, head, inputs):
            done[run.name] = record
    return done
