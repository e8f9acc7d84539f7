"""The comparison sweep: real queued DVC experiments in a temporary git repo, on embedded-tiny.

One small sweep (`sizes` and `pruning` on a 4-layer LLM: the 1-layer uniform region, 2 layers,
and all layers) runs for real, in a copy of the pipeline the session built (its params are the
uniform run's); then the checks users rely on: `dvc exp show` lists every run with its params
and metrics, no experiment reran a stage whose inputs it shares with another (DVC restored them
from its cache), the report's numbers are the ones in the committed metrics files, and a rerun
reuses every finished run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pipeline_repo import DVC, ROOT, own_site_cache, pipeline_env, run

from vregion.sweep.plan import plan_runs


def test_plan_shares_runs_between_sweeps_and_knows_every_strategy():
    runs = plan_runs(30, ["block_influence", "angular_distance"])
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    assert names[:2] == ["all-layers", "uniform"]
    for name in ("bottom", "top", "middle", "bottom-top", "random", "top-block-influence"):
        assert name in names
    assert [n for n in names if n.startswith("uniform-")] == [
        "uniform-1",
        "uniform-2",
        "uniform-4",
        "uniform-16",
    ]
    by_name = {r.name: r for r in runs}
    # 8 of 30 layers is the strategy sweep's uniform run: one run, three labels
    assert by_name["uniform"].labels == [
        ("strategies", "uniform"),
        ("sizes", "8 layers"),
        ("pruning", "region-tuned (uniform)"),
    ]
    # the all-layer model is pruned outside the uniform region, as in the paper
    assert by_name["all-layers"].overrides["prune.protect"] == [1, 5, 9, 13, 16, 20, 24, 28]
    assert by_name["top"].overrides["evaluate.prune_curve"] == []
    assert 'region.strategy="topk:angular_distance"' in by_name["top-angular-distance"].set_params()
    with pytest.raises(ValueError, match="unknown sweep"):
        plan_runs(30, [], ["sizes", "nope"])


HOLD_DVC_LOCK = (
    "import time\n"
    "from dvc.repo import Repo\n"
    "repo = Repo('.')\n"
    "repo.lock.lock()\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def _flow_runs(repo, env) -> list[tuple[str, str]]:
    script = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        runs = await c.read_flow_runs(limit=200)\n"
        "        flows = {f.id: f.name for f in await c.read_flows()}\n"
        "        for r in runs: print(flows[r.flow_id], r.state_type.value)\n"
        "asyncio.run(main())\n"
    )
    out = run([sys.executable, "-c", script], repo, env)
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def swept(built_pipeline, tmp_path_factory):
    repo = built_pipeline.clone(tmp_path_factory.mktemp("sweep"))
    env = pipeline_env(repo)
    cmd = [sys.executable, "-m", "flows.sweep", "run", "--repo", str(repo)]
    # two experiments at a time: most of a tiny stage is process start-up, so 2 cores overlap
    cmd += ["--sweeps", "sizes", "pruning", "--jobs", "2"]
    env["PYTHONPATH"] = str(ROOT)  # flows/ is not copied into the sandbox
    first = run(cmd, repo, env, timeout=1800)
    return repo, env, cmd, first


@pytest.mark.slow  # the `swept` fixture runs a real sweep (minutes)
def test_sweep_runs_every_experiment_and_shares_the_upstream_stages(swept):
    repo, env, _, first = swept
    assert "wrote" in first and "missing: []" in first
    shown = json.loads(run([*DVC, "exp", "show", "--json"], repo, env))
    exps = {
        e["name"]: rev["data"]
        for baseline in shown
        for e in baseline.get("experiments") or []
        for rev in e["revs"]
    }
    assert set(exps) == {"uniform", "uniform-2", "all-layers"}, list(exps)
    for name, data in exps.items():
        params = data["params"]["params.yaml"]["data"]
        metrics = data["metrics"]
        assert "metrics/eval.json" in metrics and "metrics/train.json" in metrics, name
        strategy = params["region"]["strategy"]
        assert strategy == ("all" if name == "all-layers" else "uniform")
    regions = {
        name: exps[name]["metrics"]["metrics/region.json"]["data"]["region_size"] for name in exps
    }
    assert regions == {"uniform": 1, "uniform-2": 2, "all-layers": 4}
    seen = _flow_runs(repo, env)
    count = {
        name: sum(1 for n, s in seen if n == name and s == "COMPLETED")
        for name in {n for n, _ in seen}
    }
    # base..probe were built before the sweep and never reran; the uniform run's params are
    # the built commit's, so DVC restored its region..prune (evaluate reran: its harness
    # folder is an uncached output); the other two ran region onwards
    for stage in ("base", "prepare", "align", "probe"):
        assert stage not in count, count
    for stage in ("region", "finetune", "prune"):
        assert count.get(stage) == 2, count
    assert count.get("evaluate") == 3, count
    assert ("vregion-sweep", "COMPLETED") in seen


@pytest.mark.slow  # the `swept` fixture runs a real sweep (minutes)
def test_report_numbers_are_the_committed_metrics(swept):
    repo, _, _, _ = swept
    result = json.loads((repo / "results" / "comparison.json").read_text())
    markdown = (repo / "results" / "comparison.md").read_text()
    assert result["missing"] == []
    for name, row in result["runs"].items():
        committed = yaml.safe_load(run(["git", "show", f"{row['rev']}:metrics/eval.json"], repo))
        tuned = committed["models"]["tuned"]
        train = yaml.safe_load(run(["git", "show", f"{row['rev']}:metrics/train.json"], repo))
        assert row["accuracy"] == tuned["visual"]["overall"]["accuracy"], name
        assert row["blind"] == tuned["visual"]["overall"]["blind"], name
        assert row["text_mc_vs_base"] == tuned["text"]["mc_accuracy_vs_base"], name
        assert row["seconds_per_step"] == train["seconds_per_step"], name
        assert row["trainable_params"] == train["trainable_params"], name
        assert f"{row['accuracy']:.3f} ± " in markdown
        assert f"{row['trainable_params']:,} (" in markdown
    runs = result["runs"]
    base = runs["all-layers"]
    assert runs["all-layers"]["retention_percent"] == 100.0
    expected = round(100 * runs["uniform-2"]["accuracy"] / base["accuracy"], 1)
    assert runs["uniform-2"]["retention_percent"] == expected
    # region-tuned has fewer trainable parameters than all-layer tuning
    assert runs["uniform"]["trainable_params"] < base["trainable_params"]
    # both pruning curves, 0..3 layers outside the protected uniform region (1 of 4 layers)
    for name in ("uniform", "all-layers"):
        assert [c["layers_removed"] for c in runs[name]["prune_curve"]] == [0, 1, 2, 3]
    assert (repo / "results" / "plots" / "pruning_curves.png").stat().st_size > 10_000
    assert (repo / "results" / "plots" / "retention_vs_layers.png").stat().st_size > 10_000
    # the claims the sizes and pruning sweeps can check, with the paper's figures beside ours
    assert "## The paper's claims" in markdown
    claims = {c["claim"]: c for c in result["claims"]}
    falls = claims["Retention falls as fewer layers are tuned (1 < 2 < 4 < 8)"]
    assert falls["paper"] == "1: 91.9%, 2: 96.5%"
    one, two = runs["uniform"], runs["uniform-2"]
    assert falls["ours"] == (
        f"1: {one['retention_percent']:.1f} ± {one['retention_se']:.1f}%, "
        f"2: {expected:.1f} ± {two['retention_se']:.1f}%"
    )
    pruning = next(c for k, c in claims.items() if k.startswith("Pruning outside the region"))
    # decided on the per-question answers each experiment committed (paired bootstrap)
    assert "all-layer minus region-tuned drop" in pruning["ours"] and "95% CI" in pruning["ours"]


@pytest.mark.slow  # the `swept` fixture runs a real sweep (minutes)
def test_another_machine_gets_the_finished_runs_and_reruns_none(swept, tmp_path):
    """The finished runs' records committed and pushed with the branch (the shared stages'
    outputs to a DVC remote), then a fresh clone elsewhere with `dvc pull` and no experiment
    refs: the sweep there finds every run finished and runs none, and its report decides the
    claims from the same per-question results."""
    repo, env, _, _ = swept
    records = sorted(p.name for p in (repo / "results" / "runs").iterdir())
    assert records == ["all-layers", "uniform", "uniform-2"]
    for name in records:  # verbatim copies of what each experiment committed
        record = repo / "results" / "runs" / name
        rev = json.loads((record / "run.json").read_text())["rev"]
        for path in ("params.yaml", "metrics/eval.json", "metrics/questions/index.json"):
            assert (record / path).read_text() == run(["git", "show", f"{rev}:{path}"], repo)
    origin, store, clone = tmp_path / "origin.git", tmp_path / "dvc-store", tmp_path / "clone"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    run(["git", "add", "results"], repo)
    run(["git", "commit", "-qm", "the sweep's records and report"], repo)
    run(["git", "push", "-q", str(origin), "HEAD:refs/heads/main"], repo)
    run([*DVC, "remote", "add", "--local", "-d", "store", str(store)], repo)
    run([*DVC, "push", "-q"], repo, timeout=300)  # the shared stages' outputs
    run(["git", "clone", "-q", "-b", "main", str(origin), str(clone)], tmp_path)
    run([*DVC, "remote", "add", "--local", "-d", "store", str(store)], clone)
    own_site_cache(clone)
    run([*DVC, "pull", "-q"], clone, timeout=300)
    env = pipeline_env(clone)
    env["PYTHONPATH"] = str(ROOT)
    assert run([*DVC, "exp", "list", "--all-commits", "--name-only"], clone, env).strip() == ""
    sweep = [sys.executable, "-m", "flows.sweep", "run", "--repo", str(clone)]
    again = run([*sweep, "--sweeps", "sizes", "pruning"], clone, env, timeout=600)
    assert "3 runs: 3 finished, 0 to run" in again, again[-3000:]
    theirs = json.loads((repo / "results" / "comparison.json").read_text())
    ours = json.loads((clone / "results" / "comparison.json").read_text())
    assert ours["runs"] == theirs["runs"] and ours["claims"] == theirs["claims"]


@pytest.mark.slow  # the `swept` fixture runs a real sweep (minutes)
def test_rerun_reuses_every_finished_run(swept):
    repo, env, cmd, _ = swept
    before = (repo / "results" / "comparison.json").read_text()
    again = run(cmd, repo, env, timeout=600)
    assert "3 runs: 3 finished, 0 to run" in again
    assert (repo / "results" / "comparison.json").read_text() == before
    # a commit that leaves the pipeline alone (a session's notes) keeps every finished run
    (repo / "NOTES.md").write_text("sweep half done\n")
    run(["git", "add", "NOTES.md"], repo)
    run(["git", "commit", "-qm", "later"], repo)
    again = run(cmd, repo, env, timeout=600)
    assert "3 runs: 3 finished, 0 to run" in again
    report = [sys.executable, "-m", "flows.sweep", "report", "--repo", str(repo)]
    shown = run([*report, "--sweeps", "sizes", "pruning"], repo, env)
    assert "finished: 3, missing: []" in shown
    # a report while a sweep runs: `dvc exp run` holds DVC's repo lock the whole time
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        shown = run([*report, "--sweeps", "sizes", "pruning"], repo, env)
        assert "finished: 3, missing: []" in shown
    finally:
        holder.kill()
        holder.wait()
    # `--runs` picks one claim's runs (with their seed repeats) out of the plan
    plan = [sys.executable, "-m", "flows.sweep", "plan", "--repo", str(repo)]
    picked = run([*plan, "--runs", "uniform-2", "--seeds", "2"], repo, env)
    assert [line.split()[0] for line in picked.splitlines() if not line[0].isspace()] == [
        "uniform-2",
        "uniform-2-s1",
    ]
    assert "finetune.seed=1" in picked
    wrong = subprocess.run(
        [*plan, "--runs", "uniform-3"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert wrong.returncode == 1 and "no run named uniform-3" in wrong.stderr
