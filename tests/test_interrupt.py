"""Ctrl-C in the middle of `dvc repro` leaves the DVC cache consistent, and the next run finishes.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group (dvc and the running
stage's Python); the test does the same to a real `dvc repro` of the embedded-tiny pipeline.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from pipeline_repo import DVC, make_pipeline_repo, pipeline_env, run


def _cache_is_consistent(repo: Path) -> int:
    """Every cached file's content hashes to its own name; returns how many were checked."""
    checked = 0
    for f in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if f.is_file() and not f.name.endswith((".dir", ".tmp")) and "." not in f.name:
            assert hashlib.md5(f.read_bytes()).hexdigest() == f.parent.name + f.name, f
            checked += 1
    return checked


def test_ctrl_c_mid_stage_then_repro_completes(tmp_path):
    repo = make_pipeline_repo(tmp_path)
    env = pipeline_env(repo)
    log = (repo / "repro.log").open("w")
    proc = subprocess.Popen(
        [*DVC, "repro"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    # Wait until `align` is running (base and prepare are done), then press Ctrl-C.
    while "Running stage 'align'" not in (repo / "repro.log").read_text():
        assert proc.poll() is None, (repo / "repro.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    log.close()

    assert _cache_is_consistent(repo) > 0
    status = run([*DVC, "status"], repo, env)
    assert "align" in status and "base:" not in status and "prepare:" not in status
    again = run([*DVC, "repro"], repo, env, timeout=900)
    assert "Running stage 'align'" in again and "Running stage 'base'" not in again
    assert "up to date" in run([*DVC, "status"], repo, env)
    _cache_is_consistent(repo)
