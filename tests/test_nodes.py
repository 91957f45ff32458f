"""Several Ray nodes on one machine, as a cluster of many runs: a head that runs only the driver and worker nodes
started with `ray start --address`, each with its own ports and temp folder. A worker node is killed as a spot node
is preempted (SIGKILL to its raylet, agents and workers), a replacement joins, and the run itself must finish with
exactly one committed row per input. A model actor pool with ``min < max`` grows onto a node that joins mid-run."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.clusters import clean_environment, kill_node, placements, ray_head, ray_node, write_images

pytestmark = pytest.mark.slow

SMALL = {
    "model": {"depth": 18, "weights": "random", "top_k": 1},
    "decode": {"image_size": 32},
    "inference": {"batch_size": 8, "actor_memory_gb": 0.5},
}


def model_actor_node(dashboard: str, env: dict[str, str]) -> str | None:
    """The name of the resource that marks the node running the model actor, once it runs."""
    state = placements(dashboard, env, alive=True)
    return next((node for name, node in state["actors"] if "Predictor" in name), None) if state else None


def node_loss_run(folder: Path, count: int = 800) -> dict:
    """Run a job on a head that only drives and two one-CPU worker nodes; once the model actor is predicting (its
    first rows are written), kill its node hard and let a replacement join. Returns the run's exit code and output,
    when the node was killed, and what was committed: rows, distinct ids, statuses, the nodes its model actors ran
    on."""
    write_images(folder / "in", count)
    spec = folder / "job.yaml"
    document = {"input": str(folder / "in"), "output": str(folder / "out"), **SMALL}
    document["decode"] = {"image_size": 64}  # a few seconds of predicting, so the node dies in the middle of it
    document["output"] = {"url": str(folder / "out"), "rows_per_file": 16}  # files appear as rows are predicted
    spec.write_text(yaml.safe_dump(document))
    # Token authentication, as production clusters run; HOME of its own: no ~/.ray of this machine's user.
    env = clean_environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=str(folder))
    started = time.monotonic()
    with (
        ray_head(env, "--num-cpus=0") as head,
        ray_node(head, env, 1, "node_a") as node_a,
        ray_node(head, env, 1, "node_b") as node_b,
    ):
        command = [sys.executable, "-m", "pipeline", "run", str(spec), "--address", f"127.0.0.1:{head.ports['port']}"]
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            victim = None
            while victim is None and time.monotonic() - started < 240 and run.poll() is None:
                time.sleep(0.5)
                victim = {"node_a": node_a, "node_b": node_b}.get(model_actor_node(head.dashboard, env))
            while not list(folder.glob("out/_staging/*/_files/*.json")) and run.poll() is None:
                time.sleep(0.1)
            killed = None
            if victim is not None and run.poll() is None:
                killed = {"at_s": round(time.monotonic() - started, 1), "processes": kill_node(victim)}
            with ray_node(head, env, 1, "node_c"):  # the replacement
                output, _ = run.communicate(timeout=420)
        finally:
            if run.poll() is None:
                run.kill()
    result = {"exit_code": run.returncode, "killed": killed, "wall_s": round(time.monotonic() - started, 1)}
    if run.returncode != 0:
        return {**result, "output": output[-4000:]}
    return {**result, **committed(folder / "out"), "expected": count}


def committed(output: Path) -> dict:
    """Rows, distinct ids and ok rows in the predictions table; the actors of its one run and their nodes."""
    from pipeline.query import connect
    from pipeline.runs import OutputLocation
    from pipeline.tables import read_manifests

    with connect(str(output)) as db:
        rows, ids, ok = db.execute(
            "SELECT count(*), count(DISTINCT image_id), count_if(status = 'ok') FROM predictions"
        ).fetchone()
    (manifest,) = read_manifests(OutputLocation.open(str(output)))  # one run, committed once
    actors = manifest.actors
    return {
        "rows": rows,
        "ids": ids,
        "ok": ok,
        "actors": len(actors),
        "actor_nodes": len({a["node_id"] for a in actors}),
    }


def pool_growth_run(folder: Path, count: int = 1000, depth: int = 18, image_size: int = 128) -> dict:
    """``actors: {min: 1, max: 2}`` on a worker node whose memory fits one model actor, the model the slow stage
    (one compute thread, one batch at a time); once the first actor is up, a second node joins. Returns the run's
    exit code, when the node joined, Ray Data's reasons for growing the pool (from its log), and what was
    committed."""
    write_images(folder / "in", count)
    document = {"input": {"url": str(folder / "in"), "files_per_task": 32}, "output": str(folder / "out"), **SMALL}
    document["model"] = {**SMALL["model"], "depth": depth}
    document["decode"] = {"image_size": image_size}
    document["inference"] = {
        **SMALL["inference"],
        "actors": {"min": 1, "max": 2},
        "threads_per_actor": 1,
        "batches_per_actor": 1,
    }
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump(document))
    env = clean_environment(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=str(folder), RAY_DATA_LOG_LEVEL="DEBUG"
    )
    one_actor = f"--memory={int(1.5 * SMALL['inference']['actor_memory_gb'] * 2**30)}"
    started = time.monotonic()
    with ray_head(env, "--num-cpus=0") as head, ray_node(head, env, 2, "node_a", one_actor):
        command = [sys.executable, "-m", "pipeline", "run", str(spec), "--address", f"127.0.0.1:{head.ports['port']}"]
        run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            while model_actor_node(head.dashboard, env) is None and run.poll() is None:
                time.sleep(0.5)
            joined_at = round(time.monotonic() - started, 1)
            with ray_node(head, env, 2, "node_b", one_actor):
                output, _ = run.communicate(timeout=420)
        finally:
            if run.poll() is None:
                run.kill()
        logs = "".join(path.read_text() for path in head.temp_dir.glob("session_2*/logs/ray-data/ray-data.log"))
    grew = re.findall(r"Scaling up MapWorker\(MapBatches\(Predictor\)\) actor pool by 1 \(reason=([^,)]+)", logs)
    result = {
        "exit_code": run.returncode,
        "node_joined_at_s": joined_at,
        "wall_s": round(time.monotonic() - started, 1),
        "scale_ups": grew,
        "expected": count,
    }
    if run.returncode != 0:
        return {**result, "output": output[-4000:]}
    return {**result, **committed(folder / "out")}


def test_a_run_survives_the_loss_of_the_node_running_its_model(tmp_path):
    result = node_loss_run(tmp_path)
    assert result["killed"] is not None, "the run ended before its node could be killed"
    assert result["killed"]["processes"] >= 2
    assert result["exit_code"] == 0, result["output"]
    assert result["rows"] == result["ids"] == result["ok"] == result["expected"]  # exactly one row per input
    assert result["actor_nodes"] == 2  # the lost node's actor, then its replacement


def test_the_model_actor_pool_grows_onto_a_node_that_joins_during_the_run(tmp_path):
    result = pool_growth_run(tmp_path)
    assert result["exit_code"] == 0, result["output"]
    assert result["scale_ups"], result  # Ray Data grew the pool, for the model's backlog
    assert result["rows"] == result["ids"] == result["ok"] == result["expected"]
    # Both actors did work, one on each node: the second could only go to the node that joined.
    assert (result["actors"], result["actor_nodes"]) == (2, 2), result
