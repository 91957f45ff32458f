"""Model construction: build an architecture and give it weights (see :mod:`pipeline.model`)."""

from __future__ import annotations

from functools import partial

import keras

from pipeline.credentials import redact_url
from pipeline.model.resnet import build_resnet
from pipeline.model.weights import (
    WeightsInfo,
    fingerprint,
    imagenet_file,
    load_weights_file,
    local_copy,
    randomize,
)


def create_model(
    architecture: str,
    include_top: bool = True,
    weights: str | None = None,
    input_shape: tuple | None = None,
    pooling: str | None = None,
    classes: int = 1000,
    *,
    classifier_activation: str | None = "softmax",
    with_embedding: bool = False,
    seed: int = 0,
    allow_download: bool = False,
    storage_options: dict | None = None,
) -> keras.Model:
    """Build ``architecture`` and give it weights; see the module docstring for ``weights``."""
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"`weights='imagenet'` with the top needs `classes=1000`. Received: classes={classes}")
    model = build_resnet(
        architecture,
        include_top=include_top,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        with_embedding=with_embedding,
    )
    if weights in (None, "random"):
        randomize(model, seed)
        source = f"random:seed={seed}"
    elif weights == "imagenet":
        path = imagenet_file(architecture, include_top, allow_download=allow_download)
        load_weights_file(model, path)
        source = f"imagenet:{path.name}"
    else:
        source = redact_url(str(weights))
        load_weights_file(model, local_copy(str(weights), storage_options), source)
    model.weights_info = WeightsInfo(source=source, fingerprint=fingerprint(model), random=weights in (None, "random"))
    return model


def _variant(architecture: str):
    factory = partial(create_model, architecture)
    factory.__doc__ = f"{architecture} with keras.applications' signature; see :func:`create_model`."
    return factory


ResNet18 = _variant("resnet18")
ResNet34 = _variant("resnet34")
ResNet50 = _variant("resnet50")
ResNet101 = _variant("resnet101")
ResNet152 = _variant("resnet152")
