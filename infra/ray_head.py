"""A local Ray head node on 127.0.0.1, for Ray Train jobs to join through RAY_ADDRESS.

    python -m infra ray start       # GCS on 127.0.0.1:6379, temp dir <project>/.ray
    python -m infra ray status
    python -m infra ray stop

Without it each training stage starts an in-process Ray; with it, export
`RAY_ADDRESS=127.0.0.1:6379` (and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, see below).

Two Ray behaviours this module works around:
- `ray start --node-ip-address=127.0.0.1` replaces a loopback address by the machine's routable
  IP and then binds GCS on all interfaces. Ray keeps loopback only when
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (its single-machine mode, despite the name also on
  Linux). A driver needs the same variable, else it rewrites `127.0.0.1` in RAY_ADDRESS too.
- `ray stop` stops every Ray process of the machine (found by name), including other
  projects' clusters. Here the head is started in its own session and stopped by that process
  group, in Ray's order (raylet, then agents, then GCS); GCS can ignore SIGTERM for 20+ s, so
  SIGKILL follows after a bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra import environment as environment_defaults
from infra import process
from infra.process import HOST, ServiceError, Status

DEFAULT_PORT = 6379
START_TIMEOUT = 90.0  # `ray start` takes ~7 s on 2 cores
STOP_TIMEOUT = 5.0  # per step (raylet, agents, GCS), then SIGKILL
RAY_ENV = environment_defaults.RAY
# <temp>/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store must fit a 107-byte socket path.
_SOCKET_SUFFIX = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


@dataclass(frozen=True)
class RayHead:
    """One local Ray head: GCS on 127.0.0.1:`port`, sessions and logs under `temp_dir`."""

    temp_dir: Path = field(default_factory=lambda: process.PROJECT_ROOT / ".ray")
    port: int = DEFAULT_PORT
    num_cpus: int | None = None
    resources: dict[str, float] | None = None
    """Custom resources of the head node (e.g. {"node-0": 1}, to place work on it)."""
    object_store_mb: int | None = None
    """Object store size; None: Ray's default (30% of memory)."""

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.temp_dir / "head.log"

    @property
    def state_path(self) -> Path:
        return self.temp_dir / "head.json"

    def command(self) -> list[str]:
        cmd = [
            process.find_executable("ray"),
            "start",
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={self.port}",
            "--include-dashboard=false",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.object_store_mb is not None:
            cmd.append(f"--object-store-memory={self.object_store_mb * 1024 * 1024}")
        return cmd


def environment() -> dict[str, str]:
    return {**os.environ, **RAY_ENV}


def healthy(address: str, timeout: float = 20.0) -> bool:
    """True if `ray status --address` reaches the GCS and lists the node."""
    try:
        result = subprocess.run(
            [process.find_executable("ray"), "status", "--address", address],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and "Active:" in result.stdout


def start(head: RayHead, *, timeout: float = START_TIMEOUT) -> str:
    """Run `ray start --head` (it daemonizes), then wait for `ray status`; return the address."""
    running = running_state(head.temp_dir)
    if running is not None:
        if running["port"] != head.port:
            raise ServiceError(
                f"a Ray head already runs from {head.temp_dir} at {running['address']}: "
                "`python -m infra ray stop` first"
            )
        if not healthy(head.address):
            raise ServiceError(f"Ray head at {head.address} runs but `ray status` fails")
        return head.address
    if len(str(head.temp_dir.resolve())) + _SOCKET_SUFFIX > 107:
        raise ServiceError(
            f"Ray temp dir {head.temp_dir} is too long for its Unix sockets (107 bytes); "
            "choose a shorter one with --temp-dir (e.g. /tmp/vregion-ray)"
        )
    if process.port_in_use(head.port):
        raise ServiceError(
            f"port {head.port} on {HOST} is taken by another process; choose another (--port)"
        )
    process.private_dir(head.temp_dir)
    deadline = time.monotonic() + timeout
    proc = process.spawn(head.command(), log_path=head.log_path, env=environment())
    process.write_state(
        head.state_path,
        {
            "pgid": proc.pid,
            "port": head.port,
            "address": head.address,
            "marker": str(head.temp_dir),
            "log": str(head.log_path),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        rc = None
    ok = rc == 0 and process.wait_until(
        lambda: healthy(head.address), timeout=max(deadline - time.monotonic(), 1.0), interval=1.0
    )
    if not ok:
        _terminate_group(proc.pid)
        process.clear_state(head.state_path)
        why = (
            f"`ray start` exited with code {rc}"
            if rc not in (0, None)
            else f"the Ray head at {head.address} was not up within {timeout:.0f} s"
        )
        raise ServiceError(
            f"{why}\nlast lines of {head.log_path}:\n{process.tail(head.log_path)}\n"
            f"(Ray's own logs: {head.temp_dir}/session_latest/logs)"
        )
    return head.address


def status(temp_dir: Path) -> Status:
    state = running_state(temp_dir)
    if state is None:
        return Status("ray", False, f"(no Ray head running from {temp_dir})")
    if not healthy(state["address"]):
        return Status(
            "ray", False, f"processes run but `ray status --address {state['address']}` fails"
        )
    return Status("ray", True, f"{state['address']}  log {temp_dir}/session_latest/logs")


def stop(temp_dir: Path, *, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the head's process group in Ray's order; True if nothing is left running."""
    state = process.read_state(temp_dir / "head.json")
    if state is None:
        return True
    if not process.owned_group(state["pgid"], state["marker"]):
        process.clear_state(temp_dir / "head.json")
        return True
    left = _terminate_group(state["pgid"], timeout=timeout)
    if not left:
        process.clear_state(temp_dir / "head.json")
    return not left


def _terminate_group(pgid: int, timeout: float = STOP_TIMEOUT) -> list[int]:
    """raylet first (agents fate-share with it), then the rest, GCS last; SIGKILL after bounds."""

    def pick(members: list[int], keyword: str) -> list[int]:
        return [pid for pid in members if keyword in process.cmdline(pid).split(" ", 1)[0]]

    members = process.group_members(pgid)
    raylets = pick(members, "raylet")
    gcs = pick(members, "gcs_server")
    process.terminate(raylets, timeout=timeout)
    rest = [pid for pid in process.group_members(pgid) if pid not in gcs]
    process.terminate(rest, timeout=timeout)
    process.terminate(gcs, timeout=timeout)
    return process.terminate(process.group_members(pgid), timeout=1.0)


def running_state(temp_dir: Path) -> dict | None:
    """The saved state if the service recorded there still runs, else None."""
    state = process.read_state(temp_dir / "head.json")
    if state and process.owned_group(state["pgid"], state["marker"]):
        return state
    return None
