"""What a user sees while a run works: images done and images/s on the driver, and no start-up chatter from the
workers unless asked for (``--verbose``)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TextIO

log = logging.getLogger(__name__)

VERBOSE_ENV = "RESNET_PIPELINE_VERBOSE"
PLAIN_EVERY_S = 20.0  # a line at most this often where stderr is not a terminal (CI, Ray job logs)

# absl's prefix (``I1202 09:47:04.813663    4773 port.cc:153] ``, before its initialisation
# ``I0000 00:00:1796204824.813663 ...``) and TensorFlow's older one
# (``2024-01-01 12:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:182] ``): the first letter is the
# severity.
LOG_PREFIX = re.compile(r"^(?:([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) )")
CHATTER = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "cpu_feature_guard.cc",
    "To enable the following instructions:",  # the second line of cpu_feature_guard's notice
    "Unable to register cuDNN factory",  # TensorFlow's own CUDA plugins registered twice, on every GPU machine
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
)
NO_GPU_CHATTER = (  # an actor that asked for no GPU finds none, nor the GPU libraries nvImageCodec would load
    "failed call to cuInit",
    "Failed to load nvjpeg library",
    "Failed to load nvjpeg2k library",
    "Failed to load nvtiff library",
    "Note: If using nvImageCodec's Python distribution",
)


def is_chatter(line: str, gpu: bool) -> bool:
    """Whether a line a worker wrote while TensorFlow started is known noise: absl/TensorFlow INFO lines, absl's
    notice that it is not initialised, the CPU features notice, duplicate CUDA plugin registrations, and, for a
    worker without a GPU, the failure to initialise CUDA."""
    prefix = LOG_PREFIX.match(line)
    if prefix and "I" in prefix.groups():
        return True
    return any(marker in line for marker in CHATTER + (() if gpu else NO_GPU_CHATTER))


def without_chatter(text: str, gpu: bool) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not is_chatter(line, gpu))


@contextlib.contextmanager
def quiet_startup(gpu: bool) -> Iterator[None]:
    """Capture file descriptor 2 while TensorFlow starts (absl writes there before its logging is initialised,
    whatever TF_CPP_MIN_LOG_LEVEL says), then write back to stderr all but the known chatter. The capture ends and
    the rest is written back even if the block raises. Nothing is captured where ``RESNET_PIPELINE_VERBOSE=1``."""
    if os.environ.get(VERBOSE_ENV) == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = without_chatter(captured.read().decode(errors="replace"), gpu)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def actor_env(verbose: bool) -> dict[str, str]:
    """Environment variables for the model actors."""
    if verbose:
        return {VERBOSE_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    # TF_CPP_MIN_LOG_LEVEL 1: TensorFlow's INFO lines go, warnings stay. nvImageCodec (decode.on: actor) logs every
    # image it cannot decode, which the CPU path then decodes or makes an error row with its reason: not twice.
    return {VERBOSE_ENV: "0", "TF_CPP_MIN_LOG_LEVEL": "1", "PYNVIMGCODEC_VERBOSITY": "0"}


class _QuietConsole(logging.Filter):
    """On Ray Data's console handler: warnings and errors only, and not the notice that its progress bars are off
    (ours are on instead). Its log file keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not record.getMessage().startswith("Progress bars disabled")


_quiet_console = _QuietConsole()


