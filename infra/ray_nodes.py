"""More Ray nodes on this machine: a local cluster of several raylets on 127.0.0.1.

    python -m infra ray start --nodes 2 --num-cpus 1     # head + 1 worker node, 1 CPU each
    python -m infra ray stop                              # worker nodes first, then the head

Each worker node is `ray start --address=<head>` with its own temp dir (`<head temp>/node-<i>`),
CPUs, object store and a custom resource `node-<i>` (the head has `node-0`), in its own process
group, so a test can kill one node's raylet — a node lost — and start it again.

Ray refuses `ray start --address` when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, and with it `=1`
it rewrites `--node-ip-address=127.0.0.1` to the machine's routable IP and binds on every
interface. So the worker node is started by Ray's own `ray start` command in a small wrapper
(`_START_NODE`) that lets the multi-node check pass while the node keeps the loopback address:
every socket of both nodes stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra import process, ray_head
from infra.process import HOST, ServiceError

START_TIMEOUT = 60.0
NODE_STATE = "node.json"
OBJECT_STORE_MB = 100  # Ray's minimum is ~75 MiB; a tiny model's checkpoints need little

_START_NODE = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "import ray.scripts.scripts as scripts\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True  # allow a second node despite single-machine mode\n"
    f"services.get_node_ip_address = lambda address=None: {HOST!r}\n"
    "services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given\n"
    "sys.argv = ['ray', 'start', *sys.argv[1:]]\n"
    "scripts.main()\n"
)


@dataclass(frozen=True)
class RayNode:
    """A worker node joining the head at `head_address`, state and logs under `temp_dir`."""

    temp_dir: Path
    head_address: str
    num_cpus: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    object_store_mb: int = OBJECT_STORE_MB

    @property
    def log_path(self) -> Path:
        return self.temp_dir / "node.log"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-c",
            _START_NODE,
            f"--address={self.head_address}",
            f"--node-ip-address={HOST}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--resources={json.dumps(self.resources)}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats",
        ]


def node_dir(head_temp_dir: Path, index: int) -> Path:
    return Path(head_temp_dir) / f"node-{index}"


def active_nodes(address: str, timeout: float = 20.0) -> int:
    """How many nodes `ray status` lists as active (0 when it cannot reach the GCS)."""
    try:
        out = subprocess.run(
            [process.find_executable("ray"), "status", "--address", address],
            capture_output=True,
            text=True,
            env=ray_head.environment(),
            timeout=timeout,
        ).stdout
    except subprocess.TimeoutExpired:
        return 0
    active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


def start_node(node: RayNode, *, expect_nodes: int, timeout: float = START_TIMEOUT) -> None:
    """Start `node` (it daemonizes) and wait until the cluster lists `expect_nodes` nodes."""
    if running_state(node.temp_dir) is not None:
        raise ServiceError(f"a Ray node already runs from {node.temp_dir}: stop it first")
    process.private_dir(node.temp_dir)
    proc = process.spawn(node.command(), log_path=node.log_path, env=ray_head.environment())
    process.write_state(
        node.temp_dir / NODE_STATE,
        {"pgid": proc.pid, "marker": str(node.temp_dir), "head": node.head_address},
    )
    deadline = time.monotonic() + timeout
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    ok = rc == 0 and process.wait_until(
        lambda: active_nodes(node.head_address) >= expect_nodes,
        timeout=max(deadline - time.monotonic(), 1.0),
        interval=0.5,
    )
    if not ok:
        stop_node(node.temp_dir)
        raise ServiceError(
            f"the Ray node from {node.temp_dir} did not join {node.head_address} within "
            f"{timeout:.0f} s (exit code {rc})\nlast lines of {node.log_path}:\n"
            f"{process.tail(node.log_path)}"
        )


def stop_node(temp_dir: Path, *, timeout: float = ray_head.STOP_TIMEOUT) -> bool:
    """Stop the node's process group (raylet first); True if nothing is left running."""
    state = process.read_state(Path(temp_dir) / NODE_STATE)
    if state is None:
        return True
    if process.owned_group(state["pgid"], state["marker"]):
        if ray_head._terminate_group(state["pgid"], timeout=timeout):
            return False
    process.clear_state(Path(temp_dir) / NODE_STATE)
    return True


def kill_raylet(temp_dir: Path) -> int:
    """SIGKILL the node's raylet, as a machine that vanished (its workers and agents die with
    it); returns the raylet's pid. The node's state stays, so `stop_node` cleans up the rest."""
    state = running_state(temp_dir)
    if state is None:
        raise ServiceError(f"no Ray node runs from {temp_dir}")
    members = process.group_members(state["pgid"])
    raylets = [p for p in members if "raylet" in process.cmdline(p).split(" ", 1)[0]]
    if not raylets:
        raise ServiceError(f"the Ray node from {temp_dir} has no raylet")
    process.signal_pids(raylets, signal.SIGKILL)  # no graceful drain: the node just vanishes
    process.wait_gone(raylets, 10.0)
    return raylets[0]


def running_state(temp_dir: Path) -> dict | None:
    state = process.read_state(Path(temp_dir) / NODE_STATE)
    if state and process.owned_group(state["pgid"], state["marker"]):
        return state
    return None


def start_cluster(
    temp_dir: Path,
    *,
    nodes: int = 2,
    port: int = ray_head.DEFAULT_PORT,
    num_cpus: int = 1,
    object_store_mb: int = OBJECT_STORE_MB,
    timeout: float = ray_head.START_TIMEOUT,
) -> str:
    """A head plus `nodes - 1` worker nodes, each with `num_cpus` and resource `node-<i>`."""
    head = ray_head.RayHead(
        temp_dir=Path(temp_dir),
        port=port,
        num_cpus=num_cpus,
        resources={"node-0": 1},
        object_store_mb=object_store_mb,
    )
    address = ray_head.start(head, timeout=timeout)
    try:
        for i in range(1, nodes):
            node = RayNode(
                node_dir(head.temp_dir, i),
                address,
                num_cpus=num_cpus,
                resources={f"node-{i}": 1},
                object_store_mb=object_store_mb,
            )
            start_node(node, expect_nodes=i + 1)
    except BaseException:
        stop_cluster(temp_dir)
        raise
    return address


def stop_cluster(temp_dir: Path) -> bool:
    """Stop every worker node under `temp_dir`, then the head; True if nothing is left."""
    ok = True
    for state in sorted(Path(temp_dir).glob(f"node-*/{NODE_STATE}")):
        ok = stop_node(state.parent) and ok
    return ray_head.stop(Path(temp_dir)) and ok
