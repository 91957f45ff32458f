"""Talking to storage: telling a transient failure from a real one, retrying the first, and writing small files whole.

Object stores fail now and then (HTTP 503 SlowDown, 500, a reset connection, a timeout). s3fs and botocore retry a
few of these themselves; what still escapes them is retried here with exponential backoff and jitter, for a whole
operation (reading a shard from the start, a commit step). A missing object, a denied request or a bad file is not
transient and is never retried.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import has_magic

T = TypeVar("T")

ATTEMPTS = 6
BASE_DELAY = 0.2  # seconds; doubled per attempt, capped, with full jitter
MAX_DELAY = 10.0

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_TYPES = (ConnectionError, TimeoutError)
_TRANSIENT_TEXT = re.compile(
    r"SlowDown|Service ?Unavailable|ServiceUnavailable|InternalError|Internal Server Error|RequestTimeout|"
    r"Throttl|TooManyRequests|\b50[0234]\b|Connection (?:reset|aborted|closed|refused)|ConnectionClosed|"
    r"ServerDisconnected|Server disconnected|EndpointConnectionError|Could not connect|ReadTimeout|"
    r"timed out|IncompleteRead|ClientPayloadError|Response payload is not completed|RemoteDisconnected|"
    r"Broken pipe|NETWORK_CONNECTION|SLOW_DOWN",
    re.I,
)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same request later could succeed. Looks through the chain of causes."""
    seen: set[int] = set()
    chain: BaseException | None = error
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, _PERMANENT):
            return False
        if isinstance(chain, _TRANSIENT_TYPES) or _TRANSIENT_TEXT.search(f"{type(chain).__name__}: {chain}"):
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (full jitter, as AWS recommends)."""
    return random.uniform(0, min(MAX_DELAY, BASE_DELAY * 2**attempt))


def with_retries(operation: Callable[[], T], attempts: int = ATTEMPTS) -> T:
    """Run ``operation``; on a transient storage error wait and run it again, up to ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            time.sleep(backoff(attempt))
    raise AssertionError("unreachable")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def glob_root(path: str) -> str:
    """The folder a glob searches (``data/2026-*/x.jpg`` -> ``data``); a path without wildcards unchanged."""
    if not has_magic(path):
        return path
    return re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]


_SAME_PROTOCOL = {"s3a": "s3", "gcs": "gs", "local": "file"}


def _place(url: str, storage_options: dict | None) -> tuple[str, str | None, str]:
    """Where ``url`` is, without opening its store: its protocol, its endpoint (a store that is not the cloud's),
    its path without the glob part. Local paths are absolute with symbolic links resolved."""
    options = storage_options or {}
    protocol = fsspec.utils.get_protocol(url)
    path = glob_root(url.split("://", 1)[1] if "://" in url else url)
    if _SAME_PROTOCOL.get(protocol, protocol) == "file":
        path = os.path.realpath(path)
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    return _SAME_PROTOCOL.get(protocol, protocol), endpoint, path.rstrip("/")


def is_within(inner: str, inner_options: dict | None, outer: str, outer_options: dict | None) -> bool:
    """Whether ``inner`` is ``outer`` or lies under it, on the same store."""
    inner_store, outer_store = _place(inner, inner_options), _place(outer, outer_options)
    if inner_store[:2] != outer_store[:2]:
        return False
    return inner_store[2] == outer_store[2] or inner_store[2].startswith(outer_store[2] + "/")


def version_of(info: dict[str, Any]) -> str | None:
    """A stored file's version from its fsspec ``info``: the ETag (S3, Azure), MD5 (GCS), else modification time."""
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
    return None if version is None else str(version).strip('"')


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file so readers see the old state or the new one, never a part.

    An object store's PUT is atomic already; on a local disk the bytes go to a hidden temporary file first and are
    renamed into place.
    """
    if is_local(fs):
        folder, name = path.rsplit("/", 1)
        os.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{name}.{os.getpid()}.tmp"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        return
    with_retries(lambda: fs.pipe_file(path, data))


def write_json(fs: fsspec.AbstractFileSystem, path: str, document: Any) -> None:
    write_bytes(fs, path, json.dumps(document, indent=2, default=str).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(with_retries(lambda: fs.cat_file(path)))


# s3fs option -> delta-rs (object_store) option
_S3_DELTA_OPTIONS = {
    "key": "AWS_ACCESS_KEY_ID",
    "secret": "AWS_SECRET_ACCESS_KEY",
    "token": "AWS_SESSION_TOKEN",
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region_name": "AWS_REGION",
}


def delta_storage_options(fs: fsspec.AbstractFileSystem, options: dict[str, Any]) -> dict[str, str]:
    """The storage options of an fsspec filesystem, as delta-rs takes them.

    For S3, s3fs's names (``key``, ``secret``, ``endpoint_url``, also inside ``client_kwargs``) become object_store's
    (``AWS_ACCESS_KEY_ID``, ...); an ``http://`` endpoint is allowed; ``anon`` skips signing. What is not given
    here delta-rs takes from the environment, as s3fs does. Other stores' options pass through unchanged: name them
    as both libraries accept them (``account_name`` for Azure, for example).
    """
    if is_local(fs):
        return {}
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol not in ("s3", "s3a"):
        return {name: str(value) for name, value in options.items() if isinstance(value, str | int | float | bool)}
    flat = {**options, **(options.get("client_kwargs") or {})}
    translated = {_S3_DELTA_OPTIONS[name]: str(flat[name]) for name in _S3_DELTA_OPTIONS if flat.get(name)}
    if flat.get("anon"):
        translated["AWS_SKIP_SIGNATURE"] = "true"
    if translated.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        translated["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "AWS_REGION" not in translated:
        translated["AWS_REGION"] = region
    return translated


def identifier(name: str) -> str:
    """A name quoted for SQL (DuckDB)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A string quoted as an SQL literal (DuckDB)."""
    return "'" + text.replace("'", "''") + "'"
