"""Ctrl-C in the middle of `dvc repro` (during finetune's Ray Train steps) stops the run within
seconds, marks the stage's flow run Cancelled with the step it reached, leaves the DVC cache
consistent, and the next `dvc repro` resumes finetune from its checkpoint.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group (dvc and the running
stage's Python); the test does the same to a real `dvc repro` of the embedded-tiny pipeline.
The stages' shared Prefect server runs in its own session, so the signal does not reach it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml
from pipeline_repo import (
    DVC,
    flow_runs,
    make_pipeline_repo,
    pipeline_env,
    prefect_api,
    run,
    stop_prefect,
)

STEPS, EVERY = 40, 5  # finetune long enough to interrupt mid-way; a checkpoint every 5 steps
STOP_WITHIN = 10.0  # s from Ctrl-C to the end of `dvc repro` (issue 19; measured 6.5-8 s)


def _cache_is_consistent(repo: Path) -> int:
    """Every cached file's content hashes to its own name; returns how many were checked."""
    checked = 0
    for f in (repo / ".dvc" / "cache" / "files" / "md5").rglob("*"):
        if f.is_file() and not f.name.endswith((".dir", ".tmp")) and "." not in f.name:
            assert hashlib.md5(f.read_bytes()).hexdigest() == f.parent.name + f.name, f
            checked += 1
    return checked


def test_ctrl_c_mid_finetune_stops_fast_marks_the_run_and_resumes(tmp_path):
    repo = make_pipeline_repo(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"].update(steps=STEPS, checkpoint_every=EVERY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**pipeline_env(repo), "VREGION_RUN_ID": "interrupted", "VREGION_LOG_EVERY": str(EVERY)}
    log = (repo / "repro.log").open("w")
    proc = subprocess.Popen(
        [*DVC, "repro"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        # Wait until finetune has checkpointed (step 10: checkpoints at 5 and 10), then Ctrl-C.
        while (
            f"finetune (worker 0): step {2 * EVERY}/{STEPS}" not in (repo / "repro.log").read_text()
        ):
            assert proc.poll() is None, (repo / "repro.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pressed = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) != 0
        stopped = time.monotonic() - pressed
        log.close()
        out = (repo / "repro.log").read_text()
        assert stopped < STOP_WITHIN, f"stopped {stopped:.1f} s after Ctrl-C\n{out[-3000:]}"
        # One line says where it stopped; no traceback from the stage or from Prefect's API.
        assert "finetune: Interrupted (Ctrl-C) at finetune (worker 0) step" in out, out[-3000:]
        tail = out[out.index("Received SIGINT") :] if "Received SIGINT" in out else out
        assert "Traceback" not in tail, tail[-3000:]

        api = prefect_api(repo)
        (finetune,) = [r for r in flow_runs(api, "run:interrupted") if r["flow"] == "finetune"]
        assert finetune["state"] == "CANCELLED", finetune
        assert "Interrupted (Ctrl-C) at finetune (worker 0) step" in finetune["message"]

        assert _cache_is_consistent(repo) > 0
        status = run([*DVC, "status"], repo, env)
        assert "finetune" in status
        for done in ("base:", "prepare:", "align:", "probe:", "region:"):
            assert done not in status, status
        again = run([*DVC, "repro"], repo, {**env, "VREGION_RUN_ID": "resumed"}, timeout=900)
        assert "Running stage 'finetune'" in again and "Running stage 'align'" not in again
        train = json.loads((repo / "metrics" / "train.json").read_text())
        # from the last checkpoint Ray Train committed before the signal (step 5 or 10)
        assert EVERY <= train["resumed_from"] <= 2 * EVERY and train["steps"] == STEPS, train
        assert "up to date" in run([*DVC, "status"], repo, env)
        _cache_is_consistent(repo)
        states = {r["flow"]: r["state"] for r in flow_runs(api, "run:resumed")}
        assert states == dict.fromkeys(("finetune", "prune", "evaluate", "report"), "COMPLETED")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stop_prefect(repo)
