"""Keras's 'caffe' input convention for the ResNet v1 ImageNet weights, done inside the model call.

Pixels cross Ray's object store as uint8 RGB (4x fewer bytes than float32); this turns them into what the weights
were trained on: BGR order, ImageNet channel means subtracted, no scaling.
"""

from __future__ import annotations

from keras import ops

BGR_MEANS = (103.939, 116.779, 123.68)


def caffe_preprocess(images, dtype: str = "float32"):
    """uint8 (or float) RGB images ``[..., H, W, 3]`` -> BGR float, mean-subtracted."""
    x = ops.cast(images, dtype)
    x = ops.flip(x, axis=-1)
    return x - ops.convert_to_tensor(BGR_MEANS, dtype=dtype)
