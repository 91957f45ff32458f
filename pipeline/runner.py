"""Turns a JobSpec into a Ray Data plan and runs it.

    shards (listed once, here) -> read + decode (CPU tasks, one per shard or group of files)
        -> predict (actor pool, one model per actor) -> write Parquet data files -> commit (one Delta commit)

Everything that can be checked before work starts is checked here first: the input lists and is not empty, the
weights and labels exist, the output is writable. Only then does Ray start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline.actor_decode import nvimgcodec_installed
from pipeline.incremental import Plan, adopt, plan_retry, plan_run, work_key
from pipeline.manifest import Counts, InputCounts, Manifest, ModelRecord, PlanSummary, Tally
from pipeline.runs import (
    Lease,
    OutputLocation,
    StagedFile,
    StagedOutput,
    discard,
    new_run_id,
    read_progress,
    staged_files,
)
from pipeline.sink import output_schema, row_bytes, rows_per_file
from pipeline.sources import InputError, Listing, check_columns, list_shards
from pipeline.spec import JobSpec
from pipeline.storage import is_within
from pipeline.tables import (
    AdoptionLost,
    LegacyOutputError,
    check_format,
    commit,
    ensure_tables,
    forget_adoption,
    recover,
)

log = logging.getLogger(__name__)

# Batches a CPU actor runs at once when the spec leaves it to us: one per compute thread, up to this many.
MAX_AUTO_BATCHES_PER_ACTOR = 4

# Rows per block that decode tasks emit, at least: a block holds a whole model batch when batches are larger, so the
# actor gets it without copying blocks together (38 MB per batch of 256; +4 % through Ray Data, RESULTS.md).
DECODED_ROWS_PER_BLOCK = 64


GIB = 2**30


class PreflightError(ValueError):
    """Something the run would fail on later, found before any work; the message names the field."""


class RunFailed(RuntimeError):
    """A run that did its work but must not be committed (too many errors); nothing was made visible."""


class RunStopped(RuntimeError):
    """A run stopped by a first Ctrl-C before every shard was read: what it finished is kept for the rerun."""


class RunConflict(RuntimeError):
    """Another run committed the crashed run this one adopted, first: nothing was committed, what this run wrote is
    kept for the rerun."""


@dataclass
class RunResult:
    run_id: str
    output_url: str
    version: int | None  # of the predictions table, holding this run's rows; None: nothing to do, nothing committed
    rows: int
    ok: int
    error: int
    wall_seconds: float
    stage_seconds: dict[str, Any] = field(default_factory=dict)
    plan: PlanSummary = field(default_factory=PlanSummary)
    input: InputCounts = field(default_factory=InputCounts)

    @property
    def images_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds else 0.0


def preflight(spec: JobSpec) -> Listing:
    """Checks that need no cluster: input listing, weights, labels, output. Returns the listing."""
    if is_within(spec.output.url, spec.output.storage_options, spec.input.url, spec.input.storage_options):
        raise PreflightError(
            f"output.url: {spec.output.url} is inside the input {spec.input.url}: a later run would read the output's "
            "files as images; choose an output outside the input"
        )
    listing = list_shards(spec.input.url, spec.input.format, spec.input.storage_options)
    check_columns(listing.shards, _input_options(spec))
    from pipeline.model import LabelError, Labels, WeightsError
    from pipeline.model.weights import imagenet_file, local_copy

    if spec.inference.backend != "tensorflow" and importlib.util.find_spec(spec.inference.backend) is None:
        raise PreflightError(
            f"inference.backend: {spec.inference.backend!r} needs the {spec.inference.backend} package, which is not "
            "installed here (the cluster's image needs it too)"
        )
    if spec.decode.on == "actor" and not nvimgcodec_installed():
        raise PreflightError(
            "decode.on: 'actor' decodes with NVIDIA nvImageCodec, which is not installed here (the cluster's image "
            "needs it too): pip install 'resnet-pipeline[gpu]', or nvidia-nvimgcodec-cu12 (cu13 on CUDA 13)"
        )
    model = spec.model
    try:
        if model.weights == "imagenet":
            # Fetched here when allowed: a download that cannot work fails now, in one line, and the actors on
            # this node find the file cached.
            imagenet_file(model.architecture, include_top=True, allow_download=model.allow_download)
        elif model.weights != "random":
            local_copy(model.weights, model.storage_options)
    except WeightsError as error:
        raise PreflightError(f"model.weights: {error}") from None
    if model.labels:
        try:
            labels = Labels.from_file(model.labels, model.storage_options)
            if model.classes:
                labels.check(model.classes)
        except LabelError as error:
            raise PreflightError(f"model.labels: {error}") from None
    try:
        location = OutputLocation.open(spec.output.url, spec.output.storage_options)
        location.fs.makedirs(location.root, exist_ok=True)
        check_format(location)
    except LegacyOutputError as error:
        raise PreflightError(f"output.url: {error}") from None
    except Exception as error:
        raise PreflightError(f"output.url: cannot write to {spec.output.url}: {error}") from None
    return listing


def _input_options(spec: JobSpec) -> dict[str, Any]:
    """What a shard reader needs of the spec (plain data: it travels to Ray workers)."""
    return {
        "storage_options": spec.input.storage_options,
        "image_column": spec.input.image_column,
        "id_column": spec.input.id_column,
        "compression": spec.input.compression,
    }


def decode_on(spec: JobSpec) -> str:
    """Where images are decoded: ``decode.on``, with ``auto`` resolved. ``auto`` means the model actor where it has a
    GPU and nvImageCodec is installed (on the driver, as in the cluster's image), CPU tasks otherwise; it is not
    the default until a GPU measurement shows the actor faster (``benchmarks/gpu_decode.py``)."""
    if spec.decode.on != "auto":
        return spec.decode.on
    return "actor" if spec.inference.gpus_per_actor > 0 and nvimgcodec_installed() else "tasks"


def _token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def _init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # The local cluster's workers inherit this: Arrow's allocator (mimalloc) hands freed memory back at once.
        # Otherwise a worker that wrote a Parquet file keeps about five times the file's size until it exits.
        # Cluster images set it in their Dockerfiles.
        os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")
        # Ray's log monitor lists the log folder every 0.1 s while it holds under this many files, and every 0.5 s
        # beyond: 1.1 % of a core against 0.5 %, taken from the model on a 2-core machine (RESULTS.md, "Ray's log
        # monitor lists its folder every 0.5 s").
        os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notices.removeFilter(_token_notice)
    if address is None and not verbose:  # our private cluster turns token authentication on, and says so each run
        notices.addFilter(_token_notice)
    ray.init(
        # "local": a private cluster of our own. None would join any cluster `ray start` left on this machine (found
        # through the temp folder or RAY_TMPDIR): someone else's, maybe with a token we do not have.
        address=address or "local",
        logging_level=logging.WARNING,
        log_to_driver=True,
        include_dashboard=False if address is None else None,
        configure_logging=True,
    )


def run(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_id: str | None = None,
    progress: bool = True,
    full: bool = False,
    retry_failed: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Run the job; raises InputError/PreflightError before any work, or the Ray error if the run fails.

    ``full`` ignores ``incremental``; ``retry_failed`` reads only the images whose newest committed row is an error.
    ``progress`` shows images done and images/s while the plan runs; ``verbose`` shows Ray Data's own progress and
    logs, and the workers' start-up messages, instead.
    A run that finds nothing to do commits nothing and returns a result with ``version`` None.
    """
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc)
    listing = preflight(spec)
    shards = listing.shards
    location = OutputLocation.open(spec.output.url, spec.output.storage_options)
    key, key_parts = work_key(spec)
    ensure_tables(location)
    crashed = recover(location)
    run_id = run_id or new_run_id(started_at)
    with Lease(location, run_id, key):
        plan = plan_retry(shards, location) if retry_failed else plan_run(spec, shards, location, key, full=full)
        adopt(location, crashed, key, plan, run_id)
        listed = time.perf_counter()
        if not plan.reads and not plan.adopted_shards:
            discard(location, run_id)
            return RunResult(
                run_id,
                location.url(),
                None,
                0,
                0,
                0,
                time.perf_counter() - started,
                plan=plan.summary(),
                input=InputCounts(listing.tally),
            )
        try:
            execution = _execute(spec, plan, location, run_id, progress, address, verbose)
            staged = StagedOutput.of([*plan.adopted_files, *execution.written])
            shard_records = _check_complete(location, run_id, plan, staged, execution.stopped)
            # A retry reads only failed images: its own error share says nothing about the input.
            if not retry_failed and staged.rows and staged.error / staged.rows > spec.max_error_fraction:
                raise RunFailed(
                    f"{staged.error} of {staged.rows} images failed ({staged.error / staged.rows:.1%}), over "
                    f"max_error_fraction {spec.max_error_fraction:.1%}: run {run_id} was not committed"
                )
        except RunFailed:
            discard(location, run_id)
            raise
        except BaseException:
            # Rows written so far (a crash, Ctrl-C) are kept for the next run with the same work to adopt; a run
            # that wrote no rows leaves nothing (its progress records alone give a rerun nothing to adopt).
            with contextlib.suppress(Exception):
                if not staged_files(location, run_id):
                    discard(location, run_id)
            raise

        import ray

        wall = time.perf_counter() - started
        stage_seconds = {
            **execution.stage_seconds,
            "list": {"seconds": round(listed - started, 3), "items": len(shards)},
        }
        fingerprints = staged.fingerprints
        manifest = Manifest(
            run_id=run_id,
            started_at=started_at.isoformat(),
            finished_at=datetime.now(timezone.utc).isoformat(),
            wall_seconds=round(wall, 3),
            spec=spec.redacted(),
            model=_model_record(
                spec, key, key_parts, fingerprints[0] if len(fingerprints) == 1 else fingerprints or None
            ),
            plan=plan.summary(),
            counts=Counts(staged.rows, staged.ok, staged.error),
            input=InputCounts(listing.tally, _read_tally(shard_records)),
            images_per_second=round(staged.rows / wall, 3) if wall else None,
            stage_seconds=stage_seconds,
            actors=execution.actors,
            host={"python": platform.python_version(), "ray": ray.__version__},
        )
        same_work = [run.run_id for run in crashed if run.key == key]  # adopted, or superseded by this run
        try:
            version = commit(
                location, run_id, staged, manifest, shard_records, replaces=same_work, adopted_from=plan.adopted_from
            )
        except AdoptionLost as error:
            forget_adoption(location, run_id, plan.adopted_from)
            raise RunConflict(
                f"{error}: run {run_id} was not committed; rerun the same command to finish (it adopts what this "
                "run wrote)"
            ) from None
    return RunResult(
        run_id=run_id,
        output_url=location.url(),
        version=version,
        rows=staged.rows,
        ok=staged.ok,
        error=staged.error,
        wall_seconds=time.perf_counter() - started,
        stage_seconds=stage_seconds,
        plan=plan.summary(),
        input=manifest.input,
    )


