"""What a user sees while a run works: images done and images/s on the driver, and no start-up chatter from the
workers unless asked for (``--verbose``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def actor_env(verbose: bool) -> dict[str, str]:
    """Environment variables for the model actors."""
    return {}


def quiet_driver(verbose: bool) -> None:
    """Lower the driver's Ray and Ray Data loggers to warnings unless ``verbose``."""


@contextlib.contextmanager
def show_progress(timer, tasks: int, enabled: bool) -> Iterator[None]:
    """While the plan runs: images done, images/s and read tasks finished, from the stage timer."""
    yield
