"""Peak memory of a whole run, and object-store spilling, as the number of images grows.

    python benchmarks/memory.py --images 1000 10000 --json benchmarks/results-...-memory.json

Each size runs `resnet-pipeline run` in a fresh session (its own local Ray cluster) and samples, twice a second, the
proportional set size (PSS: shared pages such as Ray's object store counted once, split among their users) of the
driver and every process it started: Ray's GCS, raylet, agents, the decode workers and the model actor. After the
run it reads the raylet's log for spilled objects. ResNet-50, float32, random weights, batch 32, 640x480 JPEGs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_images  # the same images as the throughput benchmark


def tree_pss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_full_info().pss
    return total


def measured_run(images: Path, output: Path, temp_dir: Path, batch_size: int, overrides: list[str]) -> dict:
    spec = output.with_suffix(".yaml")
    spec.write_text(json.dumps({"input": str(images), "output": str(output)}))
    command = [
        sys.executable, "-m", "pipeline", "run", str(spec), "--quiet",
        "--set", "model.weights=random", "--set", f"inference.batch_size={batch_size}",
        *(item for override in overrides for item in ("--set", override)),
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_TMPDIR": str(temp_dir)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(process.pid)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append((time.perf_counter() - started, tree_pss(root)))
            except psutil.NoSuchProcess:
                return
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(stderr[-3000:])
    from pipeline.runs import OutputLocation
    from pipeline.tables import read_manifests

    (manifest,) = read_manifests(OutputLocation.open(str(output)))
    record = manifest.to_json()
    return {
        "rows": record["counts"]["rows"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_pss_mib": round(max(pss for _, pss in samples) / 2**20),
        "pss_mib_at": {f"{t:.0f}s": round(pss / 2**20) for t, pss in samples[:: max(1, len(samples) // 12)]},
        "spilled": spilled(temp_dir),
    }


def spilled(temp_dir: Path) -> dict:
    """What the raylets logged about spilling objects to disk (nothing, when the object store sufficed)."""
    lines = []
    for log in temp_dir.glob("session_*/logs/raylet*.out"):
        lines += [line.strip() for line in log.read_text(errors="replace").splitlines() if re.search("[Ss]pill", line)]
    spilled_bytes = [int(m.group(1)) for line in lines if (m := re.search(r"[Ss]pilled (\d+) MiB", line))]
    return {"log_lines": len(lines), "spilled_mib": max(spilled_bytes, default=0), "examples": lines[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "resnet-pipeline-memory")
    parser.add_argument("--set", action="append", default=[], help="spec override for the runs (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results = {}
    for count in args.images:
        images = args.workdir / f"images-{count}"
        make_images(images, count, seed=count)
        work = Path(tempfile.mkdtemp(prefix=f"run-{count}-", dir=args.workdir))
        temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
        results[count] = measured_run(images, work / "out", temp_dir, args.batch_size, args.set)
        print(count, json.dumps(results[count]), flush=True)
    sizes = sorted(results)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total // 2**30} GiB",
        "command": " ".join(sys.argv),
        "results": results,
        "peak_ratio_largest_over_smallest": round(
            results[sizes[-1]]["peak_pss_mib"] / results[sizes[0]]["peak_pss_mib"], 3
        ),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
