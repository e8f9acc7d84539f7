"""`python -m infra <s3|prefect|ray|all> <start|status|stop>`: see `infra/__init__.py`.

Exit codes: 0 done (status: up), 1 failed (the message says why, with the log's last lines),
3 status: down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from infra import prefect_server, process, ray_head, ray_nodes, seaweedfs
from infra.process import ServiceError
from vregion.storage import BUCKET, DEFAULT_BUCKET, StorageError

ACTIONS = ("start", "status", "stop")
EXAMPLES = """\
examples:
  python -m infra s3 start                 S3 on http://127.0.0.1:8333, bucket 'vregion', state in .s3/
  python -m infra s3 start --bucket demo --s3-port 18333
  python -m infra prefect start            UI and API on http://127.0.0.1:4200, PREFECT_HOME=.prefect/
  python -m infra ray start                Ray head on 127.0.0.1:6379, temp dir .ray/
  python -m infra ray start --nodes 2 --num-cpus 1   head + a worker node (both 127.0.0.1)
  python -m infra all status
  python -m infra all stop
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    services = ["s3", "prefect", "ray"] if args.service == "all" else [args.service]
    if args.service == "all" and args.action == "stop":
        services.reverse()
    codes = [_run(service, args) for service in services]
    if args.action == "status":
        return 0 if all(code == 0 for code in codes) else 3
    return max(codes)


def _run(service: str, args: argparse.Namespace) -> int:
    try:
        if args.action == "start":
            return _START[service](args)
        if args.action == "status":
            status = _STATUS[service](args)
            print(status)
            return 0 if status.up else 3
        if not _RUNNING[service](args):
            _STOP[service](args)  # clears a stale pid/state file, if any
            print(f"{service}: not running")
            return 0
        ok = _STOP[service](args)
        print(f"{service}: stopped" if ok else f"{service}: some processes survived SIGKILL")
        return 0 if ok else 1
    except (ServiceError, StorageError) as err:
        print(f"{service}: {args.action} failed: {err}", file=sys.stderr)
        return 1


def _start_s3(args: argparse.Namespace) -> int:
    ports = seaweedfs.WeedPorts(
        s3=getattr(args, "s3_port", 8333),
        master=getattr(args, "master_port", 9333),
        volume=getattr(args, "volume_port", 9340),
        filer=getattr(args, "filer_port", 8888),
        admin=getattr(args, "admin_port", 23646),
    )
    server = seaweedfs.SeaweedFS(state_dir=_s3_dir(args), ports=ports)
    if getattr(args, "no_bucket", False):
        buckets: tuple[str, ...] = ()
    else:
        buckets = tuple(getattr(args, "bucket", None) or [os.environ.get(BUCKET) or DEFAULT_BUCKET])
    key, secret, source = seaweedfs.credentials(server)
    verb = "already up" if seaweedfs.running_state(server.state_dir) else "up"
    began = time.monotonic()
    settings = seaweedfs.start(
        server,
        access_key_id=key,
        secret_access_key=secret,
        buckets=buckets,
        timeout=getattr(args, "timeout", None) or seaweedfs.START_TIMEOUT,
    )
    print(
        f"s3: {verb} at {settings.endpoint_url} (ready in {time.monotonic() - began:.1f} s; "
        f"log {_show(server.log_path)})"
    )
    print(f"    buckets: {', '.join(buckets) or '(none created)'}; credentials {source}")
    print("Point vregion, DVC and Ray Train at it:")
    print(seaweedfs.exports(settings, _show(server.env_path)))
    return 0


def _start_prefect(args: argparse.Namespace) -> int:
    server = prefect_server.PrefectServer(
        home=_prefect_home(args), port=getattr(args, "port", None) or prefect_server.DEFAULT_PORT
    )
    verb = "already up" if prefect_server.running_state(server.home) else "up"
    began = time.monotonic()
    api_url = prefect_server.start(
        server, timeout=getattr(args, "timeout", None) or prefect_server.START_TIMEOUT
    )
    print(
        f"prefect: {verb} at {server.url} (UI; ready in {time.monotonic() - began:.1f} s; "
        f"log {_show(server.log_path)})"
    )
    print("Send flow runs to it:")
    print(f"  export PREFECT_API_URL={api_url}")
    return 0


