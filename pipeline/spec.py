"""The job spec: one typed, validated document, loaded from YAML with ``--set a.b=c`` overrides.

Every stage receives the part of the spec it needs. Validation happens once, before any work; an error names the
field (``inference.batch_size``) and the value received. Credentials belong in the environment (or the cloud's
workload identity); any that do appear in ``storage_options`` are passed to fsspec but redacted wherever the spec
is written out (:mod:`pipeline.credentials`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.credentials import redact
from pipeline.model.variants import DEPTHS, embedding_dim

Depth = Literal[tuple(DEPTHS)]  # 18, 34, 50, 101, 152


class SpecError(ValueError):
    """A spec that cannot run; the message names the field or URL."""


class _Section(BaseModel):
    # strict: a value of the wrong type is refused, never coerced (batch_size: true is not 1, "32" is not 32)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class InputSpec(_Section):
    url: str = Field(description="Local path, file://, s3://, gs://, az:// ...; a prefix (folder) or a glob.")
    format: Literal["auto", "images", "webdataset", "tfrecord", "parquet"] = "auto"
    image_column: str | None = Field(None, description="Parquet: the column with image bytes (auto-detected).")
    id_column: str | None = Field(None, description="Parquet: a column with a key per image (optional).")
    compression: Literal["auto", "none", "gzip", "zlib"] = Field(
        "auto", description="TFRecord: how the files are compressed; auto: sniffed, else from the name (.gz, .zz)."
    )
    storage_options: dict[str, Any] = Field(default_factory=dict, description="Passed to fsspec.")
    files_per_task: int = Field(256, ge=1, description="Image trees: files read and decoded by one task.")


class OutputSpec(_Section):
    url: str = Field(description="Where the Delta tables predictions, latest, shards and runs live; any fsspec URL.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    embedding_dtype: Literal["float32", "float16", "none"] = "float32"
    rows_per_file: int | None = Field(
        None, ge=1, description="Target rows per Parquet file; default: about 32 MB of rows, at most 50,000."
    )


class ModelSpec(_Section):
    depth: Depth = 50
    weights: str = Field("imagenet", description="'imagenet', 'random', or a path/URL to .h5, .weights.h5, .keras.")
    labels: str | None = Field(None, description="Label file (JSON or one name per line); default ImageNet.")
    classes: int | None = Field(None, ge=1, description="Model outputs; default: the number of labels.")
    top_k: int = Field(5, ge=1, le=100)
    seed: int = Field(0, description="Seed for weights: random.")
    allow_download: bool = Field(False, description="Download Keras's ImageNet weights if not cached.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="For weights and labels URLs.")

    @property
    def architecture(self) -> str:
        return DEPTHS[self.depth]

    @property
    def embedding_dim(self) -> int:
        """Known without building the model."""
        return embedding_dim(self.architecture)


class DecodeSpec(_Section):
    preprocessing: Literal["crop", "squash"] = "crop"
    image_size: int = Field(224, ge=32, le=1024)
    max_pixels: int = Field(89_478_485, ge=1, description="Larger images become error rows (decompression bombs).")
    cpus_per_task: float = Field(1, gt=0, description="CPUs Ray reserves per read+decode task.")
    on: Literal["tasks", "actor", "auto"] = Field(
        "tasks",
        description="Where images are decoded: 'tasks' (CPU tasks ship pixels), 'actor' (tasks ship bytes, the model "
        "actor decodes with NVIDIA nvImageCodec, on its GPU if it has one), 'auto' (actor on GPU actors with "
        "nvImageCodec installed, else tasks).",
    )


class ActorPoolSpec(_Section):
    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ActorPoolSpec:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class InferenceSpec(_Section):
    batch_size: int = Field(32, ge=1, le=4096)
    actors: ActorPoolSpec = Field(default_factory=ActorPoolSpec)
    gpus_per_actor: float = Field(0, ge=0, description="0 runs on CPU; 1 gives each actor a GPU.")
    cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved per actor (TensorFlow may use more).")
    threads_per_actor: int = Field(
        0, ge=0, description="TensorFlow's compute threads per actor; 0: one per core of the node."
    )
    batches_per_actor: int = Field(
        0,
        ge=0,
        description="Batches an actor runs at once on its one model, each in a thread of its own. 0: one per compute "
        "thread on CPU (up to 4), one on GPU.",
    )
    actor_memory_gb: float = Field(2.0, gt=0, description="Memory reserved per actor (ResNet-50 needs ~1.5 GB).")
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    jit_compile: bool = Field(False, description="Compile the forward pass with XLA (always so on JAX).")
    backend: Literal["tensorflow", "jax"] = Field(
        "tensorflow", description="Keras backend of the model stage; 'jax' needs jax installed on the workers."
    )


class JobSpec(_Section):
    name: str = Field("labeling", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    input: InputSpec
    output: OutputSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    decode: DecodeSpec = Field(default_factory=DecodeSpec)
    inference: InferenceSpec = Field(default_factory=InferenceSpec)
    max_error_fraction: float = Field(
        1.0, ge=0, le=1, description="Fail the run, committing nothing, if more of its images than this fail."
    )
    incremental: bool = Field(
        False, description="Process only shards no committed run has covered with the same model and decoding."
    )

    def redacted(self) -> dict[str, Any]:
        """The spec as plain data with every credential-like storage option replaced by ``***``."""
        return redact(self.model_dump(mode="json"))


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans, ``true`` and ``false`` only. PyYAML reads YAML 1.1, where ``on``, ``off``,
    ``yes`` and ``no`` are booleans too: ``decode: {on: actor}`` would be the key True."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects


def apply_override(document: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` sets ``document["a"]["b"]["c"]``; the value is read as YAML (numbers, booleans, lists)."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set expects KEY=VALUE (for example model.top_k=3), got {assignment!r}")
    keys = path.strip().split(".")
    node = document
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {path}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    try:
        node[keys[-1]] = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[keys[-1]] = raw


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "spec"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        received = "" if item["type"] in ("missing", "extra_forbidden") else f" (got {item['input']!r})"
        lines.append(f"{field}: {message}{received}")
    return "invalid job spec:\n  " + "\n  ".join(lines)


def parse_spec(document: dict[str, Any], overrides: list[str] = ()) -> JobSpec:
    document = dict(document or {})
    for section in ("input", "output"):  # the `input: URL` shorthand, expanded so --set can reach inside
        if isinstance(document.get(section), str):
            document[section] = {"url": document[section]}
    for assignment in overrides:
        apply_override(document, assignment)
    try:
        return JobSpec.model_validate(document)
    except ValidationError as error:
        raise SpecError(_describe(error)) from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML spec file and apply ``--set`` overrides."""
    path = Path(path)
    try:
        document = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    if document is not None and not isinstance(document, dict):
        raise SpecError(f"{path}: a job spec is a mapping (input:, output:, model: ...)")
    return parse_spec(document or {}, overrides)
