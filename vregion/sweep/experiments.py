"""A sweep's finished DVC experiments and what they committed, read through DVC's Python API.

Experiments are listed from their git refs (`dvc.repo.experiments.utils.exp_refs`, what
`dvc exp list --all-commits` reads), their params
with `dvc.api.params_show` and their metrics files with `dvc.api.read`: `dvc.api.metrics_show`
keeps numbers only, and the report needs the lists too (the region, the pruning curve).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import dvc.api
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.repo.experiments.utils import exp_refs

from vregion.eval.questions import parse_question_results
from vregion.sweep.plan import Run, expected_params


def head_commit(repo: str | Path) -> str:
    """The commit checked out in `repo` (the baseline its experiments are queued on)."""
    with Repo(str(repo)) as dvc_repo:
        return dvc_repo.scm.get_rev()


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
    try:
        return json.loads(dvc.api.read(path, repo=str(repo), rev=rev))
    except (DvcException, FileNotFoundError):
        return None


def committed_questions(repo: str | Path, rev: str, path: str) -> list[dict] | None:
    """Per-question results (`vregion.eval.questions`) as experiment commit `rev` holds them,
    or None if it has none (experiments made before evaluate wrote them)."""
    try:
        text = dvc.api.read(path, repo=str(repo), rev=rev)
    except (DvcException, FileNotFoundError):
        return None
    return parse_question_results(text, f"{rev[:8]}:{path}")


def finished(
    repo: str | Path,
    runs: Sequence[Run],
    base_params: dict,
    metric_files: Mapping[str, str],
    baseline: str | None = None,
) -> dict[str, str]:
    """{run name: experiment commit} for runs whose experiment exists with the run's params
    and every file of `metric_files` (name -> path, as dvc.yaml names them) the report reads,
    on a commit with this commit's pipeline (`experiments`)."""
    done: dict[str, str] = {}
    by_name = {r.name: r for r in runs}
    for exp in experiments(repo, baseline):
        run = by_name.get(exp.name)
        if run is None or exp.name in done:
            continue
        if committed_params(repo, exp.rev) != expected_params(base_params, run):
            continue
        if all(committed_metrics(repo, exp.rev, f) for f in metric_files.values()):
            done[exp.name] = exp.rev
    return done
