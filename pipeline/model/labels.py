"""Class labels: the 1,000 ImageNet classes shipped with the package, or a custom list for a custom model.

ImageNet names are not unique ('crane' the bird and the machine, 'maillot' the tights and the swimsuit), so every
class keeps its WordNet id beside a display label made unique.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import fsspec


@dataclass(frozen=True)
class ClassLabel:
    class_id: int
    label: str  # unique within its label set
    wnid: str | None = None  # WordNet id, for ImageNet classes
    lemmas: tuple[str, ...] = field(default=(), compare=False)


class LabelError(ValueError):
    """A label file that cannot be read or does not match the model."""


class Labels(Sequence[ClassLabel]):
    def __init__(self, classes: Sequence[ClassLabel], source: str):
        self._classes = tuple(classes)
        self.source = source
        duplicates = sorted(label for label, n in Counter(c.label for c in self._classes).items() if n > 1)
        if duplicates:
            raise LabelError(f"{source}: labels must be unique; repeated: {', '.join(duplicates[:5])}")

    def __getitem__(self, index):  # type: ignore[override]
        return self._classes[index]

    def __len__(self) -> int:
        return len(self._classes)

    def __iter__(self) -> Iterator[ClassLabel]:
        return iter(self._classes)

    def check(self, num_classes: int) -> Labels:
        """Raise unless there is exactly one label per model output."""
        if len(self) != num_classes:
            raise LabelError(f"{self.source} has {len(self)} labels but the model predicts {num_classes} classes")
        return self

    @classmethod
    def from_file(cls, url: str, storage_options: dict | None = None) -> Labels:
        """A JSON file (a list of names, a list of ``{"label", "wnid"}`` objects, or Keras's class index
        ``{"0": [wnid, name]}``) or a text file with one name per line; any fsspec URL."""
        try:
            with fsspec.open(url, "r", encoding="utf-8", **(storage_options or {})) as f:
                text = f.read()
        except Exception as error:
            raise LabelError(f"Could not read label file {url}: {error}") from error
        if url.endswith(".json"):
            return cls(_parse_json(text, url), url)
        names = [line.strip() for line in text.splitlines() if line.strip()]
        return cls([ClassLabel(i, name) for i, name in enumerate(names)], url)


def _parse_json(text: str, source: str) -> list[ClassLabel]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LabelError(f"{source} is not valid JSON: {error}") from error
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):  # Keras's imagenet_class_index.json: {"0": ["n01440764", "tench"], ...}
        try:
            return [ClassLabel(i, data[str(i)][1], data[str(i)][0]) for i in range(len(data))]
        except (KeyError, IndexError, TypeError) as error:
            raise LabelError(f"{source}: expected keys '0'..'{len(data) - 1}' mapping to [wnid, name]") from error
    if isinstance(data, list) and all(isinstance(item, str) for item in data):
        return [ClassLabel(i, name) for i, name in enumerate(data)]
    if isinstance(data, list) and all(isinstance(item, dict) and "label" in item for item in data):
        return [
            ClassLabel(i, item["label"], item.get("wnid"), tuple(item.get("lemmas", ()))) for i, item in enumerate(data)
        ]
    raise LabelError(f"{source}: expected a list of names, a list of {{'label': ...}} objects, or a class index")


@cache
def imagenet_labels() -> Labels:
    """The ILSVRC-2012 classes in Keras's class-index order (sorted WordNet ids)."""
    text = resources.files(__package__).joinpath("imagenet_classes.json").read_text(encoding="utf-8")
    return Labels(_parse_json(text, "imagenet_classes.json"), "imagenet")
