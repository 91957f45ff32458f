"""The predictor on its own: one trace for every batch shape, padding, error rows, and reduced precision."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.predict import Predictor
from pipeline.spec import InferenceSpec, ModelSpec


def batch(n_ok: int, n_error: int, size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n_ok * 100 + n_error)
    n = n_ok + n_error
    status = np.array(["ok"] * n_ok + ["error"] * n_error, dtype=object)
    return {
        "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
        "source": np.array(["shard"] * n, dtype=object),
        "status": status,
        "error": np.array([""] * n_ok + ["empty file (0 bytes)"] * n_error, dtype=object),
        "width": np.array([size] * n_ok + [-1] * n_error, np.int32),
        "height": np.array([size] * n_ok + [-1] * n_error, np.int32),
        "pixels": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    }


def predictor(precision: str = "float32", jit_compile: bool = False, **model) -> Predictor:
    spec = ModelSpec(depth=18, weights="random", seed=5, top_k=3, **model)
    inference = InferenceSpec(batch_size=4, precision=precision, jit_compile=jit_compile)
    return Predictor(spec, inference, 64, "float32", "run-1")


@pytest.fixture(autouse=True)
def restore_precision():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_one_trace_for_every_batch_shape():
    model = predictor()
    assert model.compiled.forward.experimental_get_tracing_count() == 1  # traced in the constructor
    tables = [model(batch(n_ok, n_error)) for n_ok, n_error in [(4, 0), (3, 1), (1, 0), (9, 2), (0, 3)]]
    assert model.compiled.forward.experimental_get_tracing_count() == 1
    assert [t.num_rows for t in tables] == [4, 4, 1, 11, 3]


def test_padding_does_not_change_results():
    model = predictor()
    full = model(batch(4, 0)).column("embedding").to_numpy(zero_copy_only=False)
    data = batch(4, 0)
    partial = model({k: v[:2] for k, v in data.items()}).column("embedding").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(np.stack(partial), np.stack(full[:2]), rtol=1e-5, atol=1e-6)


def test_error_rows_are_null_where_the_contract_says():
    rows = predictor()(batch(2, 2)).to_pylist()
    ok, error = rows[:2], rows[2:]
    assert all(r["status"] == "ok" and r["error"] is None and len(r["top_k"]) == 3 for r in ok)
    assert all(r["class_id"] == r["top_k"][0]["class_id"] and r["label"] == r["top_k"][0]["label"] for r in ok)
    assert all(r["top_k"][0]["score"] >= r["top_k"][1]["score"] >= r["top_k"][2]["score"] for r in ok)
    for row in error:
        assert row["error"] == "empty file (0 bytes)"
        assert [row[c] for c in ("label", "class_id", "score", "top_k", "embedding", "width", "height")] == [None] * 7
        assert row["model"] == "resnet18" and row["run_id"] == "run-1"


def test_custom_labels_set_the_class_count(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\n")
    rows = predictor(labels=str(labels))(batch(2, 0)).to_pylist()
    assert {c["label"] for r in rows for c in r["top_k"]} <= {"cat", "dog", "bird", "fish"}
    assert all(c["wnid"] is None for r in rows for c in r["top_k"])


def test_mixed_bfloat16_stays_close_to_float32():
    data = batch(4, 0)
    reference = predictor()(data)
    keras.mixed_precision.set_global_policy("float32")
    reduced = predictor("mixed_bfloat16")(data)
    a = np.stack(reference.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(reduced.column("embedding").to_numpy(zero_copy_only=False))
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05
    assert reduced.column("embedding").type.value_type == reference.column("embedding").type.value_type


def test_the_gpu_path_mixed_float16_with_xla_stays_close_to_float32():
    """The configuration GPU specs use (jobs/nightly.yaml, jobs/backfill.yaml): float16 compute, XLA-compiled
    forward pass. Here XLA compiles for the CPU; the graph, the casts and the single trace are the same."""
    data = batch(8, 1)
    reference = predictor()(data)
    keras.mixed_precision.set_global_policy("float32")
    model = predictor("mixed_float16", jit_compile=True)
    reduced = model(data)
    assert model.compiled.forward.experimental_get_tracing_count() == 1
    a = np.stack(reference.column("embedding").to_numpy(zero_copy_only=False)[:8])
    b = np.stack(reduced.column("embedding").to_numpy(zero_copy_only=False)[:8])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.02
    top1 = reference.column("class_id").to_pylist(), reduced.column("class_id").to_pylist()
    assert sum(x == y for x, y in zip(*top1, strict=True)) >= 7  # float16 may flip a near tie, not more
    assert reduced.column("embedding").type == reference.column("embedding").type  # stored as asked: float32


def test_threads_and_batches_per_actor_set_tensorflows_thread_pools():
    """Set before TensorFlow starts, so it runs in a fresh process, as an actor does."""
    import subprocess
    import sys

    script = (
        "from pipeline.predict import configure_backend; import tensorflow as tf; "
        "configure_backend('float32', 1, 3); threading = tf.config.threading; "
        "print(threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-2:] == ["1", "3"], done.stderr[-2000:]  # room for 3 batches' ops side by side


def test_batches_run_side_by_side_give_the_results_of_one_at_a_time():
    from concurrent.futures import ThreadPoolExecutor

    model = predictor()
    batches = [batch(n_ok, n_error) for n_ok, n_error in [(4, 0), (3, 1), (9, 2), (2, 0), (5, 0), (1, 3)]]
    alone = [model(b) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(model, batches))
    for a, b in zip(alone, together, strict=True):
        assert b.column("image_id").equals(a.column("image_id"))
        assert b.column("top_k").equals(a.column("top_k"))
        assert b.column("embedding").is_null().equals(a.column("embedding").is_null())  # error rows: null
        ok = [e for e in a.column("embedding").to_pylist() if e is not None]
        np.testing.assert_allclose([e for e in b.column("embedding").to_pylist() if e is not None], ok, rtol=1e-5)
    assert model.compiled.forward.experimental_get_tracing_count() == 1
