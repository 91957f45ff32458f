"""The ResNet family: shapes, parameter counts, keras.applications compatibility, and the origin notes' bugs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from pipeline.model import ResNet18, ResNet34, ResNet50, ResNet101, ResNet152, build_resnet, embedding_dim
from pipeline.model.resnet import BN_EPSILON, basic_block, bottleneck_block

KERAS_APPLICATIONS = {
    "resnet50": keras.applications.ResNet50,
    "resnet101": keras.applications.ResNet101,
    "resnet152": keras.applications.ResNet152,
}


def randomize_everything(model: keras.Model, seed: int) -> None:
    """Random values for every weight, batch-norm statistics included, so a miswired layer cannot hide."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = weights
            weights = [
                rng.uniform(0.5, 1.5, gamma.shape),
                rng.normal(0, 0.1, beta.shape),
                rng.normal(0, 0.1, mean.shape),
                rng.uniform(0.5, 2.0, variance.shape),
            ]
        elif weights:
            kernel, bias = weights
            fan_in = np.prod(kernel.shape[:-1])
            weights = [rng.normal(0, np.sqrt(1.0 / fan_in), kernel.shape), rng.normal(0, 0.01, bias.shape)]
        layer.set_weights([w.astype(np.float32) for w in weights])


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(np.asarray(actual) - expected) / np.linalg.norm(expected))


# --- parameter counts -------------------------------------------------------------------------------------------


def conv_params(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out + c_out + 4 * c_out  # kernel, bias, then batch norm (gamma, beta, mean, variance)


def counted_params(block: str, stage_blocks: tuple[int, ...], classes: int = 1000) -> int:
    """Parameters of a ResNet from its stage table alone, independent of any Keras code."""
    total, c_in = conv_params(7, 3, 64), 64
    for filters, blocks, stride in zip((64, 128, 256, 512), stage_blocks, (1, 2, 2, 2), strict=False):
        for i in range(blocks):
            s = stride if i == 0 else 1
            if block == "basic":
                c_out = filters
                total += conv_params(3, c_in, filters) + conv_params(3, filters, filters)
            else:
                c_out = 4 * filters
                total += conv_params(1, c_in, filters) + conv_params(3, filters, filters)
                total += conv_params(1, filters, c_out)
            if s != 1 or c_in != c_out:
                total += conv_params(1, c_in, c_out)
            c_in = c_out
    return total + c_in * classes + classes


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (ResNet18, counted_params("basic", (2, 2, 2, 2))),
        (ResNet34, counted_params("basic", (3, 4, 6, 3))),
        (ResNet50, 25_636_712),
        (ResNet101, 44_707_176),
        (ResNet152, 60_419_944),
    ],
)
def test_parameter_counts(factory, expected):
    architecture = factory.args[0]
    assert build_resnet(architecture).count_params() == expected


def test_parameter_count_formula_agrees_with_keras_for_bottlenecks():
    # The independent formula is what vouches for ResNet-18/34; check it on the depths Keras publishes.
    assert counted_params("bottleneck", (3, 4, 6, 3)) == 25_636_712
    assert counted_params("bottleneck", (3, 8, 36, 3)) == 60_419_944


def test_resnet50_without_top():
    assert build_resnet("resnet50", include_top=False).count_params() == 23_587_712


@pytest.mark.parametrize("factory", [ResNet18, ResNet34])
def test_basic_block_depths_have_512_d_features(factory):
    model = factory(input_shape=(64, 64, 3), with_embedding=True)
    assert embedding_dim(model.name) == 512
    assert model.get_layer("avg_pool").output.shape == (None, 512)
    assert model.get_layer("conv5_block1_out").output.shape == (None, 2, 2, 512)  # 64 / 32
    outputs = model(np.zeros((2, 64, 64, 3), np.float32))
    assert outputs["embedding"].shape == (2, 512)
    assert outputs["predictions"].shape == (2, 1000)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="pooling='median'"):
        build_resnet("resnet50", pooling="median")
    with pytest.raises(ValueError, match=r"\(16, 16, 3\)"):
        build_resnet("resnet18", input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="classes=10"):
        ResNet50(weights="imagenet", classes=10)
    with pytest.raises(ValueError, match="'resnet42'"):
        build_resnet("resnet42")


# --- keras.applications compatibility ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(KERAS_APPLICATIONS))
def test_same_layers_as_keras_applications(architecture):
    ours = build_resnet(architecture)
    theirs = KERAS_APPLICATIONS[architecture](weights=None)

    def layout(model):
        return [
            (layer.name, type(layer).__name__, [tuple(w.shape) for w in layer.weights])
            for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer)
        ]

    assert layout(ours) == layout(theirs)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(KERAS_APPLICATIONS))
