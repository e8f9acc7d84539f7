"""`python -m infra <service> start|status|stop` against real servers on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# `infra/` lives at the project root and is not installed.
from infra import prefect_server, process, ray_head, ray_nodes, seaweedfs
from infra.process import ServiceError
from vregion.storage import S3Settings, check_s3

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _infra(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_start_status_stop_leaves_no_process(tmp_path):
    state_dir = tmp_path / "s3"
    ports = seaweedfs.WeedPorts.free()
    key, secret = "cli-test-key", "cli-test-secret-" + os.urandom(8).hex()
    env = {**os.environ, "VREGION_S3_ACCESS_KEY_ID": key, "VREGION_S3_SECRET_ACCESS_KEY": secret}
    port_args = [
        f"--s3-port={ports.s3}",
        f"--master-port={ports.master}",
        f"--volume-port={ports.volume}",
        f"--filer-port={ports.filer}",
        f"--admin-port={ports.admin}",
    ]
    try:
        began = time.monotonic()
        started = _infra(
            "s3", "start", f"--dir={state_dir}", "--bucket=cli-test", *port_args, env=env
        )
        startup_s = time.monotonic() - began
        assert started.returncode == 0, started.stdout + started.stderr
        endpoint = f"http://127.0.0.1:{ports.s3}"
        assert f"export VREGION_S3_ENDPOINT_URL={endpoint}" in started.stdout
        assert secret not in started.stdout + started.stderr
        print(f"`python -m infra s3 start` took {startup_s:.1f} s")

        pid = json.loads((state_dir / "weed.json").read_text())["pid"]
        assert int((state_dir / "weed.pid").read_text()) == pid
        assert process.alive(pid)
        check_s3(
            S3Settings(
                bucket="cli-test",
                endpoint_url=endpoint,
                access_key_id=key,
                secret_access_key=secret,
            )
        )
        # Credentials stay in owner-only files of a directory git ignores.
        for name in ("identities.json", "s3.env"):
            assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600
        assert (state_dir / ".gitignore").read_text().strip().endswith("*")

        up = _infra("s3", "status", f"--dir={state_dir}", env=env)
        assert up.returncode == 0 and f"s3: up  {endpoint}" in up.stdout, up.stdout + up.stderr

        again = _infra(
            "s3", "start", f"--dir={state_dir}", "--bucket=cli-test", *port_args, env=env
        )
        assert again.returncode == 0, again.stdout + again.stderr  # idempotent

        stopped = _infra("s3", "stop", f"--dir={state_dir}", env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not process.alive(pid)
        assert not [p for p in ports.all() if process.port_in_use(p)]
        assert not (state_dir / "weed.pid").exists()

        down = _infra("s3", "status", f"--dir={state_dir}", env=env)
        assert down.returncode == 3 and "s3: down" in down.stdout
        assert secret not in (state_dir / "weed.log").read_text()
    finally:
        seaweedfs.stop(state_dir)


def test_start_refuses_a_taken_port(tmp_path):
    s3, master, volume, filer, admin = process.free_ports(5, offset=seaweedfs.GRPC_OFFSET)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", s3))
        taken.listen()
        ports = seaweedfs.WeedPorts(s3, master, volume, filer, admin)
        server = seaweedfs.SeaweedFS(state_dir=tmp_path / "s3", ports=ports)
        with pytest.raises(ServiceError, match=f"{s3}.*taken"):
            seaweedfs.start(
                server, access_key_id="k", secret_access_key="s", timeout=5, die_with_parent=True
            )
    assert not (tmp_path / "s3" / "weed.json").exists()


def test_status_and_stop_without_a_server(tmp_path):
    assert not seaweedfs.status(tmp_path).up
    assert seaweedfs.stop(tmp_path)


def test_session_server_answers(s3_server):
    check_s3(s3_server.settings)
    assert s3_server.settings.endpoint_url == f"http://127.0.0.1:{s3_server.server.ports.s3}"


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("echo 'fake weed: bind failed' >&2; exit 3", r"exited with code 3"),
        ("echo 'fake weed: hanging'; exec sleep 60", r"did not answer within 1 s"),
    ],
)
def test_failed_start_shows_the_log_and_leaves_nothing(tmp_path, monkeypatch, script, message):
    """A `weed` that dies or never answers: a clear error with the log's tail, no process left."""
    fake = tmp_path / "weed"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(process, "find_executable", lambda name: str(fake))
    server = seaweedfs.SeaweedFS(state_dir=tmp_path / "s3", ports=seaweedfs.WeedPorts.free())
    began = time.monotonic()
    with pytest.raises(ServiceError, match=message) as info:
        seaweedfs.start(
            server, access_key_id="k", secret_access_key="s", timeout=1, die_with_parent=True
        )
    assert time.monotonic() - began < 10
    assert "last lines of" in str(info.value) and "fake weed: " in str(info.value)
    assert seaweedfs.running_state(tmp_path / "s3") is None
    assert not (tmp_path / "s3" / "weed.json").exists()


