"""Time per stage, summed across workers: every run reports where its time went (read, decode, predict...)."""

from __future__ import annotations

import time
from collections import defaultdict

import ray


@ray.remote(num_cpus=0)
class StageTimer:
    """Workers add (stage, seconds, items) without waiting; the driver reads the totals at the end. It also carries
    the driver's request to stop (a first Ctrl-C): read tasks that have not begun skip their shards.

    A worker that also says when its piece of work began and ended (``time.time()``) widens the stage's span: from
    the first start to the last end, in the totals as ``started_s`` (counted from ``since``, the driver's clock when
    it made the timer, just before the Ray plan starts) and ``span_seconds``. For the model that span is the time
    the pipeline was predicting, start-up excluded, and items / span its rate once running, however many batches
    ran side by side.

    While the plan runs the driver polls ``progress()``: images done (errors included), read tasks finished and the
    seconds since predictions began, for the progress line.
    """

    def __init__(self, since: float | None = None) -> None:
        self.since = time.time() if since is None else since
        self.seconds: dict[str, float] = defaultdict(float)
        self.items: dict[str, int] = defaultdict(int)
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, float] = {}
        self.actors: list[dict] = []
        self.stopping = False
        self.reports: dict[str, int] = defaultdict(int)
        self.images = 0
        self.failed = 0

    def add(self, stage: str, seconds: float, items: int, span: tuple[float, float] | None = None) -> None:
        self.seconds[stage] += seconds
        self.items[stage] += items
        self.reports[stage] += 1
        if span is not None:
            began, ended = span
            self.first_start[stage] = min(began, self.first_start.get(stage, began))
            self.last_end[stage] = max(ended, self.last_end.get(stage, ended))

    def images_done(self, images: int, failed: int) -> None:
        """A batch through the model: ``images`` rows, ``failed`` of them errors (read or decode)."""
        self.images += images
        self.failed += failed

    def progress(self) -> dict[str, float]:
        """Images done and failed, read tasks finished (each reports ``read`` once), and seconds from the first
        batch's start to now (``predicting_s``) and to the last batch's end (``span_s``), once there was one."""
        snapshot = {"images": self.images, "failed": self.failed, "read_tasks": self.reports["read"]}
        if "predict" in self.first_start:
            began = self.first_start["predict"]
            snapshot.update(predicting_s=max(0.0, time.time() - began), span_s=self.last_end["predict"] - began)
        return snapshot

    def request_stop(self) -> None:
        self.stopping = True

    def stop_requested(self) -> bool:
        return self.stopping

    def actor_started(self, description: dict) -> None:
        self.actors.append(description)

    def started_actors(self) -> list[dict]:
        return self.actors

    def totals(self) -> dict[str, dict[str, float]]:
        totals = {}
        for stage in self.seconds:
            totals[stage] = {"seconds": round(self.seconds[stage], 3), "items": self.items[stage]}
            if stage in self.first_start:
                totals[stage]["started_s"] = round(self.first_start[stage] - self.since, 3)
                totals[stage]["span_seconds"] = round(self.last_end[stage] - self.first_start[stage], 3)
        return totals
