"""Where a model's weights come from, and what exactly they are.

``weights`` is ``None``/``"random"`` (seeded, for tests and benchmarks), ``"imagenet"`` (Keras's published files,
resolved from a local cache and downloaded only when the caller allows it), or a local path or any fsspec URL to a
``.h5`` (Keras's legacy format, the published one), ``.weights.h5`` or ``.keras`` file. Remote files are fetched once
per node into the cache. Every loaded model is stamped with a :class:`WeightsInfo` whose fingerprint is the sha256
of the weight values themselves, so the same weights have the same fingerprint in every file format and a random
model can never pass for a trained one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import h5py
import numpy as np

from pipeline.credentials import redact_url

try:
    import fcntl
except ImportError:  # Windows: no lock; each of a node's concurrent fetches still renames a whole copy into place
    fcntl = None

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"

# Keras's published ResNet files: architecture -> {include_top: (file name, md5)}.
IMAGENET_FILES: dict[str, dict[bool, tuple[str, str]]] = {
    "resnet50": {
        True: ("resnet50_weights_tf_dim_ordering_tf_kernels.h5", "2cb95161c43110f7111970584f804107"),
        False: ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    },
    "resnet101": {
        True: ("resnet101_weights_tf_dim_ordering_tf_kernels.h5", "f1aeb4b969a6efcfb50fad2f0c20cfc5"),
        False: ("resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "88cf7a10940856eca736dc7b7e228a21"),
    },
    "resnet152": {
        True: ("resnet152_weights_tf_dim_ordering_tf_kernels.h5", "100835be76be38e30d865e96f2aaae62"),
        False: ("resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5", "ee4c566cf9a93f14d82f913c2dc6dd0c"),
    },
}

WEIGHT_SUFFIXES = (".weights.h5", ".keras", ".h5", ".hdf5")


class WeightsError(RuntimeError):
    """Weights that cannot be found, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # "random:seed=0", "imagenet:<file>", or the path/URL, credentials removed
    fingerprint: str  # sha256 over the weight values
    random: bool