def quiet_driver(verbose: bool) -> None:
    """Lower the driver's Ray and Ray Data loggers to warnings unless ``verbose``: Ray Data's console lines
    (execution plan, progress logged every few seconds, the sink's rows) go, its log file in the session folder
    keeps them."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)

    data = logging.getLogger("ray.data")
    consoles = [h for h in data.handlers if isinstance(h, logging.StreamHandler) and not _is_file(h)]
    for handler in consoles:
        handler.removeFilter(_quiet_console)
        if not verbose:
            handler.addFilter(_quiet_console)
    if not consoles and not verbose:  # a logging configuration of the user's own: the logger itself
        data.setLevel(logging.WARNING)


def _is_file(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.FileHandler) or type(handler).__name__ == "SessionFileHandler"


@contextlib.contextmanager
def show_progress(timer, tasks: int, enabled: bool) -> Iterator[None]:
    """While the plan runs: images done, images/s and read tasks finished, from the stage timer."""
    if not enabled:
        yield
        return
    import ray

    def poll() -> dict[str, float]:
        return ray.get(timer.progress.remote(), timeout=10)

    display = ProgressDisplay(poll, tasks, sys.stderr)
    display.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        display.close(final_poll=ok)


class ProgressDisplay:
    """Polls ``poll`` (the timer's ``progress()``) from a thread of its own and shows it on ``stream``: a live line
    where it is a terminal, else a plain line every ``plain_every`` seconds, and a last one at ``close``. A poll
    that fails (the timer's node lost) is skipped: progress is never worth a run. Nothing is written after
    ``close``."""

    def __init__(
        self,
        poll: Callable[[], dict[str, float]],
        tasks: int,
        stream: TextIO,
        plain_every: float = PLAIN_EVERY_S,
        interval: float = 1.0,
    ) -> None:
        self.poll = poll
        self.tasks = tasks
        self.stream = stream
        self.terminal = stream.isatty()
        self.plain_every = plain_every
        self.interval = interval if self.terminal else plain_every
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.closed = False
        self.started = time.monotonic()
        self.last_line = self.started
        self.snapshot: dict[str, float] = {}
        self.thread = threading.Thread(target=self._loop, name="resnet-pipeline-progress", daemon=True)
        self.live = None

    def start(self) -> None:
        if self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.live = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} read tasks"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self.task = self.live.add_task(self.describe({}), total=self.tasks)
            self.live.start()
        self.thread.start()

    def close(self, final_poll: bool = True) -> None:
        self.stopping.set()
        self.thread.join(timeout=1)  # a poll under way may take longer: it then shows nothing
        snapshot = self._poll() if final_poll else None
        with self.lock:
            self._show(snapshot or self.snapshot, final=True)
            self.closed = True
            if self.live is not None:
                self.live.stop()

    def _loop(self) -> None:
        while not self.stopping.wait(self.interval):
            snapshot = self._poll()
            with self.lock:
                if not self.closed and snapshot is not None:
                    self._show(snapshot)

    def _poll(self) -> dict[str, float] | None:
        try:
            return self.poll()
        except Exception as error:  # a lost timer actor, a slow cluster: keep going without this poll
            log.debug("progress poll failed: %s", error)
            return None

    def _show(self, snapshot: dict[str, float], final: bool = False) -> None:
        self.snapshot = snapshot
        if self.live is not None:
            done = min(int(snapshot.get("read_tasks", 0)), self.tasks)
            self.live.update(self.task, completed=done, description=self.describe(snapshot, final))
            return
        now = time.monotonic()
        if final or now - self.last_line >= self.plain_every:
            self.last_line = now
            elapsed = f"{now - self.started:.0f} s"
            self.stream.write(f"progress: {self.describe(snapshot, final)}, {elapsed}{' (end)' if final else ''}\n")
            self.stream.flush()

    def describe(self, snapshot: dict[str, float], final: bool = False) -> str:
        """``240 images done (6 failed), 26.6 images/s, 12/34 read tasks`` (read tasks: on the bar of a terminal)."""
        images, failed = int(snapshot.get("images", 0)), int(snapshot.get("failed", 0))
        parts = [f"{images} images done" + (f" ({failed} failed)" if failed else "")]
        seconds = snapshot.get("span_s" if final else "predicting_s", 0)
        if images and seconds > 0:
            parts.append(f"{images / seconds:.1f} images/s")
        elif not final:
            parts.append("waiting for the first batch")
        if not self.terminal:
            parts.append(f"{min(int(snapshot.get('read_tasks', 0)), self.tasks)}/{self.tasks} read tasks")
        return ", ".join(parts)
