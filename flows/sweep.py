"""The paper's comparisons as one command: a sweep of queued DVC experiments, then a report.

    python -m flows.sweep run                       # every sweep (hours on 2 cores)
    python -m flows.sweep run --sweeps sizes        # one sweep
    python -m flows.sweep run --runs all-layers uniform --seeds 3   # one claim's runs first
    python -m flows.sweep plan                      # the runs and their params; runs nothing
    python -m flows.sweep report                    # the report from the runs finished so far

What `run` does (a Prefect flow, `vregion-sweep`; each DVC stage inside is its own flow run):

1. `dvc repro probe`: the stages every run shares (base, prepare, align, probe) are built once
   and cached; their results give the layer count and the probe's scorers.
2. The runs (`vregion/sweep/plan.py`) whose experiment already exists with the same params, on
   this commit or an older one whose dvc.yaml and stage dependencies are this commit's, are
   reused; the others are queued (`dvc exp run --queue -n NAME -S ...`) and run
   (`dvc exp run --run-all`). Inside each, DVC restores every stage whose inputs did not change
   from its cache (the run-cache), so only `region` onwards runs.
3. Each finished experiment is copied into a run record, `results/runs/<name>/` (params, metrics
   files, per-question results; `vregion.sweep.experiments.RunRecord`) as it finishes.
   Committed, the records carry the finished runs to every clone: a sweep there reruns only
   what no record holds.
4. `results/comparison.md` (+ `comparison.json`, `plots/`): per sweep, visual accuracy,
   retention against all-layer tuning, text skill against the base LLM, s/step and its ratio,
   trainable parameters; retention-vs-layers and pruning charts; the paper's figures beside
   ours. Every number is read from the metrics files the experiments committed.
"""

from __future__ import annotations

# flows.pipeline first: importing it sets the offline/quiet defaults before Prefect loads.
from flows.pipeline import PipelineError, child_env  # isort: skip

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.commands import run_dvc, stream  # noqa: E402
from stages import _dvcfile  # noqa: E402
from vregion.sweep.compare import reference_figures, write_report  # noqa: E402
from vregion.sweep.experiments import (  # noqa: E402
    experiments,
    finished,
    head_commit,
    record_experiments,
    stages_upto,
)
from vregion.sweep.plan import SWEEPS, Run, plan_runs  # noqa: E402

RESULTS = "results"
SHARED = "probe"
"""the last stage every run shares: it and the stages before it are built once, before the runs"""
RECORDS = f"{RESULTS}/runs"
RECORD_EVERY_S = 60.0
COMMAND = "python -m flows.sweep run"


def paths(repo: Path) -> dict[str, str]:
    """The pipeline's paths, as the repo's dvc.yaml names them (`vars: paths`)."""
    return _dvcfile.paths(repo / "dvc.yaml")


def metric_files(repo: Path) -> dict[str, str]:
    """The metrics files the comparison reads, by the name it gives them."""
    p = paths(repo)
    return {"eval": p["eval_metrics"], "train": p["train_metrics"], "region": p["region_metrics"]}


def _dvc(repo: Path, *args: str, timeout: float = 600) -> str:
    out = run_dvc(repo, *args, timeout=timeout)
    if out.returncode != 0:
        raise PipelineError(f"`dvc {' '.join(args)}` failed: {(out.stdout + out.stderr)[-3000:]}")
    return out.stdout


