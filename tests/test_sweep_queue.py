"""The sweep survives a `dvc queue stop` issued when no queue worker was alive.

DVC's broker keeps that shutdown on disk for the worker it was meant for; the next worker
(same node name) would read it and quit after one experiment, leaving `dvc exp run --run-all`
waiting forever. A real DVC queue in a temporary git repo, with a one-line stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from pipeline_repo import DVC, init_git_dvc, pipeline_env, run

from flows.sweep import drop_stale_shutdowns
from vregion.sweep.experiments import (
    committed_metrics,
    committed_params,
    experiments,
    finished,
    record_experiments,
)
from vregion.sweep.plan import Run

SQUARE = """import json, yaml
x = yaml.safe_load(open("params.yaml"))["x"]
json.dump({"y": x * x}, open("m.json", "w"))
"""
STAGE = {
    "stages": {
        "square": {
            "cmd": "python square.py",
            "deps": ["square.py"],
            "params": ["x"],
            "metrics": [{"m.json": {"cache": False}}],
        }
    }
}


def _workers_alive(repo: Path) -> bool:
    """Whether a queue worker DVC spawned for this repo (its pid files) is still running."""
    for pidfile in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        try:
            os.kill(int(pidfile.read_text().strip()), 0)
        except (ValueError, ProcessLookupError):
            continue
        return True
    return False


def _pending_control_messages(repo: Path) -> list[str]:
    inbox = repo / ".dvc" / "tmp" / "exps" / "celery" / "broker" / "in"
    return [p.name for p in inbox.glob("*.celery.pidbox.msg")] if inbox.is_dir() else []


def _run_all(repo: Path, env: dict, timeout: int = 240) -> None:
    try:
        run([*DVC, "exp", "run", "--run-all", "--jobs", "1"], repo, env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"`dvc exp run --run-all` still waiting after {timeout} s") from err


def _commit_square_stage(repo: Path, env: dict) -> None:
    """The one-line stage (`square.py`, param x=0) built and committed."""
    (repo / "params.yaml").write_text("x: 0\n")
    (repo / "square.py").write_text(SQUARE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    run([*DVC, "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "square"], repo, env)


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_a_stale_queue_stop_does_not_strand_the_next_sweep(tmp_path):
    repo = init_git_dvc(tmp_path)
    env = pipeline_env(repo)  # the spawned queue worker runs `dvc` from PATH
    _commit_square_stage(repo, env)

    # a first sweep leaves its worker bound to the broker's broadcast exchange
    run([*DVC, "exp", "run", "--queue", "-n", "one", "-S", "x=1"], repo, env)
    _run_all(repo, env)
    deadline = time.monotonic() + 120  # the worker idles 10 s after its queue empties
    while _workers_alive(repo) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _workers_alive(repo), "the first sweep's queue worker did not exit"

    # `dvc queue stop` with no worker alive: the shutdown waits in the broker
    run([*DVC, "queue", "stop"], repo, env)
    assert _pending_control_messages(repo), "no stale shutdown: the scenario did not arise"

    for name, x in (("two", 2), ("three", 3)):
        run([*DVC, "exp", "run", "--queue", "-n", name, "-S", f"x={x}"], repo, env)
    assert drop_stale_shutdowns(repo) >= 1
    assert not _pending_control_messages(repo)
    _run_all(repo, env)

    show = [*DVC, "exp", "show", "--json"]
    shown = json.loads(
        subprocess.run(
            show, cwd=repo, env=env, capture_output=True, text=True, timeout=120, check=True
        ).stdout
    )
    names = {
        exp["name"]: exp["data"]["metrics"]["m.json"]["data"]["y"]
        for base in shown
        for group in base.get("experiments") or []
        for exp in group["revs"]
        if exp.get("name")
    }
    assert names == {"one": 1, "two": 4, "three": 9}
    # what the sweep's report reads, through DVC's Python API: each experiment's own commit
    found = {e.name: e.rev for e in experiments(repo)}
    assert set(found) == {"one", "two", "three"}
    for name, x in (("one", 1), ("two", 2), ("three", 3)):
        assert committed_params(repo, found[name]) == {"x": x}
        assert committed_metrics(repo, found[name], "m.json") == {"y": x * x}
    assert committed_metrics(repo, found["one"], "metrics/absent.json") is None
    assert drop_stale_shutdowns(repo) == 0  # nothing left to drop


def test_finished_runs_outlive_commits_and_clones_that_leave_the_pipeline_alone(tmp_path):
    """A sweep spans sessions and machines, and sessions commit: a finished experiment is
    recorded in results/runs/<name>/, and the record counts on a later commit, and in a clone
    that never saw the experiment, as long as dvc.yaml and every stage dependency are
    unchanged since; no longer once a stage's code changed (its numbers would be the old
    code's)."""
    (tmp_path / "here").mkdir()
    repo = init_git_dvc(tmp_path / "here")
    env = pipeline_env(repo)
    _commit_square_stage(repo, env)
    run([*DVC, "exp", "run", "-n", "one", "-S", "x=3"], repo, env)
    run([*DVC, "exp", "run", "-n", "two", "-S", "x=5"], repo, env)
    run(["git", "reset", "-q", "--hard"], repo, env)  # the workspace back to the commit
    one, two = Run("one", {"x": 3}, []), Run("two", {"x": 4}, [])  # two was run with x=5
    records = "results/runs"

    def done(where: Path = repo, shared: tuple[str, ...] = ()) -> list[str]:
        return list(finished(where, [one, two], {"x": 0}, {"m": "m.json"}, records, None, shared))

    assert done() == []  # nothing recorded yet
    assert record_experiments(repo, [one, two], {"x": 0}, {"m": "m.json"}, records) == ["one"]
    assert record_experiments(repo, [one, two], {"x": 0}, {"m": "m.json"}, records) == []
    record = finished(repo, [one], {"x": 0}, {"m": "m.json"}, records)["one"]
    assert record.params() == {"x": 3} and record.metrics("m.json") == {"y": 9}
    assert json.loads((repo / records / "one" / "run.json").read_text())["rev"] == record.rev
    assert not (repo / records / "two").exists()  # other params than the plan's
    assert not list((repo / records).glob(".*"))  # no half-written record left

    (repo / "README.md").write_text("notes\n")
    run(["git", "add", "-A"], repo, env)  # the record with the notes
    run(["git", "commit", "-qm", "docs and the finished run"], repo, env)
    assert done() == ["one"]  # the experiment's baseline is the previous commit
    # another machine: a clone with no experiment refs still has the finished run
    clone = tmp_path / "there"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert experiments(clone) == []
    assert done(clone) == ["one"]
    # the runs are compared with each other, so a record counts only where the shared stages'
    # outputs are the ones it was made from (a clone that rebuilt them on another CPU has
    # other hashes in dvc.lock)
    made_from = (clone / records / "one" / "dvc.lock").read_text()
    (clone / "dvc.lock").write_text(made_from)
    assert done(clone, shared=("square",)) == ["one"]
    md5 = yaml.safe_load(made_from)["stages"]["square"]["outs"][0]["md5"]
    (clone / "dvc.lock").write_text(made_from.replace(md5, "f" * 32))
    assert done(clone, shared=("square",)) == []
    assert done(clone) == ["one"]
    # a damaged record is not the run (it is made again), and stops nothing
    meta = clone / records / "one" / "run.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])
    assert done(clone) == []
    meta.write_text(good)
    # a record altered by hand to other params is not the run
    (clone / records / "one" / "params.yaml").write_text("x: 4\n")
    assert done(clone) == []

    # the same params asked of other code: the run is not finished on this commit
    (repo / "square.py").write_text(SQUARE + "# the stage changed\n")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "stage code"], repo, env)
    assert done() == []
    assert experiments(repo) == []
