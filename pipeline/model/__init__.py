"""The ResNet family, its weights and its labels.

``ResNet18 ... ResNet152`` take keras.applications' arguments; unlike keras.applications, ``weights`` defaults to
``None`` (seeded random weights), ``"imagenet"`` is never downloaded unless ``allow_download=True``, and any path or
fsspec URL to a weights file works. Every returned model carries ``model.weights_info`` (a :class:`WeightsInfo`).
"""

from __future__ import annotations

import importlib

# Imported on first use, so that importing the package (the driver, CPU workers) does not import TensorFlow.
_EXPORTS = {
    "pipeline.model.factory": ("create_model", "ResNet18", "ResNet34", "ResNet50", "ResNet101", "ResNet152"),
    "pipeline.model.fold": ("fold_batch_norms",),
    "pipeline.model.labels": ("ClassLabel", "LabelError", "Labels", "imagenet_labels"),
    "pipeline.model.preprocess": ("caffe_preprocess", "resize_boxes"),
    "pipeline.model.resnet": ("ARCHITECTURES", "build_resnet", "embedding_dim"),
    "pipeline.model.weights": ("WeightsError", "WeightsInfo"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
