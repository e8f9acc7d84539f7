"""The whole pipeline as one Prefect flow: `dvc repro`, metrics as an artifact, `dvc push`.

DVC decides what is stale; this flow only runs it and makes it visible. Each DVC stage is
`python -m stages.<name>`, itself a Prefect flow: the flow hands its own Prefect API URL to
`dvc`, so every stage shows up as its own flow run in the same server as the pipeline run.

    python -m flows.pipeline run                       # dvc repro, metrics artifact, dvc push
    python -m flows.pipeline run -S align.steps=300    # dvc exp run -S align.steps=300
    python -m flows.pipeline run --targets prepare --no-push
    python -m flows.pipeline serve --cron "0 3 * * *"  # a scheduled deployment in the UI

Tasks:

- `check_storage`: one real, bounded S3 request before any work, so a wrong endpoint or
  wrong credentials fail in seconds with a message naming the endpoint and what to check
  (and nothing is computed, published or written).
- `reproduce`: `dvc repro [targets]` or `dvc exp run -S k=v ...`; its output streams to the
  run's logs. No retries: a failing stage is a real failure.
- `push_outputs`: `dvc push`. Retried with exponential backoff, but only for transient
  storage errors (connection refused/reset, timeouts, HTTP 5xx, throttling), never for
  credential, permission or configuration errors.
- `publish_metrics`: `dvc metrics show --json` as a markdown table, artifact `vregion-metrics`.
  Published last, so a run that failed to store its outputs leaves no artifact.

Retry delays: `VREGION_RETRY_DELAY` (seconds, default 10) is the backoff factor: delays are
factor × 1, 2, 4, ...; `VREGION_RETRIES` (default 3) the number of retries.
"""

from __future__ import annotations

from infra.environment import apply_defaults

apply_defaults()  # before Prefect and DVC are imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from flows.commands import run_dvc, stream  # noqa: E402
from vregion.storage import S3Settings, StorageError, check_s3  # noqa: E402

METRICS_ARTIFACT = "vregion-metrics"
RETRY_DELAY_ENV = "VREGION_RETRY_DELAY"
RETRIES_ENV = "VREGION_RETRIES"

# Text in an S3 / dvc error that means "try again later" ...
_TRANSIENT = re.compile(
    r"cannot reach the S3 endpoint|did not answer in time|answered HTTP 5\d\d|"
    r"connection (refused|reset|aborted|closed)|could not connect|timed? ?out|"
    r"temporar(y|ily)|ServiceUnavailable|InternalError|SlowDown|RequestTimeout|"
    r"\b50[0234]\b|EndpointConnectionError",
    re.IGNORECASE,
)
# ... unless it also says the request was refused on purpose: retrying cannot fix these.
_PERMANENT = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|\b403\b|NoSuchBucket|"
    r"refused the credentials|denied access|no S3 credentials|invalid S3|ExpiredToken|"
    r"InvalidToken|does not exist",
    re.IGNORECASE,
)


class TransientStorageError(StorageError):
    """A storage failure that may succeed if tried again (unreachable, timeout, 5xx)."""


class PipelineError(RuntimeError):
    """A DVC command failed for a reason other than storage (a stage failed, bad config)."""


def classify_storage_error(message: str) -> StorageError:
    """A StorageError for `message`: TransientStorageError when retrying may help."""
    if _TRANSIENT.search(message) and not _PERMANENT.search(message):
        return TransientStorageError(message)
    return StorageError(message)


def retry_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry transient storage and network errors only."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # the result itself cannot be read: judge that error
            exc = err
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError | PipelineError):
        return False
    return isinstance(exc, ConnectionError | TimeoutError)


