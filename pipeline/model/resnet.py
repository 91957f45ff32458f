"""ResNet v1 (He et al., 2015, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385).

ResNet-50/101/152 are layer for layer the graph of ``keras.applications.ResNet50/101/152``: the same layer names
(``conv4_block3_2_conv``), the same creation order and the same parameters, so Keras's published ImageNet weight
files load into them. As there, the stride of a stage sits in the first 1x1 convolution of its first bottleneck
block, convolutions carry a bias and batch normalization uses epsilon 1.001e-5. ResNet-18/34 use the basic block
under the same naming scheme (Keras publishes no weights for them).

The blocks mend the four bugs of the ``residual_block_basic`` in the origin notes: the ReLU after the first
convolution is applied, the shortcut and the residual are added with ``Add()([...])``, only the first convolution
is strided, and a projection shortcut is a 1x1 convolution followed by batch normalization.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from pipeline.model.variants import EXPANSION, STAGE_FILTERS, VARIANTS, embedding_dim

BN_EPSILON = 1.001e-5
STAGE_STRIDES = (1, 2, 2, 2)
MIN_INPUT_SIZE = 32


def _conv(filters: int, kernel_size: int, stride: int = 1, *, name: str, padding: str = "valid") -> layers.Conv2D:
    return layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, name=name)


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(axis=-1, epsilon=BN_EPSILON, name=name)


def _shortcut(x, out_channels: int, stride: int, name: str):
    """Identity when shapes agree, else a strided 1x1 projection with its batch norm."""
    if stride == 1 and x.shape[-1] == out_channels:
        return x
    shortcut = _conv(out_channels, 1, stride, name=f"{name}_0_conv")(x)
    return _bn(f"{name}_0_bn")(shortcut)


def basic_block(x, filters: int, stride: int = 1, *, name: str):
    """Two 3x3 convolutions (ResNet-18/34); only the first one is strided."""
    shortcut = _shortcut(x, filters * basic_block.expansion, stride, name)

    x = _conv(filters, 3, stride, padding="same", name=f"{name}_1_conv")(x)
    x = _bn(f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)

    x = _conv(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = _bn(f"{name}_2_bn")(x)

    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


basic_block.expansion = EXPANSION["basic"]


def bottleneck_block(x, filters: int, stride: int = 1, *, name: str):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152); the stride sits in the first 1x1, as in Keras."""
    shortcut = _shortcut(x, filters * bottleneck_block.expansion, stride, name)

    x = _conv(filters, 1, stride, name=f"{name}_1_conv")(x)
    x = _bn(f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)

    x = _conv(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = _bn(f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)

    x = _conv(filters * bottleneck_block.expansion, 1, name=f"{name}_3_conv")(x)
    x = _bn(f"{name}_3_bn")(x)

    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


bottleneck_block.expansion = EXPANSION["bottleneck"]

Block = Callable[..., object]


def stage(x, block: Block, filters: int, blocks: int, stride: int, *, name: str):
    """``blocks`` residual blocks; the first one changes resolution and width."""
    for i in range(1, blocks + 1):
        x = block(x, filters, stride if i == 1 else 1, name=f"{name}_block{i}")
    return x


# Architecture name -> (block, blocks per stage), from the family's table.
BLOCKS: dict[str, Block] = {"basic": basic_block, "bottleneck": bottleneck_block}
ARCHITECTURES: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    name: (BLOCKS[variant.block], variant.stages) for name, variant in VARIANTS.items()
}
__all__ = ["ARCHITECTURES", "basic_block", "bottleneck_block", "build_resnet", "embedding_dim", "stage"]


def _input_shape(input_shape: tuple | None, include_top: bool) -> tuple:
    if input_shape is None:
        return (224, 224, 3) if include_top else (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"`input_shape` must be (height, width, 3) (channels last, RGB). Received: {input_shape}")
    if include_top and None in input_shape:
        raise ValueError(f"`input_shape` must be fully defined when `include_top=True`. Received: {input_shape}")
    if any(side is not None and side < MIN_INPUT_SIZE for side in input_shape[:2]):
        raise ValueError(f"Height and width must be at least {MIN_INPUT_SIZE}. Received: input_shape={input_shape}")
    return input_shape


def build_resnet(
    architecture: str,
    *,
    include_top: bool = True,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    classifier_activation: str | None = "softmax",
    with_embedding: bool = False,
) -> keras.Model:
    """The bare network, randomly initialised; ``pipeline.model.ResNet50`` and friends also resolve weights.

    ``with_embedding=True`` makes the model return ``{"predictions": scores, "embedding": pooled}`` (with the top) so
    labels and features come from one forward pass; without the top it needs ``pooling`` and returns the pooled vector.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if include_top and classes < 1:
        raise ValueError(f"`classes` must be a positive integer. Received: classes={classes!r}")
    if with_embedding and not include_top and pooling is None:
        raise ValueError("`with_embedding=True` without the top needs `pooling='avg'` or `'max'`")
    block, stage_blocks = ARCHITECTURES[architecture]

    inputs = keras.Input(shape=_input_shape(input_shape, include_top))
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(inputs)
    x = _conv(64, 7, 2, name="conv1_conv")(x)
    x = _bn("conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    for i, (filters, blocks, stride) in enumerate(
        zip(STAGE_FILTERS, stage_blocks, STAGE_STRIDES, strict=False), start=2
    ):
        x = stage(x, block, filters, blocks, stride, name=f"conv{i}")

    if include_top:
        pooled = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # Under a mixed-precision policy the classifier stays float32 for a numerically sound softmax.
        head_dtype = "float32" if keras.config.dtype_policy().name.startswith("mixed") else None
        scores = layers.Dense(classes, activation=classifier_activation, name="predictions", dtype=head_dtype)(pooled)
        outputs = {"predictions": scores, "embedding": pooled} if with_embedding else scores
    elif pooling == "avg":
        outputs = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        outputs = layers.GlobalMaxPooling2D(name="max_pool")(x)
    else:
        outputs = x
    return keras.Model(inputs, outputs, name=architecture)
