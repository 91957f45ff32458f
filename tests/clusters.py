"""Ray heads and worker nodes started as users start them (`ray start`), on free ports, and stopped by what they
started; where a cluster's actors and tasks ran; and the small image folders their jobs read."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import _free_port

PORTS = ("port", "dashboard", "client", "agent", "metrics", "runtime_env")


@dataclass(frozen=True)
class StartedHead:
    temp_dir: Path
    ports: dict[str, int]

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"


def clean_environment(**changes: str) -> dict[str, str]:
    """This process's environment without Ray, AWS or fsspec settings, plus ``changes``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "FSSPEC_"))}
    env.update(changes)
    return env


@contextlib.contextmanager
def ray_head(env: dict[str, str], *options: str, temp_dir: Path | None = None) -> Iterator[StartedHead]:
    """`ray start --head` with every port of its own, in ``temp_dir`` (a short new one by default); stopped after."""
    # Short: Ray's socket paths have a length limit.
    temp_dir = temp_dir or Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    ports = _free_ports(PORTS)
    try:
        _ray_start(
            env,
            temp_dir,
            "--head",
            f"--port={ports['port']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--ray-client-server-port={ports['client']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['runtime_env']}",
            *options,
        )
        yield StartedHead(temp_dir, ports)
    finally:
        stop_head(temp_dir, ports["port"])
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class StartedNode:
    temp_dir: Path
    ports: dict[str, int]

    @property
    def marks(self) -> tuple[str, ...]:
        """What the command lines of its processes, and only of its, hold."""
        return str(self.temp_dir), f"={self.ports['node_manager']}"


NODE_PORTS = ("node_manager", "object_manager", "metrics", "agent", "agent_grpc", "runtime_env")


@contextlib.contextmanager
def ray_node(head: StartedHead, env: dict[str, str], cpus: int, name: str, *options: str) -> Iterator[StartedNode]:
    """A worker node of ``head`` (`ray start --address`) on this machine: ``cpus`` CPUs, a resource ``name`` that
    tells it apart, every port and its temp folder its own (its processes are found by that folder)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    first_worker = _free_port_range(64)
    ports = _free_ports(NODE_PORTS, avoid=range(first_worker, first_worker + 64))
    node = StartedNode(temp_dir, ports)
    try:
        _ray_start(
            env,
            temp_dir,
            f"--address=127.0.0.1:{head.ports['port']}",
            f"--num-cpus={cpus}",
            f'--resources={{"{name}": 1}}',
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env']}",
            f"--min-worker-port={first_worker}",
            f"--max-worker-port={first_worker + 63}",
            *options,
        )
        yield node
    finally:
        stop_processes(node.marks)
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_node(node: StartedNode) -> int:
    """Hard-kill a worker node as a preempted spot node dies: its raylet, agents and workers, SIGKILL, no goodbye.
    Returns how many processes were killed."""
    return stop_processes(node.marks, grace=0)


def _ray_start(env: dict[str, str], temp_dir: Path, *arguments: str) -> None:
    command = [str(Path(sys.executable).parent / "ray"), "start", *arguments, f"--temp-dir={temp_dir}"]
    started = subprocess.run([*command, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]


def _free_ports(names: tuple[str, ...], avoid: range = range(0)) -> dict[str, int]:
    """A free port for each name, all different and none in ``avoid`` (Ray refuses a node whose ports overlap)."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = _free_port()
        if port not in avoid and port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


def _free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now."""
    import socket

    while True:
        first = _free_port()
        if first + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    probe = stack.enter_context(socket.socket())
                    probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


def stop_head(temp_dir: Path, gcs_port: int) -> None:
    """Stops this head's processes only (`ray stop` would stop every Ray on the machine)."""
    stop_processes((str(temp_dir), f":{gcs_port}"))


def stop_processes(marks: tuple[str, ...], grace: float = 5) -> int:
    """Ends the processes with one of ``marks`` in their command line, and everything they started: asked to
    (SIGTERM) for ``grace`` seconds, then killed; at once with ``grace`` 0."""
    import psutil

    ours: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in arg for arg in process.info["cmdline"] or () for mark in marks):
                for found in (process, *process.children(recursive=True)):
                    ours[found.pid] = found
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    processes = list(ours.values())
    if grace:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, processes = psutil.wait_procs(processes, timeout=grace)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)
    return len(ours)


def write_images(folder: Path, count: int) -> None:
    """``count`` small seeded noise JPEGs in a new ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=80)


PLACEMENTS = """
import json, sys
from ray.util.state import list_actors, list_nodes, list_tasks
address, alive = sys.argv[1], sys.argv[2] == "alive"
filters = [("state", "=", "ALIVE")] if alive else None
found = {"raise_on_missing_output": False, "limit": 10000}
names = {
    n.node_id: next((r for r in sorted(n.resources_total or {}) if r.startswith("node_")), None)
    for n in list_nodes(address=address, **found)
}
actors = list_actors(address=address, filters=filters, **found)
tasks = [] if alive else list_tasks(address=address, **found)
print(json.dumps({
    "actors": [[a.class_name, names.get(a.node_id)] for a in actors],
    "tasks": [[t.name, names.get(t.node_id)] for t in tasks if t.node_id],
}))
"""


def placements(dashboard: str, env: dict[str, str], alive: bool = False) -> dict[str, list[list]] | None:
    """Where the actors (and, unless ``alive``, the tasks) of the cluster whose dashboard is ``dashboard`` ran, from
    Ray's state API: ``{"actors": [[class name, node], ...], "tasks": [[task name, node], ...]}``, a node named by
    its ``node_*`` resource (:func:`ray_node`'s ``name``; None for the head). ``alive``: only the actors alive now,
    and no tasks. Asked in a process of its own, with the cluster's token (the state API's client caches the first
    token it finds); None if the API did not answer."""
    done = subprocess.run(
        [sys.executable, "-c", PLACEMENTS, dashboard, "alive" if alive else "all"],
        env=env,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout) if done.returncode == 0 else None
