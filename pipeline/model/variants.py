"""The ResNet family as data: each variant is its block and its stage table, as in torchvision's ``resnet.py``.

Known here without Keras, so that the spec and the driver (which never import TensorFlow) state depths and
embedding widths from the same table as the model builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STAGE_FILTERS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block per filter of its stage


@dataclass(frozen=True)
class Variant:
    block: Literal["basic", "bottleneck"]
    stages: tuple[int, int, int, int]  # blocks per stage

    @property
    def embedding_dim(self) -> int:
        """Channels of the last stage: what global average pooling gives per image."""
        return STAGE_FILTERS[-1] * EXPANSION[self.block]


VARIANTS: dict[str, Variant] = {
    "resnet18": Variant("basic", (2, 2, 2, 2)),
    "resnet34": Variant("basic", (3, 4, 6, 3)),
    "resnet50": Variant("bottleneck", (3, 4, 6, 3)),
    "resnet101": Variant("bottleneck", (3, 4, 23, 3)),
    "resnet152": Variant("bottleneck", (3, 8, 36, 3)),
}
DEPTHS = {int(name.removeprefix("resnet")): name for name in VARIANTS}


def embedding_dim(architecture: str) -> int:
    return VARIANTS[architecture].embedding_dim
