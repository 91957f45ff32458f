"""A committed run's manifest, typed: what ran (spec, model, work key), what it did (plan, counts), how it went (time
per stage, actors), and where it was committed (the predictions table's version). The runner builds it; query,
report, incremental planning and the CLI read it. Stored as JSON (in the run's Delta commit and its ``runs`` row);
:meth:`Manifest.from_json` also reads manifests written by older versions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _known(cls: type, document: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``document`` that are fields of ``cls``: a newer writer's extra keys are not an error."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in document.items() if k in names}


@dataclass(frozen=True)
class ModelRecord:
    """The model a run used, and the work key its rows depend on (:func:`pipeline.incremental.work_key`)."""

    architecture: str
    weights: str  # 'imagenet', 'random', or the file's URL with credentials redacted
    random_weights: bool = False
    seed: int | None = None
    precision: str = "float32"
    decoded_on: str = "tasks"  # decode.on as resolved: CPU tasks, or the model actor (nvImageCodec)
    preprocessing: str = "crop"
    image_size: int = 224
    key: str | None = None
    key_parts: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | list[str] | None = None  # sha256 of the weights; a list if the actors disagreed

    @property
    def fingerprints(self) -> str | None:
        """The fingerprint as one string (several joined by commas)."""
        return ",".join(self.fingerprint) if isinstance(self.fingerprint, list) else self.fingerprint


@dataclass(frozen=True)
class PlanSummary:
    mode: str = "full"  # full | incremental | retry-failed
    listed: int = 0
    to_read: int = 0
    skipped_unchanged: int = 0
    adopted: int = 0
    adopted_from: list[str] = field(default_factory=list)


EXAMPLES = 5  # names kept per reason: enough to recognise the files, never a listing of millions


@dataclass
class Examples:
    """How many things one reason covers, and the first few names."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        self.count += 1
        if len(self.first) < EXAMPLES:
            self.first.append(name)

    def merge(self, other: Examples) -> None:
        self.count += other.count
        self.first.extend(other.first[: EXAMPLES - len(self.first)])

    def names(self) -> str:
        """``a.json, b.json, ...``: the first names, and whether there are more."""
        return ", ".join(self.first) + (", ..." if self.count > len(self.first) else "")


@dataclass
class Tally:
    """What a listing or a read met: every thing ``seen`` is ``kept`` (a shard; a row) or skipped by a named reason
    (``hidden``, ``sidecar``, ``not an image``...), so ``seen == kept + sum of skipped``. ``renamed``: keys that
    repeated within a shard and were given their position as a suffix, to stay unique."""

    seen: int = 0
    kept: int = 0
    skipped: dict[str, Examples] = field(default_factory=dict)
    renamed: Examples = field(default_factory=Examples)

    def keep(self) -> None:
        self.seen += 1
        self.kept += 1

    def skip(self, reason: str, name: str) -> None:
        self.seen += 1
        self.skipped.setdefault(reason, Examples()).add(name)

    def describe_skipped(self) -> str:
        """``1 hidden: .DS_Store; 3 sidecar: a.json, b.json, ...``, for messages and summaries."""
        return "; ".join(f"{e.count} {reason}: {e.names()}" for reason, e in sorted(self.skipped.items()))

    @property
    def skipped_count(self) -> int:
        return sum(examples.count for examples in self.skipped.values())

    def merge(self, other: Tally) -> Tally:
        self.seen += other.seen
        self.kept += other.kept
        for reason, examples in other.skipped.items():
            self.skipped.setdefault(reason, Examples()).merge(examples)
        self.renamed.merge(other.renamed)
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any] | None) -> Tally:
        document = document or {}
        return cls(
            seen=document.get("seen", 0),
            kept=document.get("kept", 0),
            skipped={reason: Examples(**examples) for reason, examples in document.get("skipped", {}).items()},
            renamed=Examples(**document.get("renamed", {})),
        )


@dataclass(frozen=True)
class InputCounts:
    """Nothing disappears silently: ``listed`` tallies the objects under the input URL (kept: shards), ``read`` the
    entries met in the shards this run read or adopted (image files, records, tar members, Parquet rows; kept:
    rows)."""

    listed: Tally = field(default_factory=Tally)
    read: Tally = field(default_factory=Tally)


@dataclass(frozen=True)
class Counts:
    rows: int = 0
    ok: int = 0
    error: int = 0


@dataclass(frozen=True)
class Manifest:
    run_id: str
    model: ModelRecord
    plan: PlanSummary = field(default_factory=PlanSummary)
    counts: Counts = field(default_factory=Counts)
    input: InputCounts = field(default_factory=InputCounts)
    spec: dict[str, Any] = field(default_factory=dict)  # redacted: no credential values
    started_at: str | None = None
    finished_at: str | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    stage_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    actors: list[dict[str, Any]] = field(default_factory=list)
    host: dict[str, str] = field(default_factory=dict)
    status: str = "committed"
    # Set when the run is committed:
    committed_at: str | None = None
    version: int | None = None  # of the predictions table, holding the run's rows

    @property
    def name(self) -> str | None:
        return self.spec.get("name")

    @property
    def commit_order(self) -> tuple[int, str]:
        return -1 if self.version is None else self.version, self.run_id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Manifest:
        return cls(
            **{
                **_known(cls, document),
                "model": ModelRecord(**_known(ModelRecord, document.get("model", {}))),
                "plan": PlanSummary(**_known(PlanSummary, document.get("plan", {}))),
                "counts": Counts(**_known(Counts, document.get("counts", {}))),
                "input": InputCounts(
                    *(Tally.from_json((document.get("input") or {}).get(k)) for k in ("listed", "read"))
                ),
            }
        )
