"""The pipeline flow (flows/pipeline.py) under a real Prefect API, real DVC and a real SeaweedFS.

One temporary DVC repo (the project's dvc.yaml and stages, tiny params) reproduces
`base → prepare` once through the flow and pushes to S3; the failure cases reuse it and
fail before any stage runs.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_repo import ROOT, TINY_PARAMS, make_pipeline_repo, run
from s3_fixtures import free_port

from flows.pipeline import (
    METRICS_ARTIFACT,
    PipelineError,
    TransientStorageError,
    classify_storage_error,
    dvc_command,
    metrics_table,
    pipeline,
)
from vregion.storage import StorageError, configure_dvc_remote, s3_client


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 120) -> str:
    return run(cmd, cwd, env, timeout)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield str(get_current_settings().api.url)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_pipeline_repo(tmp_path_factory.mktemp("flows-repo"))


@pytest.fixture(scope="module")
def store(s3_server):
    """The session's SeaweedFS with a key prefix of this module's own."""
    return s3_server.settings.replace(prefix=f"flows-{secrets.token_hex(4)}")


def _objects(settings) -> list[str]:
    client = s3_client(settings)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=settings.bucket, Prefix=settings.key()
    )
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifacts(key: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client() as c:
        return c.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=100
        )


def _task_runs(flow_run_id, name: str) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    with _client() as c:
        return c.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=20,
        )


@pytest.fixture(scope="module")
def pushed(prefect_api, repo, store):
    """The flow, once: base → prepare, metrics artifact, dvc push to SeaweedFS."""
    configure_dvc_remote(repo, store)
    start = time.monotonic()
    metrics = pipeline(repo=str(repo), targets=["prepare"], push=True, retries=0)
    return metrics, time.monotonic() - start


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_flow_reproduces_publishes_and_pushes(pushed, repo, store):
    metrics, seconds = pushed
    prepare = metrics["metrics/prepare.json"]
    assert prepare["synthetic"]["train_captions"] == TINY_PARAMS["data"]["train_images"]
    assert (repo / "data" / "quarantine.json").is_file()
    keys = _objects(store)
    assert keys and all(k.startswith(store.key("dvc") + "/") for k in keys), keys[:5]
    # everything DVC tracks is in the remote now: `dvc status -c` has nothing to push
    status = _run([sys.executable, "-m", "dvc", "status", "-c"], repo)
    assert "Cache and remote 'storage' are in sync" in status, status


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_pipeline_and_each_stage_are_completed_runs_in_the_same_api(pushed):
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as c:
        flows = {f.id: f.name for f in c.read_flows(limit=100)}
        runs = c.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
    seen = {(flows[r.flow_id], r.state_type.value) for r in runs}
    for name in ("vregion-pipeline", "base", "prepare"):
        assert (name, "COMPLETED") in seen, sorted(seen)
    # One tag groups the pipeline's run with its stages' runs: one filter in the UI.
    (pipeline_run,) = [r for r in runs if flows[r.flow_id] == "vregion-pipeline"]
    (group,) = [t for t in pipeline_run.tags if t.startswith("run:pipeline-")]
    grouped = sorted(flows[r.flow_id] for r in runs if group in r.tags)
    assert grouped == ["base", "prepare", "vregion-pipeline"], grouped


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_metrics_artifact_is_a_markdown_table(pushed):
    artifacts = _artifacts(METRICS_ARTIFACT)
    assert len(artifacts) == 1
    art = artifacts[0]
    assert art.type == "markdown"
    assert "| metrics/prepare.json | synthetic.train_captions | 40 |" in art.data
    assert "| metrics/base.json |" in art.data


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_wrong_credentials_fail_fast_with_the_endpoint_and_write_nothing(pushed, repo, store):
    wrong = store.replace(secret_access_key="wrong-" + secrets.token_hex(8))
    configure_dvc_remote(repo, wrong)
    before, artifacts_before = _objects(store), len(_artifacts(METRICS_ARTIFACT))
    state = pipeline(
        repo=str(repo), targets=["prepare"], push=True, retries=3, retry_delay=5,
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(StorageError) as err:
        state.result()
    assert not isinstance(err.value, TransientStorageError)
    assert store.endpoint_url in str(err.value) and "refused the credentials" in str(err.value)
    assert wrong.secret_access_key not in str(err.value)
    # not retried (a 5 s backoff would show), nothing written, no artifact
    (check,) = _task_runs(state.state_details.flow_run_id, "check-storage")
    assert check.run_count == 1
    assert _task_runs(state.state_details.flow_run_id, "reproduce") == []
    assert _objects(store) == before
    assert len(_artifacts(METRICS_ARTIFACT)) == artifacts_before


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_unreachable_endpoint_is_retried_then_fails_clearly(pushed, repo, store):
    dead = store.replace(endpoint_url=f"http://127.0.0.1:{free_port()}")
    configure_dvc_remote(repo, dead)
    artifacts_before = len(_artifacts(METRICS_ARTIFACT))
    start = time.monotonic()
    state = pipeline(
        repo=str(repo), targets=["prepare"], push=True, retries=2, retry_delay=0.2,
        return_state=True,
    )  # fmt: skip
    assert time.monotonic() - start < 60
    with pytest.raises(TransientStorageError) as err:
        state.result()
    assert dead.endpoint_url in str(err.value) and "is the server running" in str(err.value)
    (check,) = _task_runs(state.state_details.flow_run_id, "check-storage")
    assert check.run_count == 3  # the first try and two retries
    assert len(_artifacts(METRICS_ARTIFACT)) == artifacts_before


def test_cli_run_with_wrong_credentials_exits_1_with_one_clear_line(
    pushed, prefect_api, repo, store
):
    configure_dvc_remote(repo, store.replace(secret_access_key="nope-" + secrets.token_hex(8)))
    before = _objects(store)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "VREGION_RETRY_DELAY": "0.1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.pipeline",
            "run",
            "--repo",
            str(repo),
            "--targets",
            "prepare",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: S3 at " + store.endpoint_url), proc.stderr[-3000:]
    assert "refused the credentials" in last
    assert _objects(store) == before


def test_help():
    for args in ([], ["run"], ["serve"]):
        proc = subprocess.run(
            [sys.executable, "-m", "flows.pipeline", *args, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage: python -m flows.pipeline" in proc.stdout
    assert "--cron" in proc.stdout and "--name" in proc.stdout


def test_serve_creates_a_cron_deployment(prefect_api, repo):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    cmd = [sys.executable, "-m", "flows.pipeline", "serve", "--repo", str(repo), "--no-push"]
    cmd += ["--targets", "prepare", "--cron", "0 3 * * *", "--name", "test-nightly"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, deployment = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with _client() as c:
                    deployment = c.read_deployment_by_name("vregion-pipeline/test-nightly")
                break
            except Exception:
                time.sleep(1)
        assert deployment is not None, proc.stdout.read() if proc.poll() is not None else ""
        crons = [s.schedule.cron for s in deployment.schedules]
        assert crons == ["0 3 * * *"]
        assert deployment.parameters["push"] is False
        assert deployment.parameters["repo"] == str(repo.resolve())
        # a run started from the UI/API is picked up and run by the serving process
        with _client() as c:
            run = c.create_flow_run_from_deployment(deployment.id)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                run = c.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    break
                time.sleep(1)
        assert run.state is not None and run.state.is_completed(), run.state
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dvc_command_and_error_classes():
    py = [sys.executable, "-m", "dvc"]
    assert dvc_command() == [*py, "repro"]
    assert dvc_command(["prepare"]) == [*py, "repro", "prepare"]
    assert dvc_command(None, {"align.steps": 50, "region.layers": None}) == [
        *py, "exp", "run", "-S", "align.steps=50", "-S", "region.layers=null",
    ]  # fmt: skip
    assert dvc_command(["align"], experiment=True) == [*py, "exp", "run", "align"]
    transient = "cannot reach the S3 endpoint http://x:1: is the server running?"
    assert isinstance(classify_storage_error(transient), TransientStorageError)
    assert isinstance(
        classify_storage_error("ERROR: 503 Service Unavailable"), TransientStorageError
    )
    for permanent in (
        "S3 at http://x:1 refused the credentials (InvalidAccessKeyId, access key ***abcd)",
        "ERROR: failed to push: An error occurred (AccessDenied) ... 403",
    ):
        err = classify_storage_error(permanent)
        assert isinstance(err, StorageError) and not isinstance(err, TransientStorageError)
    assert not issubclass(PipelineError, StorageError)
    table = metrics_table({"m.json": {"a": {"b": 0.5}, "c": "x|y"}})
    assert table.splitlines()[2:] == ["| m.json | a.b | 0.5 |", "| m.json | c | x\\|y |"]


@pytest.mark.slow  # over 30 s on a quiet 2-core machine
def test_set_params_runs_a_dvc_experiment(pushed, repo):
    from prefect.client.schemas.sorting import FlowRunSort

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-q", "-m", "pipeline"], repo)  # `dvc exp run` needs a commit
    metrics = pipeline(
        repo=str(repo), targets=["prepare"], set_params={"data.text_items": 10}, push=False
    )
    assert sum(metrics["metrics/prepare.json"]["text_items"].values()) == 10
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["text_items"] == 10
    with _client() as c:
        flows = {f.id: f.name for f in c.read_flows(limit=100)}
        runs = c.read_flow_runs(limit=200, sort=FlowRunSort.START_TIME_DESC)
    completed = [flows[r.flow_id] for r in runs if r.state_type.value == "COMPLETED"]
    assert completed.count("prepare") == 2 and completed.count("base") == 1  # base not stale
    exps = _run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo)
    assert "text_items" in exps
