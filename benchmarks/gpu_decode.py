"""Decoding JPEGs on the GPU (issue 21), measured in one run of about 9 minutes on a GPU machine lent for minutes.

    KERAS_BACKEND=jax python benchmarks/gpu_decode.py --json benchmarks/results-...-h200-gpu-decode.json
    python benchmarks/gpu_decode.py --dry-run --json /tmp/gpu_decode_dry.json   # every part, tiny, on CPU

(1) inputs: N 640x480 JPEGs ("vga", default 30,000) and a smaller 1920x1080 set ("hd"), crops of the shipped
    photographs with colour, noise and JPEG quality (85-95) varied, so sizes are those of real photos; and a weights
    file for the model (random weights, saved once: calibrating them in an actor on a GPU takes half a minute).
(2) nvimgcodec: nvImageCodec's decode alone, batches of bytes to decoded images on the GPU, per backend: its default
    order (hardware engines, CUDA, CPU), HW_GPU_ONLY and GPU_ONLY; both sets. "cores": the process's CPU time per
    second of wall time (nvJPEG's CUDA decoder does part of the work on CPU threads).
(3) actor: the actor's path without Ray: `ActorDecoder(gpu=True)` then `CompiledModel.from_canvas` (ResNet-50,
    mixed_float16, batch 256), one batch after another, with the decode and the model's share of each batch; the
    model on a canvas already decoded; and (vga only) the model alone on 224x224 pixels already on the GPU, calls
    queued ("device"), and numpy in, numpy out ("host", what `decode.on: tasks` feeds it).
(4) pipeline: `pipeline.runner.run` on a local Ray cluster with the GPU, `decode.on: tasks` against `actor`, and the
    actor with two actors per GPU, four, and two batches at once; the 1080p set last. "steady": the rate between the
    10th and 90th percentile of the rows' processed_at; "end to end": images over the run's wall time, Ray's start
    included; "after start-up": as benchmarks/gpu.py. GPU busy share (NVML, or nvidia-smi) and CPU cores busy
    (psutil, system-wide) sampled every 0.5 s, averaged over the run and over the steady window.

Each part runs in a process of its own (and session: one that overruns is killed with everything it started, its
Ray cluster too), so one does not hold GPU memory the next needs; a part that fails is reported and the others
still run. Parts run in order of importance until `--budget-seconds` is spent. The JSON is written after every
part. `--dry-run`: 64 and 24 images, ResNet-18 at 64 pixels, float32, batch 8, nvImageCodec's CPU backend,
`gpus_per_actor: 0`, no GPU sampling (null): the same code paths except those marked "GPU only".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gpu import _calls_per_second  # benchmarks/gpu.py: the same timing of the model alone

HERE = Path(__file__).resolve()
TARGET, DALI = 12_000, 19_000  # images/s once running: issue 21's target, and NVIDIA DALI's CI floor on an H100
MAX_PIXELS = 89_478_485
SIZES = {"vga": (640, 480), "hd": (1920, 1080)}
# decode.on/actors/batches per actor/set: one pipeline run each, in this order while the budget lasts
PIPELINE_RUNS = ["tasks/1/1/vga", "actor/1/1/vga", "actor/2/1/vga", "actor/1/2/vga", "actor/4/1/vga", "tasks/1/1/hd"]
PIPELINE_RUNS += ["actor/1/1/hd", "actor/2/1/hd"]


# --- (1) inputs ----------------------------------------------------------------------------------------------------


def _write_jpegs(job: tuple[str, int, int, int, int]) -> int:
    """Images ``start..stop`` of a set; returns their bytes. Pillow's C code throughout: 8 ms a 640x480 image."""
    import numpy as np
    from PIL import Image, ImageChops, ImageOps

    from pipeline.samples import PHOTOS, photo

    folder, start, stop, width, height = job
    sources = [photo(name) for name in PHOTOS]  # 640x427
    grains = [Image.effect_noise((width + 64, height + 64), sigma).convert("RGB") for sigma in (1, 3, 6)]
    total = 0
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        source = sources[i % len(sources)]
        crop_w = int(source.width * rng.uniform(0.5, 1.0))
        crop_h = min(source.height, round(crop_w * height / width))
        x, y = int(rng.integers(0, source.width - crop_w + 1)), int(rng.integers(0, source.height - crop_h + 1))
        image = source.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        image = image.point([min(255, int(v * gain)) for gain in rng.uniform(0.8, 1.2, 3) for v in range(256)])
        x, y = (int(v) for v in rng.integers(0, 64, 2))
        grain = grains[i % len(grains)].crop((x, y, x + width, y + height))  # centred on 128
        image = ImageChops.add(image, grain, 1.0, -128)
        path = Path(folder) / f"img-{i:07d}.jpg"
        image.save(path, quality=int(rng.integers(85, 96)))
        total += path.stat().st_size
    return total


