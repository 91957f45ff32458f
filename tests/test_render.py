"""Manifests from the job specs: valid against KubeRay's own CRD schemas and the cluster-launcher schema that ships
with Ray, identical to the examples checked in under infra/, and free of credentials."""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.render import SHIPS_SPEC, TARGETS, RenderError, load_cluster, render
from pipeline.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
# KubeRay's CRD definitions: beside the checkout (../shared/reference/kuberay), or wherever KUBERAY_CRDS points.
KUBERAY = Path(os.environ.get("KUBERAY_CRDS") or ROOT.parent / "shared" / "reference" / "kuberay")
EXAMPLES = sorted([*ROOT.glob("infra/kuberay/*.yaml"), *ROOT.glob("infra/launcher/*.yaml")])
HEADER = "# Rendered by: "
FAKE_SECRET = "fake-secret-2f9c41d7"
FAKE_KEY_ID = "fake-key-id-88e0a5"

needs_crds = pytest.mark.skipif(
    not KUBERAY.is_dir(),
    reason=f"KubeRay CRD definitions not found at {KUBERAY} (../shared/reference/kuberay, or set KUBERAY_CRDS)",
)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema with unknown fields rejected, as `kubectl apply` does (strict field validation)."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(sub) for sub in schema[key]]
    return schema


@functools.cache
def crd_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    crd = yaml.safe_load((KUBERAY / f"ray.io_{kind.lower()}s.yaml").read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    return _strict(served["schema"]["openAPIV3Schema"])


def crd_errors(document: dict[str, Any]) -> list[str]:
    schema = crd_schema(document["kind"], document["apiVersion"].split("/")[1])
    validator = jsonschema.Draft4Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def pod_template_errors(template: dict[str, Any]) -> list[str]:
    """A pod template checked against the PodTemplateSpec schema embedded in the RayCluster CRD."""
    schema = crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"]["properties"]["template"]
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(template)]


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = {d["kind"]: d for d in documents}
    assert len(kinds) == len(documents), "one object of each kind"
    return kinds


def rendered(spec_name: str, target: str, *overrides: str):
    spec = load_spec(ROOT / "jobs" / f"{spec_name}.yaml", list(overrides))
    return spec, render(spec, target, load_cluster(ROOT / "infra" / "cluster.yaml"), "test")


def check_spec_config_map(documents: list[dict[str, Any]], spec) -> dict[str, Any]:
    config_map = by_kind(documents)["ConfigMap"]
    shipped = parse_spec(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert shipped.model_dump(exclude={"input", "output", "model"}) == spec.model_dump(
        exclude={"input", "output", "model"}
    )
    assert (shipped.input.url, shipped.output.url, shipped.model.weights) == (
        spec.input.url,
        spec.output.url,
        spec.model.weights,
    )
    return config_map


def check_head_mounts_spec(cluster_spec: dict[str, Any], config_map: dict[str, Any]) -> None:
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [{"name": "job-spec", "configMap": {"name": config_map["metadata"]["name"]}}]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/resnet-pipeline"


def check_not_exposed(cluster_spec: dict[str, Any]) -> None:
    head = cluster_spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert cluster_spec["authOptions"] == {"mode": "token"}


# --- KubeRay ------------------------------------------------------------------------------------------------------


@needs_crds
def test_raycluster_validates_and_scales_gpu_workers_from_the_spec():
    spec, result = rendered("backfill", "raycluster")
    (cluster,) = result.documents
    assert crd_errors(cluster) == []
    check_not_exposed(cluster["spec"])
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0
    assert groups["gpu"]["maxReplicas"] == spec.inference.actors.max  # one GPU per actor, one per pod
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@needs_crds
def test_a_cpu_spec_gets_no_gpu_group():
    _, result = rendered("demo", "raycluster")
    (cluster,) = result.documents
    assert crd_errors(cluster) == []
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["cpu"]


@needs_crds
def test_rayjob_validates_and_runs_the_shipped_spec():
    spec, result = rendered("backfill", "rayjob")
    kinds = by_kind(result.documents)
    job = kinds["RayJob"]
    assert crd_errors(job) == []
    assert job["spec"]["entrypoint"] == "python -m pipeline run /etc/resnet-pipeline/job.yaml --quiet"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_not_exposed(job["spec"]["rayClusterSpec"])
    check_head_mounts_spec(job["spec"]["rayClusterSpec"], check_spec_config_map(result.documents, spec))


@needs_crds
def test_raycronjob_validates_with_the_nightly_schedule():
    spec, result = rendered("nightly", "raycronjob")
    cron = by_kind(result.documents)["RayCronJob"]
    assert crd_errors(cron) == []
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Etc/UTC")
    assert yaml.safe_load(by_kind(result.documents)["ConfigMap"]["data"]["job.yaml"])["incremental"] is True
    check_head_mounts_spec(cron["spec"]["jobTemplate"]["rayClusterSpec"], check_spec_config_map(result.documents, spec))


@needs_crds
def test_cronjob_creates_one_valid_rayjob_per_night():
    spec, result = rendered("nightly", "cronjob")
    kinds = by_kind(result.documents)
    cron, config_map = kinds["CronJob"], kinds["ConfigMap"]
    # batch/v1 CronJob: no CRD to validate against, so its required fields, and its pod against PodTemplateSpec.
    assert (cron["apiVersion"], cron["metadata"]["name"]) == ("batch/v1", "nightly")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["timeZone"] == "Etc/UTC"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    template = cron["spec"]["jobTemplate"]["spec"]["template"]
    assert template["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert all(c["name"] and c["image"] for c in template["spec"]["containers"])
    assert pod_template_errors(template) == []
    # It may create RayJobs, and nothing else.
    assert kinds["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    assert kinds["RoleBinding"]["subjects"][0]["name"] == template["spec"]["serviceAccountName"]
    assert kinds["ServiceAccount"]["metadata"]["name"] == template["spec"]["serviceAccountName"]
    # The RayJob it creates: named after the night, valid once the date is filled in, as the pod's script does.
    script = template["spec"]["containers"][0]["command"][-1]
    assert "__RUN_DATE__" in script and "kubectl create -f" in script
    job = yaml.safe_load(config_map["data"]["rayjob.yaml"].replace("__RUN_DATE__", "2026-11-29"))
    assert job["metadata"]["name"] == job["spec"]["jobId"] == "nightly-2026-11-29"
    assert crd_errors(job) == []
    check_head_mounts_spec(job["spec"]["rayClusterSpec"], check_spec_config_map(result.documents, spec))


@needs_crds
def test_the_validation_catches_unknown_fields_and_wrong_types():
    _, result = rendered("backfill", "rayjob")
    job = by_kind(result.documents)["RayJob"]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["serviceTyp"] = "ClusterIP"
    assert any("serviceTyp" in e for e in crd_errors(typo))
    wrong = copy.deepcopy(job)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in crd_errors(wrong))


# --- cluster launcher ---------------------------------------------------------------------------------------------


def test_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    _, result = rendered("backfill", "launcher")
    (config,) = result.documents
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu"]["max_workers"] == 16
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]  # reached through `ray dashboard`
    assert all(
        "RAY_AUTH_MODE=token" in c
        for c in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]
    )
    broken = {**config, "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# --- checked-in examples, credentials, errors ---------------------------------------------------------------------


def render_cli(*args: str, cwd: Path = ROOT):
    import os

    previous = Path.cwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, ["render", *args])
    finally:
        os.chdir(previous)


