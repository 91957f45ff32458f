"""The command line, run as a user runs it: a subprocess of the installed entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300, **kwargs
    )


def test_demo_with_random_weights_labels_the_sample_photos():
    result = run("demo", "--weights", "random", "--depth", "18", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    assert "china.jpg" in result.stdout and "flower.jpg" in result.stdout
    assert "random:seed=0" in result.stdout
    assert "meaningless" in result.stderr  # a random run never passes for a real one
    assert result.stdout.count("(n0") >= 6  # three labels per image, each with its WordNet id


def test_demo_without_cached_imagenet_weights_says_how_to_continue():
    result = run("demo")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "weights fetch 50" in result.stderr
    assert "weights=random" in result.stderr


def test_console_script_and_bad_depth():
    script = Path(sys.executable).with_name("resnet-pipeline")
    scripts = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert scripts.returncode == 0 and "demo" in scripts.stdout
    result = run("demo", "--weights", "random", "--depth", "42")
    assert result.returncode == 2 and "--depth must be one of" in result.stderr
