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


def _weights(start, end, extent, canvas: int, size: int):
    """``[B, size, canvas]``: for each output pixel along one axis, its weights over the canvas's pixels.

    Pillow's antialiased bilinear filter over the region ``start..end`` of an image ``extent`` pixels long: a
    triangle as wide as the scale when shrinking, taps beyond the image left out, weights summing to 1.
    """
    scale = (end - start) / size  # [B, 1, 1]
    support = ops.maximum(scale, 1.0)
    center = start + (ops.arange(size, dtype="float32")[None, :, None] + 0.5) * scale  # [B, size, 1]
    position = ops.arange(canvas, dtype="float32")[None, None, :] + 0.5  # [1, 1, canvas]
    weights = ops.relu(1.0 - ops.abs(position - center) / support) * ops.cast(position < extent, "float32")
    return weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-12)


def resize_boxes(canvas, boxes, size: int):
    """uint8 images padded into a canvas ``[B, C, C, 3]`` -> ``[B, size, size, 3]`` float, each resized from its
    own box: ``boxes`` is ``[B, 6]``, (left, top, right, bottom) of the region to keep and the image's width and
    height, in canvas pixels. Shapes stay static whatever the images' sizes, so the model is traced once per
    canvas size. Values are rounded as Pillow rounds its 8-bit output."""
    side = canvas.shape[1]
    left, top, right, bottom, width, height = (ops.reshape(boxes[:, i], (-1, 1, 1)) for i in range(6))
    rows = _weights(top, bottom, height, side, size)
    columns = _weights(left, right, width, side, size)
    x = ops.einsum("bsh,bhwc->bswc", rows, ops.cast(canvas, "float32"))
    x = ops.einsum("btw,bswc->bstc", columns, x)
    return ops.clip(ops.round(x), 0.0, 255.0)