def make_inputs(workdir: str, counts: dict[str, int], depth: int, image_size: int) -> dict:
    weights = Path(workdir) / f"resnet{depth}-{image_size}.weights.h5"
    save = (
        "from pipeline.model import create_model; "
        f"model = create_model('resnet{depth}', weights='random', input_shape=({image_size}, {image_size}, 3), "
        f"with_embedding=True); model.save_weights({str(weights)!r})"
    )
    started = time.perf_counter()
    saving = subprocess.Popen([sys.executable, "-c", save], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    sets = {}
    cores = len(os.sched_getaffinity(0))
    with multiprocessing.get_context("fork").Pool(cores) as pool:  # fork: this process has imported no framework
        for name, count in counts.items():
            started = time.perf_counter()
            folder = Path(workdir) / name
            folder.mkdir(parents=True, exist_ok=True)
            step = max(1, -(-count // (4 * cores)))
            jobs = [(str(folder), i, min(i + step, count), *SIZES[name]) for i in range(0, count, step)]
            total = sum(pool.map(_write_jpegs, jobs))
            sets[name] = {
                "folder": str(folder),
                "images": count,
                "size": "x".join(map(str, SIZES[name])),
                "mean_bytes": round(total / count),
                "seconds": round(time.perf_counter() - started, 1),
            }
    if saving.wait() != 0:
        raise RuntimeError(f"saving the weights failed (exit status {saving.returncode})")
    return {"sets": sets, "weights": str(weights), "weights_seconds": round(time.perf_counter() - started, 1)}


def _blobs(folder: str, count: int) -> list[bytes]:
    return [path.read_bytes() for path in sorted(Path(folder).glob("*.jpg"))[:count]]


def _synchronize(gpu: bool) -> None:
    if gpu:  # GPU only: decoding and the canvas's copies are asynchronous on the device
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


# --- (2) nvImageCodec alone ----------------------------------------------------------------------------------------


def nvimgcodec_decode(folder: str, sample: int, batch_size: int, seconds: float, gpu: bool) -> dict:
    from nvidia import nvimgcodec

    blobs = _blobs(folder, sample)
    params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
    if gpu:  # GPU only
        decoders = {
            "default": lambda: nvimgcodec.Decoder(),
            "hw_gpu_only": lambda: nvimgcodec.Decoder(
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]
            ),
            "gpu_only": lambda: nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)]),
        }
    else:
        decoders = {
            "cpu_only": lambda: nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
            )
        }
    batches = [blobs[i : i + batch_size] for i in range(0, len(blobs) - batch_size + 1, batch_size)] or [blobs]
    results: dict[str, Any] = {"images_in_memory": len(blobs), "batch_size": len(batches[0])}
    for name, make in decoders.items():
        try:
            decoder = make()
            images = decoder.decode(batches[0], params=params)  # warm-up: buffers, streams, hardware engines
            _synchronize(gpu)
            failed = sum(image is None for image in images)
            if failed == len(images):
                results[name] = {"error": "decoded nothing: backend not available here"}
                continue
            done, calls, cpu, started = 0, 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - started < seconds:
                decoder.decode(batches[calls % len(batches)], params=params)
                _synchronize(gpu)
                done, calls = done + len(batches[calls % len(batches)]), calls + 1
            wall = time.perf_counter() - started
            results[name] = {
                "images_per_second": round(done / wall, 1),
                "cores": round((time.process_time() - cpu) / wall, 2),
                "failed_in_warm_up": failed,
                "where": str(images[0].buffer_kind) if images[0] is not None else None,
            }
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    return results


