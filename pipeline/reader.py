"""The read stage of the Ray plan: read tasks in, decoded rows out, on CPU tasks (see :mod:`pipeline.runner`).

Reading is :mod:`pipeline.sources`; decoding is the pure functions of :mod:`pipeline.decode`; this module is the
Ray Data function that runs both over a task's shards and keeps the books a rerun needs.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.decode import DecodeError, Preprocessing, decode
from pipeline.manifest import Tally
from pipeline.runs import record_progress
from pipeline.sources import ReadTask, read_shard


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    input_options: dict,
    preprocessing: Preprocessing,
    image_size: int,
    max_pixels: int,
    rows_per_batch: int = 64,
    timer=None,
    progress: dict | None = None,
    ship_bytes: bool = False,
):
    """Ray Data stage: :class:`ReadTask` s in (``batch["task"]``), batches of decoded rows out (uint8 pixels, or an
    error reason); with ``ship_bytes``, the images' bytes undecoded (``data``), for the model actor to decode.

    Every record becomes exactly one row. Error rows carry zero pixels so every batch has one tensor shape; "no
    error" is "" and an unknown size is -1 (the predictor turns both into nulls). A task that begins after the
    driver asked the run to stop (``timer.request_stop``) reads nothing. When all shards of a task are read, the
    number of rows each gave, and the tally of what it held, is recorded under ``progress`` (see
    :func:`pipeline.runs.record_progress`): a rerun after a crash uses it to tell finished shards from half-written
    ones, and the manifest counts what was skipped.
    """
    rows: list[tuple] = []
    read_seconds = decode_seconds = 0.0
    began = time.time()

    def flush():
        nonlocal rows
        if ship_bytes:
            images = {"data": np.array([row[5] or b"" for row in rows], dtype=object)}
        else:
            images = {"pixels": np.zeros((len(rows), image_size, image_size, 3), np.uint8)}
            for i, row in enumerate(rows):
                if row[5] is not None:
                    images["pixels"][i] = row[5]
        out = {
            "image_id": np.array([r[0] for r in rows], dtype=object),
            "source": np.array([r[1] for r in rows], dtype=object),
            "status": np.array(["ok" if r[2] is None else "error" for r in rows], dtype=object),
            "error": np.array([r[2] or "" for r in rows], dtype=object),  # "" not None: no all-null column
            "width": np.array([r[3] for r in rows], dtype=np.int32),
            "height": np.array([r[4] for r in rows], dtype=np.int32),
            **images,
        }
        rows = []
        return out

    for record in batch["task"]:
        task = ReadTask.from_json(record)
        if _stop_requested(timer):
            continue  # the run is stopping: shards not begun are left whole for the rerun
        done = []
        for shard_read in task.reads:
            tally = Tally()
            records = read_shard(shard_read.shard, input_options, only=shard_read.only, tally=tally)
            count = 0
            while True:
                started = time.perf_counter()
                record = next(records, None)
                read_seconds += time.perf_counter() - started
                if record is None:
                    break
                count += 1
                started = time.perf_counter()
                if record.error is not None:
                    rows.append((record.image_id, record.source, record.error, -1, -1, None))
                elif ship_bytes:  # decoded by the model actor (decode.on: actor)
                    rows.append((record.image_id, record.source, None, -1, -1, record.data))
                else:
                    try:
                        pixels, width, height = decode(record.data, preprocessing, max_pixels, image_size)
                        rows.append((record.image_id, record.source, None, width, height, pixels))
                    except Exception as error:  # a bad image is a row with a reason, never a dead job
                        reason = str(error) if isinstance(error, DecodeError) else f"{type(error).__name__}: {error}"
                        rows.append((record.image_id, record.source, reason, -1, -1, None))
                decode_seconds += time.perf_counter() - started
                if len(rows) >= rows_per_batch:
                    yield flush()
            done.append(shard_read.done(count, tally))
        if progress is not None:
            record_progress(progress, task.key, done)
    if rows:
        yield flush()
    if timer is not None:
        timer.add.remote("read", read_seconds, 0)
        timer.add.remote("decode", decode_seconds, 0, (began, time.time()))


def _stop_requested(timer) -> bool:
    """Whether the driver asked the run to stop; a timer that cannot be asked (lost with its node) says no."""
    if timer is None:
        return False
    import ray

    try:
        return ray.get(timer.stop_requested.remote(), timeout=30)
    except Exception:
        return False