@task(name="shared-stages", cache_policy=NO_CACHE)
def shared_stages(repo: str) -> dict:
    """`dvc repro probe` (base, prepare, align, probe), then the probe's layer count and scorers."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", SHARED]
    code, tail = stream(cmd, repo, child_env(), logger)
    if code != 0:
        raise PipelineError(f"`dvc repro probe` failed ({code}); last lines:\n{tail}")
    return _shape_from_scores(Path(repo))


def drop_stale_shutdowns(repo: Path) -> int:
    """Purge shutdown requests waiting in DVC's queue broker for a worker that is gone.

    `dvc queue stop` broadcasts a shutdown to every worker ever bound to the broker. A live
    worker reads it at once; for one already gone it waits on disk, and the next worker (DVC
    reuses the node name) reads it and quits after its first experiment, leaving
    `dvc exp run --run-all` waiting forever on the rest. Returns how many were dropped."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        app = dvc_repo.experiments.celery_queue.celery
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            # the workers' control queues: the bindings of celery's broadcast exchange
            queues = {b.queue for b in channel.get_table("celery.pidbox")}
            return sum(channel.queue_purge(q) or 0 for q in queues)


@task(name="queue-and-run", cache_policy=NO_CACHE)
def queue_and_run(repo: str, runs: list[Run], jobs: int) -> None:
    """Queue every run as a DVC experiment, then run the queue (`dvc exp run --run-all`)."""
    logger = get_run_logger()
    path = Path(repo)
    # same name, other params, on this commit: DVC refuses a second experiment of that name
    head = head_commit(path)
    names = {r.name for r in runs}
    stale = [e for e in experiments(path) if e.baseline == head and e.name in names]
    if stale:
        logger.info("replacing experiments with changed params: %s", [e.name for e in stale])
        _dvc(path, "exp", "remove", *[e.ref for e in stale])
    _dvc(path, "queue", "remove", "--queued", "--failed")  # leftovers of an interrupted sweep
    for run in runs:
        args = [a for p in run.set_params() for a in ("-S", p)]
        _dvc(path, "exp", "run", "--queue", "-n", run.name, *args)
        logger.info("queued %s: %s", run.name, " ".join(run.set_params()))
    stale = drop_stale_shutdowns(path)
    if stale:
        logger.info("dropped %d stale shutdown message(s) left by `dvc queue stop`", stale)
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--run-all", "--jobs", str(jobs)]
    code, tail = stream(cmd, repo, child_env(), logger)
    if code != 0:
        raise PipelineError(f"`dvc exp run --run-all` failed ({code}); last lines:\n{tail}")


@flow(name="vregion-sweep", log_prints=True)
def sweep(
    repo: str = ".",
    sweeps: list[str] | None = None,
    jobs: int = 1,
    run: bool = True,
    seeds: int = 1,
    only: list[str] | None = None,
) -> dict:
    """Run the sweeps (default: all) as DVC experiments and write results/comparison.md.

    repo: the DVC repo. sweeps: any of strategies, sizes, pruning. jobs: experiments run at a
    time (1 on a 2-core machine). run: False only rebuilds the report from finished runs.
    seeds: training seeds of the runs the claims compare (`vregion.sweep.plan.SEEDED`).
    only: run names to keep (with their seed repeats); the report still shows every finished
    run of the sweeps. Returns {"finished": [...], "missing": [...], "report": path}.
    """
    path = Path(repo).resolve()
    shape = shared_stages(str(path)) if run else _shape_from_scores(path)
    base_params = yaml.safe_load((path / "params.yaml").read_text())
    # the scorers asked for in params (layer_scores.json also holds their parts, e.g. the
    # image and text halves of multimodal_block_influence)
    scorers = [x for x in base_params["probe"]["scorers"] if x in shape["scorers"]]
    runs = plan_runs(shape["num_layers"], scorers, sweeps, seeds)
    wanted = {r.name for r in plan_runs(shape["num_layers"], scorers, sweeps, seeds, only)}
    files = metric_files(path)  # dvc.yaml, read once
    questions = paths(path)["questions"]
    shared = stages_upto(path, SHARED)

    def collect(baseline: str | None = None) -> dict:
        """Record the experiments that finished, then the records that count on this commit:
        of this commit or an older one with the same pipeline (a commit that changed only
        docs, tests or this file), made from the shared stages' outputs this workspace has;
        after a change to a stage, or shared stages rebuilt elsewhere, every run reruns."""
        for name in record_experiments(
            path, runs, base_params, files, RECORDS, questions, baseline, shared
        ):
            print(f"recorded {name} in {RECORDS}/{name} (commit it to keep it on every clone)")
        return finished(path, runs, base_params, files, RECORDS, baseline, shared)

    done = collect()
    todo = [r for r in runs if r.name not in done and r.name in wanted]
    print(f"{len(runs)} runs: {len(done)} finished, {len(todo)} to run")
    if run and todo:
        # the experiments are queued on this commit; a commit made while they run must not
        # hide them from the report
        head = head_commit(path)
        stop = threading.Event()

        def record_as_they_finish() -> None:
            while not stop.wait(RECORD_EVERY_S):
                try:
                    collect(head)
                except Exception as err:  # a record is retried at the next tick, and at the end
                    print(f"recording finished runs failed, will retry: {err}")

        recorder = threading.Thread(target=record_as_they_finish, daemon=True)
        recorder.start()
        try:
            queue_and_run(str(path), todo, jobs)
        finally:
            stop.set()
            recorder.join()
        done = collect(head)
    report = write_report(
        path,
        runs,
        done,
        reference_figures(path),
        COMMAND,
        files,
        RESULTS,
        questions=questions,
    )
    create_markdown_artifact(
        markdown=report.read_text(), key="vregion-comparison", description="the sweep's report"
    )
    missing = [r.name for r in runs if r.name not in done]
    if run and set(missing) & wanted:
        raise PipelineError(f"runs that did not finish: {missing} (see the log above)")
    return {"finished": sorted(done), "missing": missing, "report": str(report)}