def retry_settings(
    retries: int | None = None, retry_delay: float | None = None
) -> tuple[int, list[float]]:
    """(retries, delays): arguments first, then VREGION_RETRIES / VREGION_RETRY_DELAY."""
    if retries is None:
        retries = int(os.environ.get(RETRIES_ENV, "3"))
    if retry_delay is None:
        retry_delay = float(os.environ.get(RETRY_DELAY_ENV, "10"))
    return retries, exponential_backoff(backoff_factor=retry_delay)(max(retries, 1))


def prefect_api_url() -> str | None:
    """The API this process reports to: the setting, or the ephemeral server it started.

    Under `prefect_test_harness` and the ephemeral server the URL exists only in this process
    (a settings context or a subprocess server), not in os.environ: ask the client.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return str(url)
    try:
        return str(get_client(sync_client=True).api_url).rstrip("/")
    except Exception:  # no API at all: children start their own ephemeral server
        return None


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for `dvc`: this interpreter first on PATH, this process's Prefect API."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    url = prefect_api_url()
    if url:
        env["PREFECT_API_URL"] = url
    env.update(extra or {})
    return env


def dvc_command(
    targets: Iterable[str] | None = None,
    set_params: Mapping[str, object] | None = None,
    experiment: bool = False,
) -> list[str]:
    """`dvc repro [targets]`, or `dvc exp run [-S k=v ...] [targets]` for an experiment."""
    targets = list(targets or [])
    if experiment or set_params:
        cmd = [sys.executable, "-m", "dvc", "exp", "run"]
        for key, value in (set_params or {}).items():
            cmd += ["-S", f"{key}={_param_value(value)}"]
        return cmd + targets
    return [sys.executable, "-m", "dvc", "repro", *targets]


def _param_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def default_remote(repo: str | Path) -> str | None:
    """Name of the DVC repo's default remote, or None."""
    out = run_dvc(repo, "remote", "default")
    name = out.stdout.strip()
    return name if out.returncode == 0 and name else None


def remote_settings(repo: str | Path, name: str) -> S3Settings | None:
    """S3Settings for DVC remote `name` (url, endpoint, region, keys from config and
    config.local); keys fall back to the environment. None for a non-S3 remote."""
    out = run_dvc(repo, "config", "--list")
    if out.returncode != 0:
        raise PipelineError(f"`dvc config --list` failed in {repo}: {out.stderr.strip()}")
    conf: dict[str, str] = {}
    prefix = f"remote.{name}."
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith(prefix):
            conf[key[len(prefix) :]] = value
    url = urlsplit(conf.get("url", ""))
    if url.scheme != "s3":
        return None
    env = S3Settings.from_env()
    key, secret = conf.get("access_key_id"), conf.get("secret_access_key")
    if not (key and secret):
        key, secret = env.access_key_id, env.secret_access_key
    return S3Settings(
        bucket=url.netloc,
        endpoint_url=conf.get("endpointurl") or env.endpoint_url,
        prefix=url.path.strip("/"),
        region=conf.get("region") or env.region,
        access_key_id=key,
        secret_access_key=secret,
    )


@task(
    name="check-storage",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=retry_transient,
)
def check_storage(settings: S3Settings) -> str:
    """One bounded request to the store; StorageError (transient or not) with what to check."""
    try:
        check_s3(settings)
    except StorageError as err:
        raise classify_storage_error(str(err)) from None
    get_run_logger().info("S3 store reachable: %s (bucket %r)", settings.where, settings.bucket)
    return settings.url()


@task(name="reproduce", retries=0, cache_policy=NO_CACHE)
def reproduce(
    repo: str,
    targets: list[str] | None = None,
    set_params: dict | None = None,
    experiment: bool = False,
) -> str:
    """`dvc repro` / `dvc exp run`, output streamed to the run's logs; PipelineError on failure."""
    logger = get_run_logger()
    cmd = dvc_command(targets, set_params, experiment)
    shown = " ".join(["dvc", *cmd[3:]])
    env = child_env({"VREGION_RUN_ID": group_id()})  # the stages' runs carry our tag
    logger.info("running `%s` in %s (Prefect API: %s)", shown, repo, env.get("PREFECT_API_URL"))
    code, tail = stream(cmd, repo, env, logger)
    if code != 0:
        raise PipelineError(f"`{shown}` failed with exit code {code}; last lines:\n{tail}")
    return tail