@dataclass
class Execution:
    """What the Ray plan did: time per stage, the actors it started, the files it wrote, and whether a first
    Ctrl-C stopped it early."""

    stage_seconds: dict[str, Any] = field(default_factory=dict)
    actors: list[dict] = field(default_factory=list)
    written: list[StagedFile] = field(default_factory=list)
    stopped: bool = False


def _execute(
    spec: JobSpec,
    plan: Plan,
    location: OutputLocation,
    run_id: str,
    progress: bool,
    address: str | None,
    verbose: bool = False,
) -> Execution:
    """Run the Ray plan over ``plan.reads``, writing into the run's staging folder."""
    if not plan.reads:
        return Execution()
    started = time.perf_counter()
    _init_ray(address, verbose)
    check_resources(spec, *_cluster_shapes())
    import ray
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.metrics import StageTimer
    from pipeline.progress import quiet_driver, show_progress
    from pipeline.writer import RunSink

    quiet_driver(verbose)
    target_rows = rows_per_file(
        spec.model.embedding_dim, spec.output.embedding_dtype, spec.model.top_k, spec.output.rows_per_file
    )
    inference = spec.inference.model_copy(update={"batches_per_actor": _batches_per_actor(spec, _node_cpus())})
    spec = spec.model_copy(update={"inference": inference})
    context = DataContext.get_current()
    # What waits in the object store is bounded, not by the run's size: memory stays flat from a thousand images
    # to millions, and nothing spills to disk. None (GPU actors) resets a budget an earlier run in this process set.
    budget = _buffer_bytes(spec, target_rows, ray.cluster_resources().get("CPU", 1))
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    context.enable_progress_bars = progress and verbose
    context.print_on_execution_start = verbose
    ray_started = time.perf_counter()
    # On the driver's node: the run survives the loss of any other node (a preempted spot node), and the timer with
    # it. It starts later than this, maybe after the first task.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    timer = StageTimer.options(scheduling_strategy=here).remote(time.time())
    sink = RunSink(location, run_id, target_rows, output_schema())
    try:
        tasks = plan.reads.tasks(spec.input.files_per_task)
        task_count, dataset = len(tasks), _plan(spec, tasks, location, run_id, timer, verbose)
        del tasks  # in the object store now, as the plan's first blocks
        with _first_interrupt_stops(timer) as stopped, show_progress(timer, task_count, progress and not verbose):
            dataset.write_datasink(sink)
        try:
            stage_seconds, actors = ray.get([timer.totals.remote(), timer.started_actors.remote()], timeout=60)
        except Exception as error:  # the rows are written: time per stage is not worth failing the run for
            log.warning("time per stage is lost (%s: %s)", type(error).__name__, error)
            stage_seconds, actors = {}, []
    finally:
        with contextlib.suppress(Exception):
            ray.kill(timer)
    stage_seconds["ray_init"] = {"seconds": round(ray_started - started, 3), "items": 0}
    stage_seconds["pipeline"] = {"seconds": round(time.perf_counter() - ray_started, 3), "items": 0}
    return Execution(stage_seconds, actors, sink.written, stopped.is_set())


