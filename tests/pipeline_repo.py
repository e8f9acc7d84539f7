"""A temporary copy of the project as its own git + DVC repo, with tiny params: the pipeline
tests' sandbox (the real dvc.yaml, stages and library, the `embedded-tiny` model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = {
    "model": {
        "base": "embedded-tiny",
        "embedded": {"tower_pretrain_steps": 10, "tower_pretrain_batch_size": 8},
    },
    "data": {"train_images": 40, "eval_images": 10, "text_items": 20, "questions_per_image": 2},
    "align": {"steps": 3, "batch_size": 4, "eval_samples": 8},
    "probe": {"samples": 8, "batch_size": 4, "tune_steps": 2, "lora_r": 4},
    "finetune": {
        "steps": 3,
        "batch_size": 4,
        "lora_r": 4,
        "lora_alpha": 8,
        "checkpoint_every": 2,
        "eval_samples": 12,
        "eval_batch_size": 6,
        "precision": "fp32",
    },
    "prune": {"layers": 1, "samples": 8, "batch_size": 4},
    "evaluate": {
        "samples": 12,
        "curve_samples": 12,
        "prune_curve": [0, 1],
        "speed_repeats": 1,
        "new_tokens": 3,
        "batch_size": 6,
        "precision": "fp32",
        # The harnesses cost ~12 s a model each: off here, run once in test_pipeline_dvc.
        "lm_eval": {"tasks": []},
        "lmms_eval": {"tasks": []},
    },
}
DVC = [sys.executable, "-m", "dvc"]


def merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 600) -> str:
    """Run a command; fail the test with the end of its output if it fails."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def pipeline_env(repo: Path) -> dict:
    """PATH with this interpreter first (dvc runs `python -m stages.X`), Prefect state in the repo."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PREFECT_HOME"] = str(repo / ".prefect")
    return env


def prefect_api(repo: Path) -> str:
    """The API of the Prefect server the repo's stages share (started by the first stage)."""
    return json.loads((repo / ".prefect" / "server.json").read_text())["api_url"]


def stop_prefect(repo: Path) -> None:
    from infra import prefect_server

    assert prefect_server.stop(repo / ".prefect")


def flow_runs(api: str, tag: str | None = None) -> list[dict]:
    """The server's flow runs (those with `tag`), newest first: flow name, state type and
    message, tags, log messages, and artifacts (key, type, data, description)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterTags,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort, LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs = []
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        selected = FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])) if tag else None
        for run in client.read_flow_runs(
            flow_run_filter=selected, sort=FlowRunSort.START_TIME_DESC, limit=200
        ):
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                sort=LogSort.TIMESTAMP_ASC,
                limit=200,
            )
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
            runs.append(
                {
                    "flow": flows[run.flow_id],
                    "state": run.state_type.value,
                    "message": run.state.message if run.state else None,
                    "tags": run.tags,
                    "logs": [(log.name, log.message) for log in logs],
                    "artifacts": {
                        a.key: {"type": a.type, "data": a.data, "description": a.description}
                        for a in artifacts
                    },
                }
            )
    return runs


def make_pipeline_repo(repo: Path) -> Path:
    # .dvcignore: directory deps (a whole package) must not hash the __pycache__ a run writes
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("stages", "vregion", "infra"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, TINY_PARAMS), sort_keys=False))
    return init_git_dvc(repo)


def init_git_dvc(repo: Path) -> Path:
    """`git init` + `dvc init` with a commit identity and a site cache inside the repo."""
    run(["git", "init", "-q"], repo)
    run(["git", "config", "user.email", "t@example.com"], repo)
    run(["git", "config", "user.name", "t"], repo)
    run([*DVC, "init", "-q"], repo)
    own_site_cache(repo)
    return repo


def own_site_cache(repo: Path) -> None:
    """DVC's site cache inside `repo`, in the git-ignored local config (so a copy or a clone
    points it at its own directory)."""
    site = str(repo / ".dvc" / "site_cache")
    run([*DVC, "config", "--local", "core.site_cache_dir", site], repo)


LOG_EVERY = 2  # the built pipeline's stages log progress every 2 steps (and first and last)


@dataclass(frozen=True)
class BuiltPipeline:
    """The tiny pipeline after one `dvc repro`, committed: `repo` for the tests that read and
    then change it (test_pipeline_dvc), `snapshot` an untouched copy for those that need their
    own (`clone`)."""

    repo: Path
    env: dict
    log: str
    """`dvc repro`'s output."""
    snapshot: Path

    def clone(self, dest: Path) -> Path:
        """A copy of the built, committed repo (git, DVC cache and outputs; no Prefect state)."""
        shutil.copytree(self.snapshot, dest, symlinks=True, dirs_exist_ok=True)
        own_site_cache(dest)
        return dest


def build_pipeline(repo: Path, snapshot: Path) -> BuiltPipeline:
    """`dvc repro` of the tiny pipeline in `repo` (its first stage starts the Prefect server the
    stages share, in `repo/.prefect`), committed, then copied to `snapshot`."""
    make_pipeline_repo(repo)
    env = {**pipeline_env(repo), "VREGION_LOG_EVERY": str(LOG_EVERY)}
    log = run([*DVC, "repro"], repo, env, timeout=1200)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "built"], repo)
    state = shutil.ignore_patterns(".prefect", "site_cache", "tmp")
    shutil.copytree(repo, snapshot, symlinks=True, ignore=state, dirs_exist_ok=True)
    return BuiltPipeline(repo, env, log, snapshot)
