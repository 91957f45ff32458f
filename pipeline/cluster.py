"""Labeling jobs on a running Ray cluster, through the Ray Jobs API.

``submit`` sends a job whose working_dir holds the resolved spec (``job.yaml``) and, unless the cluster's image has
the project installed, a copy of this ``pipeline`` package; its entrypoint is ``python -m pipeline run job.yaml``,
which runs as the driver on the head node and joins that cluster (Ray sets ``RAY_ADDRESS`` for it).

Credentials never travel in the entrypoint or the shipped spec. A spec with credential-like storage options (see
:mod:`pipeline.credentials`) is refused: Ray writes a job's runtime_env in plain text to the head's logs
(``runtime_env_agent.log``, readable by every user of the head and any log collector), so the cluster gets storage
access from its own identity or the storage Secret (infra/README.md). With ``send_credentials`` (``submit
--send-credentials``) they are taken out of the spec and sent as ``FSSPEC_<PROTOCOL>`` variables in the job's
runtime_env: fsspec applies them to every filesystem of that protocol the job opens, driver and workers alike.
The Ray token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` or ``--token-file``) goes only
into the Authorization header of the requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.credentials import holds_secret
from pipeline.spec import JobSpec

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

SPEC_FILE = "job.yaml"
ENTRYPOINT = f"python -m pipeline run {SPEC_FILE} --quiet"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")


class ClusterInputError(ValueError):
    """Bad input for a cluster command (address, token, spec); exit code 2."""


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused a request; exit code 1."""


