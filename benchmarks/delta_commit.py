"""What a run's commit and a nightly run's planning cost on the Delta Lake output (issue 19), measured with the
pipeline's own code (``tables.commit``, ``tables.recover``, ``incremental.plan_run``, ``query.connect``), no Ray.

Two parts (``--only``):

``commits``  one run's ``tables.commit`` with 10, 1,000 and 10,000 data files (``--files``), on local disk and on
             moto's S3 server over HTTP (started here on a free port). The data files are tiny (3 rows each, one
             shard per file, written with ``runs.write_data_file``): this is about the commit's cost per file, not
             about bytes. Each commit goes into a fresh output that already holds one 10-file run. On S3 every case
             runs twice: straight to moto (its time is the one reported) and through a counting HTTP proxy (a
             separate process, ``tests.faults.FaultProxy`` with no faults), whose counts say how many requests of
             each kind (GET, PUT, HEAD, LIST, DELETE, POST) each step of the commit made.
``nightly``  an output with a year of history on local disk: ``--nights`` runs (365) of ``--shards-per-night`` new
             shards (10) of ``--rows-per-shard`` images (274), so 1,000,100 rows, in 3 files a night, 8-d
             embeddings and 5 top-k labels per row, each committed with ``tables.commit`` (which merges it into
             ``latest``; Delta checkpoints every 100 commits, as delta-rs makes them by default). Then night 366 in
             a fresh process, ``--repeat`` times, each time on a fresh copy of that output:
             (a) a night that adds 10 new shards; (b) a night that rereads 1 % of all shards whole (every 100th,
             one image fewer in each). Each measures ``ensure_tables`` + ``recover`` + ``plan_run`` (which calls
             ``covered_shards``), writing the night's data files (what the workers do), ``tables.commit`` step by
             step, ``query.connect`` + a count on ``latest``, and the process's peak resident memory (``VmHWM`` of
             each phase, reset between phases; ``ru_maxrss`` would carry the parent's peak into the child). The
             merge into ``latest`` (``catch_up_latest``) is compared with appending the same rows to
             ``predictions`` alone (writing the data files plus the predictions commit). ``--night-on-s3`` runs
             night 366 once more on a copy of the history uploaded to moto (straight, then through the proxy).

    python benchmarks/delta_commit.py --rebuild --night-on-s3 --repeat 3 --workdir /tmp/delta-commit-bench \
        --json /tmp/delta-commit-bench/results.json    (as run for benchmarks/RESULTS.md: 34 minutes on 2 cores)

The history is kept in the work folder and reused by a later invocation with the same sizes (``--rebuild`` builds
it again).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import incremental, query, tables  # noqa: E402
from pipeline.manifest import Counts, Manifest, ModelRecord, PlanSummary  # noqa: E402
from pipeline.runs import LATEST, PREDICTIONS, TABLES, OutputLocation, StagedOutput, write_data_file  # noqa: E402
from pipeline.sink import output_schema  # noqa: E402
from pipeline.sources import Shard, Shards  # noqa: E402
from pipeline.spec import parse_spec  # noqa: E402

DIM = 8  # embedding values per row: small, this is about commit and planning cost, not bytes
TOP_K = 5
FIRST_NIGHT = datetime(2026, 1, 1, 2, 0, tzinfo=timezone.utc)
KINDS = ("GET", "PUT", "HEAD", "LIST", "DELETE", "POST")
STEPS = {  # tables' functions that finish_commit calls, in its order, and what the report calls them
    "write_intent": "intent",
    "_append_once": None,  # "shards" or "runs", by its second argument
    "_commit_predictions": "predictions commit",
    "catch_up_latest": "latest merge",
    "discard": "cleanup",
}
CONTROL = "/__counts__"  # the proxy answers this path itself, with its counts


# --- rows ---


def night_rows(
    sources: list[str], rows_per_shard: int, run_id: str, at: datetime, seed: int, skip: int = 0
) -> pa.Table:
    """Rows of the output schema: ``rows_per_shard`` - ``skip`` images of each shard, ``<shard>#<n>.jpg``."""
    per = rows_per_shard - skip
    n = len(sources) * per
    rng = np.random.default_rng(seed)
    ids = [f"{source}#{i:06d}.jpg" for source in sources for i in range(per)]
    top_k_type = output_schema().field("top_k").type
    entry = pa.array(
        [{"class_id": c, "wnid": f"n{c:08d}", "label": f"class {c}", "score": 0.1} for c in range(TOP_K)],
        top_k_type.value_type,
    )
    top_k = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * TOP_K), entry.take(pa.array(np.tile(np.arange(TOP_K), n)))
    )
    embedding = pa.ListArray.from_arrays(
        pa.array(np.arange(n + 1, dtype=np.int32) * DIM), pa.array(rng.standard_normal(n * DIM, dtype=np.float32))
    )
    columns = {
        "image_id": pa.array(ids),
        "source": pa.array(np.repeat(np.array(sources, dtype=object), per)),
        "status": pa.array(["ok"] * n),
        "error": pa.nulls(n, pa.string()),
        "label": pa.array(["class 0"] * n),
        "class_id": pa.array(np.zeros(n, dtype=np.int32)),
        "score": pa.array(rng.random(n, dtype=np.float32)),
        "top_k": top_k,
        "embedding": embedding,
        "width": pa.array(np.full(n, 640, dtype=np.int32)),
        "height": pa.array(np.full(n, 480, dtype=np.int32)),
        "model": pa.array(["resnet50"] * n),
        "model_fingerprint": pa.array(["f" * 64] * n),
        "run_id": pa.array([run_id] * n),
        "processed_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns).cast(output_schema())


def run_id_of(at: datetime, tag: str) -> str:
    return f"{at:%Y%m%dT%H%M%SZ}-{tag}"


def manifest_of(run_id: str, spec: Any, key: str, parts: dict, staged: StagedOutput, plan: PlanSummary) -> Manifest:
    return Manifest(
        run_id=run_id,
        model=ModelRecord("resnet50", "imagenet", key=key, key_parts=parts, fingerprint="f" * 64),
        plan=plan,
        counts=Counts(staged.rows, staged.ok, staged.error),
        spec=spec.redacted(),
        started_at=datetime.now(timezone.utc).isoformat(),
        host={"python": platform.python_version()},
    )


def shard_record(shard: Shard, rows: int, key: str) -> dict[str, Any]:
    return {**shard.to_dict(), "rows": rows, "partial": False, "work_key": key}


def write_files(location: OutputLocation, run_id: str, tables_: list[pa.Table], threads: int = 1) -> tuple[list, float]:
    """Each table as one data file of the run, as the workers write them; returns the StagedFiles and seconds."""
    started = time.perf_counter()

    def one(item: tuple[int, pa.Table]):
        return write_data_file(location, run_id, f"part-{item[0]:05d}.parquet", item[1])

    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            files = list(pool.map(one, enumerate(tables_)))
    else:
        files = [one(item) for item in enumerate(tables_)]
    return files, time.perf_counter() - started


# --- timing the commit's steps (and the requests each made) ---


class Steps:
    """Wraps the functions ``tables.finish_commit`` calls, for the time, memory (and requests) of each step, and
    records the add and remove actions of each commit ``tables`` makes with ``create_write_transaction``."""

    def __init__(self, requests: Callable[[], Counter] | None = None):
        self.requests = requests
        self.seconds: Counter[str] = Counter()
        self.counts: dict[str, Counter] = {}
        self.commits: list[dict[str, Any]] = []  # table, step, adds, removes
        self.current: str | None = None
        self.memory: dict[str, tuple[float, float]] = {}  # step: (resident at its start, peak during it), MiB

    @contextlib.contextmanager
    def installed(self) -> Iterator[Steps]:
        from deltalake import DeltaTable

        originals = {name: getattr(tables, name) for name in STEPS}
        transaction = DeltaTable.create_write_transaction
        for name, function in originals.items():
            setattr(tables, name, self._wrap(name, function))
        steps = self

        @functools.wraps(transaction)
        def recorded(table: DeltaTable, actions, *args, **kwargs):
            removes = sum(type(action).__name__ == "RemoveAction" for action in actions)
            steps.commits.append(
                {
                    "table": table.table_uri.rstrip("/").rsplit("/", 1)[-1],
                    "step": steps.current,
                    "adds": len(actions) - removes,
                    "removes": removes,
                }
            )
            return transaction(table, actions, *args, **kwargs)

        DeltaTable.create_write_transaction = recorded
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(tables, name, function)
            DeltaTable.create_write_transaction = transaction

    def _wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapped(*args, **kwargs):
            step = STEPS[name] or args[1]
            self.current = step
            before = self.requests() if self.requests else None
            reset_peak()
            resident = resident_mib()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - started
                self.memory[step] = (round(resident, 1), round(peak_mib(), 1))
                if before is not None:
                    self.counts[step] = self.counts.get(step, Counter()) + (self.requests() - before)

        return wrapped


# --- moto's S3 server, and a counting proxy in front of it (its own process: delta-rs holds the GIL while it waits
# on the network, so a proxy thread in this process would never get to answer) ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(endpoint: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{endpoint} did not start") from None
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(endpoint, process)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def counting_proxy(upstream: str) -> Iterator[tuple[str, Callable[[], Counter]]]:
    process = subprocess.Popen(
        [sys.executable, __file__, "_proxy", upstream], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    endpoint = process.stdout.readline().strip()
    try:
        wait_for(endpoint + CONTROL, process)
        yield endpoint, proxy_counts(endpoint)
    finally:
        process.terminate()
        process.wait(timeout=10)


def kind(method: str, target: str) -> str:
    """The request's kind: LIST is a GET of a bucket (ListObjects), DELETE includes S3's multi-object delete (a
    POST ?delete, one request for up to 1,000 keys), POST what else is posted (multipart uploads)."""
    parts = urlsplit(target)
    params = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET" and ("list-type" in params or "/" not in parts.path.strip("/")):
        return "LIST"
    if method == "POST" and "delete" in params:
        return "DELETE"
    return method


def serve_proxy(upstream: str) -> None:
    from tests.faults import FaultProxy

    class CountingProxy(FaultProxy):
        def __init__(self, upstream: str):
            self.kinds: Counter[str] = Counter()
            super().__init__(upstream)

        def _handler(self):
            base, proxy = super()._handler(), self

            class Handler(base):
                def _count(self) -> None:
                    if self.path == CONTROL:
                        body = json.dumps(proxy.kinds).encode()
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                        return
                    with proxy.lock:
                        proxy.kinds[kind(self.command, self.path)] += 1
                        agent = self.headers.get("User-Agent", "")
                        client = "delta-rs" if "object_store" in agent else "s3fs" if "botocore" in agent else "other"
                        proxy.kinds[f"{client}:{self.command}"] += 1
                    try:
                        base._proxy(self)
                    except (BrokenPipeError, ConnectionResetError):  # the client hung up before the whole answer
                        with proxy.lock:
                            proxy.kinds["closed early:client"] += 1

                do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _count

            return Handler

    with CountingProxy(upstream) as proxy:
        print(proxy.endpoint, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


def s3_location(endpoint: str, bucket: str) -> OutputLocation:
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
    return OutputLocation.open(f"s3://{bucket}/out", {"endpoint_url": endpoint})


def s3_environment() -> None:
    """moto's keys, for s3fs and delta-rs alike (child processes inherit them)."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


# --- part 1: one commit with N files ---


def commit_case(location: OutputLocation, files: int, requests: Callable[[], Counter] | None, threads: int) -> dict:
    spec = parse_spec({"input": "s3://camera/", "output": "/tmp/unused", "incremental": True})
    key, parts = incremental.work_key(spec)
    tables.ensure_tables(location)
    results: dict[str, Any] = {"files": files}
    for tag, count in (("warmup", 10), ("measured", files)):
        at = datetime.now(timezone.utc)
        run_id = run_id_of(at, tag)
        sources = [
            Shard(f"s3://camera/{tag}/shard-{i:05d}.tar", "webdataset", 300_000, f'"{tag}-{i}"') for i in range(count)
        ]
        staged, write_seconds = write_files(
            location, run_id, [night_rows([s.url], 3, run_id, at, i) for i, s in enumerate(sources)], threads
        )
        staged = StagedOutput.of(staged)
        plan = PlanSummary("incremental", count, count)
        manifest = manifest_of(run_id, spec, key, parts, staged, plan)
        steps = Steps(requests)
        before = requests() if requests else Counter()
        window_start()
        resident = resident_mib()
        with steps.installed():
            started = time.perf_counter()
            tables.commit(location, run_id, staged, manifest, [shard_record(s, 3, key) for s in sources])
            seconds = time.perf_counter() - started
        total = (requests() - before) if requests else Counter()
        if tag == "measured":
            results.update(
                write_seconds=round(write_seconds, 3),
                commit_seconds=round(seconds, 3),
                steps={step: round(value, 3) for step, value in steps.seconds.items()},
                requests=dict(total),
                requests_by_step={step: dict(c) for step, c in steps.counts.items()},
                delta_commits=steps.commits,
                step_memory_mib=steps.memory,
                resident_before_mib=round(resident, 1),
                peak_mib=round(window_peak(), 1),
            )
    rows = tables.dataset(location, LATEST).count_rows()
    assert rows == 3 * (10 + files), f"latest holds {rows} rows, expected {3 * (10 + files)}"
    return results


def part_commits(args: argparse.Namespace) -> dict:
    results: dict[str, list] = {"local": [], "s3": [], "s3_counted": []}
    for files in args.files:
        folder = Path(args.workdir) / f"commit-{files}"
        shutil.rmtree(folder, ignore_errors=True)
        result = commit_case(OutputLocation.open(str(folder)), files, None, 1)
        print(f"local  {files:>6} files: commit {result['commit_seconds']:.2f} s {result['steps']}", flush=True)
        results["local"].append(result)
        shutil.rmtree(folder, ignore_errors=True)
    s3_environment()
    with moto_server() as endpoint:
        for files in args.files:
            location = s3_location(endpoint, f"direct-{files}")
            result = commit_case(location, files, None, args.threads)
            print(f"s3     {files:>6} files: commit {result['commit_seconds']:.2f} s {result['steps']}", flush=True)
            results["s3"].append(result)
        with counting_proxy(endpoint) as (proxy, counts):
            for files in args.files:
                location = s3_location(proxy, f"counted-{files}")
                result = commit_case(location, files, counts, args.threads)
                print(
                    f"s3+proxy {files:>4} files: commit {result['commit_seconds']:.2f} s, requests "
                    f"{ {k: v for k, v in result['requests'].items() if ':' not in k} }",
                    flush=True,
                )
                results["s3_counted"].append(result)
    return results


# --- part 2: a year of nights, then night 366 ---


def night_shards(night: int, shards_per_night: int, rows_per_shard: int) -> list[Shard]:
    day = FIRST_NIGHT + timedelta(days=night)
    return [
        Shard(f"s3://camera/{day:%Y/%m/%d}/shard-{s:03d}.tar", "webdataset", rows_per_shard * 110_000, f'"{night}-{s}"')
        for s in range(shards_per_night)
    ]


def night_plan(shards: list[Shard], files_per_night: int) -> list[list[Shard]]:
    """The night's shards split over its files, whole shards per file."""
    return [list(group) for group in np.array_split(np.array(shards, dtype=object), files_per_night) if len(group)]


def commit_night(
    location, spec, key, parts, night, shards, rows_per_shard, files_per_night, listed, skip=0, requests=None
):
    at = FIRST_NIGHT + timedelta(days=night)
    run_id = run_id_of(at, f"{night:06x}")
    groups = night_plan(shards, files_per_night)
    data = [
        night_rows([s.url for s in g], rows_per_shard, run_id, at, night * 1000 + i, skip) for i, g in enumerate(groups)
    ]
    files, write_seconds = write_files(location, run_id, data)
    staged = StagedOutput.of(files)
    plan = PlanSummary("incremental", listed, len(shards), listed - len(shards))
    manifest = manifest_of(run_id, spec, key, parts, staged, plan)
    steps = Steps(requests)
    with steps.installed():
        started = time.perf_counter()
        tables.commit(location, run_id, staged, manifest, [shard_record(s, rows_per_shard - skip, key) for s in shards])
        seconds = time.perf_counter() - started
    return {
        "requests_by_step": {step: dict(c) for step, c in steps.counts.items()},
        "night": night + 1,
        "rows": staged.rows,
        "write_seconds": round(write_seconds, 3),
        "commit_seconds": round(seconds, 3),
        "steps": {step: round(value, 3) for step, value in steps.seconds.items()},
        "step_memory_mib": steps.memory,
        "delta_commits": steps.commits,
    }


def history_spec(output: str):
    spec = parse_spec({"input": "s3://camera/", "output": output, "incremental": True})
    key, parts = incremental.work_key(spec)
    return spec, key, parts


def build_history(args: argparse.Namespace, output: Path) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    location = OutputLocation.open(str(output))
    spec, key, parts = history_spec(str(output))
    tables.ensure_tables(location)
    nights = []
    started = time.perf_counter()
    for night in range(args.nights):
        shards = night_shards(night, args.shards_per_night, args.rows_per_shard)
        listed = (night + 1) * args.shards_per_night
        record = commit_night(
            location, spec, key, parts, night, shards, args.rows_per_shard, args.files_per_night, listed
        )
        nights.append(record)
        if night % 25 == 0 or night == args.nights - 1:
            print(
                f"night {night + 1}: commit {record['commit_seconds']:.2f} s "
                f"(latest merge {record['steps'].get('latest merge', 0):.2f} s), "
                f"{time.perf_counter() - started:.0f} s so far",
                flush=True,
            )
    build = {"seconds": round(time.perf_counter() - started, 1), "nights": nights, "sizes": sizes(args)}
    (output.parent / f"{output.name}.json").write_text(json.dumps(build))
    return build


def sizes(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("nights", "shards_per_night", "rows_per_shard", "files_per_night")}


def delta_log(folder: Path) -> dict:
    log = folder / "_delta_log"
    names = [p for p in log.iterdir() if p.is_file()]
    data = [p for p in folder.rglob("*.parquet") if "_delta_log" not in p.parts]
    return {
        "log_bytes": sum(p.stat().st_size for p in names),
        "log_files": len(names),
        "commits": sum(p.name.endswith(".json") and p.name[:-5].isdigit() for p in names),
        "checkpoints": sorted(int(p.name.split(".")[0]) for p in names if ".checkpoint." in p.name),
        "data_files_on_disk": len(data),
        "data_bytes_on_disk": sum(p.stat().st_size for p in data),
    }


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib() -> float:
    """This process's peak resident memory since its start or the last :func:`reset_peak` (Linux ``VmHWM``:
    ``ru_maxrss`` would carry the parent's peak over into a child process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_WINDOW = [0.0]  # the highest peak seen since window_start(), across the resets within it


def reset_peak() -> bool:
    """Start ``VmHWM`` over from the present resident size (Linux 4.0+: ``5`` to ``/proc/self/clear_refs``)."""
    _WINDOW[0] = max(_WINDOW[0], peak_mib())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_start() -> None:
    reset_peak()
    _WINDOW[0] = 0.0


def window_peak() -> float:
    """The peak resident memory since :func:`window_start`, steps that reset ``VmHWM`` within it included."""
    return max(_WINDOW[0], peak_mib())


class Phases:
    """Seconds, peak memory and (with a counting proxy) requests of each phase of a night."""

    def __init__(self, requests: Callable[[], Counter] | None = None):
        self.requests = requests
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.resident: dict[str, float] = {}  # at the phase's start: the peak cannot be below it
        self.counts: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        window_start()
        self.resident[name] = round(resident_mib(), 1)
        before = self.requests() if self.requests else None
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        self.peak[name] = round(window_peak(), 1)
        if before is not None:
            self.counts[name] = dict(self.requests() - before)


def proxy_counts(endpoint: str) -> Callable[[], Counter]:
    def counts() -> Counter:
        with urllib.request.urlopen(endpoint + CONTROL, timeout=10) as response:
            return Counter(json.loads(response.read()))

    return counts


def measure_night(output: str, variant: str, sizes_: dict, storage_options: dict, counter: str | None) -> dict:
    """Night ``nights + 1`` on ``output``, as the runner plans and commits it, in a process of its own."""
    import gc

    gc.collect()
    after_imports = peak_mib()
    requests = proxy_counts(counter) if counter else None
    nights, per_night, rows_per_shard = sizes_["nights"], sizes_["shards_per_night"], sizes_["rows_per_shard"]
    location = OutputLocation.open(output, storage_options)
    spec, key, parts = history_spec(output)
    listed = [s for night in range(nights) for s in night_shards(night, per_night, rows_per_shard)]
    if variant == "a":  # a new night: new shards only
        new = night_shards(nights, per_night, rows_per_shard)
        listed += new
        skip, expected_reads, expected_delta = 0, new, len(new) * rows_per_shard
    else:  # every 100th shard changed (new ETag): read again, whole, one image fewer in each
        changed = {i: s for i, s in enumerate(listed) if i % 100 == 0}
        listed = [
            Shard(s.url, s.format, s.size, f'"{nights}-changed"') if i in changed else s for i, s in enumerate(listed)
        ]
        skip, expected_reads = 1, [listed[i] for i in changed]
        expected_delta = -len(changed)
    latest_before = tables.dataset(location, LATEST).count_rows()
    phases = Phases(requests)
    crashed, plan = plan_night(phases, location, spec, listed, key)
    assert not crashed and [r.shard for r in plan.reads] == expected_reads, (len(plan.reads), len(expected_reads))
    files_per_night = max(1, round(sizes_["files_per_night"] * len(expected_reads) / per_night))
    with phases.phase("write and commit"):  # split below: the workers' part, and the driver's commit
        record = commit_night(
            location,
            spec,
            key,
            parts,
            nights,
            expected_reads,
            rows_per_shard,
            files_per_night,
            len(listed),
            skip,
            requests,
        )
    with phases.phase("connect_and_count"), query.connect(location) as db:
        count = db.execute("SELECT count(*) FROM latest").fetchone()[0]
    assert count == latest_before + expected_delta, (count, latest_before, expected_delta)
    return {
        "variant": variant,
        "output": output,
        "latest_rows_before": latest_before,
        "latest_rows_after": count,
        "shards_listed": len(listed),
        "shards_read": len(plan.reads),
        "planning": round(sum(phases.seconds[p] for p in ("ensure_tables", "recover", "plan_run")), 3),
        **{name: seconds for name, seconds in phases.seconds.items() if name != "write and commit"},
        **record,
        "peak_mib": phases.peak,
        "resident_at_start_mib": phases.resident,
        "requests": phases.counts,
        "peak_after_imports_mib": round(after_imports, 1),
        "peak_mib_max": round(max(after_imports, *phases.peak.values()), 1),
    }


def plan_night(phases: Phases, location: OutputLocation, spec, listed: list[Shard], key: str):
    """What the runner does before Ray starts, phase by phase: the output's tables, crashed runs, the plan."""
    with phases.phase("ensure_tables"):
        tables.ensure_tables(location)
    with phases.phase("recover"):
        crashed = tables.recover(location)
    with phases.phase("plan_run"):
        plan = incremental.plan_run(spec, Shards.of(listed), location, key)
    return crashed, plan


def run_night(script_args: list[str], script: str = __file__) -> dict:
    """``script _night ARGS`` in a process of its own (a fresh peak, a fresh import): its last line, as JSON."""
    done = subprocess.run([sys.executable, script, "_night", *script_args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-6000:], file=sys.stderr)
        raise RuntimeError(f"night {script_args[:2]} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def show_night(label: str, result: dict) -> None:
    print(
        f"{label}: planning {result['planning']:.2f} s, write {result['write_seconds']:.2f} s, "
        f"commit {result['commit_seconds']:.2f} s {result['steps']}, connect+count "
        f"{result['connect_and_count']:.2f} s, peak {result['peak_mib_max']:.0f} MiB",
        flush=True,
    )


def part_nightly(args: argparse.Namespace) -> dict:
    work = Path(args.workdir)
    output = work / f"history-{args.nights}"
    saved = work / f"history-{args.nights}.json"
    build = json.loads(saved.read_text()) if saved.exists() and not args.rebuild else None
    if build is None or build.get("sizes") != sizes(args) or not output.exists():
        build = build_history(args, output)
    logs = {name: delta_log(output / name) for name in TABLES}
    base = OutputLocation.open(str(output))
    rows = {name: tables.dataset(base, name).count_rows() for name in (PREDICTIONS, LATEST)}
    print(f"history: {build['seconds']} s to build; rows {rows}; logs {logs}", flush=True)
    nights = []
    for repeat in range(args.repeat):
        for variant in ("a", "b"):
            copy = work / "night"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(output, copy)
            result = {**run_night([str(copy), variant, json.dumps(sizes(args)), "{}", ""]), "store": "local"}
            result["repeat"] = repeat
            nights.append(result)
            show_night(f"local night {variant} #{repeat + 1}", result)
            shutil.rmtree(copy, ignore_errors=True)
    if args.night_on_s3:
        s3_environment()
        import s3fs

        with moto_server() as endpoint, counting_proxy(endpoint) as (proxy, _):
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            for variant in ("a", "b"):
                for via, target in (("direct", endpoint), ("counted", proxy)):
                    bucket = f"night-{variant}-{via}"
                    fs.mkdir(bucket)
                    started = time.perf_counter()
                    fs.put(f"{output}/", f"{bucket}/out", recursive=True)
                    uploaded = time.perf_counter() - started
                    result = run_night(
                        [
                            f"s3://{bucket}/out",
                            variant,
                            json.dumps(sizes(args)),
                            json.dumps({"endpoint_url": target}),
                            proxy if via == "counted" else "",
                        ]
                    )
                    nights.append({**result, "store": f"s3 {via}", "upload_seconds": round(uploaded, 1)})
                    show_night(f"s3 ({via}) night {variant}", result)
                    fs.rm(bucket, recursive=True)
    return {"build": build, "logs": logs, "rows": rows, "nights": nights}


# --- report ---


def summary(results: dict) -> None:
    """The numbers as Markdown tables (what RESULTS.md shows)."""
    commits = results.get("commits")
    if commits:
        print(
            "\n| store | data files | commit s | intent | shards | predictions commit | runs | latest merge | cleanup |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for store in ("local", "s3"):
            for r in commits[store]:
                s = r["steps"]
                print(
                    f"| {store} | {r['files']:,} | {r['commit_seconds']:.2f} | {s.get('intent', 0):.2f} | "
                    f"{s.get('shards', 0):.2f} | {s.get('predictions commit', 0):.2f} | {s.get('runs', 0):.2f} | "
                    f"{s.get('latest merge', 0):.2f} | {s.get('cleanup', 0):.2f} |"
                )
        print("\n| data files | " + " | ".join(KINDS) + " | total | by step (total) |")
        print("|---" * (len(KINDS) + 4) + "|")
        for r in commits["s3_counted"]:
            plain = {k: v for k, v in r["requests"].items() if ":" not in k}
            steps = ", ".join(
                f"{step} {sum(v for k, v in c.items() if ':' not in k)}" for step, c in r["requests_by_step"].items()
            )
            print(
                f"| {r['files']:,} | "
                + " | ".join(str(plain.get(k, 0)) for k in KINDS)
                + f" | {sum(plain.values())} | {steps} |"
            )
    nightly = results.get("nightly")
    if nightly:
        print(
            "\n| night 366 | store | planning s (ensure / recover / plan_run) | write files s | commit s | "
            "predictions commit s | latest merge s | merge / append | connect + count s | peak MiB |"
        )
        print("|---" * 10 + "|")
        for n in nightly["nights"]:
            append = n["write_seconds"] + n["steps"].get("predictions commit", 0)
            merge = n["steps"].get("latest merge", 0)
            label = f"{n['variant']} #{n.get('repeat', 0) + 1}"
            planning = f"{n['planning']:.2f} ({n['ensure_tables']:.2f} / {n['recover']:.2f} / {n['plan_run']:.2f})"
            print(
                f"| {label} | {n['store']} | {planning} | {n['write_seconds']:.2f} | {n['commit_seconds']:.2f} | "
                f"{n['steps'].get('predictions commit', 0):.2f} | {merge:.2f} | {merge / append:.1f} | "
                f"{n['connect_and_count']:.2f} | {n['peak_mib_max']:.0f} |"
            )
            if n.get("requests"):
                plain = {phase: sum(v for k, v in c.items() if ":" not in k) for phase, c in n["requests"].items()}
                by_step = {
                    step: sum(v for k, v in c.items() if ":" not in k) for step, c in n["requests_by_step"].items()
                }
                print(f"|   requests | {plain} {by_step} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/delta-commit-bench")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--only", nargs="+", choices=["commits", "nightly"], default=["commits", "nightly"])
    parser.add_argument("--files", nargs="+", type=int, default=[10, 1000, 10000])
    parser.add_argument("--threads", type=int, default=8, help="threads writing the data files to S3 (setup only)")
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--shards-per-night", type=int, default=10)
    parser.add_argument("--rows-per-shard", type=int, default=274)
    parser.add_argument("--files-per-night", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="build the history again even if it is there")
    parser.add_argument(
        "--night-on-s3",
        action="store_true",
        help="also run night 366 (a and b) on a copy of the history uploaded to moto's S3 server (once straight to "
        "moto, once through the counting proxy)",
    )
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "python": platform.python_version(),
            "deltalake": _version("deltalake"),
            "duckdb": _version("duckdb"),
            "pyarrow": _version("pyarrow"),
            "moto": _version("moto"),
        },
        "code": {  # which pipeline code was measured
            name: hashlib.sha256((ROOT / "pipeline" / name).read_bytes()).hexdigest()[:12]
            for name in ("tables.py", "runs.py", "incremental.py", "query.py")
        },
        "command": " ".join(["python", *sys.argv]),
        "loadavg": {},
    }
    for part, function in (("commits", part_commits), ("nightly", part_nightly)):
        if part in args.only:
            results["loadavg"][f"{part} start"] = os.getloadavg()
            results[part] = function(args)
            results["loadavg"][f"{part} end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    summary(results)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        serve_proxy(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_night":
        output, variant, sizes_, options, counter = sys.argv[2:7]
        print(json.dumps(measure_night(output, variant, json.loads(sizes_), json.loads(options), counter or None)))
    else:
        main()
