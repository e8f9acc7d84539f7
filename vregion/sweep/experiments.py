"""A sweep's finished DVC experiments and what they committed, read through DVC's Python API.

Experiments are listed from their git refs (`dvc.repo.experiments.utils.exp_refs`, what
`dvc exp list --all-commits` reads), their params
with `dvc.api.params_show` and their metrics files with `dvc.api.read`: `dvc.api.metrics_show`
keeps numbers only, and the report needs the lists too (the region, the pruning curve).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

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


def experiments(
    repo: str | Path, any_baseline: bool = False, baseline: str | None = None
) -> dict[str, str]:
    """{experiment name: commit} for the experiments of the current commit; with
    `any_baseline`, of any commit, the current commit's first, then the newest. `baseline`: a
    commit other than HEAD (the one a running sweep queued its experiments on)."""
    with Repo(str(repo)) as dvc_repo:
        scm = dvc_repo.scm
        head = baseline or scm.get_rev()
        # the experiments' git refs, read without DVC's repo lock (`experiments.ls` takes it
        # and a running `dvc exp run` holds it), so a report can be written mid-sweep
        listed = [(ref.baseline_sha, ref.name, scm.get_ref(str(ref))) for ref in exp_refs(scm)]
        others = [
            (scm.resolve_commit(rev).commit_time, name, rev)
            for base, name, rev in listed
            if base != head and rev
        ]
    found = {name: rev for base, name, rev in listed if base == head and rev}
    if any_baseline:
        for _, name, rev in sorted(others, key=lambda t: -t[0]):
            found.setdefault(name, rev)
    return found


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
    any_baseline: bool = False,
    baseline: str | None = None,
) -> dict[str, str]:
    """{run name: experiment commit} for runs whose experiment exists with the run's params
    and every file of `metric_files` (name -> path, as dvc.yaml names them) the report reads
    (of this commit, or with `any_baseline` of any)."""
    done = {}
    for name, rev in experiments(repo, any_baseline, baseline).items():
        run = next((r for r in runs if r.name == name), None)
        if run is None:
            continue
        if committed_params(repo, rev) != expected_params(base_params, run):
            continue
        if all(committed_metrics(repo, rev, f) for f in metric_files.values()):
            done[name] = rev
    return done
