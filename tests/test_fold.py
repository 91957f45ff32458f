"""Batch norms folded into convolutions for inference: the same network, fewer ops."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model import build_resnet, fold_batch_norms
from pipeline.model.weights import WeightsInfo
from tests.test_resnet import randomize_everything, relative_error

SHAPE = (64, 64, 3)


@pytest.fixture(autouse=True)
def restore_precision():
    yield
    keras.mixed_precision.set_global_policy("float32")


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 50, (n, *SHAPE)).astype(np.float32)


def random_resnet(architecture: str, seed: int = 3) -> keras.Model:
    model = build_resnet(architecture, input_shape=SHAPE, classes=10, classifier_activation=None, with_embedding=True)
    randomize_everything(model, seed)  # batch-norm statistics far from the identity, so folding has work to do
    return model


@pytest.mark.parametrize("architecture", ["resnet18", "resnet50"])
def test_folded_model_computes_the_same_function(architecture):
    model = random_resnet(architecture)
    model.weights_info = WeightsInfo(source="random:seed=3", fingerprint="abc", random=True)
    folded = fold_batch_norms(model)

    assert not [layer for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)]
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in folded.layers if isinstance(layer, keras.layers.Conv2D)] == convs
    assert folded.name == model.name and folded.weights_info == model.weights_info

    x = images()
    expected, actual = model(x, training=False), folded(x, training=False)
    assert np.std(expected["predictions"]) > 1e-2  # a non-trivial comparison
    for output in ("predictions", "embedding"):
        assert relative_error(actual[output], expected[output]) < 1e-5, output
    # The original is untouched: its batch norms still hold their statistics.
    assert relative_error(model(x, training=False)["embedding"], expected["embedding"]) == 0


def test_folding_is_not_the_identity_on_the_kernels():
    """The folded kernels carry the batch norm's scale: leaving the batch norms out without folding is wrong."""
    model = random_resnet("resnet18")
    folded = fold_batch_norms(model)
    skipped = keras.models.clone_model(
        model, call_function=lambda layer, x, *a, **k: x if "_bn" in layer.name else layer(x, *a, **k)
    )
    for layer in (layer for layer in skipped.layers if layer.weights):
        layer.set_weights(model.get_layer(layer.name).get_weights())
    x = images()
    assert relative_error(skipped(x)["embedding"], model(x)["embedding"]) > 0.1
    assert relative_error(folded(x)["embedding"], model(x)["embedding"]) < 1e-5


def test_bfloat16_folded_moves_no_further_from_float32_than_unfolded():
    """Under mixed_bfloat16 the folded kernels are rounded to bfloat16 with the scale inside them; Keras keeps
    the batch norm itself in float32. The drift against float32 must stay of the same size."""
    reference_model = random_resnet("resnet50")
    x = images(8)
    reference = np.asarray(reference_model(x, training=False)["embedding"], np.float64)

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    reduced = build_resnet("resnet50", input_shape=SHAPE, classes=10, classifier_activation=None, with_embedding=True)
    reduced.set_weights(reference_model.get_weights())
    folded = fold_batch_norms(reduced)
    assert folded.get_layer("conv1_conv").compute_dtype == "bfloat16"

    unfolded_error = relative_error(np.asarray(reduced(x)["embedding"], np.float64), reference)
    folded_error = relative_error(np.asarray(folded(x)["embedding"], np.float64), reference)
    assert 0 < unfolded_error < 0.1
    assert folded_error < max(1.5 * unfolded_error, 0.02)


@pytest.mark.parametrize(("use_bias", "between"), [(False, None), (True, "relu"), (False, "relu")])
def test_a_batch_norm_not_right_after_a_biased_convolution_is_refused(use_bias, between):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=use_bias, name="stem_conv")(inputs)
    if between:
        x = keras.layers.Activation(between)(x)
    outputs = keras.layers.BatchNormalization(name="stem_bn")(x)
    with pytest.raises(ValueError, match="cannot fold 'stem_bn'"):
        fold_batch_norms(keras.Model(inputs, outputs))
