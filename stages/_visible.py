"""What a stage shows in the Prefect UI while and after it runs (issue 19).

- One local Prefect server for all the stages of a run (`infra.prefect_server.shared`), in its
  own session: Ctrl-C in the terminal reaches the stage, not the server, so the stage can still
  mark its flow run; and no stage pays for an ephemeral server's start.
- Progress: every `vregion.progress.track` loop (Ray Train workers' included, through the relay
  in stages.finetune) updates a progress artifact per phase and logs a compact line every
  VREGION_LOG_EVERY steps.
- Results: after the flow body, the stage's metrics files (from dvc.yaml) become table
  artifacts, its PNG plots and markdown outputs markdown artifacts, its params a table.
- Grouping: every flow run of one `dvc repro` carries the tag `run:<id>` (VREGION_RUN_ID, else
  the dvc process's pid and start time), and `exp:<name>` inside a DVC experiment.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from vregion import progress

log = logging.getLogger("vregion.progress")
ARTIFACT_INTERVAL = 5.0  # s between updates of one progress artifact
MAX_EMBEDDED_PLOT = 400_000  # bytes; a larger PNG is linked by path instead of embedded


def slug(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_id() -> str:
    """The id shared by the stages of one `dvc repro`: VREGION_RUN_ID, else the nearest `dvc`
    ancestor process (pid + start time, so a reused pid gives a new id), else our parent."""
    if os.environ.get("VREGION_RUN_ID"):
        return os.environ["VREGION_RUN_ID"]
    pid = chosen = os.getppid()
    for _ in range(4):  # dvc → (sh -c) → python -m stages.X
        try:
            if "dvc" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                chosen = pid
                break
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    try:
        started = Path(f"/proc/{chosen}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = str(int(time.time()))
    return "repro-" + hashlib.sha1(f"{chosen}-{started}".encode()).hexdigest()[:10]


def run_tags() -> list[str]:
    tags = ["vregion", f"run:{run_id()}"]
    if os.environ.get("DVC_EXP_NAME"):
        tags.append(f"exp:{os.environ['DVC_EXP_NAME']}")
    return tags


class FlowProgress:
    """A `vregion.progress` reporter: a progress artifact per phase (updated every
    ARTIFACT_INTERVAL s and at 100%) and a log line every `every` steps."""

    def __init__(self, stage: str, every: int):
        self.stage, self.every = stage, every
        self.artifacts: dict[str, list] = {}  # phase -> [artifact id, last update, last done]
        self.last: dict[str, dict] = {}  # phase -> latest event (the Ctrl-C message uses it)
        self.failed = False
        self.flow_run_id = None  # set when the flow body starts; artifacts are attached to it

    def key(self, phase: str) -> str:
        name = slug(phase)
        return name if name.startswith(slug(self.stage)) else slug(f"{self.stage}-{phase}")

    def __call__(self, event: dict) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        phase, done, total = event["phase"], event["done"], event["total"]
        self.last.pop(phase, None)
        self.last[phase] = event  # most recent last
        line = progress.describe(event)
        if progress.log_due(event, self.every):
            log.info(line)
        if not total or self.failed or self.flow_run_id is None:
            return
        percent, now = round(100.0 * done / total, 2), time.monotonic()
        slot = self.artifacts.get(phase)
        try:
            # The client API, not create_progress_artifact: events from the Ray relay arrive on
            # another thread, outside the flow run's context.
            if slot is None or done <= slot[2]:  # a new loop of this phase: a new artifact
                with get_client(sync_client=True) as client:
                    artifact = client.create_artifact(
                        ArtifactCreate(
                            key=self.key(phase),
                            type="progress",
                            data=percent,
                            description=line,
                            flow_run_id=self.flow_run_id,
                        )
                    )
                self.artifacts[phase] = [artifact.id, now, done]
            elif done >= total or now - slot[1] >= ARTIFACT_INTERVAL:
                with get_client(sync_client=True) as client:
                    client.update_artifact(slot[0], ArtifactUpdate(data=percent, description=line))
                slot[1:] = [now, done]
            else:
                slot[2] = done
        except Exception as err:  # the run goes on without progress artifacts
            self.failed = True
            log.warning("progress artifacts off for this run: %s", err)

    def reached(self) -> str:
        if not self.last:
            return "before its first step"
        event = list(self.last.values())[-1]
        total = f"/{event['total']}" if event["total"] else ""
        return f"{event['phase']} {event['unit']} {event['done']}{total}"


def _dvc_stage(stage: str, item: str | None) -> dict:
    from stages import _dvcfile

    try:
        return _dvcfile.stage(stage, item)
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def _paths(entries) -> list[str]:
    from stages._dvcfile import entry_paths

    return entry_paths(entries)


def flatten(obj, prefix: str = "") -> dict:
    """Nested metrics as `a.b.c: value` rows; lists as JSON text."""
    if isinstance(obj, dict):
        out: dict = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        return {prefix: json.dumps(obj)}
    return {prefix: obj}


def publish_outputs(stage: str, item: str | None, params_path: str) -> None:
    """The stage's metrics, plots, markdown outputs and params as artifacts of its flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    spec = _dvc_stage(stage, item)
    name = f"{stage}-{item}" if item else stage
    for path in _paths(spec.get("metrics")):
        if path.endswith(".json") and Path(path).is_file():
            rows = flatten(json.loads(Path(path).read_text()))
            create_table_artifact(
                [{"metric": k, "value": v} for k, v in rows.items()],
                key=slug(f"{name}-metrics"),
                description=f"`{path}` (the stage's DVC metrics file)",
            )
    images = [p for p in _paths(spec.get("plots")) if p.endswith(".png") and Path(p).is_file()]
    if images:
        parts = []
        for path in images:
            data = Path(path).read_bytes()
            if len(data) <= MAX_EMBEDDED_PLOT:
                parts.append(
                    f"### {path}\n\n![{path}](data:image/png;base64,"
                    f"{base64.b64encode(data).decode()})\n"
                )
            else:
                parts.append(f"### {path}\n\n`{Path(path).resolve()}` ({len(data)} bytes)\n")
        create_markdown_artifact(
            "\n".join(parts), key=slug(f"{name}-plots"), description="the stage's plots (DVC plots)"
        )
    for path in _paths(spec.get("outs")):
        if path.endswith(".md") and Path(path).is_file():
            create_markdown_artifact(
                Path(path).read_text(),
                key=slug(f"{name}-{Path(path).stem}"),
                description=f"`{path}`",
            )
    values = _stage_params(spec.get("params"), params_path)
    if values:
        create_table_artifact(
            [{"param": k, "value": v} for k, v in values.items()],
            key=slug(f"{name}-params"),
            description=f"the `{params_path}` values this stage reads",
        )