# --- (3) the actor's path without Ray ------------------------------------------------------------------------------


def actor_path(
    folder: str,
    sample: int,
    depth: int,
    image_size: int,
    precision: str,
    batch_size: int,
    weights: str,
    seconds: float,
    gpu: bool,
    model_alone: bool,
) -> dict:
    import numpy as np

    from pipeline.actor_decode import ActorDecoder
    from pipeline.predict import CompiledModel, configure_backend

    configure_backend(precision)
    import keras

    from pipeline.model import create_model

    started = time.perf_counter()
    model = create_model(
        f"resnet{depth}", weights=weights, input_shape=(image_size, image_size, 3), with_embedding=True
    )
    compiled = CompiledModel(model, batch_size, image_size, top_k=5)
    startup = time.perf_counter() - started
    decoder = ActorDecoder("crop", image_size, MAX_PIXELS, gpu)
    blobs = _blobs(folder, sample)
    batches = [blobs[i : i + batch_size] for i in range(0, len(blobs) - batch_size + 1, batch_size)] or [blobs]

    started = time.perf_counter()
    first = decoder(batches[0])
    compiled.from_canvas(first.canvas, first.boxes)  # compiles for this canvas size
    first_call = time.perf_counter() - started
    errors = sum(reason is not None for reason in first.errors)

    done = calls = 0
    decode_seconds = model_seconds = 0.0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        blobs = batches[calls % len(batches)]
        start = time.perf_counter()
        decoded = decoder(blobs)
        _synchronize(gpu)
        middle = time.perf_counter()
        compiled.from_canvas(decoded.canvas, decoded.boxes)  # returns NumPy: waits for the model
        decode_seconds, model_seconds = decode_seconds + middle - start, model_seconds + time.perf_counter() - middle
        done, calls = done + len(blobs), calls + 1
    wall = time.perf_counter() - began

    def canvas_call() -> None:
        compiled.from_canvas(first.canvas, first.boxes)

    result: dict[str, Any] = {
        "images_per_second": round(done / wall, 1),
        "decode_ms_per_batch": round(1000 * decode_seconds / calls, 2),
        "model_ms_per_batch": round(1000 * model_seconds / calls, 2),
        "batch_size": len(batches[0]),
        "canvas": list(first.canvas.shape),
        "canvas_on": type(first.canvas).__module__.split(".")[0],
        "errors_in_first_batch": errors,
        "model_startup_seconds": round(startup, 2),
        "first_call_seconds": round(first_call, 2),
        "from_canvas_only_images_per_second": round(len(first.boxes) * _calls_per_second(canvas_call, seconds), 1),
    }
    if model_alone:
        pixels = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
        on_device = keras.ops.convert_to_tensor(pixels)

        def device_calls(count: int = 8) -> int:
            outputs = [compiled.forward(on_device) for _ in range(count)]
            np.asarray(outputs[-1][0])  # waits for the queue: calls run in order
            return count

        def host_call() -> None:
            compiled(pixels)

        result["model_alone"] = {
            "device_images_per_second": round(batch_size * _calls_per_second(device_calls, seconds), 1),
            "host_images_per_second": round(batch_size * _calls_per_second(host_call, seconds), 1),
        }
    return result


# --- (4) the pipeline ----------------------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every ``interval`` s: wall time, CPU cores busy system-wide, GPU busy percent and memory (None without)."""

    def __init__(self, gpu: bool, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.query = self._gpu_query() if gpu else None
        self.gpu_source = getattr(self.query, "source", None)

    @staticmethod
    def _gpu_query():
        """GPU only: NVML where nvidia-ml-py is installed, else nvidia-smi."""
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def nvml() -> tuple[float, float]:
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu), used

            nvml.source = "nvml"
            return nvml
        except Exception:
            if not shutil.which("nvidia-smi"):
                return None

        def smi() -> tuple[float, float]:
            query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            first = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
            busy, used = (float(value) for value in first.split(","))
            return busy, used

        smi.source = "nvidia-smi"
        return smi

    def run(self) -> None:
        import psutil

        psutil.cpu_percent(percpu=True)
        while not self.stopped.wait(self.interval):
            cores = sum(psutil.cpu_percent(percpu=True)) / 100
            busy = used = None
            if self.query is not None:
                with contextlib.suppress(Exception):  # a missed sample is no reason to stop the run
                    busy, used = self.query()
            self.samples.append((time.time(), cores, busy, used))

    def summary(self, start: float, end: float) -> dict:
        """Means over the samples taken between ``start`` and ``end`` (time.time())."""
        inside = [sample for sample in self.samples if start <= sample[0] <= end]
        gpu = [sample[2] for sample in inside if sample[2] is not None]
        return {
            "samples": len(inside),
            "cpu_cores_busy": round(sum(sample[1] for sample in inside) / len(inside), 2) if inside else None,
            "gpu_busy_share": round(sum(gpu) / len(gpu) / 100, 3) if gpu else None,
            "gpu_memory_peak_mib": max((s[3] for s in inside if s[3] is not None), default=None),
        }