@contextlib.contextmanager
def _first_interrupt_stops(timer) -> Iterator[threading.Event]:
    """While the plan runs, a first Ctrl-C (SIGINT) stops it gently: read tasks not yet begun skip their shards,
    and what was read is still predicted and written, so a rerun adopts every shard read so far. A second Ctrl-C
    stops at once (KeyboardInterrupt), keeping what was written. Signals reach the main thread only; elsewhere
    Ctrl-C keeps its usual meaning."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, previous)
        stopped.set()
        timer.request_stop.remote()
        log.warning(
            "stopping: the shards being read are finished and written, the rest are left for a rerun to read "
            "(it adopts what this run wrote); Ctrl-C again stops at once"
        )

    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def _cluster_shapes() -> tuple[list[dict[str, float]], list[dict[str, float]] | None]:
    """The resources of every alive node, and of every node type the cluster may still add: none for a local
    cluster this process started, those its autoscaler's configuration lists, or None where they cannot be known
    (Ray's first autoscaler, KubeRay's default, publishes no node types)."""
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    if getattr(ray._private.worker._global_node, "head", False):  # this process started the cluster's head
        return nodes, []
    try:  # what Ray Data's own autoscaling reads; written by Ray's second autoscaler only
        config = ray._private.state.state.get_cluster_config()
    except Exception:
        config = None
    if not config:
        return nodes, None
    groups = [group for group in config.node_group_configs if group.max_count != 0]
    # A node type that leaves its memory unsaid is not held to a memory request.
    return nodes, [{"memory": math.inf, **dict(group.resources)} for group in groups]


def check_resources(spec: JobSpec, nodes: list[dict[str, float]], addable: list[dict[str, float]] | None) -> None:
    """Refuse, naming the field, a request that no node of the cluster can ever hold: Ray would wait for it
    forever (or until the actor dies for want of memory) without saying why.

    ``nodes``: the resources of the nodes now in the cluster; ``addable``: of the node types it may add (None: not
    known, and then what does not fit now is only a warning: an autoscaler may add a node for it).
    """
    inference = spec.inference
    actor = {
        "CPU": inference.cpus_per_actor,
        "GPU": inference.gpus_per_actor,
        "memory": inference.actor_memory_gb * GIB,
    }
    fields = {"CPU": "cpus_per_actor", "GPU": "gpus_per_actor", "memory": "actor_memory_gb"}

    def short(shape: dict[str, float], need: dict[str, float]) -> list[str]:
        return [k for k, v in need.items() if v and shape.get(k, 0) < v]

    def fits(need: dict[str, float]) -> bool:
        return any(not short(shape, need) for shape in nodes + (addable or []))

    largest = {k: max([node.get(k, 0) for node in nodes] + [0]) for k in actor}
    problems = []
    if not fits(actor):
        # What no node has enough of; or, when each is found somewhere but never together, all of it.
        missing = [k for k in actor if not fits({k: actor[k]})] or [k for k, v in actor.items() if v]
        problems.append(
            f"{', '.join('inference.' + fields[k] for k in missing)}: a model actor asks for {_resources(actor)}, "
            f"more than any node of the cluster has (the largest: {_resources(largest)}; {len(nodes)} node(s))"
        )
    if not fits({"CPU": spec.decode.cpus_per_task}):
        problems.append(
            f"decode.cpus_per_task: a decode task asks for {spec.decode.cpus_per_task:g} CPUs, more than any node "
            f"has (the largest: {largest['CPU']:g})"
        )
    if problems and addable is None:
        log.warning("%s; waiting for the cluster to add a node that fits", "; ".join(problems))
    elif problems:
        raise PreflightError("\n".join(problems))
    if addable != []:
        return  # nodes can be added: the pool and the decode tasks will find room
    room = sum(min(int(node.get(k, 0) // v) for k, v in actor.items() if v) for node in nodes)
    if room < inference.actors.min:
        raise PreflightError(
            f"inference.actors.min: {inference.actors.min} model actors of {_resources(actor)} each do not fit in "
            f"the cluster; it holds {room}"
        )
    cpus = sum(node.get("CPU", 0) for node in nodes)
    cpus_left = cpus - inference.actors.min * inference.cpus_per_actor
    if cpus_left < spec.decode.cpus_per_task:
        raise PreflightError(
            f"inference.cpus_per_actor: {inference.actors.min} model actor(s) of {inference.cpus_per_actor:g} CPUs "
            f"leave {max(cpus_left, 0):g} of the cluster's {cpus:g} CPUs for decoding, which needs "
            f"{spec.decode.cpus_per_task:g} (decode.cpus_per_task)"
        )


def _resources(shape: dict[str, float]) -> str:
    parts = [f"{shape['CPU']:g} CPUs"] if shape.get("CPU") else []
    parts += [f"{shape['GPU']:g} GPUs"] if shape.get("GPU") else []
    parts += [f"{shape['memory'] / GIB:.1f} GiB of memory"] if shape.get("memory") else []
    return ", ".join(parts) or "nothing"


def _node_cpus() -> int:
    """CPUs of the largest node now in the cluster (1 if none has any yet)."""
    import ray

    return max([int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]] + [1])


def _batches_per_actor(spec: JobSpec, node_cpus: int) -> int:
    """``inference.batches_per_actor``, or when 0 what suits the actor: a GPU runs one batch at a time. On a CPU
    one forward pass leaves cores idle at every op's end (its threads wait for the slowest) and between ops;
    one batch per compute thread, run side by side on the same model, fills them. On 2 cores that is 1,200 images
    in 185-195 s against 202 s for one batch at a time (README, Performance, "On CPU-only nodes"), with one model's
    start-up and memory, where one actor per core pays both per core.
    """
    chosen = spec.inference.batches_per_actor
    if chosen:
        return chosen
    if spec.inference.gpus_per_actor > 0:
        return 1
    return max(1, min(MAX_AUTO_BATCHES_PER_ACTOR, spec.inference.threads_per_actor or node_cpus))


def _buffer_bytes(spec: JobSpec, rows_per_file: int, cluster_cpus: float) -> int | None:
    """Object store budget for the run, or None for Ray Data's own (a fixed share of the object store).

    With CPU actors the model is the slowest stage, so what waits for it is bounded: 16 batches of decoded pixels
    for each batch a replica runs at once, the output of every decode task that can run at once, two files' worth
    of output rows being gathered for the writer, and at least 128 MiB. Memory then stays flat from a thousand
    images to millions. A GPU replica takes images several times faster than a node's CPUs decode them
    (``benchmarks/RESULTS.md``): there a tight budget only makes decoding wait, and decoding ahead while the actors
    start pays, so Ray Data's budget, which is bounded by the object store, is kept.
    """
    if spec.inference.gpus_per_actor > 0:
        return None
    image_bytes = spec.decode.image_size**2 * 3
    concurrent = max(1, spec.inference.batches_per_actor)
    waiting = 16 * spec.inference.batch_size * image_bytes * spec.inference.actors.max * concurrent
    model_cpus = spec.inference.actors.max * spec.inference.cpus_per_actor
    decode_tasks = max(1, int((cluster_cpus - model_cpus) // spec.decode.cpus_per_task))
    decoding = decode_tasks * spec.input.files_per_task * image_bytes
    rows = 2 * rows_per_file * row_bytes(spec.model.embedding_dim, spec.output.embedding_dtype, spec.model.top_k)
    return max(128 * 2**20, waiting + decoding + rows)


def _read_tally(shard_records: list[dict[str, Any]]) -> Tally:
    """What the shards this run read or adopted held, from their progress records."""
    tally = Tally()
    for record in shard_records:
        tally.merge(Tally.from_json(record.get("tally")))
    return tally


def _check_complete(
    location: OutputLocation, run_id: str, plan: Plan, staged, stopped: bool = False
) -> list[dict[str, Any]]:
    """Every planned shard was read to its end, and the staged rows are exactly the rows the shards gave.

    This is the guarantee "one committed row per input image" checked on the real files before the commit; it
    cannot fail unless rows were lost or duplicated somewhere, and then the run must not be committed. A run
    stopped early (``stopped``) is not committed either unless, the stop coming late, it read everything.
    """
    records = read_progress(location, run_id)
    missing = plan.reads.without(records).urls.to_pylist()
    if stopped and missing:
        raise RunStopped(
            f"run {run_id} stopped: {len(plan.reads) - len(missing)} of {len(plan.reads)} shards read and "
            "written, nothing committed; rerun the same command to finish (it adopts them)"
        )
    expected = sum(record["rows"] for record in records.values())
    if missing or expected != staged.rows:
        raise RuntimeError(
            f"run {run_id} is inconsistent and was not committed: {len(missing)} shards unfinished "
            f"({', '.join(missing[:3])}), {staged.rows} rows staged for {expected} read"
        )
    return sorted(records.values(), key=lambda record: record["url"])


def _plan(spec: JobSpec, tasks: list[str], location: OutputLocation, run_id: str, timer, verbose: bool = False):
    """The Ray Data plan: read tasks -> read and decode on CPU tasks -> predictor actor pool."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.predict import Predictor
    from pipeline.progress import actor_env
    from pipeline.reader import read_and_decode

    on_actor = decode_on(spec) == "actor"

    return (
        ray.data.from_items([{"task": task} for task in tasks], override_num_blocks=len(tasks))
        .map_batches(
            read_and_decode,
            batch_size=1,
            num_cpus=spec.decode.cpus_per_task,
            fn_kwargs={
                "input_options": _input_options(spec),
                "preprocessing": spec.decode.preprocessing,
                "image_size": spec.decode.image_size,
                "max_pixels": spec.decode.max_pixels,
                "rows_per_batch": max(DECODED_ROWS_PER_BLOCK, spec.inference.batch_size),
                "timer": timer,
                "progress": location.progress(run_id),
                "ship_bytes": on_actor,
            },
        )
        .map_batches(
            Predictor,
            batch_size=spec.inference.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                min_size=spec.inference.actors.min,
                max_size=spec.inference.actors.max,
                max_concurrent_calls_per_actor=spec.inference.batches_per_actor,
                enable_true_multi_threading=spec.inference.batches_per_actor > 1,
            ),
            num_gpus=spec.inference.gpus_per_actor or None,
            num_cpus=spec.inference.cpus_per_actor,
            # Reserving the model's memory keeps Ray from packing more actors on a node than fit. It also keeps Ray
            # Data from fusing decoding into the actors (different remote args): decoding scales with CPUs.
            memory=spec.inference.actor_memory_gb * GIB,
            runtime_env={"env_vars": {"KERAS_BACKEND": spec.inference.backend, **actor_env(verbose)}},
            fn_constructor_kwargs={
                "model_spec": spec.model,
                "inference": spec.inference,
                "image_size": spec.decode.image_size,
                "embedding_dtype": spec.output.embedding_dtype,
                "run_id": run_id,
                "timer": timer,
                "decode": spec.decode if on_actor else None,
            },
        )
    )


def _model_record(
    spec: JobSpec, key: str, key_parts: dict[str, Any], fingerprint: str | list[str] | None
) -> ModelRecord:
    from pipeline.credentials import redact_url

    weights = spec.model.weights
    return ModelRecord(
        architecture=spec.model.architecture,
        weights=weights if weights in ("imagenet", "random") else redact_url(weights),
        random_weights=weights == "random",
        seed=spec.model.seed if weights == "random" else None,
        precision=spec.inference.precision,
        decoded_on=decode_on(spec),
        preprocessing=spec.decode.preprocessing,
        image_size=spec.decode.image_size,
        key=key,
        key_parts=key_parts,
        fingerprint=fingerprint,
    )


__all__ = ["InputError", "PreflightError", "RunConflict", "RunFailed", "RunResult", "RunStopped", "preflight", "run"]
