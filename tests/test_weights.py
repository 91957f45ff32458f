"""Weights: files saved by keras.applications load into ours by every route, and are fingerprinted."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.model import ResNet18, ResNet50, WeightsError, create_model
from pipeline.model import weights as weights_module
from pipeline.model.weights import fingerprint, weights_cache_dir
from tests.test_resnet import randomize_everything

SHAPE = (64, 64, 3)


@pytest.fixture(scope="module")
def keras_resnet50(tmp_path_factory):
    """keras.applications.ResNet50 with random weights, saved in each format Keras writes."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = keras.applications.ResNet50(weights=None, input_shape=SHAPE)
    randomize_everything(model, seed=11)
    folder = tmp_path_factory.mktemp("keras-files")
    files = {
        "weights.h5": folder / "resnet50.weights.h5",
        "keras": folder / "resnet50.keras",
        "full.h5": folder / "resnet50_full.h5",
        "legacy.h5": folder / "resnet50_weights_tf_dim_ordering_tf_kernels.h5",  # the published layout
    }
    model.save_weights(files["weights.h5"])
    model.save(files["keras"])
    model.save(files["full.h5"])  # legacy whole-model HDF5: weights under /model_weights
    with h5py.File(files["legacy.h5"], "w") as f:
        save_weights_to_hdf5_group(f, model)
    images = np.random.default_rng(5).uniform(-120, 120, (2, *SHAPE)).astype(np.float32)
    return model, files, images, model.predict(images, verbose=0)


def ours(weights, **options):
    return ResNet50(weights=weights, input_shape=SHAPE, **options)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["legacy.h5", "full.h5", "weights.h5", "keras"])
def test_keras_files_load_from_a_path(keras_resnet50, kind):
    _reference, files, images, expected = keras_resnet50
    model = ours(str(files[kind]))
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-7)
    assert model.weights_info.random is False
    assert model.weights_info.source == str(files[kind])
    # The fingerprint is of the values, not the file: every format gives the same one.
    assert model.weights_info.fingerprint == fingerprint(ours(str(files["legacy.h5"])))


@pytest.mark.slow
def test_file_url_and_embedding_output(keras_resnet50):
    reference, files, images, expected = keras_resnet50
    model = ours(files["legacy.h5"].as_uri(), with_embedding=True)
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(out["predictions"], expected, rtol=1e-5, atol=1e-7)
    features = keras.Model(reference.input, reference.get_layer("avg_pool").output).predict(images, verbose=0)
    np.testing.assert_allclose(out["embedding"], features, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_s3_url_is_fetched_once_and_refetched_when_replaced(keras_resnet50, s3):
    _reference, files, images, expected = keras_resnet50
    fs, bucket, storage_options = s3
    url = f"s3://{bucket}/models/resnet50.h5"
    fs.put_file(str(files["legacy.h5"]), url)

    model = ours(url, storage_options=storage_options)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-7)
    cached = list((weights_cache_dir() / "remote").rglob("*.h5"))
    assert len(cached) == 1

    stamp = cached[0].stat().st_mtime_ns
    ours(url, storage_options=storage_options)  # the second load reads the node's copy
    assert list((weights_cache_dir() / "remote").rglob("*.h5")) == cached
    assert cached[0].stat().st_mtime_ns == stamp

    other = keras.applications.ResNet50(weights=None, input_shape=SHAPE)
    randomize_everything(other, seed=12)
    replacement = files["legacy.h5"].with_name("replacement.h5")
    other.save(replacement)
    fs.put_file(str(replacement), url)  # same URL, new object: its ETag changes, so it is fetched again
    model = ours(url, storage_options=storage_options)
    np.testing.assert_allclose(model.predict(images, verbose=0), other.predict(images, verbose=0), rtol=1e-5)
    assert len(list((weights_cache_dir() / "remote").rglob("*.h5"))) == 2


def test_corrupt_weights_file_names_its_source(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match=f"{path}"):
        ResNet18(weights=str(path))


def test_missing_remote_weights_name_the_url(s3):
    _fs, bucket, storage_options = s3
    with pytest.raises(WeightsError, match=f"not found: s3://{bucket}/nope.h5"):
        ResNet18(weights=f"s3://{bucket}/nope.h5", storage_options=storage_options)


def test_missing_local_file():
    with pytest.raises(WeightsError, match="not found"):
        ResNet18(weights="/nonexistent/resnet.h5")


@pytest.mark.slow
def test_a_file_without_the_top_is_refused_for_a_model_with_it(tmp_path):
    donor = keras.applications.ResNet50(weights=None, include_top=False, input_shape=SHAPE)
    path = tmp_path / "notop.keras"
    donor.save(path)
    with pytest.raises(WeightsError, match="no weights for layer 'predictions'"):
        ours(str(path))


