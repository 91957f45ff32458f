"""Submission to a real Ray head started here (`ray start --head`, dashboard on loopback, token authentication on),
through the `resnet-pipeline` command as a user runs it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable

from pipeline.cluster import (
    ClusterInputError,
    Token,
    check_credentials,
    find_token,
    scheduled_submission_id,
    split_credentials,
)
from pipeline.query import dataset
from pipeline.runs import OutputLocation
from pipeline.samples import write_samples
from pipeline.spec import parse_spec
from pipeline.tables import read_manifests
from tests.clusters import clean_environment, ray_head
from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
SMALL = {  # ResNet-18 on 64x64 crops with random weights: a real run at a fraction of ResNet-50's cost
    "model": {"depth": 18, "weights": "random", "top_k": 3},
    "decode": {"image_size": 64},
    "inference": {"batch_size": 4},
}
FAKE_KEY_ID = "fake-key-id-31c8e2"
FAKE_SECRET = "fake-secret-b7d40a96"


# --- without a cluster --------------------------------------------------------------------------------------------


def test_credentials_move_to_fsspec_variables_and_out_of_the_spec():
    spec = parse_spec(
        {
            "input": {"url": "s3://in/photos/", "storage_options": {"endpoint_url": "http://minio:9000", "key": "K"}},
            "output": {
                "url": "s3://out/labels/",
                "storage_options": {"key": "K", "client_kwargs": {"aws_secret_access_key": "S", "region_name": "x"}},
            },
        }
    )
    document, env, moved = split_credentials(spec)
    assert moved == ["input.storage_options.key", "output.storage_options.key", "output.storage_options.client_kwargs"]
    assert document["input"]["storage_options"] == {"endpoint_url": "http://minio:9000"}
    assert document["output"]["storage_options"] == {}
    # fsspec merges its configuration one level deep: a section holding a credential moves whole.
    assert json.loads(env["FSSPEC_S3"]) == {
        "key": "K",
        "client_kwargs": {"aws_secret_access_key": "S", "region_name": "x"},
    }
    assert "K" not in yaml.safe_dump(document) and "S" not in json.dumps(document["output"])


def test_model_credentials_move_too():
    spec = parse_spec({"input": "/in", "output": "/out", "model": {"storage_options": {"token": "T", "project": "p"}}})
    document, env, moved = split_credentials(spec)
    assert moved == ["model.storage_options.token"]
    assert document["model"]["storage_options"] == {"project": "p"}
    assert json.loads(env["FSSPEC_FILE"]) == {"token": "T"}


def test_two_sets_of_credentials_for_one_protocol_are_refused():
    spec = parse_spec(
        {
            "input": {"url": "s3://in/", "storage_options": {"secret": "one"}},
            "output": {"url": "s3://out/", "storage_options": {"secret": "two"}},
        }
    )
    with pytest.raises(ClusterInputError, match=r"output.storage_options.secret: another section .* s3://"):
        split_credentials(spec)


def test_submit_refuses_credentials_in_the_spec_before_any_request(tmp_path):
    """Ray writes a job's runtime_env to the head's logs: credentials go there only when the user insists."""
    output = {"url": "s3://bucket/labels", "storage_options": {"key": FAKE_KEY_ID, "secret": FAKE_SECRET}}
    spec = write_spec(tmp_path / "job.yaml", "creds", str(tmp_path), output)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "FSSPEC_"))}
    with socket.create_server(("127.0.0.1", 0)) as dashboard:  # listens, and would see any request
        address = f"http://127.0.0.1:{dashboard.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "submit", str(spec), "--address", address],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=env,
        )
        dashboard.setblocking(False)
        with pytest.raises(BlockingIOError):
            dashboard.accept()  # nobody connected
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "the spec holds credentials (output.storage_options.key, output.storage_options.secret)" in line
    for hint in ("workload identity", "storage Secret (infra/README.md)", "--send-credentials", "runtime_env_agent"):
        assert hint in line
    assert FAKE_SECRET not in result.stdout + result.stderr and FAKE_KEY_ID not in result.stdout + result.stderr

    parsed = parse_spec(yaml.safe_load(spec.read_text()))
    with pytest.raises(ClusterInputError, match="--send-credentials"):
        check_credentials(parsed)
    _, env_vars = check_credentials(parsed, send_credentials=True)
    assert json.loads(env_vars["FSSPEC_S3"]) == {"key": FAKE_KEY_ID, "secret": FAKE_SECRET}

    rendered = subprocess.run(  # manifests still render, without the credentials
        [sys.executable, "-m", "pipeline", "render", str(spec), "--target", "rayjob"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "output.storage_options.key, output.storage_options.secret" in rendered.stderr
    assert FAKE_SECRET not in rendered.stdout + rendered.stderr and FAKE_KEY_ID not in rendered.stdout


def test_token_sources_follow_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert find_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token().value == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert (find_token().value, find_token().source) == ("from-env", "RAY_AUTH_TOKEN")
    (tmp_path / "explicit").write_text("explicit")
    assert find_token(tmp_path / "explicit").value == "explicit"
    assert "from-env" not in repr(Token("from-env", "RAY_AUTH_TOKEN"))
    with pytest.raises(ClusterInputError, match="cannot read the Ray token file"):
        find_token(tmp_path / "missing")


# --- a real head --------------------------------------------------------------------------------------------------


@dataclass
class Head:
    address: str
    token: str
    home: Path

    def env(self, **changes: str | None) -> dict[str, str]:
        """The submitter's environment: the token, a HOME without ~/.ray/auth_token, no Ray or AWS settings."""
        env = clean_environment(HOME=str(self.home), RAY_AUTH_TOKEN=self.token)
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Iterator[Head]:
    home = tmp_path_factory.mktemp("home")
    token = secrets.token_hex(24)
    env = clean_environment(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        HOME=str(home),  # no ~/.aws or ~/.ray of the machine's user: the job gets credentials from the spec only
        AWS_EC2_METADATA_DISABLED="true",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this one
    )
    with ray_head(env, "--num-cpus=2") as started:
        yield Head(started.dashboard, token, home)