def test_examples_cover_every_target():
    targets = set()
    for path in EXAMPLES:
        words = shlex.split(path.read_text().splitlines()[0].removeprefix(HEADER))
        targets.add(words[words.index("--target") + 1])
    assert targets == set(TARGETS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_checked_in_examples_are_up_to_date(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(HEADER), f"{path} does not say how it was rendered"
    words = shlex.split(first.removeprefix(HEADER))
    assert words[:2] == ["resnet-pipeline", "render"]
    result = render_cli(*words[2:])
    assert result.exit_code == 0, result.output
    assert result.stdout == path.read_text(), (
        f"{path.relative_to(ROOT)} is out of date: run `{first.removeprefix(HEADER)} -o {path.relative_to(ROOT)}`"
    )


@pytest.mark.parametrize("target", TARGETS)
def test_credentials_in_the_spec_never_reach_a_manifest(target):
    args = [
        "jobs/nightly.yaml",
        "--target",
        target,
        "--set",
        "input.storage_options.endpoint_url=http://minio.internal:9000",
        "--set",
        f"input.storage_options.key={FAKE_KEY_ID}",
        "--set",
        f"output.storage_options.secret={FAKE_SECRET}",
    ]
    result = render_cli(*args)
    assert result.exit_code == 0, result.output
    assert FAKE_SECRET not in result.output and FAKE_KEY_ID not in result.output  # stdout, stderr, header alike
    if target in SHIPS_SPEC:
        assert "input.storage_options.key, output.storage_options.secret" in result.stderr
        config_map = yaml.safe_load(
            next(d for d in yaml.safe_load_all(result.stdout) if d["kind"] == "ConfigMap")["data"]["job.yaml"]
        )
        assert config_map["input"]["storage_options"] == {"endpoint_url": "http://minio.internal:9000"}


def test_render_writes_a_file_and_refuses_bad_settings(tmp_path):
    out = tmp_path / "deep" / "nightly.yaml"
    result = render_cli(
        "jobs/nightly.yaml",
        "--target",
        "raycronjob",
        "--schedule",
        "30 1 * * *",
        "--time-zone",
        "Europe/Berlin",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    cron = next(d for d in yaml.safe_load_all(out.read_text()) if d["kind"] == "RayCronJob")
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("30 1 * * *", "Europe/Berlin")

    for args, message in [
        (["--target", "helm"], "--target must be one of"),
        (["--target", "raycronjob", "--schedule", "nightly"], "five fields"),
        (["--target", "raycronjob", "--time-zone", "Mars/Olympus"], "unknown time zone"),
        (["--target", "rayjob", "--cluster-set", "gpu_workers.gpu=2"], "gpu_workers.gpu: unknown field"),
        (["--target", "rayjob", "--set", "inference.batch_size=0"], "inference.batch_size"),
        (["--target", "rayjob", "--cluster-set", "gpu_workers.max_replicas=true"], "gpu_workers.max_replicas"),
    ]:
        result = render_cli("jobs/nightly.yaml", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and "Traceback" not in result.output


def test_load_cluster_reports_a_missing_file(tmp_path):
    with pytest.raises(RenderError, match="cluster file not found"):
        load_cluster(tmp_path / "nope.yaml")


# --- job specs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nightly", "backfill", "demo"])
def test_job_specs_validate(name):
    path = ROOT / "jobs" / f"{name}.yaml"
    spec = load_spec(path)
    assert spec.name == name
    assert "#" in path.read_text().splitlines()[0], "a spec starts by saying what it is for"
    if name == "nightly":
        assert spec.incremental is True and spec.inference.gpus_per_actor == 1
    if name == "backfill":
        assert spec.incremental is False and spec.inference.actors.max > 1
    if name == "demo":
        assert spec.inference.gpus_per_actor == 0
