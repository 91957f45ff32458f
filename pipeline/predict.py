"""The inference stage: a callable class for Ray Data's actor pool, one model per actor.

The model is built and its weights read once, in the constructor, which also traces the forward function (and
compiles it, with XLA) so the first batch does not pay for it. The forward function has a fixed input signature,
uint8 ``[batch_size, size, size, 3]``: the 'caffe' preprocessing runs inside it, the last partial batch is padded
rather than traced again, and one pass gives the top-k classes and the pooled embedding. One actor may run several
batches at once on its one model, each in a thread of its own (``inference.batches_per_actor``): the forward pass
releases the GIL.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline.progress import quiet_startup
from pipeline.sink import TOP_K_TYPE, output_schema
from pipeline.spec import DecodeSpec, InferenceSpec, ModelSpec


def configure_backend(precision: str, threads: int = 0, concurrent_calls: int = 1) -> None:
    """Before the first op: set the Keras precision policy and let GPU memory grow on demand. On TensorFlow,
    ``threads`` sets the number of compute threads per op (0 leaves TensorFlow's default: one per core), and the
    pool that runs ops side by side is made large enough for ``concurrent_calls`` forward passes at once."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX: no 75% grab, actors may share a GPU
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(threads, concurrent_calls))
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    keras.mixed_precision.set_global_policy(precision)