def cache_dir() -> Path:
    """Per-node cache: ``$RESNET_PIPELINE_CACHE``, else ``$XDG_CACHE_HOME/resnet-pipeline``."""
    if root := os.environ.get("RESNET_PIPELINE_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet-pipeline"


def weights_cache_dir() -> Path:
    return cache_dir() / "weights"


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _node_lock(target: Path) -> Iterator[None]:
    """Held by one process of this machine at a time: an exclusive ``flock`` on a lock file beside ``target``
    (released by the kernel if its holder dies)."""
    with target.with_name(f"{target.name}.lock").open("a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _download(url: str, target: Path, storage_options: dict | None = None) -> None:
    """Copy ``url`` to ``target`` once per node: the node's actors that start together take turns on a lock, so
    one fetches and the others find its copy; the copy is renamed into place whole, so none sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(target):
        if target.is_file():
            return
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
            fs.get_file(path, str(partial))
            os.replace(partial, target)
        except Exception as error:
            partial.unlink(missing_ok=True)
            raise WeightsError(f"Could not fetch weights from {redact_url(url)}: {error}") from error


def _choices(ways: list[str]) -> str:
    return "\n".join(f"  - {'or ' if index else ''}{way}" for index, way in enumerate(ways))


def imagenet_file(architecture: str, include_top: bool, *, allow_download: bool = False) -> Path:
    """Keras's ImageNet weight file for ``architecture``, from the cache or (only if allowed) downloaded."""
    if architecture not in IMAGENET_FILES:
        raise WeightsError(
            f"There are no published ImageNet weights for {architecture} (only for {', '.join(IMAGENET_FILES)}). "
            "Use weights from your own file or URL, or 'random' for a test run."
        )
    file_name, md5 = IMAGENET_FILES[architecture][include_top]
    target = weights_cache_dir() / file_name
    for candidate in (target, _keras_cache_dir() / file_name):
        if candidate.is_file():
            if _md5(candidate) == md5:
                return candidate
            raise WeightsError(f"{candidate} is not Keras's {file_name} (md5 differs from {md5}); delete it.")

    base_url = os.environ.get("RESNET_PIPELINE_WEIGHTS_URL", KERAS_WEIGHTS_URL)
    url = base_url.rstrip("/") + "/" + file_name
    other_ways = [
        f"stage the file yourself: download {url} (md5 {md5}) into {target.parent}/",
        f"point the model at a copy: weights=/path/or/s3://bucket/{file_name}",
        "run with random weights (labels will be meaningless): weights=random",
    ]
    if not allow_download:
        fetch = f"fetch them once:  resnet-pipeline weights fetch {architecture.removeprefix('resnet')}"
        fetch += "" if include_top else " --no-top"
        raise WeightsError(
            f"The ImageNet weights for {architecture} ({file_name}) are not cached on this machine.\n"
            + _choices([fetch, *other_ways])
        )
    try:
        _download(url, target)
    except WeightsError as error:  # no network, say: the same ways on as without a download
        raise WeightsError(f"{error}\n{_choices(other_ways)}") from error
    if (actual := _md5(target)) != md5:
        target.unlink()
        raise WeightsError(f"Downloaded {url} but its md5 is {actual}, not {md5}; nothing was kept.")
    return target


def local_copy(url: str, storage_options: dict | None = None) -> Path:
    """A local path for a weights file: local paths as they are, remote ones fetched once into the node cache.

    The cache key includes the store's own version key (the ETag on S3), so a replaced object is fetched again.
    """
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        path = Path(fsspec.core.strip_protocol(url)).expanduser()
        if not path.is_file():
            raise WeightsError(f"Weights file not found: {path}")
        return path
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        version = fs.ukey(path)
    except FileNotFoundError as error:
        raise WeightsError(f"Weights file not found: {redact_url(url)}") from error
    except Exception as error:
        raise WeightsError(f"Could not reach weights at {redact_url(url)}: {error}") from error
    key = hashlib.sha256(f"{redact_url(url)}\n{version}".encode()).hexdigest()[:24]
    target = weights_cache_dir() / "remote" / key / PurePosixPath(path).name
    if not target.is_file():
        _download(url, target, storage_options)
    return target


def _legacy_h5_arrays(path: Path, source: str) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays from a Keras legacy HDF5 file (weights only, or a whole saved model)."""
    try:
        f = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"{source} is not an HDF5 file: {error}") from error
    with f:
        group = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise WeightsError(f"{source} is not a Keras HDF5 weights file (no 'layer_names')")
        arrays = {}
        for raw_name in group.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            layer = group[name]
            weight_names = [w.decode() if isinstance(w, bytes) else str(w) for w in layer.attrs["weight_names"]]
            if weight_names:
                arrays[name] = [np.asarray(layer[w]) for w in weight_names]
    return arrays


def _keras_archive_arrays(path: Path, source: str) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight arrays from a ``.keras`` archive, deserialised in safe mode (no arbitrary code)."""
    import keras

    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{source} is not a .keras archive")
    try:
        donor = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise WeightsError(f"Could not load {source} in Keras safe mode: {error}") from error
    return {layer.name: layer.get_weights() for layer in donor.layers if layer.weights}


def _assign_by_name(model, arrays: dict[str, list[np.ndarray]], source: str) -> None:
    """Set every weighted layer of ``model`` from ``arrays``; refuse a file that leaves any layer unset."""
    problems = []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in arrays:
            problems.append(f"no weights for layer {layer.name!r}")
            continue
        expected = [tuple(w.shape) for w in layer.weights]
        found = [a.shape for a in arrays[layer.name]]
        if expected != found:
            problems.append(f"layer {layer.name!r} expects shapes {expected}, the file has {found}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise WeightsError(f"{source} does not fit {model.name}: {shown}")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(arrays[layer.name])


def load_weights_file(model, path: Path, source: str | None = None) -> None:
    """Load ``path`` into ``model`` by layer name (by structure for ``.weights.h5``, which stores no names)."""
    source = source or str(path)
    name = path.name
    if name.endswith(".weights.h5"):
        try:
            model.load_weights(path)
        except Exception as error:
            raise WeightsError(f"{source} does not fit {model.name}: {error}") from error
    elif name.endswith(".keras"):
        _assign_by_name(model, _keras_archive_arrays(path, source), source)
    elif name.endswith((".h5", ".hdf5")):
        _assign_by_name(model, _legacy_h5_arrays(path, source), source)
    else:
        raise WeightsError(f"Unsupported weights file {source}; expected one of {', '.join(WEIGHT_SUFFIXES)}")


def randomize(model, seed: int, calibration_size: int = 64) -> None:
    """Seeded random weights that behave like a trained network's in scale.

    He-normal convolutions and a Glorot-uniform classifier are drawn with numpy (the same seed gives the same
    draws on every backend). With batch norm left as the identity, activations would grow about 2x per residual
    block and saturate the softmax (and overflow float16), so the batch-norm statistics are then calibrated on one
    seeded batch of noise images: one training-mode pass with momentum 0 stores each layer's batch statistics.
    They are rounded to float16 precision so other CPUs' kernels reproduce the same values, and the fingerprint.
    """
    import keras

    rng = np.random.default_rng(seed)
    batch_norms = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:-1]))
            kernel = rng.standard_normal(kernel.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
            layer.set_weights([kernel, np.zeros_like(bias)])
        elif isinstance(layer, keras.layers.Dense):
            kernel, bias = layer.get_weights()
            limit = np.sqrt(6.0 / sum(kernel.shape))
            layer.set_weights([rng.uniform(-limit, limit, kernel.shape).astype(np.float32), np.zeros_like(bias)])
        elif isinstance(layer, keras.layers.BatchNormalization):
            batch_norms.append(layer)
    if not batch_norms:
        return

    from pipeline.model.preprocess import caffe_preprocess

    height, width = (side or calibration_size for side in model.input_shape[1:3])
    noise = rng.integers(0, 256, size=(4, height, width, 3), dtype=np.uint8)
    momenta = [layer.momentum for layer in batch_norms]
    for layer in batch_norms:
        layer.momentum = 0.0
    try:
        model(caffe_preprocess(noise), training=True)
    finally:
        for layer, momentum in zip(batch_norms, momenta, strict=False):
            layer.momentum = momentum
    for layer in batch_norms:
        layer.set_weights([np.float32(np.float16(w)) for w in layer.get_weights()])


def fingerprint(model) -> str:
    """sha256 over every weight value, keyed by layer name, in the model's layer order."""
    digest = hashlib.sha256()
    for layer in model.layers:
        for index, value in enumerate(layer.get_weights()):
            value = np.ascontiguousarray(value)
            digest.update(f"{layer.name}/{index}:{value.dtype.str}:{value.shape}\n".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()
