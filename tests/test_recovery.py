"""Runs you can trust, end to end on real parts: a killed driver, a flaky object store, nights on a growing bucket,
retrying failed images. Ray is a real local cluster; S3 is moto's server over HTTP, behind the fault proxy."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.manifest import Manifest
from pipeline.query import connect, dataset
from pipeline.runner import run
from pipeline.runs import OutputLocation
from pipeline.samples import PHOTOS, VARIANTS, photo
from pipeline.spec import parse_spec
from pipeline.tables import read_manifests
from tests.faults import FaultProxy, FaultProxyProcess
from tests.layouts import tar_shard

pytestmark = pytest.mark.slow

SMALL = {
    "model": {"depth": 18, "weights": "random", "seed": 5, "top_k": 3},
    "decode": {"image_size": 64},
    "inference": {"batch_size": 4},
}


def pictures(count: int) -> dict[str, bytes]:
    """``count`` distinct small JPEGs (variants of the sample photos)."""
    out, index = {}, 0
    while len(out) < count:
        source = photo(PHOTOS[index % len(PHOTOS)]).rotate(7 * index, expand=True)
        out[f"img-{index:03d}.jpg"] = VARIANTS["small.jpg"](source)
        index += 1
    return out


def spec_document(input_url: str, output_url: str, options: dict | None = None, **extra) -> dict:
    document = {
        "name": "nightly-test",
        "input": {"url": input_url, "storage_options": options or {}},
        "output": {"url": output_url},
        **SMALL,
    }
    for dotted, value in extra.items():
        section, _, field = dotted.partition("__")
        if field:
            document.setdefault(section, {})[field] = value
        else:
            document[section] = value
    return document


def cli(*args: str) -> subprocess.Popen:
    """The CLI in its own session, so that everything it starts (its local Ray cluster) can be stopped together."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_group(process: subprocess.Popen) -> None:
    """Ray's agents can outlive a SIGKILLed driver; a killed machine would take them along."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def processes_of_session(driver_pid: int, seconds: float) -> list[str]:
    """The processes of the local Ray cluster a driver started (its session is named after the driver's pid) that
    are still running after up to ``seconds``."""
    import psutil

    session = re.compile(rf"session_[0-9_-]+_{driver_pid}\b")
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                command = " ".join(process.info["cmdline"] or ())
                if session.search(command):
                    alive.append(command[:160])
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def committed_rows(output: str, storage_options: dict | None = None) -> list[dict]:
    with connect(output, storage_options) as db:
        return [
            dict(zip(("image_id", "status", "run_id"), row, strict=True))
            for row in db.execute("SELECT image_id, status, run_id FROM predictions").fetchall()
        ]


@dataclass
class SlowRun:
    """A job over ``images`` on S3, behind a store that answers every request 0.3 s late: long enough to interrupt.
    ``driver`` is the CLI running it in a session of its own; ``spec`` reruns it."""

    images: dict[str, bytes]
    bucket: str
    out: Path
    spec: Path
    store: FaultProxy
    driver: subprocess.Popen | None = None

    def start(self, ready: Callable[[Path], bool]) -> subprocess.Popen:
        """Start the run and return once ``ready(staging folder)``; the driver is then still running."""
        self.driver = cli("run", str(self.spec), "--quiet")
        staging, deadline = self.out / "_staging", time.monotonic() + 240
        while time.monotonic() < deadline and self.driver.poll() is None and not ready(staging):
            time.sleep(0.05)
        assert self.driver.poll() is None, f"the run ended too early:\n{self.driver.communicate()[1][-2000:]}"
        return self.driver

    def rerun_and_check(self) -> Manifest:
        """Rerun after the interruption (at full speed): it commits one row per image, the only committed run."""
        self.store.delay = 0
        stop_group(self.driver)
        rerun = cli("run", str(self.spec), "--quiet")
        stdout, stderr = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, stderr[-3000:]
        (manifest,) = read_manifests(OutputLocation.open(str(self.out)))
        assert f"progress of crashed run {', '.join(manifest.plan.adopted_from)}" in stdout
        assert manifest.plan.adopted + manifest.plan.to_read == len(self.images)
        rows = committed_rows(str(self.out))
        assert sorted(r["image_id"] for r in rows) == sorted(f"s3://{self.bucket}/in/{name}" for name in self.images)
        assert {r["status"] for r in rows} == {"ok"} and {r["run_id"] for r in rows} == {manifest.run_id}
        assert not (self.out / "_staging").exists()
        return manifest


@contextlib.contextmanager
def a_slow_run(s3, tmp_path: Path, **output) -> Iterator[SlowRun]:
    fs, bucket, storage_options = s3
    images = pictures(24)
    for name, data in images.items():
        fs.pipe_file(f"{bucket}/in/{name}", data)
    out = tmp_path / "out"
    with FaultProxy(storage_options["endpoint_url"], delay=0.3) as slow_store:
        document = spec_document(f"s3://{bucket}/in/", str(out), {"endpoint_url": slow_store.endpoint})
        document["input"]["files_per_task"] = 2
        document["output"].update(output)
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(document))
        run = SlowRun(images, bucket, out, spec, slow_store)
        try:
            yield run
        finally:
            if run.driver is not None:
                stop_group(run.driver)


def test_a_driver_killed_mid_run_leaves_nothing_visible_and_the_rerun_adopts_its_progress(s3, tmp_path):
    with a_slow_run(s3, tmp_path, rows_per_file=2) as job:
        driver = job.start(
            lambda staging: (
                len(list(staging.glob("*/_progress/*.json"))) >= 3 and len(list(staging.glob("*/_files/*.json"))) >= 2
            )
        )
        assert processes_of_session(driver.pid, seconds=0)  # its local cluster, as this test finds it
        driver.send_signal(signal.SIGKILL)  # the driver only: what its cluster still runs is left to itself
        driver.communicate()
        time.sleep(3)  # anything the dead driver's cluster still had in flight
        assert committed_rows(str(job.out)) == [] and read_manifests(OutputLocation.open(str(job.out))) == []
        (crashed,) = [p.name for p in (job.out / "_staging").iterdir()]
        # The dead driver's local cluster goes with it (Ray's fate sharing): no process of its session lingers.
        assert processes_of_session(driver.pid, seconds=30) == []

        manifest = job.rerun_and_check()
    assert manifest.plan.adopted_from == [crashed] and manifest.plan.adopted >= 2  # finished shards not read again


def test_ctrl_c_stops_gently_keeps_what_was_read_and_the_rerun_adopts_it(s3, tmp_path):
    """A first Ctrl-C, sent to the whole process group as a terminal sends it: the shards being read are finished,
    predicted and written, the rest are left; nothing is committed, and the rerun adopts every shard read."""
    with a_slow_run(s3, tmp_path) as job:  # the default rows_per_file: no file is written before the end
        driver = job.start(lambda staging: len(list(staging.glob("*/_progress/*.json"))) >= 2)
        os.killpg(driver.pid, signal.SIGINT)
        _, stderr = driver.communicate(timeout=240)
        assert driver.returncode == 130, stderr[-3000:]
        assert "stopping: the shards being read are finished and written" in stderr
        stopped = re.search(r"run (\S+) stopped: (\d+) of 24 shards read and written, nothing committed", stderr)
        assert stopped, stderr[-3000:]
        assert committed_rows(str(job.out)) == [] and read_manifests(OutputLocation.open(str(job.out))) == []
        shards_read = int(stopped.group(2))
        assert 4 <= shards_read < 24
        assert list((job.out / "_staging" / stopped.group(1)).glob("_files/*.json"))  # what was read was written

        manifest = job.rerun_and_check()
    assert manifest.plan.adopted_from == [stopped.group(1)]
    assert manifest.plan.adopted == shards_read  # every shard the stopped run read; none read twice


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_flaky_store_costs_retries_not_rows(s3, ray_cluster):
    fs, bucket, storage_options = s3
    images = pictures(18)
    names = sorted(images)
    for index in range(3):
        part = names[index * 6 : (index + 1) * 6]
        fs.pipe_file(f"{bucket}/in/shard-{index}.tar", tar_shard([(name, images[name]) for name in part]))
    # In a process of its own: delta-rs holds the GIL while it waits on the store, which would starve a proxy thread.
    with FaultProxyProcess(
        storage_options["endpoint_url"], slow_down=0.08, drop_before=0.04, drop_after=0.04, seed=3
    ) as proxy:
        options = {"endpoint_url": proxy.endpoint, "key": "testing", "secret": "testing"}
        # Many ranged reads per shard: many chances to fail in the middle of one.
        document = spec_document(f"s3://{bucket}/in/", f"s3://{bucket}/out", {**options, "default_block_size": 4096})
        document["output"].update(storage_options=options, rows_per_file=4)
        result = run(parse_spec(document), progress=False)
    assert proxy.counts["slow_down"] and proxy.counts["drop_before"] and proxy.counts["drop_after"], proxy.counts
    rows = committed_rows(f"s3://{bucket}/out", storage_options)
    expected = sorted(f"s3://{bucket}/in/shard-{i // 6}.tar#{name}" for i, name in enumerate(names))
    assert sorted(r["image_id"] for r in rows) == expected
    assert {r["status"] for r in rows} == {"ok"} and result.error == 0


def test_three_nights_on_a_growing_bucket(tmp_path, ray_cluster):
    images = pictures(15)
    names = sorted(images)
    bucket = tmp_path / "bucket"
    bucket.mkdir()

    def write_shard(index: int, members: list[str]) -> None:
        (bucket / f"shard-{index}.tar").write_bytes(tar_shard([(name, images[name]) for name in members]))

    out = str(tmp_path / "labels")
    spec = parse_spec(spec_document(str(bucket), out, incremental=True))

    def night() -> dict:
        result = run(spec, progress=False)
        return asdict(result.plan) | {
            "rows": result.rows,
            "committed": result.version is not None,
            "id": result.run_id,
        }

    write_shard(0, names[0:3])
    write_shard(1, names[3:6])
    first = night()
    assert (first["to_read"], first["skipped_unchanged"], first["rows"]) == (2, 0, 6)

    write_shard(2, names[6:9])  # a new shard
    second = night()
    assert (second["to_read"], second["skipped_unchanged"], second["rows"]) == (1, 2, 3)

    write_shard(3, names[9:12])
    write_shard(1, [names[3], names[12], names[13]])  # rewritten: names[4:6] are gone, two images are new
    third = night()
    assert (third["to_read"], third["skipped_unchanged"], third["rows"]) == (2, 2, 6)

    fourth = night()  # nothing new
    assert (fourth["to_read"], fourth["committed"]) == (0, False)

    with connect(out) as db:
        latest = dict(db.execute("SELECT image_id, run_id FROM latest").fetchall())
        total = db.execute("SELECT count(*) FROM predictions").fetchone()[0]
        runs = db.execute("SELECT run_id, mode, shards_read, shards_skipped FROM runs ORDER BY seq").fetchall()
    shard = f"{bucket}/shard-"
    expected = {f"{shard}0.tar#{n}": first["id"] for n in names[0:3]}
    expected |= {f"{shard}2.tar#{n}": second["id"] for n in names[6:9]}
    expected |= {f"{shard}3.tar#{n}": third["id"] for n in names[9:12]}
    expected |= {f"{shard}1.tar#{n}": third["id"] for n in (names[3], names[12], names[13])}
    assert latest == expected  # one row per image now in the bucket, each from the newest run that saw it
    assert total == 6 + 3 + 6  # history is kept in predictions
    assert runs == [
        (first["id"], "incremental", 2, 0),
        (second["id"], "incremental", 1, 2),
        (third["id"], "incremental", 2, 2),
    ]

    full = run(spec, progress=False, full=True)
    assert (full.plan.mode, full.plan.to_read, full.rows) == ("full", 4, 12)


def test_retry_failed_reads_only_failed_images_and_its_rows_supersede(s3, tmp_path):
    fs, bucket, storage_options = s3
    images = pictures(8)
    for name, data in images.items():
        fs.pipe_file(f"{bucket}/in/{name}", data)
    fs.pipe_file(f"{bucket}/in/corrupt.jpg", images["img-000.jpg"][:300])
    denied = ("img-002.jpg", "img-005.jpg")
    out = tmp_path / "out"
    with FaultProxy(storage_options["endpoint_url"], deny=denied) as store:  # access denied: a permanent error
        spec = tmp_path / "job.yaml"
        spec.write_text(yaml.safe_dump(spec_document(f"s3://{bucket}/in/", str(out), {"endpoint_url": store.endpoint})))
        first = cli("run", str(spec), "--quiet")
        stdout, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
        assert "9 (6 ok, 3 failed)" in stdout
        with connect(str(out)) as db:
            reasons = dict(db.execute("SELECT image_id, error FROM errors").fetchall())
        assert all("PermissionError" in reasons[f"s3://{bucket}/in/{name}"] for name in denied), reasons

        store.deny = ()  # access fixed
        retry = cli("retry-failed", str(out), "--quiet")
        stdout, stderr = retry.communicate(timeout=300)
    assert retry.returncode == 0, stderr[-3000:]
    assert "3 (2 ok, 1 failed)" in stdout and "(retry-failed)" in stdout

    manifests = read_manifests(OutputLocation.open(str(out)))
    assert [m.plan.mode for m in manifests] == ["full", "retry-failed"]
    assert manifests[1].plan.to_read == 3  # the two denied images and the corrupt one, nothing else
    with connect(str(out)) as db:
        latest = dict(db.execute("SELECT image_id, status FROM latest").fetchall())
        errors = db.execute("SELECT image_id, error FROM errors").fetchall()
        assert db.execute("SELECT count(*) FROM predictions").fetchone()[0] == 9 + 3
    assert len(latest) == 9 and sum(status == "ok" for status in latest.values()) == 8
    # The corrupt file failed again, for its own reason: now the only error.
    assert [(image_id, "PermissionError" in error) for image_id, error in errors] == [
        (f"s3://{bucket}/in/corrupt.jpg", False)
    ]
    shards = dataset(str(out), table="shards").to_table().to_pylist()
    retried = [s for s in shards if s["run_id"] == manifests[1].run_id]
    assert sorted(Path(s["url"]).name for s in retried) == ["corrupt.jpg", *denied]


def test_resume_needs_no_ray_when_every_shard_was_finished(tmp_path, ray_cluster, monkeypatch):
    """A driver that died just before its commit, having finished everything: the next run commits the dead run's
    data files as its own, without reading anything and without copying a file."""
    import pipeline.runner

    images = pictures(4)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for name, data in images.items():
        (bucket / name).write_bytes(data)
    out = tmp_path / "out"
    spec = parse_spec(spec_document(str(bucket), str(out)))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("the driver died before its commit")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.runner, "commit", die)
        with pytest.raises(KeyboardInterrupt):
            run(spec, progress=False)
    assert committed_rows(str(out)) == []
    written = sorted(p.relative_to(out / "predictions") for p in (out / "predictions").glob("run_id=*/*.parquet"))
    assert written

    second = run(spec, progress=False)
    assert second.plan.adopted == 4 and second.plan.to_read == 0 and second.rows == 4
    assert "ray_init" not in second.stage_seconds  # nothing to read: Ray was not needed
    assert sorted(r["run_id"] for r in committed_rows(str(out))) == [second.run_id] * 4
    from deltalake import DeltaTable

    committed = DeltaTable(str(out / "predictions")).file_uris()
    assert sorted(Path(uri).relative_to(out / "predictions") for uri in committed) == written  # the same files
    assert not (out / "_staging").exists()