def backend_devices() -> list[str]:
    """The devices the Keras backend computes on, for the manifest."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return [str(device) for device in jax.devices()]
    import tensorflow as tf

    return [device.name for device in tf.config.list_logical_devices()]


class CompiledModel:
    """A model's forward pass compiled once for uint8 ``[batch_size, size, size, 3]`` input: 'caffe' preprocessing,
    top-k and the pooled embedding in one call. Any number of images is run in padded batches of that shape.
    :meth:`from_canvas` takes images laid in a padded canvas instead (``decode.on: actor``) and resizes each from
    its box inside the compiled call, compiled once per canvas size.

    Batch norms are folded into their convolutions first (same results, 1.2x faster in float32 and 1.7x in
    bfloat16 on CPU, see ``benchmarks/RESULTS.md``); ``fold=False`` compiles the model as built. It compiles with
    the Keras backend in use: a ``tf.function`` (XLA if ``jit_compile``) on TensorFlow, ``jax.jit`` (always XLA)
    on JAX."""

    def __init__(
        self,
        model,
        batch_size: int,
        image_size: int,
        top_k: int,
        jit_compile: bool = False,
        fold: bool = True,
        warm_up: bool = True,
    ):
        """``warm_up``: compile the pixel forward pass now, during start-up (not when images come in canvases)."""
        import keras
        from keras import ops

        from pipeline.model import caffe_preprocess, fold_batch_norms, resize_boxes

        self.batch_size, self.image_size, self.jit_compile = batch_size, image_size, jit_compile
        self.backend = keras.backend.backend()
        if self.backend not in ("tensorflow", "jax"):
            raise ValueError(f"the model stage runs on the 'tensorflow' or 'jax' Keras backend, not {self.backend!r}")
        if fold:
            model = fold_batch_norms(model)

        def heads(outputs):
            scores, class_ids = ops.top_k(ops.cast(outputs["predictions"], "float32"), k=top_k)
            return class_ids, scores, ops.cast(outputs["embedding"], "float32")

        if self.backend == "tensorflow":
            self._state = None

            def predict(state, images):
                return heads(model(caffe_preprocess(images), training=False))

        else:
            # Weights are arguments, not constants folded into the compiled program (which would copy 100 MB of
            # ResNet-50 into it and slow compilation down).
            variables = model.trainable_variables, model.non_trainable_variables
            self._state = tuple([v.value for v in group] for group in variables)

            def predict(state, images):
                outputs, _ = model.stateless_call(*state, caffe_preprocess(images), training=False)
                return heads(outputs)

        def from_canvas(state, canvas, boxes):
            return predict(state, resize_boxes(canvas, boxes, image_size))

        self._from_canvas_function = from_canvas
        self._from_canvas: dict[int, Callable] = {}
        self.forward = self._compile(predict, ([batch_size, image_size, image_size, 3], "uint8"))
        if warm_up and self.backend == "tensorflow" and not jit_compile:
            self.forward.get_concrete_function()  # trace now; a warm-up batch would cost a batch of compute on a CPU
        elif warm_up:
            self.forward(np.zeros([batch_size, image_size, image_size, 3], np.uint8))  # XLA compiles on first call

    def _compile(self, function: Callable, *signature: tuple[list[int], str]) -> Callable:
        """``function(state, *inputs)`` compiled, with the Keras backend in use, for inputs of these shapes and
        dtypes; returns a function of the inputs alone."""
        if self.backend == "tensorflow":
            import tensorflow as tf

            specs = [tf.TensorSpec(shape, dtype) for shape, dtype in signature]
            return tf.function(
                lambda *inputs: function(None, *inputs), jit_compile=self.jit_compile, input_signature=specs
            )
        import jax

        jitted = jax.jit(function)
        return lambda *inputs: jitted(self._state, *inputs)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Class ids, scores (``[n, k]``) and embeddings (``[n, D]``) for any number of images."""
        return self._batches(self.forward, pixels)

    def from_canvas(self, canvas, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The same for images in a canvas ``[n, C, C, 3]`` (NumPy, or a GPU array taken through DLPack) with their
        ``boxes`` ``[n, 6]`` (see :func:`pipeline.model.resize_boxes`)."""
        side = canvas.shape[1]
        if side not in self._from_canvas:
            canvas_spec = [self.batch_size, side, side, 3], "uint8"
            boxes_spec = [self.batch_size, 6], "float32"
            self._from_canvas[side] = self._compile(self._from_canvas_function, canvas_spec, boxes_spec)
        return self._batches(self._from_canvas[side], canvas, boxes)

    def _batches(self, function: Callable, *inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``function`` over ``inputs`` (arrays with one row per image) in batches of ``batch_size``, the last one
        padded with zeros: the same shapes every call, nothing traced again. Every batch is started before any
        result is read back: where the backend dispatches asynchronously (JAX; TensorFlow on a GPU), the copy to
        the device, the compute and the copy back of successive batches overlap."""
        n = len(inputs[0])
        started = []
        for start in range(0, n, self.batch_size):
            count = min(self.batch_size, n - start)
            chunks = [self._on_device(_padded(x[start : start + count], self.batch_size)) for x in inputs]
            started.append((count, function(*chunks)))
        results = [[np.asarray(t)[:count] for t in outputs] for count, outputs in started]
        ids, scores, embeddings = zip(*results, strict=True)
        return np.concatenate(ids), np.concatenate(scores), np.concatenate(embeddings)

    def _on_device(self, array):
        """A NumPy array as it is; a GPU array (CuPy) as the backend's, through DLPack, without a copy."""
        if isinstance(array, np.ndarray):
            return array
        if self.backend == "jax":
            import jax

            return jax.dlpack.from_dlpack(array)
        import tensorflow as tf

        return tf.experimental.dlpack.from_dlpack(array.toDlpack())


def _module_of(array):
    """NumPy for a NumPy array, CuPy for a CuPy one: the same calls, on the host or on the GPU."""
    return np if isinstance(array, np.ndarray) else importlib.import_module(type(array).__module__.split(".")[0])


def _padded(chunk, rows: int):
    """``chunk`` with zero rows appended up to ``rows``, in the array library it came in (NumPy, or CuPy)."""
    if len(chunk) == rows:
        return chunk
    padded = _module_of(chunk).zeros((rows, *chunk.shape[1:]), chunk.dtype)
    padded[: len(chunk)] = chunk
    return padded


class Predictor:
    def __init__(
        self,
        model_spec: ModelSpec,
        inference: InferenceSpec,
        image_size: int,
        embedding_dtype: str,
        run_id: str,
        timer=None,
        decode: DecodeSpec | None = None,
    ):
        """``decode``: decode here the image bytes read tasks ship (``decode.on: actor``); None: they ship pixels."""
        with quiet_startup(gpu=inference.gpus_per_actor > 0):  # TensorFlow's start-up chatter, unless verbose
            started = time.perf_counter()
            self.decoder = None
            if decode is not None:
                from pipeline.actor_decode import ActorDecoder

                gpu = inference.gpus_per_actor > 0
                self.decoder = ActorDecoder(decode.preprocessing, image_size, decode.max_pixels, gpu)
            configure_backend(inference.precision, inference.threads_per_actor, max(1, inference.batches_per_actor))
            from pipeline.model import Labels, create_model, imagenet_labels

            labels = Labels.from_file(model_spec.labels, model_spec.storage_options) if model_spec.labels else None
            classes = model_spec.classes or (len(labels) if labels else 1000)
            model = create_model(
                model_spec.architecture,
                weights=model_spec.weights,
                input_shape=(image_size, image_size, 3),
                classes=classes,
                with_embedding=True,
                seed=model_spec.seed,
                allow_download=model_spec.allow_download,
                storage_options=model_spec.storage_options,
            )
            labels = (labels or imagenet_labels()).check(classes)
            self.class_wnids = np.array([c.wnid for c in labels], dtype=object)
            self.class_labels = np.array([c.label for c in labels], dtype=object)
            self.model_name = model.name
            self.fingerprint = model.weights_info.fingerprint
            self.batch_size = inference.batch_size
            self.top_k = min(model_spec.top_k, classes)
            self.embedding_dtype = embedding_dtype
            self.run_id = run_id
            self.timer = timer
            self.schema = output_schema()
            self.embedding_dim = model.output["embedding"].shape[-1]

            self.compiled = CompiledModel(
                model, self.batch_size, image_size, self.top_k, inference.jit_compile, warm_up=decode is None
            )
            self.startup_seconds = time.perf_counter() - started
            if timer is not None:
                import keras
                import ray

                timer.add.remote("model_startup", self.startup_seconds, 1)
                timer.actor_started.remote(
                    {
                        "node_id": ray.get_runtime_context().get_node_id(),
                        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                        "backend": keras.backend.backend(),
                        "devices": backend_devices(),
                        "startup_seconds": round(self.startup_seconds, 3),
                        "batches_at_once": max(1, inference.batches_per_actor),
                    }
                )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = batch["status"] == "ok"
        n = len(ok)
        if self.decoder is not None:
            batch, inputs = self._decode(batch, ok)
            ok = batch["status"] == "ok"
        began = time.time()
        started = time.perf_counter()
        if ok.any() and self.decoder is not None:
            ok_ids, ok_scores, ok_embeddings = self.compiled.from_canvas(*inputs)
        elif ok.any():
            pixels = batch["pixels"] if ok.all() else batch["pixels"][ok]  # no copy in the common case
            ok_ids, ok_scores, ok_embeddings = self.compiled(pixels)
        else:
            dim = self.embedding_dim
            ok_ids = np.zeros((0, self.top_k), np.int32)
            ok_scores = np.zeros((0, self.top_k), np.float32)
            ok_embeddings = np.zeros((0, dim), np.float32)
        elapsed = time.perf_counter() - started
        if self.timer is not None:
            done = int(ok.sum())
            self.timer.add.remote("predict", elapsed, done, (began, began + elapsed))
            self.timer.images_done.remote(n, n - done)
        return self._table(batch, ok, ok_ids, ok_scores, ok_embeddings, n)

    def _decode(self, batch: dict[str, np.ndarray], readable: np.ndarray) -> tuple[dict[str, np.ndarray], tuple]:
        """The batch with the decoding's statuses, errors and sizes, and the canvas and boxes of its decoded images."""
        started = time.perf_counter()
        indices = np.flatnonzero(readable)
        decoded = self.decoder([batch["data"][i] for i in indices])
        status, error = batch["status"].copy(), batch["error"].copy()
        width, height = batch["width"].copy(), batch["height"].copy()
        for i, reason in zip(indices, decoded.errors, strict=True):
            if reason is not None:
                status[i], error[i] = "error", reason
        width[indices], height[indices] = decoded.width, decoded.height
        good = np.array([reason is None for reason in decoded.errors], bool)
        inputs = (decoded.canvas, decoded.boxes)
        if not good.all():
            on_canvas = good if isinstance(decoded.canvas, np.ndarray) else _module_of(decoded.canvas).asarray(good)
            inputs = (decoded.canvas[on_canvas], decoded.boxes[good])
        if self.timer is not None:
            self.timer.add.remote("actor_decode", time.perf_counter() - started, len(indices))
        return {**batch, "status": status, "error": error, "width": width, "height": height}, inputs

    def _table(self, batch, ok, ok_ids, ok_scores, ok_embeddings, n) -> pa.Table:
        k, dim = self.top_k, ok_embeddings.shape[1]
        class_ids = np.zeros((n, k), np.int32)
        scores = np.zeros((n, k), np.float32)
        embeddings = np.zeros((n, dim), np.float32)
        class_ids[ok], scores[ok], embeddings[ok] = ok_ids, ok_scores, ok_embeddings
        error = ~ok

        flat_ids = class_ids.reshape(-1)
        top_k_values = pa.StructArray.from_arrays(
            [
                pa.array(flat_ids, pa.int32()),
                pa.array(self.class_wnids[flat_ids], pa.string()),
                pa.array(self.class_labels[flat_ids], pa.string()),
                pa.array(scores.reshape(-1), pa.float32()),
            ],
            fields=list(TOP_K_TYPE.value_type),
        )
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
        top_k = pa.ListArray.from_arrays(offsets, top_k_values, type=TOP_K_TYPE, mask=pa.array(error))

        stored = embeddings.astype(np.float16).astype(np.float32) if self.embedding_dtype == "float16" else embeddings
        embedding_mask = np.ones(n, bool) if self.embedding_dtype == "none" else error
        embedding = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * dim),
            pa.array(stored.reshape(-1)),
            type=self.schema.field("embedding").type,
            mask=pa.array(embedding_mask),
        )
        known_size = batch["width"] >= 0
        now = datetime.now(timezone.utc)
        columns = {
            "image_id": pa.array(batch["image_id"], pa.string()),
            "source": pa.array(batch["source"], pa.string()),
            "status": pa.array(batch["status"], pa.string()),
            "error": pa.array(batch["error"].astype(str), pa.string(), mask=ok),
            "label": pa.array(self.class_labels[class_ids[:, 0]], pa.string(), mask=error),
            "class_id": pa.array(class_ids[:, 0], pa.int32(), mask=error),
            "score": pa.array(scores[:, 0], pa.float32(), mask=error),
            "top_k": top_k,
            "embedding": embedding,
            "width": pa.array(batch["width"], pa.int32(), mask=~known_size),
            "height": pa.array(batch["height"], pa.int32(), mask=~known_size),
            "model": pa.array([self.model_name] * n, pa.string()),
            "model_fingerprint": pa.array([self.fingerprint] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
            "processed_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.Table.from_pydict(columns, schema=self.schema)  # by name: the order is the schema's
