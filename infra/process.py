"""Start, watch and stop one background service process; shared by the three services.

Each service runs in its own session (`start_new_session=True`), so its process group id is
the pid we started and a stop signals exactly that group: never a process found by name.
Before signalling, the group is checked against a marker (the service's own state directory
or port in a command line), so a pid reused after a reboot is never killed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The vregion checkout that holds `infra/`; service state lives in dot-directories under it."""

HOST = "127.0.0.1"
"""Every service binds to loopback only."""

# Popen objects of the processes this interpreter started, so they are reaped (no zombies,
# no ResourceWarning) when a long-lived caller such as a pytest session stops them.
_children: dict[int, subprocess.Popen] = {}


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message says why and where the log is."""


@dataclass(frozen=True)
class Status:
    """What `status` reports for one service."""

    name: str
    up: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {'up' if self.up else 'down'}  {self.detail}".rstrip()


def find_executable(name: str) -> str:
    """`name` from the running interpreter's bin directory (the project venv), else from PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found:
        return found
    raise ServiceError(
        f"`{name}` not found next to {sys.executable} or on PATH: run `make install` "
        "(or activate the project's .venv)"
    )


def private_dir(path: Path) -> Path:
    """Create a state directory that git never picks up: it carries its own `.gitignore`."""
    path.mkdir(parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        ignore.write_text(
            "# local service state written by `python -m infra`; never commit it\n*\n"
        )
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (mode 600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_state(path: Path, state: dict) -> None:
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clear_state(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    cmd: list[str], *, log_path: Path, env: dict[str, str], die_with_parent: bool = False
) -> subprocess.Popen:
    """Start `cmd` detached in a new session, stdout and stderr appended to `log_path`.

    `die_with_parent` (Linux) ties the process to the caller's life: for servers that tests
    start, so a killed test run leaves no server behind. The CLI must not use it (it exits).
    """
    with open(log_path, "ab") as log:
        log.write(
            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {Path(cmd[0]).name}\n".encode()
        )
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )
    _children[proc.pid] = proc
    return proc


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group id) from /proc, or None where the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as gone: in a container nobody may reap it)."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    return True


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (Linux: from /proc; elsewhere: the leader)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            _children.pop(pid, None)
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def cmdline(pid: int) -> str:
    """The command line of `pid`, or "" if it cannot be read."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        pass
    try:
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def owned_group(pgid: int, marker: str) -> list[int]:
    """Live members of `pgid`, but only if one of them has `marker` in its command line."""
    members = group_members(pgid)
    if any(marker in cmdline(pid) for pid in members):
        return members
    return []


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to `timeout` s for `pids` to exit; return those still alive."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def terminate(pids: Iterable[int], *, timeout: float, kill_timeout: float = 5.0) -> list[int]:
    """SIGTERM, wait up to `timeout` s, then SIGKILL what is left; return pids still alive."""
    pids = list(pids)
    signal_pids(pids, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    if left:
        signal_pids(left, signal.SIGKILL)
        left = wait_gone(left, kill_timeout)
    for pid in pids:
        child = _children.pop(pid, None)
        if child is not None:
            child.poll()
    return left


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.25,
    process: subprocess.Popen | None = None,
) -> bool:
    """Poll `check` until it returns True (True) or `timeout` s pass or `process` exits (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if process is not None and process.poll() is not None:
            return check()
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file, indented for a terminal."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - 65536, 0))
            text = fh.read().decode(errors="replace")
    except OSError:
        return f"    (no log at {path})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET a loopback URL directly, ignoring any HTTP(S)_PROXY; HTTP errors are answers too."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def port_in_use(port: int, host: str = HOST) -> bool:
    """True if a server could not bind `host:port` now (something listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_ports(count: int, *, offset: int = 0, low: int = 20000, high: int = 45000) -> list[int]:
    """`count` distinct free loopback ports; with `offset`, each `port + offset` is free too.

    Random rather than OS-assigned because some servers (SeaweedFS) also bind `port + 10000`,
    which an OS-assigned ephemeral port would push past 65535.
    """
    rng = random.Random()
    taken: set[int] = set()
    picked: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, high)
        pair = {port, port + offset} if offset else {port}
        if pair & taken or any(port_in_use(p) for p in pair):
            continue
        picked.append(port)
        taken |= pair
        if len(picked) == count:
            return picked
    raise ServiceError(f"could not find {count} free ports on {HOST} in [{low}, {high})")