def _stage_params(entries, params_path: str) -> dict:
    try:
        params = yaml.safe_load(Path(params_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict = {}
    for entry in entries or []:
        if not isinstance(entry, str):
            continue  # a section of another params file
        value = params
        for part in entry.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out.update(flatten(value, entry) if isinstance(value, dict) else {entry: value})
    return {k: v for k, v in out.items() if not k.startswith("data.sources.") or v is not None}


class Watch:
    """What run_stage needs after an interrupt: the flow run, and the step it reached."""

    def __init__(self, stage: str, reporter: FlowProgress):
        self.stage, self.reporter = stage, reporter
        self.flow_run_id = None

    def interrupted(self) -> None:
        """Ctrl-C: mark the flow run Cancelled with the step reached, say so in one line."""
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        message = (
            f"Interrupted (Ctrl-C) at {self.reporter.reached()}; the next `dvc repro` "
            "resumes from the latest checkpoint where the stage keeps one"
        )
        if self.flow_run_id is not None:
            try:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(
                        self.flow_run_id, Cancelled(message=message), force=True
                    )
            except Exception as err:
                message += f" (the flow run's state could not be set: {err})"
        print(f"{self.stage}: {message}", file=sys.stderr)


class _NoInterruptTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def stage_run(
    flow, params_path: str, kwargs: dict, item: str | None = None
) -> Iterator[tuple[Callable[[], object], Watch]]:
    """Everything around one stage's flow call: the shared server, tags, progress, artifacts.
    `item`: a foreach stage's item (`ingest@<item>`)."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra import prefect_server

    stage = flow.name
    reporter = FlowProgress(stage, progress.log_every())
    watch = Watch(stage, reporter)

    @functools.wraps(flow.fn)
    def body(*args, **kw):
        from prefect.runtime import flow_run

        watch.flow_run_id = reporter.flow_run_id = flow_run.id
        result = flow.fn(*args, **kw)
        try:
            publish_outputs(stage, item, params_path)
        except Exception as err:  # the outputs are written: a UI extra must not fail the stage
            log.warning("could not publish %s's results as artifacts: %s", stage, err)
        return result

    visible = flow.with_options()
    visible.fn = body
    # Prefect sets the root logger to WARNING: the library's INFO lines (progress, results)
    # would reach neither the terminal nor the flow run.
    library = logging.getLogger("vregion")
    library.setLevel(logging.INFO)
    # PREFECT_LOGGING_EXTRA_LOGGERS works only if set before prefect is first imported, which
    # a stage module may do before stages._common: attach the API handler here.
    from prefect.logging.handlers import APILogHandler

    if not any(isinstance(h, APILogHandler) for h in library.handlers):
        library.addHandler(APILogHandler())
    for name in ("prefect.flow_runs", "prefect.engine", "prefect.flow_engine"):
        logging.getLogger(name).addFilter(_NoInterruptTraceback())
    api = os.environ.get("PREFECT_API_URL") or prefect_server.shared(
        Path(os.environ["PREFECT_HOME"])
    )
    progress.reporters.append(reporter)
    try:
        with temporary_settings({PREFECT_API_URL: api}), tags(*run_tags()):
            yield (lambda: visible(params=params_path, **kwargs)), watch
    finally:
        progress.reporters.remove(reporter)
