"""Ray heads started as users start them (`ray start --head`), on free ports, and stopped by what they started."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    ports = {name: _free_port() for name in PORTS}
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={ports['port']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *options,
    ]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        yield StartedHead(temp_dir, ports)
    finally:
        stop_head(temp_dir, ports["port"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: Path, gcs_port: int) -> None:
    """Stops this head's processes only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    marks = (str(temp_dir), f":{gcs_port}")
    ours = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in arg for arg in process.info["cmdline"] or () for mark in marks):
                ours.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in ours:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(ours, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