def test_wrong_class_count_is_refused(tmp_path):
    donor = create_model("resnet18", input_shape=SHAPE, classes=10)
    path = tmp_path / "ten.keras"
    donor.save(path)
    with pytest.raises(WeightsError, match=r"'predictions' expects shapes \[\(512, 1000\), \(1000,\)\]"):
        ResNet18(weights=str(path), input_shape=SHAPE)
    assert ResNet18(weights=str(path), input_shape=SHAPE, classes=10).weights_info.fingerprint == fingerprint(donor)


def test_keras_archives_load_in_safe_mode(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2, name="arbitrary_code")(inputs)
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(WeightsError, match="safe mode"):
        ResNet18(weights=str(path))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\0")
    with pytest.raises(WeightsError, match="Unsupported weights file"):
        ResNet18(weights=str(path))


def test_random_weights_are_seeded_and_marked():
    a, b, c = (ResNet18(input_shape=SHAPE, seed=s) for s in (1, 1, 2))
    assert a.weights_info.random and a.weights_info.source == "random:seed=1"
    assert a.weights_info.fingerprint == b.weights_info.fingerprint != c.weights_info.fingerprint
    assert ResNet18(weights="random", input_shape=SHAPE, seed=1).weights_info == a.weights_info
    # Calibrated batch norm keeps a random network in a realistic range: no saturated softmax, no float16 overflow.
    images = np.random.default_rng(0).uniform(-120, 120, (4, *SHAPE)).astype(np.float32)
    scores = a.predict(images, verbose=0)
    assert 0.001 < scores.max() < 0.5
    assert np.abs(keras.Model(a.input, a.get_layer("avg_pool").output).predict(images, verbose=0)).max() < 1e3


def test_fingerprint_changes_with_any_weight():
    model = ResNet18(input_shape=SHAPE)
    before = fingerprint(model)
    layer = model.get_layer("conv3_block2_2_bn")
    values = layer.get_weights()
    values[3][0] += 1e-3
    layer.set_weights(values)
    assert fingerprint(model) != before


# --- ImageNet weights: cache, refusal to download, and the download itself over loopback ------------------------


def test_imagenet_not_cached_says_how_to_continue():
    with pytest.raises(WeightsError) as raised:
        ResNet50(weights="imagenet")
    message = str(raised.value)
    assert "resnet-pipeline weights fetch 50" in message
    assert "2cb95161c43110f7111970584f804107" in message  # the md5 to check a staged copy against
    assert str(weights_cache_dir()) in message
    assert "weights=random" in message
    assert not weights_cache_dir().exists()  # nothing was downloaded


def test_imagenet_unavailable_for_basic_depths():
    with pytest.raises(WeightsError, match="no published ImageNet weights for resnet18"):
        ResNet18(weights="imagenet")


def test_imagenet_cached_file_with_wrong_md5_is_refused():
    cached = weights_cache_dir() / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="md5 differs"):
        ResNet50(weights="imagenet")


@pytest.fixture
def weights_server(tmp_path):
    """A plain HTTP server on loopback standing in for Keras's bucket."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.slow
def test_imagenet_download_when_allowed_is_md5_checked(keras_resnet50, weights_server, monkeypatch):
    _reference, files, images, expected = keras_resnet50
    served, url = weights_server
    name = "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    (served / name).write_bytes(files["legacy.h5"].read_bytes())
    md5 = hashlib.md5((served / name).read_bytes()).hexdigest()
    monkeypatch.setenv("RESNET_PIPELINE_WEIGHTS_URL", url)
    monkeypatch.setitem(weights_module.IMAGENET_FILES["resnet50"], True, (name, md5))

    with pytest.raises(WeightsError, match="not cached"):
        ours("imagenet")
    model = ours("imagenet", allow_download=True)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-7)
    assert model.weights_info.source == f"imagenet:{name}"
    assert (weights_cache_dir() / name).is_file()
    (served / name).unlink()  # from now on it comes from the cache
    assert ours("imagenet").weights_info == model.weights_info


def test_imagenet_download_with_bad_md5_keeps_nothing(weights_server, monkeypatch):
    served, url = weights_server
    name = "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    (served / name).write_bytes(b"truncated download")
    monkeypatch.setenv("RESNET_PIPELINE_WEIGHTS_URL", url)
    with pytest.raises(WeightsError, match="md5"):
        ResNet50(weights="imagenet", allow_download=True)
    assert not (weights_cache_dir() / name).exists()
    assert not list(Path(weights_cache_dir()).glob("*.part"))
