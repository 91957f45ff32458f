"""Shared fixtures: an isolated weights cache, and moto's standalone S3 server over HTTP on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> None:
    """No test reads or fills the user's real caches (ours or Keras's)."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RESNET_PIPELINE_CACHE", str(root / "resnet-pipeline"))
    monkeypatch.setenv("KERAS_HOME", str(root / "keras"))
    monkeypatch.delenv("RESNET_PIPELINE_WEIGHTS_URL", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """``moto_server`` in its own process, on a free port; yields its endpoint URL and stops it after."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server, monkeypatch):
    """An s3fs filesystem on the moto server with a fresh bucket; yields (fs, bucket, storage_options)."""
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    storage_options = {"endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
    bucket = f"test-{time.monotonic_ns()}"
    fs.mkdir(bucket)
    return fs, bucket, storage_options
