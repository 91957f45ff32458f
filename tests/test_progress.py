"""What a user sees while a run works: the progress line, and the workers' start-up chatter kept out unless
``--verbose``."""

from __future__ import annotations

import io
import logging
import os
import sys
import time

import pytest

from pipeline.progress import VERBOSE_ENV, ProgressDisplay, actor_env, is_chatter, quiet_driver, quiet_startup
from pipeline.samples import BAD_FILES, write_samples
from tests.test_cli import SMALL, cli, write_spec

STARTUP = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796204824.813663    4773 port.cc:153] oneDNN custom operations are on. You may see slightly\n",
    "I0000 00:00:1796204824.814896    4773 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n",
    "I1202 09:47:04.204219    5172 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use\n",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate\n",
    "2024-01-01 12:00:00.123456: I tensorflow/core/platform/cpu_feature_guard.cc:182] This TensorFlow binary\n",
    "E0000 00:00:1796204828.052223    4773 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error (303)\n",
    "E0000 00:00:1731.1 12 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to register factory\n",
    "E0000 00:00:1731.1 12 cuda_fft.cc:485] Unable to register cuFFT factory: Attempting to register factory\n",
    "E0000 00:00:1731.1 12 cuda_blas.cc:1418] Unable to register cuBLAS factory: Attempting to register factory\n",
    "W0000 00:00:1731.1 12 computation_placer.cc:177] computation placer already registered. Please check linkage\n",
]
KEPT = [
    "W0000 00:00:1796204828.052223    4773 op_kernel.cc:1857] OP_REQUIRES failed: out of memory\n",
    "E1202 09:47:08.052223    4773 some_kernel.cc:10] a real error\n",
    "/venv/keras/src/layers/layer.py:421: UserWarning: something the user should see\n",
    "Traceback (most recent call last):\n",
    "ValueError: weights file is not a ResNet-50\n",
]


@pytest.mark.parametrize("line", STARTUP)
def test_start_up_chatter_is_dropped(line):
    assert is_chatter(line, gpu=False)


@pytest.mark.parametrize("line", KEPT)
def test_real_warnings_and_errors_are_kept(line):
    assert not is_chatter(line, gpu=False)
    assert not is_chatter(line, gpu=True)


def test_a_cuda_failure_is_kept_where_the_actor_asked_for_a_gpu():
    cuinit = STARTUP[6]
    assert is_chatter(cuinit, gpu=False) and not is_chatter(cuinit, gpu=True)


def test_start_up_output_is_written_back_without_the_chatter_even_when_start_up_fails(capfd, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "0")
    with pytest.raises(RuntimeError), quiet_startup(gpu=False):
        os.write(2, "".join(STARTUP + KEPT).encode())  # as TensorFlow's C++ writes: to the descriptor
        raise RuntimeError("the model did not build")
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "".join(KEPT) + "after\n"


def test_verbose_captures_nothing(capfd, monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "1")
    with quiet_startup(gpu=False):
        os.write(2, STARTUP[1].encode())
    assert capfd.readouterr().err == STARTUP[1]
    assert actor_env(True)[VERBOSE_ENV] == "1" and actor_env(False)[VERBOSE_ENV] == "0"
    assert actor_env(False)["TF_CPP_MIN_LOG_LEVEL"] == "1"  # TensorFlow's own warnings stay


def test_ray_data_info_lines_leave_the_console_warnings_stay():
    quiet_driver(verbose=False)
    (console,) = [h for h in logging.getLogger("ray.data").handlers if type(h).__name__ == "PlainRayHandler"]

    def shown(level: int, message: str) -> bool:
        return bool(console.filter(logging.LogRecord("ray.data.x", level, __file__, 1, message, None, None)))

    assert not shown(logging.INFO, "Starting execution of Dataset")
    assert not shown(logging.WARNING, "Progress bars disabled. To enable, set ...")  # ours are on instead
    assert shown(logging.WARNING, "Warning: The Ray cluster currently does not have any available CPUs")
    quiet_driver(verbose=True)
    assert shown(logging.INFO, "Starting execution of Dataset")
    quiet_driver(verbose=False)
    quiet_driver(verbose=False)  # once per run in a process: one filter
    assert len(console.filters) == 2 and not shown(logging.INFO, "x")
    quiet_driver(verbose=True)