def _shape_from_scores(repo: Path) -> dict:
    path = repo / paths(repo)["layer_scores"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dvc repro probe` or the sweep first")
    scores = json.loads(path.read_text())
    return {"num_layers": scores["num_layers"], "scorers": list(scores["scores"])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.sweep",
        description="The paper's comparisons (layer-selection strategies, region sizes, "
        "pruning) as queued DVC experiments, then results/comparison.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,plan,report}")
    for name, text in (
        ("run", "run the missing runs, then write the report"),
        ("plan", "print the runs and the params each sets; run nothing"),
        ("report", "write the report from the runs finished so far"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--repo", default=".", help="the DVC repo (default: .)")
        p.add_argument(
            "--sweeps", nargs="+", choices=SWEEPS, help="which sweeps (default: all three)"
        )
        p.add_argument(
            "--seeds",
            type=int,
            default=1,
            help="training seeds of the runs the claims compare (default 1; 3 gives a spread)",
        )
        if name != "report":
            p.add_argument(
                "--runs",
                nargs="+",
                metavar="NAME",
                help="only these runs (names as `plan` prints them) and their seed repeats, "
                "e.g. --runs all-layers uniform",
            )
        if name == "run":
            p.add_argument("--jobs", type=int, default=1, help="experiments at a time (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        if args.command == "plan":
            shape = _shape_from_scores(repo)
            asked = yaml.safe_load((repo / "params.yaml").read_text())["probe"]["scorers"]
            scorers = [x for x in asked if x in shape["scorers"]]
            for r in plan_runs(shape["num_layers"], scorers, args.sweeps, args.seeds, args.runs):
                labels = ", ".join(f"{s}/{label}" for s, label in r.labels)
                print(f"{r.name:<32} {labels}\n{'':<32} -S " + " -S ".join(r.set_params()))
            return 0
        result = sweep(
            repo=str(repo),
            sweeps=args.sweeps,
            jobs=getattr(args, "jobs", 1),
            run=args.command == "run",
            seeds=args.seeds,
            only=getattr(args, "runs", None),
        )
    except (PipelineError, FileNotFoundError, ValueError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print(
        f"wrote {result['report']}; finished: {len(result['finished'])}, missing: {result['missing']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
