"""Batch normalization folded into the convolution before it, for inference.

At inference a batch norm is a fixed affine map per channel, ``gamma * (x - mean) / sqrt(variance + eps) + beta``.
After a convolution with a bias it folds into that convolution: the kernel's output channels are scaled and the bias
shifted, and the batch norm disappears. Keras runs each batch norm as separate element-wise passes over the
activations (and under a float16/bfloat16 policy casts them to float32 and back around it), which TensorFlow's CPU
kernels do not fuse into the convolution; folded, the convolution, its bias and the ReLU run as one fused op.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def _folded(conv: layers.Conv2D, bn: layers.BatchNormalization) -> list[np.ndarray]:
    kernel, bias = (w.astype(np.float64) for w in conv.get_weights())
    gamma, beta, mean, variance = (w.astype(np.float64) for w in bn.get_weights())
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """An inference copy of a ResNet built by :func:`pipeline.model.build_resnet`, in which every batch norm
    ``<prefix>_bn`` is folded into the convolution ``<prefix>_conv`` that feeds it. Same outputs, within float
    rounding; the model's other attributes (``weights_info``) carry over."""
    layers_by_name = {layer.name: layer for layer in model.layers}
    conv_of = {}
    for bn in (layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)):
        conv = layers_by_name.get(bn.name.removesuffix("_bn") + "_conv")
        if not (isinstance(conv, layers.Conv2D) and conv.use_bias and bn.input is conv.output and bn.axis in (-1, 3)):
            raise ValueError(
                f"cannot fold {bn.name!r}: it must follow a biased convolution over the channels-last axis"
            )
        conv_of[conv.name] = bn

    def call_unless_batch_norm(layer, inputs, *args, **kwargs):
        return inputs if isinstance(layer, layers.BatchNormalization) else layer(inputs, *args, **kwargs)

    folded = keras.models.clone_model(model, call_function=call_unless_batch_norm)
    for layer in (layer for layer in folded.layers if layer.weights):  # the input layer is renamed in the clone
        source = model.get_layer(layer.name)
        layer.set_weights(_folded(source, conv_of[layer.name]) if layer.name in conv_of else source.get_weights())
    if hasattr(model, "weights_info"):
        folded.weights_info = model.weights_info
    return folded