def pipeline_run(
    folder: str,
    images: int,
    decode_on: str,
    actors: int,
    batches_per_actor: int,
    depth: int,
    image_size: int,
    precision: str,
    batch_size: int,
    weights: str,
    gpu: bool,
    backend: str,
    output: str,
) -> dict:
    import pyarrow.compute as pc
    import ray

    from pipeline import runner
    from pipeline.runs import OutputLocation
    from pipeline.spec import parse_spec
    from pipeline.tables import PREDICTIONS, dataset, read_manifests  # not pipeline.query: no DuckDB to carry

    # What runner._init_ray sets for the local clusters it starts; this process starts its own, to give it the GPU.
    os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
    os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
    sampler = Sampler(gpu)
    sampler.start()
    began, started = time.time(), time.perf_counter()
    for attempt in range(2):  # a loaded machine can miss Ray's start-up deadline once
        try:
            ray.init(address="local", num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    ray_init = time.perf_counter() - started
    overrides = [
        f"model.depth={depth}",
        f"model.weights={weights}",
        f"decode.image_size={image_size}",
        f"decode.on={decode_on}",
        f"inference.backend={backend}",
        f"inference.precision={precision}",
        f"inference.batch_size={batch_size}",
        f"inference.gpus_per_actor={1 / actors if gpu else 0}",
        f"inference.batches_per_actor={batches_per_actor}",
        f"inference.actors.min={actors}",
        f"inference.actors.max={actors}",
        f"inference.actor_memory_gb={4 if gpu else 0.5}",
        # --dry-run: up to 4 actors and a decode task in the 2 CPUs of a small machine
        f"inference.cpus_per_actor={1 if gpu else 0.25}",
    ]
    spec = parse_spec({"input": folder, "output": output}, overrides)
    try:
        result = runner.run(spec, progress=False)
    finally:
        wall = time.perf_counter() - started
        ended = time.time()
        sampler.stopped.set()
        ray.shutdown()
    location = OutputLocation.open(output)
    (manifest,) = [m for m in read_manifests(location) if m.run_id == result.run_id]
    times = pc.cast(
        dataset(location, PREDICTIONS).to_table(columns=["processed_at"])["processed_at"], "int64"
    )  # us, per batch
    low, high = (float(v) for v in pc.quantile(times, q=[0.1, 0.9]).to_pylist())
    inside = pc.sum(pc.and_(pc.greater_equal(times, low), pc.less_equal(times, high))).as_py()
    after_ray = manifest.stage_seconds["pipeline"]["seconds"]
    startup = max(actor["startup_seconds"] for actor in manifest.actors)
    steady = inside / ((high - low) / 1e6) if high > low else None
    return {
        "images": images,
        "decode_on": decode_on,
        "actors_on_the_gpu": actors,
        "batches_per_actor": batches_per_actor,
        "rows": result.rows,
        "ray_init_seconds": round(ray_init, 2),
        "wall_seconds": round(wall, 2),
        "end_to_end_images_per_second": round(images / wall, 1),
        "steady_images_per_second": round(steady, 1) if steady else None,
        "after_startup_images_per_second": round(images / max(after_ray - startup, 1e-3), 1),
        "whole_run": {**sampler.summary(began, ended), "gpu_source": sampler.gpu_source},
        "steady_window": sampler.summary(low / 1e6, high / 1e6),
        "stage_seconds": manifest.stage_seconds,
        "actors": manifest.actors,
    }


PARTS = {"inputs": make_inputs, "nvimgcodec": nvimgcodec_decode, "actor": actor_path, "pipeline": pipeline_run}


def part(name: str, kwargs: dict, timeout: float) -> dict:
    """One part in a fresh process of its own session; its last stdout line is its JSON result. One that overruns
    is killed with its process group: the Ray cluster it started must not hold the GPU for the next part."""
    command = [sys.executable, str(HERE), "--part", name, json.dumps(kwargs)]
    started = time.perf_counter()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as p:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return {
                "error": f"timed out after {timeout:.0f} s",
                "part_seconds": round(time.perf_counter() - started, 1),
            }
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # what the part left running (its group only)
    lines = stdout.strip().splitlines()
    seconds = round(time.perf_counter() - started, 1)
    if p.returncode != 0 or not lines:
        return {"error": stderr[-3000:] or f"exit status {p.returncode}", "part_seconds": seconds}
    return {**json.loads(lines[-1]), "part_seconds": seconds}


def machine(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    gpu = ""
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    versions = {}
    for package in ("keras", "jax", "jaxlib", "tensorflow", "ray", "cupy-cuda13x", "cupy-cuda12x"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    for package in ("nvidia-nvimgcodec-cu13", "nvidia-nvimgcodec-cu12", "nvidia-nvjpeg", "nvidia-nvjpeg-cu12"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu or None,
        "python": platform.python_version(),
        "keras_backend": backend,
        **versions,
    }


def settings(args: argparse.Namespace) -> dict:
    dry = args.dry_run
    return {
        "gpu": not dry,
        "counts": {"vga": args.images or (64 if dry else 30_000), "hd": args.hd_images or (24 if dry else 3_000)},
        "sample": 64 if dry else 2_048,  # images held in memory for parts 2 and 3
        "depth": 18 if dry else 50,
        "image_size": 64 if dry else 224,
        "precision": "float32" if dry else "mixed_float16",
        "batch_size": 8 if dry else 256,  # dry run: a few batches, so the steady window holds some
        "seconds": 0.5 if dry else 3.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny, on CPU: checks that every part runs")
    parser.add_argument("--only", nargs="*", default=["nvimgcodec", "actor", "pipeline"], help="parts after inputs")
    parser.add_argument("--images", type=int, help="640x480 images (default 30,000; dry run 64)")
    parser.add_argument("--hd-images", type=int, help="1920x1080 images (default 3,000; dry run 24)")
    parser.add_argument("--pipeline-runs", nargs="*", default=PIPELINE_RUNS, help="decode.on/actors/batches/set")
    parser.add_argument("--budget-seconds", type=float, help="parts start and end within it (default 540; dry run 900)")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary folder, removed at the end")
    parser.add_argument("--json", type=Path, help="written after every part, so a cut-short run keeps its results")
    parser.add_argument("--part", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")  # the GPU machine has no TensorFlow

    if args.part:
        name, kwargs = args.part
        print(json.dumps(PARTS[name](**json.loads(kwargs)), default=str))
        return

    began = time.perf_counter()
    config = settings(args)
    budget = args.budget_seconds or (900 if args.dry_run else 540)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-decode-"))
    report: dict[str, Any] = {
        "machine": machine(backend),
        "command": " ".join(sys.argv),
        "dry_run": args.dry_run,
        "settings": config,
        "inputs": None,
        "nvimgcodec": {},
        "actor": {},
        "pipeline": [],
    }

    def save() -> None:
        report["total_seconds"] = round(time.perf_counter() - began, 1)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    def left(at_most: float) -> float:
        return min(at_most, budget - (time.perf_counter() - began))

    def run(name: str, kwargs: dict, at_most: float, minimum: float) -> dict:
        if left(at_most) < minimum:
            return {"skipped": f"budget: {left(at_most):.0f} s left, {minimum:.0f} s needed"}
        print(f"[{time.perf_counter() - began:6.1f} s] {name} {kwargs.get('folder', '')}", file=sys.stderr)
        return part(name, kwargs, left(at_most))

    try:
        common = {key: config[key] for key in ("depth", "image_size")}
        report["inputs"] = run("inputs", {"workdir": str(workdir), "counts": config["counts"], **common}, 180, 10)
        save()
        if "error" in report["inputs"] or "skipped" in report["inputs"]:
            raise SystemExit("no inputs: " + json.dumps(report["inputs"])[-3000:])
        sets, weights = report["inputs"]["sets"], report["inputs"]["weights"]
        model = {**common, "precision": config["precision"], "batch_size": config["batch_size"], "weights": weights}
        for name in sets if "nvimgcodec" in args.only else []:
            kwargs = {"folder": sets[name]["folder"], "sample": config["sample"], "gpu": config["gpu"]}
            kwargs |= {"batch_size": config["batch_size"], "seconds": config["seconds"]}
            report["nvimgcodec"][name] = run("nvimgcodec", kwargs, 90, 15)
            save()
        for name in sets if "actor" in args.only else []:
            kwargs = {"folder": sets[name]["folder"], "sample": config["sample"], "gpu": config["gpu"], **model}
            kwargs |= {"seconds": config["seconds"], "model_alone": name == "vga"}
            report["actor"][name] = run("actor", kwargs, 150, 30)
            save()
        for label in args.pipeline_runs if "pipeline" in args.only else []:
            decode_on, actors, batches, name = label.split("/")
            kwargs = {"folder": sets[name]["folder"], "images": sets[name]["images"], "decode_on": decode_on}
            kwargs |= {"actors": int(actors), "batches_per_actor": int(batches), "gpu": config["gpu"], **model}
            kwargs |= {"backend": backend, "output": str(workdir / f"out-{label.replace('/', '-')}")}
            report["pipeline"].append({"run": label, **run("pipeline", kwargs, 180, 45)})
            save()
    finally:
        save()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(summary(report))


def summary(report: dict) -> str:
    """The results as a table, images/s throughout."""

    def rate(value: Any) -> str:
        return f"{value:>10,.0f}" if isinstance(value, (int, float)) else f"{'-':>10}"

    def failed(result: dict) -> list[str]:
        reason = (result.get("error") or result.get("skipped") or "").strip().splitlines()
        return [f"    not measured: {reason[-1]}"] if reason else []

    lines = [f"{report.get('total_seconds')} s in all. Target {TARGET:,}/s once running; DALI's CI floor {DALI:,}/s"]
    for name, result in report["nvimgcodec"].items():
        for backend, value in result.items():
            if isinstance(value, dict):
                lines.append(f"decode alone {name:4} {backend:12} {rate(value.get('images_per_second'))}")
                lines[-1] += f"  cores {value.get('cores', '-')}"
                lines += failed(value)
        lines += failed(result)
    for name, result in report["actor"].items():
        lines.append(f"actor path   {name:4} decode + model {rate(result.get('images_per_second'))}")
        lines[-1] += (
            f"  a batch: decode {result.get('decode_ms_per_batch')} ms, model {result.get('model_ms_per_batch')}"
        )
        lines[-1] += f" ms; canvas {result.get('canvas')}"
        lines.append(
            f"actor path   {name:4} model on the canvas {rate(result.get('from_canvas_only_images_per_second'))}"
        )
        alone = result.get("model_alone", {})
        for where in ("device", "host") if alone else ():
            lines.append(f"model alone on pixels, {where:6} {rate(alone[f'{where}_images_per_second'])}")
        lines += failed(result)
    header = ("pipeline run", "steady", "end to end", "/ target", "DALI - it", "GPU busy", "cores")
    lines.append("{:16} {:>10} {:>10} {:>8} {:>10} {:>8} {:>6}".format(*header))
    for result in report["pipeline"]:
        steady = result.get("steady_images_per_second")
        window = result.get("steady_window", {})
        busy = window.get("gpu_busy_share")
        cells = (
            result["run"],
            rate(steady),
            rate(result.get("end_to_end_images_per_second")),
            f"{steady / TARGET:.2f}" if steady else "-",
            f"{DALI - steady:,.0f}" if steady else "-",
            f"{busy:.0%}" if busy is not None else "null",
            str(window.get("cpu_cores_busy", "-")),
        )
        lines.append("{:16} {} {} {:>8} {:>10} {:>8} {:>6}".format(*cells))
        lines += failed(result)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