def test_same_outputs_as_keras_applications(architecture):
    shape = (96, 96, 3)
    theirs = KERAS_APPLICATIONS[architecture](weights=None, input_shape=shape, classifier_activation=None)
    randomize_everything(theirs, seed=7)
    ours = build_resnet(architecture, input_shape=shape, classifier_activation=None, with_embedding=True)
    for layer in theirs.layers:
        if layer.weights:
            ours.get_layer(layer.name).set_weights(layer.get_weights())

    images = np.random.default_rng(0).normal(0, 50, (3, *shape)).astype(np.float32)
    # Called directly, not through predict(), which would trace a function per model (most of the test's time).
    logits = keras.ops.convert_to_numpy(theirs(images, training=False))
    features_model = keras.Model(theirs.input, theirs.get_layer("avg_pool").output)
    features = keras.ops.convert_to_numpy(features_model(images, training=False))
    outputs = {name: keras.ops.convert_to_numpy(t) for name, t in ours(images, training=False).items()}

    assert features.shape == (3, 2048)
    assert np.std(logits) > 1e-3  # a non-trivial comparison
    assert relative_error(outputs["predictions"], logits) <= 1e-4
    assert relative_error(outputs["embedding"], features) <= 1e-4
    probabilities = keras.ops.softmax(logits)
    assert relative_error(keras.ops.softmax(outputs["predictions"]), probabilities) <= 1e-4


# --- the four bugs of the origin notes' residual_block_basic ----------------------------------------------------


def single_block(block, channels_in: int, filters: int, stride: int, size: int = 8) -> keras.Model:
    inputs = keras.Input((size, size, channels_in))
    return keras.Model(inputs, block(inputs, filters, stride, name="b"))


def set_conv(model, name, kernel=None, bias=None):
    layer = model.get_layer(name)
    k, b = layer.get_weights()
    layer.set_weights([k if kernel is None else kernel, b if bias is None else bias])


def test_first_relu_is_applied():
    # Bug 1: the notes create the first ReLU but feed the raw convolution onwards. With a first convolution that
    # outputs -1 everywhere, the ReLU zeroes it, so the second convolution (kernel of ones, bias 0) sees zeros.
    model = single_block(basic_block, 4, 4, stride=1)
    set_conv(model, "b_1_conv", np.zeros((3, 3, 4, 4), np.float32), -np.ones(4, np.float32))
    set_conv(model, "b_2_conv", np.ones((3, 3, 4, 4), np.float32), np.zeros(4, np.float32))
    x = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 4)).astype(np.float32)
    out = model.predict(x, verbose=0)
    # relu(x + bn(conv(relu(-1)))) = x; without the first ReLU the residual would be -36 / sqrt(1 + eps).
    np.testing.assert_allclose(out, x, rtol=1e-5)


def test_residual_is_added_to_the_shortcut():
    # Bug 2: ``add[shortcut, residual]`` indexes instead of adding. Here the residual is a known constant.
    model = single_block(basic_block, 4, 4, stride=1)
    set_conv(model, "b_2_conv", np.zeros((3, 3, 4, 4), np.float32), np.full(4, 0.5, np.float32))
    x = np.random.default_rng(1).normal(0, 1, (1, 8, 8, 4)).astype(np.float32)
    out = model.predict(x, verbose=0)
    expected = np.maximum(x + 0.5 / np.sqrt(1 + BN_EPSILON), 0)  # relu(shortcut + bn(residual))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert (out >= 0).all()  # the last ReLU is applied


@pytest.mark.parametrize("block", [basic_block, bottleneck_block])
def test_stride_two_halves_the_size_exactly_once(block):
    # Bug 3: the notes stride both convolutions, so a stride-2 block shrinks 16 -> 4.
    model = single_block(block, 8, 8, stride=2, size=16)
    assert model.output.shape == (None, 8, 8, 8 * block.expansion)
    strided = [layer.name for layer in model.layers if getattr(layer, "strides", (1, 1)) != (1, 1)]
    assert sorted(strided) == ["b_0_conv", "b_1_conv"]  # the projection and the first convolution only
    out = model.predict(np.random.default_rng(2).normal(size=(2, 16, 16, 8)).astype(np.float32), verbose=0)
    assert out.shape == (2, 8, 8, 8 * block.expansion)
    assert (out >= 0).all()


def test_projection_shortcut_has_batch_norm():
    # Bug 4: the notes' 1x1 projection has no batch norm. Zero the residual branch, give the projection's batch
    # norm distinctive statistics, and the block's output must be relu(bn(conv1x1_stride2(x))).
    model = single_block(basic_block, 4, 6, stride=2)
    rng = np.random.default_rng(3)
    kernel = rng.normal(size=(1, 1, 4, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    set_conv(model, "b_0_conv", kernel, bias)
    set_conv(model, "b_2_conv", np.zeros((3, 3, 6, 6), np.float32), np.zeros(6, np.float32))
    gamma, beta, mean, variance = (np.full(6, v, np.float32) for v in (2.0, 3.0, 1.0, 4.0))
    model.get_layer("b_0_bn").set_weights([gamma, beta, mean, variance])

    x = rng.normal(size=(1, 8, 8, 4)).astype(np.float32)
    out = model.predict(x, verbose=0)
    projected = x[:, ::2, ::2, :] @ kernel[0, 0] + bias
    expected = np.maximum(gamma * (projected - mean) / np.sqrt(variance + BN_EPSILON) + beta, 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_embedding_is_the_pooled_feature_of_the_same_pass():
    model = ResNet18(input_shape=(64, 64, 3), with_embedding=True, seed=3)
    features = keras.Model(model.input, model.get_layer("conv5_block2_out").output)
    x = np.random.default_rng(4).uniform(-100, 100, (2, 64, 64, 3)).astype(np.float32)
    out = model.predict(x, verbose=0)
    np.testing.assert_allclose(out["embedding"], features.predict(x, verbose=0).mean(axis=(1, 2)), rtol=1e-5)
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    logits = out["embedding"] @ kernel + bias
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(out["predictions"], expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)