def _start_ray(args: argparse.Namespace) -> int:
    nodes = getattr(args, "nodes", None) or 1
    if nodes > 1:  # a local multi-node cluster: head + worker nodes, all on 127.0.0.1
        began = time.monotonic()
        address = ray_nodes.start_cluster(
            _ray_dir(args),
            nodes=nodes,
            port=getattr(args, "port", None) or ray_head.DEFAULT_PORT,
            num_cpus=getattr(args, "num_cpus", None) or 1,
            timeout=getattr(args, "timeout", None) or ray_head.START_TIMEOUT,
        )
        print(
            f"ray: {nodes} nodes up at {address} (ready in {time.monotonic() - began:.1f} s; "
            f"resources node-0..node-{nodes - 1})"
        )
        print(f"  export RAY_ADDRESS={address}")
        print("  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
        return 0
    head = ray_head.RayHead(
        temp_dir=_ray_dir(args),
        port=getattr(args, "port", None) or ray_head.DEFAULT_PORT,
        num_cpus=getattr(args, "num_cpus", None),
    )
    verb = "already up" if ray_head.running_state(head.temp_dir) else "up"
    began = time.monotonic()
    address = ray_head.start(head, timeout=getattr(args, "timeout", None) or ray_head.START_TIMEOUT)
    print(
        f"ray: head {verb} at {address} (ready in {time.monotonic() - began:.1f} s; "
        f"logs {_show(head.temp_dir)}/session_latest/logs)"
    )
    print("Let Ray Train jobs join it (the second line keeps Ray on 127.0.0.1):")
    print(f"  export RAY_ADDRESS={address}")
    print("  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    return 0


_START = {"s3": _start_s3, "prefect": _start_prefect, "ray": _start_ray}
_STATUS = {
    "s3": lambda a: seaweedfs.status(_s3_dir(a)),
    "prefect": lambda a: prefect_server.status(_prefect_home(a)),
    "ray": lambda a: ray_head.status(_ray_dir(a)),
}
_RUNNING = {
    "s3": lambda a: seaweedfs.running_state(_s3_dir(a)),
    "prefect": lambda a: prefect_server.running_state(_prefect_home(a)),
    "ray": lambda a: ray_head.running_state(_ray_dir(a)),
}
_STOP = {
    "s3": lambda a: seaweedfs.stop(_s3_dir(a)),
    "prefect": lambda a: prefect_server.stop(_prefect_home(a)),
    "ray": lambda a: ray_nodes.stop_cluster(_ray_dir(a)),
}


def _s3_dir(args) -> Path:
    return getattr(args, "dir", None) or process.PROJECT_ROOT / ".s3"


def _prefect_home(args) -> Path:
    return getattr(args, "home", None) or process.PROJECT_ROOT / ".prefect"


def _ray_dir(args) -> Path:
    return getattr(args, "temp_dir", None) or process.PROJECT_ROOT / ".ray"


def _show(path: Path | str) -> str:
    """A path relative to the current directory when it is below it (shorter to read)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _abs_path(text: str) -> Path:
    return Path(text).expanduser().resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra",
        description="Start, check and stop vregion's local services (all on 127.0.0.1).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="service", required=True, metavar="SERVICE")

    s3 = sub.add_parser(
        "s3",
        help="SeaweedFS S3 store (default http://127.0.0.1:8333, state in .s3/)",
        description=seaweedfs.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s3.add_argument("action", choices=ACTIONS)
    s3.add_argument("--dir", type=_abs_path, help="state directory (default: <project>/.s3)")
    s3.add_argument(
        "--bucket",
        action="append",
        help=f"bucket to create on start, repeatable (default: ${BUCKET} or {DEFAULT_BUCKET!r})",
    )
    s3.add_argument("--no-bucket", action="store_true", help="create no bucket")
    defaults = seaweedfs.WeedPorts()
    for name in ("s3", "master", "volume", "filer", "admin"):
        s3.add_argument(
            f"--{name}-port",
            type=int,
            default=getattr(defaults, name),
            help=f"{name} HTTP port; gRPC uses it + 10000 (default: %(default)s)",
        )
    s3.add_argument(
        "--timeout", type=float, default=seaweedfs.START_TIMEOUT, help="start timeout, seconds"
    )

    prefect = sub.add_parser(
        "prefect",
        help="Prefect server (default http://127.0.0.1:4200, PREFECT_HOME .prefect/)",
        description=prefect_server.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prefect.add_argument("action", choices=ACTIONS)
    prefect.add_argument(
        "--home", type=_abs_path, help="PREFECT_HOME (default: <project>/.prefect)"
    )
    prefect.add_argument("--port", type=int, default=prefect_server.DEFAULT_PORT)
    prefect.add_argument(
        "--timeout", type=float, default=prefect_server.START_TIMEOUT, help="start timeout, seconds"
    )

    ray = sub.add_parser(
        "ray",
        help="Ray head node (default 127.0.0.1:6379, temp dir .ray/)",
        description=ray_head.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ray.add_argument("action", choices=ACTIONS)
    ray.add_argument("--temp-dir", type=_abs_path, help="Ray temp dir (default: <project>/.ray)")
    ray.add_argument("--port", type=int, default=ray_head.DEFAULT_PORT, help="GCS port")
    ray.add_argument("--num-cpus", type=int, help="CPUs to offer per node (default: all)")
    ray.add_argument(
        "--nodes", type=int, default=1, help="nodes on this machine: head + N-1 worker raylets"
    )
    ray.add_argument(
        "--timeout", type=float, default=ray_head.START_TIMEOUT, help="start timeout, seconds"
    )

    every = sub.add_parser("all", help="all three, with their default settings")
    every.add_argument("action", choices=ACTIONS)
    return parser


if __name__ == "__main__":
    sys.exit(main())
