"""Time per stage, summed across workers: every run reports where its time went (read, decode, predict...)."""

from __future__ import annotations

from collections import defaultdict

import ray


@ray.remote(num_cpus=0)
class StageTimer:
    """Workers add (stage, seconds, items) without waiting; the driver reads the totals at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.items: dict[str, int] = defaultdict(int)
        self.actors: list[dict] = []

    def add(self, stage: str, seconds: float, items: int) -> None:
        self.seconds[stage] += seconds
        self.items[stage] += items

    def actor_started(self, description: dict) -> None:
        self.actors.append(description)

    def started_actors(self) -> list[dict]:
        return self.actors

    def totals(self) -> dict[str, dict[str, float]]:
        return {stage: {"seconds": round(self.seconds[stage], 3), "items": self.items[stage]} for stage in self.seconds}
