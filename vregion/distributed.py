"""Ray Train plumbing: where runs keep their checkpoints, and a local Ray that starts and stops.

A run's checkpoints go to `RunConfig(storage_path)`: a local directory, or the team's S3 store
when `VREGION_S3_*` is set, so an interrupted run resumes from its latest checkpoint (re-using
a run name resumes it) and a teammate's run can too. `RAY_ADDRESS` joins an existing cluster.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vregion.storage import S3Settings, check_s3, pyarrow_filesystem, s3_configured


def run_config(name: str, local_dir: str | Path, *, max_failures: int = 2, environ=None):
    """RunConfig whose checkpoints live in S3 when configured, else under `local_dir`.

    `max_failures`: a worker that dies is restarted from the latest checkpoint this many times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    env = os.environ if environ is None else environ
    common = dict(
        name=name,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )
    if s3_configured(env):
        settings = S3Settings.from_env(env)
        check_s3(settings)  # a clear error now beats a Ray traceback mid-run
        return RunConfig(
            storage_path=settings.path("ray"),
            storage_filesystem=pyarrow_filesystem(settings),
            **common,
        )
    return RunConfig(storage_path=str(Path(local_dir).resolve()), **common)


def quiet_workers() -> None:
    """Ray worker setup: without Ray's dashboard (not installed here) the state API is absent,
    and Ray Train's placement-group cleaner would warn about it every second of a run."""
    import logging

    logging.getLogger(
        "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    ).setLevel(logging.ERROR)


@contextlib.contextmanager
def local_ray(temp_dir: str | Path | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join `RAY_ADDRESS` if set; otherwise start a local Ray here and stop it afterwards."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict = {
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"worker_process_setup_hook": "vregion.distributed.quiet_workers"},
    }
    if not address:
        kwargs["num_cpus"] = num_cpus
        if temp_dir is not None:
            # Ray's socket paths must stay short (~107 bytes): keep temp dirs near the root.
            kwargs["_temp_dir"] = str(Path(temp_dir).resolve())
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def forget_run(name: str, local_dir: str | Path, environ=None) -> None:
    """Delete a finished run's checkpoints (local or S3): its outputs are exported, and a
    later run of the same name must start fresh rather than resume a completed one."""
    import shutil

    env = os.environ if environ is None else environ
    if s3_configured(env):
        settings = S3Settings.from_env(env)
        fs = pyarrow_filesystem(settings)
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(settings.path("ray", name))
        return
    shutil.rmtree(Path(local_dir) / name, ignore_errors=True)


@contextlib.contextmanager
def progress_relay() -> Iterator[object]:
    """A Ray queue through which Ray Train workers send their progress events to this
    process's reporters (`vregion.progress`): the workers' own logs never reach the driver's
    orchestrator. Pass the yielded queue to `worker_progress` in the worker."""
    import contextvars
    import queue as stdlib_queue
    import threading

    from ray.util.queue import Queue

    from vregion import progress

    relay = Queue(maxsize=10_000)
    stop = threading.Event()

    def drain() -> None:
        while True:
            try:
                event = relay.get(timeout=0.5)
            except stdlib_queue.Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down)
                return
            progress.emit(event)

    # The reporters run in the caller's context (e.g. inside its flow run), on this thread.
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(drain,), name="progress-relay", daemon=True
    )
    thread.start()
    try:
        yield relay
    finally:
        stop.set()
        thread.join(timeout=5)


def worker_progress(relay, every: int, min_interval: float = 2.0):
    """A reporter for a Ray Train worker: forwards its events through `relay`, each line-worthy
    one (`log_due`) and others at most every `min_interval` s; never blocks the training loop."""
    import time

    from vregion import progress

    last = 0.0

    def forward(event: dict) -> None:
        nonlocal last
        now = time.monotonic()
        if progress.log_due(event, every) or now - last >= min_interval:
            last = now
            try:
                relay.put_nowait(event)
            except Exception:  # a full or vanished queue costs a progress update, not the run
                pass

    return forward
