"""Model weights given as a URL are fetched once per node, and the work spreads over the nodes: a head that only
drives and two worker nodes, each with a weights cache of its own (``RESNET_PIPELINE_CACHE`` set on its
`ray start`, which its workers inherit), so that one machine behaves as three; the weights on moto's S3 server,
whose own request log counts the fetches. One worker node holds two model actors (its memory fits two), which start
together and must share one fetch; the other holds one. A quick test without Ray has two threads of one process
ask for the same weights at once."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.clusters import clean_environment, placements, ray_head, ray_node, write_images
from tests.conftest import moto_server

GIB = 1 << 30
KEY = "models/resnet18.h5"
ACTORS = {"node_a": 2, "node_b": 1}  # model actors per worker node: its memory fits that many
ACTOR_MEMORY_GB = 0.5
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def save_weights(path: Path) -> None:
    """A seeded random ResNet-18, saved as Keras's legacy HDF5 (about 45 MB: s3fs fetches it in one GET)."""
    from pipeline.model import ResNet18

    ResNet18(weights="random", input_shape=(32, 32, 3), seed=7).save(path)


def weights_gets(endpoint: str, key: str) -> list[str | None]:
    """The GETs of ``key`` that moto's request log holds, each as its Range header (None for a whole object)."""
    with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/download-recording") as answer:
        requests = [json.loads(line) for line in answer.read().decode().splitlines() if line]
    return [
        {name.lower(): value for name, value in request["headers"].items()}.get("range")
        for request in requests
        if request["method"] == "GET" and urlsplit(request["url"]).path.endswith(f"/{key}")
    ]


def cached_copies(cache: Path) -> int:
    return len(list((cache / "weights" / "remote").rglob("*.h5")))


def node_cache_run(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A run through `resnet-pipeline run --address` on a head (no CPUs, its own cache) and the worker nodes of
    ``ACTORS``, each with memory for its actors and a CPU more for decoding, weights from S3. Returns the run's exit
    code and output, the weights GETs, the copies in each cache, and where its model actors and decode tasks ran."""
    write_images(folder / "in", 48)
    caches = {name: folder / "caches" / name for name in ("driver", "head", *ACTORS)}
    # moto's request log (its recorder) goes to a file of this test, not to the working directory.
    monkeypatch.setenv("MOTO_RECORDER_FILEPATH", str(folder / "moto-requests.jsonl"))
    started = time.monotonic()
    with moto_server() as endpoint:
        import s3fs

        weights = folder / "resnet18.h5"
        save_weights(weights)
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir("weights")
        fs.put_file(str(weights), f"weights/{KEY}")
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/start-recording", method="POST"))

        spec = folder / "job.yaml"
        document = {
            "input": {"url": str(folder / "in"), "files_per_task": 4},  # 12 decode tasks, to spread
            "output": str(folder / "out"),
            "model": {
                "depth": 18,
                "weights": f"s3://weights/{KEY}",
                "storage_options": {"endpoint_url": endpoint},
                "top_k": 1,
            },
            "decode": {"image_size": 32},
            "inference": {
                "batch_size": 8,
                "actors": {"min": sum(ACTORS.values()), "max": sum(ACTORS.values())},
                "actor_memory_gb": ACTOR_MEMORY_GB,
                "threads_per_actor": 1,
                "batches_per_actor": 1,
            },
        }
        spec.write_text(yaml.safe_dump(document))
        env = clean_environment(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24), HOME=str(folder), **CREDENTIALS
        )

        def cache(name: str) -> dict[str, str]:
            return {**env, "RESNET_PIPELINE_CACHE": str(caches[name])}

        with contextlib.ExitStack() as cluster:
            head = cluster.enter_context(ray_head(cache("head"), "--num-cpus=0"))
            for name, actors in ACTORS.items():
                memory = f"--memory={int((actors + 0.5) * ACTOR_MEMORY_GB * GIB)}"
                cluster.enter_context(ray_node(head, cache(name), actors + 1, name, memory))
            address = f"127.0.0.1:{head.ports['port']}"
            command = [sys.executable, "-m", "pipeline", "run", str(spec), "--address", address]
            # Ray Data waits for the whole pool before it starts (else the first actor up may do all the work while
            # the others still import TensorFlow, and they never report where they ran).
            driver = {**cache("driver"), "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "240"}
            run = subprocess.run(command, env=driver, capture_output=True, text=True, timeout=420)
            state = placements(head.dashboard, env) if run.returncode == 0 else None
        gets = weights_gets(endpoint, KEY)
    result = {
        "exit_code": run.returncode,
        "output": (run.stdout + run.stderr)[-4000:],
        "wall_s": round(time.monotonic() - started, 1),
        "gets": gets,
        "copies": {name: cached_copies(path) for name, path in caches.items()},
    }
    if state is None:
        return result
    from pipeline.runs import OutputLocation
    from pipeline.tables import read_manifests

    (manifest,) = read_manifests(OutputLocation.open(str(folder / "out")))
    return {
        **result,
        "model_actors": Counter(node for name, node in state["actors"] if "Predictor" in name),
        "decode_tasks": Counter(node for name, node in state["tasks"] if "read_and_decode" in name),
        "manifest_actor_nodes": len({actor["node_id"] for actor in manifest.actors}),
        "manifest_actors": len(manifest.actors),
    }


@pytest.mark.slow
def test_weights_are_fetched_once_per_node_and_work_spreads_over_the_nodes(tmp_path, monkeypatch):
    result = node_cache_run(tmp_path, monkeypatch)
    assert result["exit_code"] == 0, result["output"]
    # The model actors where their nodes have room (two on one node), and decoding on both nodes.
    assert result["model_actors"] == ACTORS, result
    assert result["manifest_actors"] == sum(ACTORS.values())
    assert result["manifest_actor_nodes"] == len(ACTORS)
    assert set(result["decode_tasks"]) == set(ACTORS), result
    # s3fs fetches a file with one GET of the whole object (larger ones: that GET, then ranged parts), so a fetch
    # is a GET without a Range header: one by the driver's preflight, one per worker node, however many actors.
    fetches = [header for header in result["gets"] if header is None]
    assert len(fetches) == 1 + len(ACTORS), result
    assert result["copies"] == {"driver": 1, "head": 0, **dict.fromkeys(ACTORS, 1)}, result


def test_concurrent_fetches_on_a_node_take_turns(monkeypatch):
    """Two loaders that want the same remote weights at the same moment: one fetches, the other waits for its copy
    (without the node's lock both would fetch, and into the same partial file)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.model.weights import local_copy

    url = f"memory://weights-{time.monotonic_ns()}/resnet.h5"
    with fsspec.open(url, "wb") as f:
        f.write(b"weights")
    fetches: list[str] = []
    get_file = MemoryFileSystem.get_file

    def slow_get_file(self, rpath: str, lpath: str, **options) -> None:
        fetches.append(rpath)
        time.sleep(0.5)  # long enough for the other loader to arrive while this one fetches
        get_file(self, rpath, lpath, **options)

    monkeypatch.setattr(MemoryFileSystem, "get_file", slow_get_file)
    both = threading.Barrier(2)
    paths: list[Path] = []

    def load() -> None:
        both.wait()
        paths.append(local_copy(url))

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for loader in loaders:
        loader.start()
    for loader in loaders:
        loader.join()
    assert len(fetches) == 1
    assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == b"weights"