@task(
    name="push-outputs",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=retry_transient,
)
def push_outputs(repo: str, settings: S3Settings | None = None, remote: str | None = None) -> str:
    """Check the store, then `dvc push`; transient failures raise TransientStorageError."""
    logger = get_run_logger()
    if settings is not None:
        try:
            check_s3(settings)
        except StorageError as err:
            raise classify_storage_error(str(err)) from None
    cmd = [sys.executable, "-m", "dvc", "push", *(["-r", remote] if remote else [])]
    code, tail = stream(cmd, repo, child_env(), logger)
    if code != 0:
        where = settings.where if settings else f"DVC remote {remote or '(default)'}"
        raise classify_storage_error(
            f"`dvc push` to {where} failed (exit code {code}); last lines:\n{tail}"
        )
    return tail


def flatten(data: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if isinstance(data, Mapping):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def metrics_table(metrics: Mapping[str, Mapping[str, object]]) -> str:
    """Markdown: one row per metric (file, metric, value)."""
    lines = ["| file | metric | value |", "|---|---|---|"]
    for path, values in metrics.items():
        for name, value in flatten(values).items():
            if isinstance(value, float):
                value = f"{value:.6g}"
            text = str(value).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {path} | {name} | {text} |")
    return "\n".join(lines)


@task(name="publish-metrics", cache_policy=NO_CACHE)
def publish_metrics(repo: str, title: str = "vregion metrics") -> dict:
    """`dvc metrics show --json` as the `vregion-metrics` markdown artifact; returns
    {metrics file: {metric: value}}."""
    out = run_dvc(repo, "metrics", "show", "--json")
    if out.returncode != 0:
        raise PipelineError(f"`dvc metrics show --json` failed: {out.stderr.strip()[-2000:]}")
    shown = json.loads(out.stdout or "{}")
    workspace = shown.get("", shown.get("workspace", {})) if isinstance(shown, dict) else {}
    metrics = {
        path: entry.get("data", {})
        for path, entry in (workspace.get("data") or {}).items()
        if isinstance(entry, dict)
    }
    markdown = f"# {title}\n\n{metrics_table(metrics)}\n"
    create_markdown_artifact(
        markdown=markdown, key=METRICS_ARTIFACT, description="`dvc metrics show` after the run"
    )
    from stages._dvcfile import paths

    name = paths(Path(repo, "dvc.yaml"))["summary"]
    summary = Path(repo, name)
    if summary.is_file():  # the report stage's page, on the pipeline's run too
        create_markdown_artifact(
            markdown=summary.read_text(), key="vregion-summary", description=name
        )
    return metrics


def group_id() -> str:
    """`run:<id>` groups this pipeline run and its stages' runs in the UI (one tag filter):
    VREGION_RUN_ID if set (a sweep names its experiment), else `pipeline-<flow run id>`."""
    from prefect.runtime import flow_run

    return os.environ.get("VREGION_RUN_ID") or f"pipeline-{str(flow_run.id)[:8]}"


def tag_this_run() -> None:
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, tags=[*run.tags, "vregion", f"run:{group_id()}"])