def cli(head: Head, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env or head.env(),
    )


def client(head: Head):
    """Ray's own client, to look at what the cluster recorded."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def write_spec(path: Path, name: str, input_url: str, output: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "input": input_url, "output": output, **SMALL}))
    return path


def predictions(output: Path) -> list[dict]:
    return DeltaTable(str(output / "predictions")).to_pyarrow_table(columns=["image_id", "status"]).to_pylist()


@pytest.mark.slow
def test_submit_wait_runs_a_real_job_and_its_output_is_there(head, tmp_path):
    images = write_samples(tmp_path / "images", photos=("flower.jpg",))
    spec = write_spec(tmp_path / "job.yaml", "cluster-test", str(tmp_path / "images"), {"url": str(tmp_path / "out")})

    result = cli(head, "submit", str(spec), "--address", head.address, "--wait", "--set", "model.top_k=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.split("submitted: ", 1)[1].split()[0]
    assert f"job {job_id}: SUCCEEDED" in result.stdout
    assert f"{len(images)} (" in result.stdout  # the driver's summary, streamed from the job's logs
    rows = predictions(tmp_path / "out")
    assert sorted(Path(r["image_id"]).name for r in rows) == sorted(p.name for p in images)
    (manifest,) = read_manifests(OutputLocation.open(str(tmp_path / "out")))
    assert manifest.spec["model"]["top_k"] == 2  # the --set reached the job

    # The driver joined this cluster (Ray records a driver only for a job that connected to it).
    assert client(head).get_job_info(job_id).driver_info is not None

    status = cli(head, "status", job_id, "--address", head.address)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout
    logs = cli(head, "logs", job_id, "--address", head.address)
    assert logs.returncode == 0 and f"{len(images)} (" in logs.stdout
    for output in (result, status, logs):
        assert head.token not in output.stdout + output.stderr


@pytest.mark.slow
def test_a_scheduled_night_runs_once_with_credentials_kept_out_of_sight(head, s3, tmp_path):
    fs, bucket, storage_options = s3
    images = write_samples(tmp_path / "images", photos=("china.jpg",), include_bad=False)
    output = {
        "url": f"s3://{bucket}/labels",
        "storage_options": {
            **storage_options,
            "key": FAKE_KEY_ID,
            "secret": FAKE_SECRET,
            "client_kwargs": {"region_name": "us-east-1"},
        },
    }
    spec = write_spec(tmp_path / "night.yaml", "night", str(tmp_path / "images"), output)
    # The head's environment has no AWS credentials: the job can write to S3 only with the ones from the spec.
    # --no-ship-code: the local head has the package installed, like a cluster built from our image.
    # --send-credentials: the user insists on sending them (they land in the job's runtime_env and Ray's logs).
    submit = ["submit", str(spec), "--address", head.address, "--scheduled-for", "2026-11-29", "--no-ship-code"]
    submit.append("--send-credentials")

    first = cli(head, *submit, "--wait")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted: night-2026-11-29" in first.stdout and "job night-2026-11-29: SUCCEEDED" in first.stdout
    second = cli(head, *submit, "--wait")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "already submitted: night-2026-11-29 (status SUCCEEDED)" in second.stdout

    output = OutputLocation.open(f"s3://{bucket}/labels", storage_options)
    (manifest,) = read_manifests(output)  # ran once
    assert dataset(output).count_rows() == len(images)

    logs = cli(head, "logs", "night-2026-11-29", "--address", head.address)
    stored = b"".join(fs.cat_file(path) for path in fs.find(f"{bucket}/labels") if not path.endswith(".parquet"))
    seen = "".join(r.stdout + r.stderr for r in (first, second, logs)) + json.dumps(manifest.spec) + stored.decode()
    for secret in (FAKE_SECRET, FAKE_KEY_ID, head.token):
        assert secret not in seen

    job = client(head).get_job_info(scheduled_submission_id("night", date(2026, 11, 29)))
    assert FAKE_SECRET not in job.entrypoint
    assert FAKE_SECRET in job.runtime_env["env_vars"]["FSSPEC_S3"]  # how they travelled: the job's runtime_env
    assert job.metadata["scheduled_for"] == "2026-11-29"


@pytest.mark.slow
def test_stop_ends_a_running_job(head, tmp_path):
    write_samples(tmp_path / "images", photos=("flower.jpg",), include_bad=False)
    spec = write_spec(tmp_path / "job.yaml", "to-stop", str(tmp_path / "images"), {"url": str(tmp_path / "out")})
    submitted = cli(head, "submit", str(spec), "--address", head.address, "--submission-id", "to-stop-1")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "submitted: to-stop-1" in submitted.stdout

    stopped = cli(head, "stop", "to-stop-1", "--address", head.address)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stop requested: to-stop-1" in stopped.stdout or "already ended" in stopped.stdout
    deadline = time.monotonic() + 60
    while "STOPPED" not in (status := cli(head, "status", "to-stop-1", "--address", head.address)).stdout:
        assert time.monotonic() < deadline, status.stdout + status.stderr
        time.sleep(1)
    assert not (tmp_path / "out" / "runs").exists() or read_manifests(OutputLocation.open(str(tmp_path / "out"))) == []


@pytest.mark.slow
def test_a_missing_wrong_or_unreadable_token_is_one_clear_line(head, tmp_path):
    wrong = "wrong-token-5a1e"
    cases = [
        (head.env(RAY_AUTH_TOKEN=None), [], 2, f"the Ray cluster at {head.address} requires a token"),
        (head.env(RAY_AUTH_TOKEN=wrong), [], 2, "rejected the token from RAY_AUTH_TOKEN"),
        (head.env(), ["--token-file", str(tmp_path / "nope")], 2, "cannot read the Ray token file"),
        (head.env(), [], 1, "no job no-such-job on the Ray cluster"),
    ]
    for env, extra, code, message in cases:
        result = cli(head, "status", "no-such-job", "--address", head.address, *extra, env=env, timeout=60)
        assert result.returncode == code, (message, result.stdout, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr and head.token not in result.stderr and wrong not in result.stderr

    (tmp_path / "token").write_text(head.token + "\n")
    token_file = ["--token-file", str(tmp_path / "token")]
    from_file = cli(
        head, "status", "no-such-job", "--address", head.address, *token_file, env=head.env(RAY_AUTH_TOKEN=None)
    )
    assert from_file.returncode == 1 and "no job no-such-job" in from_file.stderr

    unreachable = cli(head, "status", "x", "--address", f"http://127.0.0.1:{_free_port()}", timeout=60)
    assert unreachable.returncode == 1 and "cannot reach the Ray dashboard" in unreachable.stderr
    no_address = cli(head, "status", "x", timeout=60)
    assert no_address.returncode == 2 and "no cluster: pass --address" in no_address.stderr