# --- the other two services behind the same CLI ------------------------------------------------


def test_prefect_server_cli_start_status_stop(tmp_path):
    home, port = tmp_path / "prefect", process.free_ports(1)[0]
    args = [f"--home={home}", f"--port={port}"]
    try:
        started = _infra("prefect", "start", *args, env=dict(os.environ))
        assert started.returncode == 0, started.stdout + started.stderr
        api_url = f"http://127.0.0.1:{port}/api"
        assert f"export PREFECT_API_URL={api_url}" in started.stdout
        assert prefect_server.healthy(api_url)
        pid = json.loads((home / "server.json").read_text())["pid"]
        assert _infra("prefect", "status", *args, env=dict(os.environ)).returncode == 0
        stopped = _infra("prefect", "stop", *args, env=dict(os.environ))
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not process.alive(pid) and not process.port_in_use(port)
        assert _infra("prefect", "status", *args, env=dict(os.environ)).returncode == 3
    finally:
        prefect_server.stop(home)


def _listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets `pids` listen on."""
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.is_dir() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1].rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1


def test_ray_cli_two_nodes_start_join_stop():
    # A short temp dir: Ray's socket paths under it must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="vr-ray-", dir="/tmp"))
    port = process.free_ports(1)[0]
    args = [f"--temp-dir={temp_dir}", f"--port={port}", "--num-cpus=1", "--nodes=2"]
    env = dict(os.environ)
    try:
        started = _infra("ray", "start", *args, env=env)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export RAY_ADDRESS=127.0.0.1:{port}" in started.stdout
        pgid = json.loads((temp_dir / "head.json").read_text())["pgid"]
        node_pgid = json.loads((temp_dir / "node-1" / "node.json").read_text())["pgid"]
        members = process.group_members(pgid) + process.group_members(node_pgid)
        assert process.group_members(pgid) and process.group_members(node_pgid)
        listening = _listening_addresses(members)
        assert listening and listening <= LOOPBACK, listening  # both raylets, GCS: loopback only

        # A driver joins through the printed variables and sees both nodes, 1 CPU each.
        script = (
            "import ray; ray.init(); r = ray.cluster_resources(); "
            "print(r['CPU'], r['node-0'], r['node-1'], len(ray.nodes()))"
        )
        driver = subprocess.run(
            [sys.executable, "-c", script],
            env={**env, **ray_head.RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert driver.stdout.split()[-4:] == ["2.0", "1.0", "1.0", "2"], driver.stdout

        stopped = _infra("ray", "stop", *args, env=env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not process.group_members(pgid) and not process.port_in_use(port)
        assert not process.group_members(node_pgid)
        assert _infra("ray", "status", *args, env=env).returncode == 3
    finally:
        ray_nodes.stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