class AlreadySubmitted(Exception):
    """A submission id that the cluster already has: the scheduled run is not started twice."""

    def __init__(self, submission_id: str, status: str) -> None:
        super().__init__(f"already submitted: {submission_id} (status {status})")
        self.submission_id = submission_id
        self.status = status


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    source: str  # where it came from, for messages; never the value

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def find_token(token_file: Path | None = None) -> Token | None:
    """Ray's own order: ``--token-file``, then ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if token_file is not None:
        return _read_token(token_file, f"--token-file {token_file}")
    if value := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(value, "RAY_AUTH_TOKEN")
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(path), f"RAY_AUTH_TOKEN_PATH ({path})")
    default = DEFAULT_TOKEN_FILE.expanduser()
    return _read_token(default, str(default)) if default.is_file() else None


def _read_token(path: Path, source: str) -> Token:
    try:
        value = path.expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ClusterInputError(f"cannot read the Ray token file {path}: {error.strerror}") from None
    if not value:
        raise ClusterInputError(f"the Ray token file {path} is empty")
    return Token(value, source)


def scheduled_submission_id(name: str, day: date) -> str:
    """One id per job and schedule date: the same night submitted twice runs once."""
    return f"{name}-{day.isoformat()}"


# --- credentials --------------------------------------------------------------------------------------------------


def _locations(spec: JobSpec) -> dict[str, str]:
    """Each section with ``storage_options`` and the URL they open (the model's: weights, else labels)."""
    model = next((url for url in (spec.model.weights, spec.model.labels) if url and "://" in url), "file://")
    return {"input": spec.input.url, "output": spec.output.url, "model": model}


def split_credentials(spec: JobSpec) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The spec as a document with no credentials, the ``FSSPEC_<PROTOCOL>`` variables that carry them, and the
    dotted names of the options taken out.

    The document holds the fields the spec file and the overrides set; the rest are defaults wherever it runs, so
    a cluster whose image is older or newer than this checkout reads it the same way.

    A top-level storage option that holds a credential anywhere inside it (``key``, ``client_kwargs.…``) moves
    whole, because fsspec merges its configuration one level deep.
    """
    from fsspec.utils import get_protocol

    document = spec.model_dump(mode="json", exclude_unset=True)
    per_protocol: dict[str, dict[str, Any]] = {}
    moved: list[str] = []
    for section, url in _locations(spec).items():
        options = document.get(section, {}).get("storage_options", {})
        protocol = get_protocol(url)
        config = per_protocol.setdefault(protocol, {})
        for key in [k for k, v in options.items() if holds_secret(v, k)]:
            value = options.pop(key)
            if config.setdefault(key, value) != value:
                raise ClusterInputError(
                    f"{section}.storage_options.{key}: another section sets a different {key} for {protocol}:// "
                    "URLs; one job can carry one set of credentials per protocol (or use the cloud's workload "
                    "identity)"
                )
            name = f"{section}.storage_options.{key}"
            if name not in moved:
                moved.append(name)
    env = {f"FSSPEC_{protocol.upper()}": json.dumps(config) for protocol, config in per_protocol.items() if config}
    return document, env, moved


def check_credentials(spec: JobSpec, send_credentials: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`split_credentials`'s document and variables; a ClusterInputError, naming the options and never their
    values, if the spec holds credentials and ``send_credentials`` is not given."""
    document, env, moved = split_credentials(spec)
    if moved and not send_credentials:
        raise ClusterInputError(
            f"the spec holds credentials ({', '.join(moved)}); submit does not send them, since Ray writes a job's "
            "runtime_env in plain text to the head's logs: give the cluster access through its workload identity "
            "or the storage Secret (infra/README.md), or pass --send-credentials to send them anyway (they land in "
            "the job's runtime_env and the head's runtime_env_agent.log)"
        )
    return document, env


def _absolute_local_paths(document: dict[str, Any]) -> None:
    """Relative local paths mean the submitter's working directory, not the job's (which is a temporary copy)."""
    for section, key in (("input", "url"), ("output", "url"), ("model", "weights"), ("model", "labels")):
        value = document.get(section, {}).get(key)
        if value and "://" not in value and value not in ("imagenet", "random") and not Path(value).is_absolute():
            document[section][key] = str(Path(value).resolve())


# --- talking to the cluster ---------------------------------------------------------------------------------------


def normalize_address(address: str | None) -> str:
    if not address or not address.strip():
        raise ClusterInputError("no cluster: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    address = address.strip().rstrip("/")
    return address if "://" in address else f"http://{address}"


@contextmanager
def _requests_to(address: str, token: Token | None, job_id: str | None = None) -> Iterator[None]:
    """Ray's exceptions, turned into one line that never contains the token."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        if token is None:
            raise ClusterInputError(
                f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or pass "
                "--token-file"
            ) from None
        raise ClusterInputError(f"the Ray cluster at {address} rejected the token from {token.source}") from None
    except (ConnectionError, requests.RequestException) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {first_line}") from None
    except RuntimeError as error:
        text = str(error)
        if job_id and "status code 404" in text:
            raise ClusterError(f"no job {job_id} on the Ray cluster at {address}") from None
        raise ClusterError(
            f"the Ray cluster at {address} refused the request: {_last_line(text).rstrip('.')}"
        ) from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "."]
    return lines[-1] if lines else text.strip()


@dataclass
class Cluster:
    """A Jobs API client bound to one dashboard address and token."""

    address: str
    token: Token | None
    client: JobSubmissionClient

    @classmethod
    def connect(cls, address: str | None, token_file: Path | None = None) -> Cluster:
        from ray.job_submission import JobSubmissionClient

        address = normalize_address(address)
        token = find_token(token_file)
        for name in (
            "ray.dashboard.modules.dashboard_sdk",
            "ray.dashboard.modules.job.sdk",
            "ray._private.runtime_env",
        ):
            logging.getLogger(name).setLevel(logging.WARNING)  # they set INFO: lines on every upload and websocket
        with _requests_to(address, token), _explicit_address(address):
            client = JobSubmissionClient(address, headers=token.header() if token else None)
        return cls(address, token, client)

    def submit(
        self,
        spec: JobSpec,
        *,
        submission_id: str | None = None,
        ship_code: bool = True,
        driver_cpus: float = 0,
        metadata: dict[str, str] | None = None,
        send_credentials: bool = False,
    ) -> str:
        """Submit the job; returns its submission id. Raises AlreadySubmitted for an id the cluster has, and
        ClusterInputError for credentials in the spec unless ``send_credentials`` (see :func:`check_credentials`)."""
        document, env = check_credentials(spec, send_credentials)
        _absolute_local_paths(document)
        with tempfile.TemporaryDirectory(prefix="resnet-pipeline-job-") as staging:
            root = Path(staging)
            (root / SPEC_FILE).write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
            if ship_code:
                shutil.copytree(
                    Path(__file__).parent, root / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            runtime_env: dict[str, Any] = {"working_dir": str(root)}
            if env:
                runtime_env["env_vars"] = env
            try:
                with _requests_to(self.address, self.token):
                    return self.client.submit_job(
                        entrypoint=ENTRYPOINT,
                        submission_id=submission_id,
                        runtime_env=runtime_env,
                        entrypoint_num_cpus=driver_cpus,
                        metadata={"job": spec.name, **(metadata or {})},
                    )
            except ClusterError as error:
                if submission_id and "already exists" in str(error):
                    raise AlreadySubmitted(submission_id, str(self.status(submission_id).status)) from None
                raise

    def status(self, job_id: str) -> JobDetails:
        """The job's JobDetails (status, message, start and end times, entrypoint, metadata)."""
        with _requests_to(self.address, self.token, job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with _requests_to(self.address, self.token, job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs until it ends; returns its final status."""
        streamed = False

        async def tail() -> None:
            nonlocal streamed
            async for chunk in self.client.tail_job_logs(job_id):
                streamed = streamed or bool(chunk)
                write(chunk)

        self.status(job_id)  # a clear error for an unknown id before the websocket opens
        with _requests_to(self.address, self.token, job_id):
            asyncio.run(tail())
        status = self.wait(job_id)
        if not streamed:  # a job that ended before the stream opened
            write(self.logs(job_id))
        return status

    def wait(self, job_id: str, poll_seconds: float = 1.0) -> str:
        while (status := str(self.status(job_id).status)) not in TERMINAL:
            time.sleep(poll_seconds)
        return status

    def stop(self, job_id: str) -> bool:
        """True if a stop was requested; False if the job had already ended."""
        with _requests_to(self.address, self.token, job_id):
            return self.client.stop_job(job_id)


@contextmanager
def _explicit_address(address: str) -> Iterator[None]:
    """Ray lets ``RAY_ADDRESS`` override the address given to the client; here the address given wins."""
    name = "RAY_API_SERVER_ADDRESS"
    previous = os.environ.get(name)
    os.environ[name] = address
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def describe(details: JobDetails) -> list[str]:
    """A job's status in a few lines, without its runtime_env (credential variables, with --send-credentials)."""
    lines = [f"{details.submission_id}  {details.status}"]
    if details.message:  # on failure, Ray's message ends with up to 20,000 characters of log: keep the last lines
        message = details.message.strip().splitlines()
        if len(message) > 12:
            message = [message[0], "  ...", *message[-10:]]
        lines += [f"  {line}" for line in message]
    if details.start_time:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(details.start_time / 1000))
        ended = details.end_time or time.time() * 1000
        lines.append(f"  started {started}, {(ended - details.start_time) / 1000:.0f} s")
    if details.metadata:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(details.metadata.items())))
    return lines


def check_name(value: str) -> str:
    """Submission ids name files and Kubernetes objects later: keep them to the spec's name characters."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ClusterInputError(f"a submission id is letters, digits, '.', '_' and '-', got {value!r}")
    return value
