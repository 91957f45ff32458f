"""Several Ray nodes on one machine (issue 22): how often a run survives a lost node, and whether and when the model
actor pool grows onto a node that joins. Too long to repeat in CI (`tests/test_nodes.py` runs one node loss).

    python benchmarks/nodes.py --tries 5 --json benchmarks/results-...-nodes.json

(1) node loss, ``--tries`` times, as ``tests/test_nodes.py`` runs it once: a head that runs only the driver, two
    one-CPU worker nodes, 800 images; once the model actor is predicting, its node is killed (SIGKILL to its raylet,
    agents and workers) and a replacement joins. Each try reports the run's exit code, when the node was killed,
    the wall time, the committed rows, distinct ids and ok rows, and the nodes the model actor ran on.
(2) pool growth: one two-CPU node with memory for one model actor, ``actors: {min: 1, max: 2}``, ResNet-50 on tiny
    images (the model is the slow stage); a second node joins once the first actor works. Reports when the pool
    scaled up (from Ray Data's log) and on which nodes the actors ran.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.clusters import clean_environment, ray_head, ray_node  # noqa: E402
from tests.test_nodes import SMALL, model_actor_node, node_loss_run, write_images  # noqa: E402


def run_command(spec: Path, head) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(spec), "--address", f"127.0.0.1:{head.ports['port']}"]


def committed(output: Path) -> tuple[int, int, list[dict]]:
    """Rows and distinct ids in the predictions table, and the actors of its runs."""
    from pipeline.query import connect
    from pipeline.runs import OutputLocation
    from pipeline.tables import read_manifests

    with connect(str(output)) as db:
        rows, ids = db.execute("SELECT count(*), count(DISTINCT image_id) FROM predictions").fetchone()
    actors = [actor for manifest in read_manifests(OutputLocation.open(str(output))) for actor in manifest.actors]
    return rows, ids, actors


def pool_growth(folder: Path, count: int = 2400) -> dict:
    write_images(folder / "in", count)
    document = {"input": {"url": str(folder / "in"), "files_per_task": 32}, "output": str(folder / "out"), **SMALL}
    document["model"] = {**SMALL["model"], "depth": 50}
    document["decode"] = {"image_size": 96}
    actors = {"min": 1, "max": 2}
    document["inference"] = {**SMALL["inference"], "actors": actors, "batches_per_actor": 1, "actor_memory_gb": 1.0}
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump(document))
    env = clean_environment(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=str(folder), RAY_DATA_LOG_LEVEL="DEBUG"
    )
    started = time.monotonic()
    with ray_head(env, "--num-cpus=0") as head, ray_node(head, env, 2, "node_a", f"--memory={int(1.5 * 2**30)}"):
        run = subprocess.Popen(
            run_command(spec, head), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        while model_actor_node(head.dashboard, env) is None and run.poll() is None:
            time.sleep(1)
        joined_at = round(time.monotonic() - started, 1)
        with ray_node(head, env, 2, "node_b"):
            output, _ = run.communicate(timeout=600)
        logs = "".join(path.read_text() for path in head.temp_dir.glob("session_2*/logs/ray-data/ray-data.log"))
    scale_ups = re.findall(r"Scaling up MapWorker\(MapBatches\(Predictor\)\) actor pool by 1 \(reason=([^,]+)", logs)
    _, _, actors = committed(folder / "out") if run.returncode == 0 else (0, 0, [])
    return {
        "exit_code": run.returncode,
        "node_joined_at_s": joined_at,
        "wall_s": round(time.monotonic() - started, 1),
        "scale_ups": scale_ups,
        "actor_nodes": len({actor["node_id"] for actor in actors}),
        "actors": len(actors),
        "tail": output[-1500:] if run.returncode else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict = {"node_loss": [], "pool_growth": None}
    for attempt in range(args.tries):
        folder = Path(tempfile.mkdtemp(prefix="nodes-"))
        try:
            results["node_loss"].append(node_loss_run(folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"node loss, try {attempt + 1}: {json.dumps(results['node_loss'][-1])[:300]}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="nodes-"))
    try:
        results["pool_growth"] = pool_growth(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"pool growth: {json.dumps(results['pool_growth'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
