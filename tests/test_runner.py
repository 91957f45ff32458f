"""The runner's choices: the object-store budget (bounded by what waits for the model on CPU, Ray Data's own on
GPU) and how many batches an actor runs at once."""

from __future__ import annotations

import time

from pipeline.runner import MAX_AUTO_BATCHES_PER_ACTOR, _batches_per_actor, _buffer_bytes
from pipeline.sink import row_bytes
from pipeline.sources import ReadTask, Shard, ShardRead, ShardReads
from pipeline.spec import parse_spec

PIXELS = 224 * 224 * 3


def spec(*overrides: str):
    return parse_spec({"input": "/in", "output": "/out"}, list(overrides))


def test_cpu_budget_covers_waiting_batches_decode_tasks_and_two_files():
    job = spec("inference.batch_size=32", "inference.actors.max=2", "input.files_per_task=100")
    rows = 1000
    budget = _buffer_bytes(job, rows, cluster_cpus=16)
    waiting = 16 * 32 * PIXELS * 2
    decoding = (16 - 2) * 100 * PIXELS  # every CPU the two actors leave runs a decode task
    assert budget == waiting + decoding + 2 * rows * row_bytes(2048, job.output.embedding_dtype, job.model.top_k)


def test_cpu_budget_grows_with_the_clusters_cpus():
    small, large = (_buffer_bytes(spec(), 1000, cluster_cpus=cpus) for cpus in (16, 64))
    assert large - small == (64 - 16) * 256 * PIXELS  # files_per_task is 256
    assert _buffer_bytes(spec(), 10**6, cluster_cpus=1) == _buffer_bytes(spec(), 10**6, cluster_cpus=2)  # >= 1 task
    assert _buffer_bytes(spec(), 1, cluster_cpus=2) == 128 * 2**20


def test_gpu_actors_keep_ray_datas_own_budget():
    assert _buffer_bytes(spec("inference.gpus_per_actor=1"), 1000, cluster_cpus=16) is None


def test_the_budget_holds_waiting_batches_for_each_batch_an_actor_runs_at_once():
    one, three = (_buffer_bytes(spec(f"inference.batches_per_actor={n}"), 1, cluster_cpus=16) for n in (1, 3))
    assert three - one == 2 * 16 * 32 * PIXELS


def test_a_cpu_actor_runs_one_batch_per_compute_thread_a_gpu_actor_one():
    assert _batches_per_actor(spec(), node_cpus=2) == 2  # TensorFlow's threads: one per core
    assert _batches_per_actor(spec(), node_cpus=64) == MAX_AUTO_BATCHES_PER_ACTOR
    assert _batches_per_actor(spec("inference.threads_per_actor=1"), node_cpus=16) == 1  # one actor per core
    assert _batches_per_actor(spec("inference.threads_per_actor=3"), node_cpus=16) == 3
    assert _batches_per_actor(spec("inference.gpus_per_actor=1"), node_cpus=16) == 1
    assert _batches_per_actor(spec("inference.batches_per_actor=6"), node_cpus=2) == 6  # asked for: kept


def test_stage_span_runs_from_the_first_start_to_the_last_end_whatever_order_reports_arrive_in():
    from pipeline.metrics import StageTimer

    t0 = time.time()
    timer = StageTimer.__ray_actor_class__(since=t0)  # the class itself: the bookkeeping, without a cluster
    timer.add("predict", 4.0, 32, (t0 + 12.0, t0 + 16.0))
    timer.add("predict", 4.5, 32, (t0 + 10.0, t0 + 14.5))  # ran beside the first, reported after it
    timer.add("predict", 2.0, 16, (t0 + 16.0, t0 + 18.0))
    timer.add("read", 1.0, 0)  # no span: totals only
    totals = timer.totals()
    assert totals["predict"] == {"seconds": 10.5, "items": 80, "started_s": 10.0, "span_seconds": 8.0}
    assert totals["read"] == {"seconds": 1.0, "items": 0}


def test_read_tasks_group_image_files_and_keep_container_shards_alone():
    files = [ShardRead(Shard(f"/in/{i}.jpg", "images", 10, "e")) for i in range(5)]
    tar = ShardRead(Shard("/in/a.tar", "webdataset", 99, None), frozenset({"/in/a.tar#k1", "/in/a.tar#k0"}))
    tasks = [ReadTask.from_json(task) for task in ShardReads.of([*files[:3], tar, *files[3:]]).tasks(2)]
    assert [[read.shard.url for read in task.reads] for task in tasks] == [
        ["/in/0.jpg", "/in/1.jpg"],
        ["/in/a.tar"],
        ["/in/2.jpg", "/in/3.jpg"],
        ["/in/4.jpg"],
    ]
    for task in tasks:  # as they travel through Ray Data and back
        assert ReadTask.from_json(task.to_json()) == task
    assert tasks[1].reads[0] == tar
    assert tasks[1].reads[0].done(7) == {**tar.shard.to_dict(), "rows": 7, "partial": True}
    assert len({task.key for task in tasks}) == len(tasks)
    for files_per_task in (1, 3, 10):  # every read in exactly one task
        grouped = [ReadTask.from_json(task) for task in ShardReads.of([*files, tar]).tasks(files_per_task)]
        assert sorted(read.shard.url for task in grouped for read in task.reads) == sorted(
            read.shard.url for read in [*files, tar]
        )
        assert max(len(task.reads) for task in grouped) == min(files_per_task, len(files))
    assert ShardReads.of([]).tasks(2) == []