def test_the_timer_counts_images_with_errors_and_read_tasks():
    from pipeline.metrics import StageTimer

    t0 = time.time()
    timer = StageTimer.__ray_actor_class__(since=t0)  # the class itself: the bookkeeping, without a cluster
    assert timer.progress() == {"images": 0, "failed": 0, "read_tasks": 0}
    timer.add("read", 1.0, 0)
    timer.add("read", 1.0, 0)
    timer.add("predict", 2.0, 14, (t0 - 4.0, t0 - 2.0))
    timer.images_done(16, 2)
    progress = timer.progress()
    assert progress["images"] == 16 and progress["failed"] == 2 and progress["read_tasks"] == 2
    assert progress["span_s"] == 2.0 and progress["predicting_s"] >= 4.0


class Polls:
    """The timer's progress as a run goes, and a poll that fails (the timer's node lost) on the way."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> dict[str, float]:
        self.count += 1
        if self.count == 2:
            raise ConnectionError("the timer's node is gone")
        images = 16 * self.count
        return {"images": images, "failed": 1, "read_tasks": self.count, "predicting_s": images / 8, "span_s": 2.0}


def test_plain_progress_lines_survive_a_lost_timer_and_end_with_a_final_line():
    stream = io.StringIO()
    display = ProgressDisplay(Polls(), tasks=10, stream=stream, plain_every=0.05)
    display.start()
    time.sleep(0.5)
    display.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3
    assert lines[0].startswith("progress: 16 images done (1 failed), 8.0 images/s, 1/10 read tasks, ")
    final = lines[-1]
    assert final.startswith("progress: ") and final.endswith(" s (end)")
    assert "images/s" in final and "read tasks" in final
    display._show({"images": 1})  # a poll that was under way when the run ended
    assert stream.getvalue().splitlines() == lines  # nothing after the end


def test_plain_lines_are_rare_where_stderr_is_not_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay(lambda: {"images": 0, "failed": 0, "read_tasks": 0}, tasks=3, stream=stream)
    display.start()
    time.sleep(0.2)
    display.close(final_poll=False)
    assert stream.getvalue() == "progress: 0 images done, 0/3 read tasks, 0 s (end)\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_live_line():
    stream = Terminal()
    display = ProgressDisplay(Polls(), tasks=10, stream=stream, interval=0.05)
    display.start()
    time.sleep(0.3)
    display.close()
    shown = stream.getvalue()
    assert "images done (1 failed)" in shown and "images/s" in shown and "/10 read tasks" in shown


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    paths = write_samples(root / "images", photos=("flower.jpg",))
    return write_spec(root / "job.yaml", {"input": str(root / "images"), "output": str(root / "unused")}), len(paths)


@pytest.mark.slow
def test_a_default_run_shows_progress_and_no_start_up_chatter(job, tmp_path):
    spec, images = job
    result = cli("run", str(spec), *SMALL, "--set", f"output.url={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    for chatter in ("I0000", "absl::InitializeLog", "oneDNN", "cuInit", "Starting execution", "Total Progress"):
        assert chatter not in result.stderr, result.stderr
    (final,) = [line for line in result.stderr.splitlines() if line.endswith("(end)")]
    assert final.startswith(f"progress: {images} images done ({len(BAD_FILES)} failed), ")
    assert " images/s, 1/1 read tasks, " in final
    assert "images/s once predicting" in result.stdout  # the summary, after the progress


@pytest.mark.slow
def test_verbose_brings_back_ray_data_and_the_workers_full_output(job, tmp_path):
    spec, _ = job
    result = cli("run", str(spec), *SMALL, "--set", f"output.url={tmp_path / 'out'}", "--verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    for shown in ("absl::InitializeLog", "I0000", "oneDNN", "INFO streaming_executor", "Data sink RunSink finished"):
        assert shown in result.stderr, result.stderr
    assert "(end)" not in result.stderr  # Ray Data's progress instead of ours
