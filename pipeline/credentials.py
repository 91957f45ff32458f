"""Credentials: which keys hold one, and how they are kept out of everything written, shown or sent.

One rule: a credential is a non-empty value under a key whose name looks like one (:func:`is_secret_key`). The
spec's recorded form (:func:`redact`), the ``--set`` words written into manifests (:func:`redact_assignment`),
what ``submit`` refuses to send (:func:`holds_secret`) and ``retry-failed``'s reading of a recorded spec
(:func:`without_redacted`) all follow it; :func:`redact_url` drops a URL's user-info. Standard library only, so
that the weights code can use it without importing the spec.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
_SECRET_KEY = re.compile(
    r"secret|token|password|passwd|credential|private|^key$|access_key|account_key|api_key|connection_string|sas", re.I
)  # connection_string: Azure's holds AccountKey=...


def is_secret_key(name: str) -> bool:
    """Whether a key's name looks like a credential's (``key``, ``secret``, ``aws_session_token``, ``sas_token``)."""
    return _SECRET_KEY.search(name) is not None


def _is_secret(key: str, value: Any) -> bool:
    return is_secret_key(key) and value not in (None, "")


def holds_secret(value: Any, key: str = "") -> bool:
    """Whether ``value``, found under ``key``, is a credential or holds one anywhere inside (dicts and lists)."""
    if _is_secret(key, value):
        return True
    if isinstance(value, dict):
        return any(holds_secret(v, str(k)) for k, v in value.items())
    return isinstance(value, list) and any(holds_secret(v) for v in value)


def redact(value: Any) -> Any:
    """A copy of a document (dicts, lists, scalars) with every credential replaced by ``***``."""
    if isinstance(value, dict):
        return {k: REDACTED if _is_secret(str(k), v) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def without_redacted(value: Any) -> Any:
    """A redacted document with its ``***`` entries left out, so that they take their defaults or a ``--set``."""
    if isinstance(value, dict):
        return {k: without_redacted(v) for k, v in value.items() if v != REDACTED}
    return value


def redact_assignment(assignment: str) -> str:
    """A ``--set a.b.c=value`` as it may be shown: ``a.b.secret=***`` if its last key looks like a credential's."""
    path, sep, _ = assignment.partition("=")
    return f"{path}={REDACTED}" if sep and is_secret_key(path.rsplit(".", 1)[-1]) else assignment


def redact_url(url: str) -> str:
    """The URL without user-info (``s3://KEY:SECRET@bucket`` is valid fsspec and must never be recorded)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
