"""What every stage shares: offline/quiet settings, logging, params, output writers, the CLI shell."""

from __future__ import annotations

from infra.environment import apply_defaults

# Before Prefect, Ray, DVC or transformers are imported (a user's own settings still win).
apply_defaults()

import argparse  # noqa: E402
import csv  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from vregion.config import ConfigError, load_params  # noqa: E402
from vregion.region.registry import check_params  # noqa: E402

log = logging.getLogger("vregion.stages")


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """Rows as CSV; `fields` names the columns when there may be no row to take them from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else []))
        writer.writeheader()
        writer.writerows(rows)


class _ActionableErrorsWithoutTraceback(logging.Filter):
    """A bad config value or input file is the user's to fix: its message says how, and a
    traceback in the flow run's log would only bury it."""

    def __init__(self, kinds: tuple[type[BaseException], ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.kinds):
            record.exc_info, record.exc_text = None, None
        return True


def _path_params(flow: Callable[..., object], positional: str | None) -> list[str]:
    """The flow's path parameters: all but `params` and the positional one."""
    names = inspect.signature(flow.fn).parameters
    return [n for n in names if n not in ("params", positional)]


def _parser(
    flow: Callable[..., object],
    description: str,
    positional: tuple[str, str] | None,
    shown: dict[str, str],
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {flow.__module__}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Paths default to this stage's `cmd` in dvc.yaml (its `vars: paths`).",
    )
    if positional:
        parser.add_argument(positional[0], help=positional[1])
    described = flow.parameters.properties  # from the flow's docstring (Args:), as the UI shows
    for name in _path_params(flow, positional and positional[0]):
        text = described.get(name, {}).get("description", name)
        default = f"default: {shown[name]}" if name in shown else "no default in dvc.yaml"
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, metavar="PATH", help=f"{text} ({default})"
        )
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    return parser


def stage_defaults(
    flow: Callable[..., object], key: str | None = None, positional: str | None = None
) -> dict[str, str]:
    """The path arguments dvc.yaml's `cmd` gives the flow's stage (item `key` of a foreach
    stage): `python -m stages.X` by hand runs what `dvc repro` would."""
    from stages import _dvcfile

    argv = _dvcfile.command_args(flow.name, key)
    parser = _parser(flow, "", (positional, "") if positional else None, {})
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise _dvcfile.DvcFileError(
            f"dvc.yaml: stage {flow.name!r}: its cmd passes {unknown}, which "
            f"`python -m {flow.__module__}` does not take"
        )
    return {n: getattr(args, n) for n in _path_params(flow, positional) if getattr(args, n)}


def run_stage(
    flow: Callable[..., object],
    description: str,
    argv: list[str] | None = None,
    positional: tuple[str, str] | None = None,
) -> int:
    """`python -m stages.X [ARG] [--PATH ...] [--params params.yaml]`: run the flow with the
    paths given, else those of its stage in dvc.yaml; bad config or bad input data exits 2 with
    the fix, Ctrl-C exits 130 with the run marked Cancelled at the step it reached.
    `positional` = (name, help) of one argument passed to the flow (a foreach stage's item)."""
    from stages._dvcfile import DvcFileError
    from vregion.data.llava_format import DataFileError

    name = positional[0] if positional else None
    try:  # for --help: a foreach stage's paths shown with its item's name as a placeholder
        shown = stage_defaults(flow, name and f"<{name}>", name)
    except (OSError, DvcFileError):
        shown = {}
    args = _parser(flow, description, positional, shown).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    item = getattr(args, name) if name else None
    try:
        defaults = stage_defaults(flow, item, name)
    except (OSError, DvcFileError) as err:
        defaults, why = {}, f" ({err})"
    else:
        why = ""
    kwargs = {n: getattr(args, n) or defaults.get(n) for n in _path_params(flow, name)}
    missing = ["--" + n.replace("_", "-") for n, v in kwargs.items() if not v]
    if missing:
        print(f"error: no {', '.join(missing)} given and none from dvc.yaml{why}", file=sys.stderr)
        return 2
    if name:
        kwargs = {name: item, **kwargs}
    actionable = (ConfigError, FileNotFoundError, DataFileError)
    logging.getLogger("prefect.flow_runs").addFilter(_ActionableErrorsWithoutTraceback(actionable))
    try:
        # Fail fast, before a Prefect server starts or a model loads for nothing; the scorer
        # and strategy names too, of the registries this stage imported (it uses them).
        check_params(load_params(args.params), loaded_only=True)
    except actionable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from stages import _visible

    with _visible.stage_run(flow, args.params, kwargs, item) as (run, watch):
        try:
            run()
        except actionable as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        # Ctrl-C: a KeyboardInterrupt, or during Ray Train's fit() a SystemExit (its SIGINT
        # handler aborts the run and calls sys.exit; no stage calls it).
        except (KeyboardInterrupt, SystemExit):
            watch.interrupted()
            return 130
    return 0