@flow(name="vregion-pipeline", log_prints=True)
def pipeline(
    repo: str = ".",
    targets: list[str] | None = None,
    set_params: dict | None = None,
    experiment: bool = False,
    push: bool | None = None,
    remote: str | None = None,
    retries: int | None = None,
    retry_delay: float | None = None,
) -> dict:
    """Run the DVC pipeline, push its outputs, publish its metrics.

    repo: the DVC repo. targets: stages for `dvc repro` (default: all). set_params:
    {"align.steps": 50} → `dvc exp run -S align.steps=50`; experiment: `dvc exp run` even
    without overrides. push: `dvc push` afterwards (default: iff the repo has a default DVC
    remote). remote: a remote other than the default. retries / retry_delay: storage retries
    and backoff factor in seconds (default: VREGION_RETRIES / VREGION_RETRY_DELAY, 3 / 10).

    Returns {metrics file: {metric: value}}.
    """
    logger = get_run_logger()
    tag_this_run()
    repo = str(Path(repo).resolve())
    name = remote or default_remote(repo)
    if push is None:
        push = name is not None
    settings = None
    retry_opts = {}
    if push:
        if name is None:
            raise StorageError(
                f"push requested but the DVC repo {repo} has no default remote: "
                "`dvc remote add -d NAME s3://BUCKET/dvc` (or pass push=False / --no-push)"
            )
        settings = remote_settings(repo, name)
        n, delays = retry_settings(retries, retry_delay)
        retry_opts = {"retries": n, "retry_delay_seconds": delays}
        if settings is not None:  # fail before any work if the store is unusable
            check_storage.with_options(**retry_opts)(settings)
    else:
        logger.info("not pushing (no default DVC remote, or push=False)")
    reproduce(repo, targets, set_params, experiment)
    if push:
        push_outputs.with_options(**retry_opts)(repo, settings, remote)
    return publish_metrics(repo)


def _parse_set(values: list[str]) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"-S expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value) if value else value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description=(
            "The vregion pipeline as one Prefect flow: `dvc repro` (or `dvc exp run -S ...`), "
            "`dvc push` to the S3 remote, metrics as the Prefect artifact 'vregion-metrics'. "
            "Each DVC stage appears as its own flow run in the same Prefect API "
            "(PREFECT_API_URL, or a temporary local server when unset)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,serve}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo", default=".", help="the DVC repo (default: .)")
        p.add_argument(
            "--targets", nargs="+", metavar="STAGE", help="stages to reproduce (default: all)"
        )
        p.add_argument(
            "-S",
            "--set-param",
            dest="set_params",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a param for this run (`dvc exp run -S`); repeatable",
        )
        p.add_argument(
            "--experiment", action="store_true", help="use `dvc exp run` even without -S"
        )
        push = p.add_mutually_exclusive_group()
        push.add_argument(
            "--push",
            dest="push",
            action="store_true",
            default=None,
            help="`dvc push` afterwards (default: iff a default DVC remote is configured)",
        )
        push.add_argument("--no-push", dest="push", action="store_false", help="do not push")
        p.add_argument("--remote", help="DVC remote to push to (default: the default remote)")

    run = sub.add_parser(
        "run",
        help="run the pipeline once",
        description="Run the pipeline once and exit: 0 on success, 1 on a failed stage or "
        "unusable storage (one line saying what to check).",
    )
    common(run)
    serve = sub.add_parser(
        "serve",
        help="serve the pipeline on a cron schedule (a deployment in the Prefect UI)",
        description="Create the deployment 'vregion-pipeline/NAME' with a cron schedule and "
        "run it from this process until interrupted. Point PREFECT_API_URL at a server "
        "(`python -m infra prefect start`, UI at http://127.0.0.1:4200) to see and trigger it.",
    )
    common(serve)
    serve.add_argument(
        "--cron", default="0 3 * * *", help='cron schedule (default: "0 3 * * *", 03:00 daily)'
    )
    serve.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = {
            "repo": str(Path(args.repo).resolve()),
            "targets": args.targets,
            "set_params": _parse_set(args.set_params) or None,
            "experiment": args.experiment,
            "push": args.push,
            "remote": args.remote,
        }
    except argparse.ArgumentTypeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "serve":
        pipeline.serve(name=args.name, cron=args.cron, parameters=params)
        return 0
    try:
        pipeline(**params)
    except (StorageError, PipelineError) as err:
        first = str(err).splitlines()[0]
        print(f"error: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
