"""The GPU measurements (issue 7) in one short run, for a GPU machine lent for minutes.

    KERAS_BACKEND=jax python benchmarks/gpu.py --json benchmarks/results-...-gpu.json

(1) model only: the pipeline's own CompiledModel (folded ResNet-50, uint8 in, top-5 and embedding out), compiled by
    the Keras backend in use, per precision and batch size. "device": the batch already on the GPU, calls queued
    back to back (the GPU's rate); "host": numpy in, numpy out, one call after another, as the actor calls it.
(2) decode: the pipeline's decode() of 640x480 JPEGs with every core at once (one process per core).
(3) pipeline: `pipeline.runner.run` on a local Ray cluster that has the GPU, ResNet-50 with `inference.backend`
    set to the Keras backend and a weights file (as a real run loads), N 640x480 JPEGs. End to end; "steady": the
    rate between the 10th and 90th percentile of the rows' processed_at times; "after startup": N over the run's
    Ray time less the slowest actor's start-up. Decoding runs ahead while the actors start, so on a GPU both
    include draining that backlog: they are upper bounds of the sustained rate unless N is much larger than what
    the CPUs decode during start-up. Their share of (1) "host" at the same precision and batch size is the share of
    the model's rate that the feeding path (read, decode, object store, batching, writing) sustains.

Each part runs in a process of its own, so one does not hold GPU memory the next needs; a part that fails is
reported and the others still run. Random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODELS = [  # precision/batch size[/unfolded]
    "float32/256",
    "mixed_bfloat16/256",
    "mixed_float16/128",
    "mixed_float16/256",
    "mixed_float16/512",
    "mixed_float16/256/unfolded",
]


def model_only(precision: str, batch_size: int, fold: bool, seconds: float = 3.0) -> dict:
    import numpy as np

    from pipeline.predict import CompiledModel, configure_backend

    configure_backend(precision)
    import keras

    from pipeline.model import create_model

    model = create_model("resnet50", weights="random", input_shape=(224, 224, 3), with_embedding=True)
    started = time.perf_counter()
    compiled = CompiledModel(model, batch_size, 224, top_k=5, fold=fold)
    compile_seconds = time.perf_counter() - started
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)

    def host_call():
        compiled(pixels)

    on_device = keras.ops.convert_to_tensor(pixels)

    def device_calls(count: int = 8):
        outputs = [compiled.forward(on_device) for _ in range(count)]
        np.asarray(outputs[-1][0])  # waits for the queue: calls run in order
        return count

    return {
        "precision": precision,
        "batch_size": batch_size,
        "folded": fold,
        "compile_seconds": round(compile_seconds, 2),
        "host_images_per_second": round(batch_size * _calls_per_second(host_call, seconds), 1),
        "device_images_per_second": round(batch_size * _calls_per_second(device_calls, seconds), 1),
    }


def _calls_per_second(call, seconds: float) -> float:
    for _ in range(2):
        call()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += call() or 1
    return done / (time.perf_counter() - started)


def _decode_for(seconds: float, images: list[bytes]) -> int:
    from pipeline.decode import decode

    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        decode(images[done % len(images)])
        done += 1
    return done


def decode_all_cores(seconds: float = 4.0) -> dict:
    images = [path.read_bytes() for path in _sample_jpegs(Path(tempfile.mkdtemp()), 16)]
    cores = len(os.sched_getaffinity(0))
    _decode_for(0.5, images)
    one = _decode_for(seconds, images) / seconds
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        pool.starmap(_decode_for, [(0.5, images)] * cores)  # imports and page-ins
        started = time.perf_counter()
        counts = pool.starmap(_decode_for, [(seconds, images)] * cores)
        wall = time.perf_counter() - started
    return {
        "source": "640x480 JPEG, crop to 224",
        "cores": cores,
        "one_core_images_per_second": round(one, 1),
        "all_cores_images_per_second": round(sum(counts) / wall, 1),
    }


def _sample_jpegs(folder: Path, count: int) -> list[Path]:
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
    from throughput import make_images

    return make_images(folder, count)


def pipeline_run(images: int, precision: str, batch_size: int, actors: int, budget: str = "pipeline") -> dict:
    import pyarrow.compute as pc
    import ray

    from pipeline import runner
    from pipeline.query import dataset
    from pipeline.runs import OutputLocation
    from pipeline.spec import parse_spec
    from pipeline.tables import read_manifests

    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    unique = _sample_jpegs(workdir / "unique", 256)
    folder = workdir / "images"
    folder.mkdir()
    for i in range(images):  # hard links: N files to read and decode, 256 distinct pictures
        os.link(unique[i % len(unique)], folder / f"img-{i:07d}.jpg")
    # A weights file, as a real run loads (random weights are calibrated with an eager pass, slow on a GPU).
    weights = workdir / "resnet50.weights.h5"
    save = (
        "from pipeline.model import create_model; "
        "model = create_model('resnet50', weights='random', input_shape=(224, 224, 3), with_embedding=True); "
        f"model.save_weights({str(weights)!r})"
    )
    subprocess.run([sys.executable, "-c", save], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})

    import keras  # the driver's backend is the one the actors use

    started = time.perf_counter()
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
    ray.init(num_gpus=1, include_dashboard=False, logging_level="ERROR")
    if budget == "cpu":  # for comparison: the object-store budget the pipeline sets for CPU actors
        cpu_rule = runner._buffer_bytes
        on_cpu = {"gpus_per_actor": 0}
        runner._buffer_bytes = lambda job, *args: cpu_rule(
            job.model_copy(update={"inference": job.inference.model_copy(update=on_cpu)}), *args
        )
    spec = parse_spec(
        {"input": str(folder), "output": str(workdir / "out")},
        [
            f"model.weights={weights}",
            f"inference.backend={keras.backend.backend()}",
            f"inference.precision={precision}",
            f"inference.batch_size={batch_size}",
            f"inference.gpus_per_actor={1 / actors}",
            f"inference.actors.min={actors}",
            f"inference.actors.max={actors}",
            "inference.actor_memory_gb=4",
        ],
    )
    result = runner.run(spec, progress=False)
    wall = time.perf_counter() - started
    location = OutputLocation.open(str(workdir / "out"))
    (manifest,) = [m for m in read_manifests(location) if m.run_id == result.run_id]
    times = pc.cast(
        dataset(location).to_table(columns=["processed_at"])["processed_at"],
        "int64",
    )  # microseconds; one value per batch
    low, high = (float(v) for v in pc.quantile(times, q=[0.1, 0.9]).to_pylist())
    inside = pc.sum(pc.and_(pc.greater_equal(times, low), pc.less_equal(times, high))).as_py()
    after_ray = manifest.stage_seconds["pipeline"]["seconds"]
    startup = max(actor["startup_seconds"] for actor in manifest.actors)
    ray.shutdown()
    return {
        "images": images,
        "precision": precision,
        "batch_size": batch_size,
        "actors_on_the_gpu": actors,
        "object_store_budget": budget,
        "rows": result.rows,
        "wall_seconds": round(wall, 2),
        "end_to_end_images_per_second": round(images / wall, 1),
        "steady_images_per_second": round(inside / ((high - low) / 1e6), 1),
        "after_startup_images_per_second": round(images / (after_ray - startup), 1),
        "stage_seconds": manifest.stage_seconds,
        "actors": manifest.actors,
    }


PARTS = {"model": model_only, "decode": decode_all_cores, "pipeline": pipeline_run}


def part(name: str, *args, timeout: float = 300) -> dict:
    """One part in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, str(HERE), "--part", name, *map(str, args)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"part": name, "args": list(args), "error": f"timed out after {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"part": name, "args": list(args), "error": done.stderr[-3000:]}
    return {**json.loads(lines[-1]), "part_seconds": round(time.perf_counter() - started, 1)}


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    gpu = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    versions = {}
    for package in ("keras", "jax", "jaxlib", "tensorflow", "ray"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu or None,
        "python": platform.python_version(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        **versions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=list(PARTS))
    parser.add_argument("--models", nargs="*", default=MODELS, help="precision/batch size[/unfolded]")
    parser.add_argument("--images", type=int, default=30000, help="images per pipeline run")
    parser.add_argument("--pipeline-precision", default="mixed_float16")
    parser.add_argument("--pipeline-batch-size", type=int, default=256)
    parser.add_argument(
        "--pipeline-runs",
        nargs="*",
        default=["1", "2"],
        help="one pipeline run each: actors sharing the GPU[/cpu: with the object-store budget of CPU actors]",
    )
    parser.add_argument("--json", type=Path, help="written after every part, so a cut-short run keeps its results")
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.part:
        name, *rest = args.part
        values = [json.loads(v) if v[:1].isdigit() else {"True": True, "False": False}.get(v, v) for v in rest]
        print(json.dumps(PARTS[name](*values), default=str))
        return

    report = {"machine": machine(), "command": " ".join(sys.argv), "model": [], "decode": None, "pipeline": []}

    def save():
        text = json.dumps(report, indent=2, default=str)
        print(text, flush=True)
        if args.json:
            args.json.write_text(text + "\n")

    if "decode" in args.only:
        report["decode"] = part("decode")
        save()
    models = [config.split("/") for config in args.models]
    pipelined = [args.pipeline_precision, str(args.pipeline_batch_size)]
    models.sort(key=lambda config: config != pipelined)  # the one the pipeline is compared with first
    for precision, batch_size, *unfolded in models if "model" in args.only else []:
        report["model"].append(part("model", precision, batch_size, not unfolded))
        save()
        if [precision, batch_size] == pipelined and not unfolded and "pipeline" in args.only:
            pipeline_parts(args, report["model"][-1], report["pipeline"], save)
    if "pipeline" in args.only and not report["pipeline"]:
        pipeline_parts(args, {}, report["pipeline"], save)


def pipeline_parts(args, model: dict, results: list, save) -> None:
    for actors, *budget in (config.split("/") for config in args.pipeline_runs):
        run = part("pipeline", args.images, args.pipeline_precision, args.pipeline_batch_size, actors, *budget)
        if "error" in run:  # a cut-short Ray cluster must not hold the GPU for the next part
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        if "steady_images_per_second" in run and "host_images_per_second" in model:
            for rate in ("steady", "after_startup"):
                share = run[f"{rate}_images_per_second"] / model["host_images_per_second"]
                run[f"{rate}_share_of_model_host"] = round(share, 3)
        results.append(run)
        save()


if __name__ == "__main__":
    main()
