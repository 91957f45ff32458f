"""Several Ray nodes on one machine (issue 22): how often a run survives a lost node, and whether and when the model
actor pool grows onto a node that joins. Too long to repeat in CI: `tests/test_nodes.py` runs each once (pool growth
with ResNet-18 at 128 px on 1,000 images).

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
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_nodes import node_loss_run, pool_growth_run  # noqa: E402


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
        results["pool_growth"] = pool_growth_run(folder, count=2400, depth=50, image_size=96)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"pool growth: {json.dumps(results['pool_growth'])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
