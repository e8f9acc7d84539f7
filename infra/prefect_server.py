"""A local Prefect server (API + UI) on 127.0.0.1, so stage flow runs show up in one UI.

    python -m infra prefect start   # http://127.0.0.1:4200, PREFECT_HOME=<project>/.prefect
    python -m infra prefect status
    python -m infra prefect stop

Without it every stage starts a temporary server of its own; with it, export
`PREFECT_API_URL=http://127.0.0.1:4200/api` and every flow run lands here. State (the SQLite
database) lives in `PREFECT_HOME` (default `<project>/.prefect/`, git-ignored); the server log
is `server.log` there, its pid `server.pid` (the file `prefect server stop` reads too).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra import process
from infra.process import HOST, ServiceError, Status

DEFAULT_PORT = 4200
START_TIMEOUT = 90.0  # ~13 s measured on 2 cores; the first start also creates the database
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class PrefectServer:
    """One local Prefect server: state in `home` (its PREFECT_HOME), API on 127.0.0.1:`port`."""

    home: Path = field(default_factory=lambda: process.PROJECT_ROOT / ".prefect")
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.home / "server.pid"

    @property
    def state_path(self) -> Path:
        return self.home / "server.json"

    def command(self) -> list[str]:
        return [
            process.find_executable("prefect"),
            "server",
            "start",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--analytics-off",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)  # the server must not talk to another server
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(self.port),
        )
        return env


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True if GET <api>/health answers `true`."""
    try:
        status, body = process.http_get(api_url + "/health", timeout=timeout)
    except OSError:
        return False
    return status == 200 and body.strip() == b"true"


def start(server: PrefectServer, *, timeout: float = START_TIMEOUT) -> str:
    """Start `prefect server start` in the background and wait for /api/health; return the API URL."""
    running = running_state(server.home)
    if running is not None:
        if running["port"] != server.port:
            raise ServiceError(
                f"a Prefect server already runs from {server.home} on port {running['port']}: "
                "`python -m infra prefect stop` first"
            )
        if not process.wait_until(lambda: healthy(server.api_url), timeout=timeout):
            raise ServiceError(f"Prefect server pid {running['pid']} runs but is not healthy")
        return server.api_url
    if process.port_in_use(server.port):
        raise ServiceError(
            f"port {server.port} on {HOST} is taken by another process; choose another (--port)"
        )
    process.private_dir(server.home)
    proc = process.spawn(server.command(), log_path=server.log_path, env=server.environment())
    server.pid_path.write_text(f"{proc.pid}\n")
    process.write_state(
        server.state_path,
        {
            "pid": proc.pid,
            "port": server.port,
            "api_url": server.api_url,
            "marker": f"server start --host {HOST} --port {server.port}",
            "log": str(server.log_path),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    if not process.wait_until(lambda: healthy(server.api_url), timeout=timeout, process=proc):
        exited = proc.poll() is not None
        process.terminate(process.group_members(proc.pid), timeout=5.0)
        process.clear_state(server.pid_path, server.state_path)
        why = (
            f"`prefect server start` exited with code {proc.returncode}"
            if exited
            else f"{server.api_url}/health did not answer within {timeout:.0f} s"
        )
        raise ServiceError(
            f"{why}\nlast lines of {server.log_path}:\n{process.tail(server.log_path)}"
        )
    return server.api_url


def status(home: Path) -> Status:
    state = running_state(home)
    if state is None:
        return Status("prefect", False, f"(no Prefect server running from {home})")
    if not healthy(state["api_url"]):
        return Status(
            "prefect", False, f"pid {state['pid']} runs but {state['api_url']} is unhealthy"
        )
    return Status("prefect", True, f"{state['api_url']}  pid {state['pid']}  log {state['log']}")


def stop(home: Path, *, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM the server's process group (SIGKILL after `timeout` s); True if nothing is left."""
    state = process.read_state(home / "server.json")
    if state is None:
        return True
    members = process.owned_group(state["pid"], state["marker"])
    left = process.terminate(members, timeout=timeout) if members else []
    if not left:
        process.clear_state(home / "server.pid", home / "server.json")
    return not left


def running_state(home: Path) -> dict | None:
    """The saved state if the service recorded there still runs, else None."""
    state = process.read_state(home / "server.json")
    if state and process.owned_group(state["pid"], state["marker"]):
        return state
    return None


# --- The server the stages of a run share -----------------------------------------------------
# Without PREFECT_API_URL each stage used to start an ephemeral server of its own (~12 s) in the
# stage's process group, so Ctrl-C in a terminal killed it before the stage could report its
# state. `shared()` starts one server per PREFECT_HOME in its own session instead (Ctrl-C does
# not reach it), reuses it across stages, and a watchdog stops it once idle.

IDLE_STOP = 600.0  # s without a running flow run before an auto-started server stops itself


def shared(home: Path, *, idle_stop: float | None = None, timeout: float = START_TIMEOUT) -> str:
    """The API URL of the server running from `home` (one `python -m infra prefect start`
    started, or an earlier stage), else start one on 4200 (a free port if taken) with a watchdog
    that stops it after `idle_stop` s without a running flow run (env VREGION_PREFECT_IDLE_STOP)."""
    import fcntl

    process.private_dir(home)
    with open(home / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # stages of parallel experiments start one server
        running = running_state(home)
        if running is not None:
            if process.wait_until(lambda: healthy(running["api_url"]), timeout=timeout):
                return running["api_url"]
        port = DEFAULT_PORT if not process.port_in_use(DEFAULT_PORT) else process.free_ports(1)[0]
        api_url = start(PrefectServer(home=home, port=port), timeout=timeout)
        if idle_stop is None:
            idle_stop = float(os.environ.get("VREGION_PREFECT_IDLE_STOP", IDLE_STOP))
        pid = running_state(home)["pid"]
        watch = [sys.executable, "-m", "infra.prefect_server", "watch", str(home), str(idle_stop)]
        watch += [str(pid), str(port)]
        process.spawn(watch, log_path=home / "watchdog.log", env=_watchdog_env())
        return api_url


def _watchdog_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(process.PROJECT_ROOT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def busy(api_url: str) -> bool:
    """True if a flow run is Pending or Running on the server."""
    body = json.dumps(
        {"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}, "limit": 1}
    ).encode()
    request = urllib.request.Request(
        api_url + "/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bool(json.loads(response.read()))


def watch(home: Path, idle_stop: float, pid: int, port: int, poll: float = 10.0) -> None:
    """Stop the server `pid` (on `port`) running from `home` once no flow run has run for
    `idle_stop` seconds, or once `home` is deleted (a DVC experiment's temporary workspace)."""
    last_busy = time.monotonic()
    started = {"pid": pid, "marker": f"server start --host {HOST} --port {port}"}
    while True:
        state = running_state(home)
        if state is None and not home.exists():
            members = process.owned_group(started["pid"], started["marker"])
            process.terminate(members, timeout=STOP_TIMEOUT)
            return
        if state is None or state["pid"] != started["pid"]:
            return  # stopped, or replaced by a server someone else started: not ours to stop
        try:
            if busy(state["api_url"]):
                last_busy = time.monotonic()
        except OSError:
            pass
        if time.monotonic() - last_busy > idle_stop:
            stop(home)
            return
        time.sleep(min(poll, idle_stop))


if __name__ == "__main__":  # python -m infra.prefect_server watch HOME IDLE_SECONDS PID PORT
    if sys.argv[1:2] == ["watch"] and len(sys.argv) == 6:
        watch(Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: python -m infra.prefect_server watch HOME IDLE_SECONDS PID PORT")
