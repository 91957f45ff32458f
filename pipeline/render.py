"""Cluster manifests rendered from a job spec: KubeRay RayCluster, RayJob and RayCronJob, a Kubernetes CronJob that
creates one RayJob per night (for clusters without RayCronJob), and a Ray cluster-launcher config.

The job spec says what to compute; a cluster file (``ClusterConfig``, e.g. ``infra/cluster.yaml``) says where and
when: images, pod sizes, GPU nodes, namespace, where storage credentials come from, the nightly schedule. Sizes
follow the spec: the GPU worker group grows to as many nodes as the actor pool can use.

The spec reaches the pods as a ConfigMap mounted on the head, where the RayJob's entrypoint runs. Nothing is
exposed beyond the cluster (ClusterIP services, no ingress), Ray's token authentication is on (KubeRay creates and
distributes the token), and storage credentials come from an optional Secret (``envFrom``) or the service account's
workload identity; any found in the spec are left out of the manifests.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.spec import JobSpec, apply_override

TARGETS = ("rayjob", "raycronjob", "cronjob", "raycluster", "launcher")
SHIPS_SPEC = ("rayjob", "raycronjob", "cronjob")  # the others describe a cluster, not a job
SPEC_DIR = "/etc/resnet-pipeline"
ENTRYPOINT = f"python -m pipeline run {SPEC_DIR}/job.yaml --quiet"
RUN_DATE = "__RUN_DATE__"  # replaced by the CronJob's pod with the night's date (in the schedule's time zone)


class RenderError(ValueError):
    """A cluster file or option that cannot be rendered; the message names the field."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)  # as the job spec: no coercion


class PodSize(_Config):
    cpu: str = Field("4", description="Kubernetes CPU quantity, requested and limited.")
    memory: str = Field("16Gi", description="Kubernetes memory quantity, requested and limited.")


class GpuWorkers(PodSize):
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = Field(1, ge=1, description="GPUs per worker pod.")
    max_replicas: int | None = Field(None, ge=1, description="Default: as many as the spec's actor pool can use.")
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.product": "NVIDIA-L4"}, description="Picks the GPU type."
    )


class CpuWorkers(PodSize):
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(4, ge=1)


class Schedule(_Config):
    cron: str = Field("0 2 * * *", description="Five-field cron expression.")
    time_zone: str = Field("Etc/UTC", description="IANA time zone of the cron expression and of the run date.")

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"a cron expression has five fields (minute hour day month weekday), got {value!r}")
        return value

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (IANA names, e.g. Europe/Berlin)") from None
        return value


class Launcher(_Config):
    region: str = "us-west-2"
    head_instance_type: str = "m6i.2xlarge"
    gpu_instance_type: str = "g6.2xlarge"
    cpu_instance_type: str = "c6i.4xlarge"
    instance_profile_arn: str | None = Field(None, description="IAM role of the nodes: how they reach storage.")


class ClusterConfig(_Config):
    cluster_name: str = Field("resnet-pipeline", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: str = Field("resnet-pipeline", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    ray_version: str = "2.60.0"
    gpu_image: str = "ghcr.io/example/resnet-pipeline:0.1.0-gpu"
    cpu_image: str = Field("ghcr.io/example/resnet-pipeline:0.1.0-cpu", description="Head, CPU workers, CronJob.")
    head: PodSize = Field(default_factory=lambda: PodSize(cpu="2", memory="8Gi"))
    gpu_workers: GpuWorkers = Field(default_factory=GpuWorkers)
    cpu_workers: CpuWorkers = Field(default_factory=CpuWorkers)
    idle_timeout_seconds: int = Field(300, ge=0, description="An idle worker pod is removed after this long.")
    storage_secret: str | None = Field("resnet-pipeline-storage", description="Secret with storage env vars.")
    service_account: str | None = Field(None, description="For the cloud's workload identity (IRSA, GKE WI).")
    schedule: Schedule = Field(default_factory=Schedule)
    deadline_seconds: int = Field(8 * 3600, ge=60, description="A job running longer than this is stopped.")
    launcher: Launcher = Field(default_factory=Launcher)


def load_cluster(path: str | Path | None = None, overrides: list[str] = ()) -> ClusterConfig:
    """The cluster file (defaults for anything it leaves out), with ``key.sub=value`` overrides."""
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise RenderError(f"cluster file not found: {path}") from None
        except yaml.YAMLError as error:
            raise RenderError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(document, dict):
            raise RenderError(f"{path}: a cluster file is a mapping (namespace:, gpu_image: ...)")
    for assignment in overrides:
        apply_override(document, assignment)
    try:
        return ClusterConfig.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in error.errors()
        )
        raise RenderError(f"invalid cluster settings: {problems}") from None


@dataclass
class Rendered:
    documents: list[dict[str, Any]]
    text: str
    left_out: list[str] = field(default_factory=list)  # credential options found in the spec, never rendered


def k8s_name(name: str, limit: int = 30) -> str:
    """A DNS-1123 label from a job name, short enough for the date and the suffixes KubeRay appends."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:limit].rstrip("-")
    return cleaned or "labeling"


class _Literal(str):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, "|"))


def _dump(documents: list[dict[str, Any]]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)


class _Manifests:
    """Builds each target's objects; one instance per spec and cluster file."""

    def __init__(self, spec: JobSpec, config: ClusterConfig) -> None:
        from pipeline.cluster import split_credentials

        self.spec, self.config = spec, config
        self.name = k8s_name(spec.name)
        self.document, _, self.left_out = split_credentials(spec)
        self.labels = {"app.kubernetes.io/name": "resnet-pipeline", "app.kubernetes.io/instance": self.name}

    def _meta(self, name: str) -> dict[str, Any]:
        return {"name": name, "namespace": self.config.namespace, "labels": dict(self.labels)}

    def spec_config_map(self, extra: dict[str, str] | None = None) -> dict[str, Any]:
        data = {"job.yaml": _Literal(yaml.safe_dump(self.document, sort_keys=False))}
        data.update({key: _Literal(value) for key, value in (extra or {}).items()})
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._meta(f"{self.name}-spec"), "data": data}

    def _pod(
        self, container: str, image: str, size: PodSize, *, gpus: int = 0, mount_spec: bool = False
    ) -> dict[str, Any]:
        amounts = {"cpu": size.cpu, "memory": size.memory}
        limits = {**amounts, "nvidia.com/gpu": gpus} if gpus else dict(amounts)
        body: dict[str, Any] = {
            "name": container,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "resources": {"requests": amounts, "limits": limits},
            "securityContext": {"allowPrivilegeEscalation": False},
        }
        pod: dict[str, Any] = {"containers": [body]}
        if self.config.storage_secret:  # optional: with workload identity the Secret need not exist
            body["envFrom"] = [{"secretRef": {"name": self.config.storage_secret, "optional": True}}]
        if self.config.service_account:
            pod["serviceAccountName"] = self.config.service_account
        if gpus:
            pod["nodeSelector"] = dict(self.config.gpu_workers.node_selector)
            pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if mount_spec:
            body["volumeMounts"] = [{"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True}]
            pod["volumes"] = [{"name": "job-spec", "configMap": {"name": f"{self.name}-spec"}}]
        return {"metadata": {"labels": dict(self.labels)}, "spec": pod}

    def gpu_replicas(self) -> int:
        """GPU worker pods the actor pool can use: 0 when the spec runs on CPUs."""
        inference, workers = self.spec.inference, self.config.gpu_workers
        if inference.gpus_per_actor == 0:
            return 0
        return workers.max_replicas or math.ceil(inference.actors.max * inference.gpus_per_actor / workers.gpus)

    def ray_cluster_spec(self, mount_spec: bool) -> dict[str, Any]:
        config = self.config
        workers = []
        if gpu_replicas := self.gpu_replicas():
            gpu = config.gpu_workers
            workers.append(
                {
                    "groupName": "gpu",
                    "minReplicas": 0,
                    "maxReplicas": gpu_replicas,
                    "rayStartParams": {},
                    "template": self._pod("ray-worker", config.gpu_image, gpu, gpus=gpu.gpus),
                }
            )
        cpu = config.cpu_workers
        workers.append(
            {
                "groupName": "cpu",
                "minReplicas": cpu.min_replicas,
                "maxReplicas": max(cpu.max_replicas, cpu.min_replicas),
                "rayStartParams": {},
                "template": self._pod("ray-worker", config.cpu_image, cpu),
            }
        )
        return {
            "rayVersion": config.ray_version,
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": config.idle_timeout_seconds},
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "serviceType": "ClusterIP",
                "enableIngress": False,
                # The head only drives (lists, plans, commits); tasks and actors go to the workers.
                "rayStartParams": {"num-cpus": "0"},
                "template": self._pod("ray-head", config.cpu_image, config.head, mount_spec=mount_spec),
            },
            "workerGroupSpecs": workers,
        }

    def ray_job_spec(self, job_id: str | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "entrypoint": ENTRYPOINT,
            "metadata": {"job": self.spec.name},
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 24 * 3600,
            "activeDeadlineSeconds": self.config.deadline_seconds,
            "backoffLimit": 0,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": self.ray_cluster_spec(mount_spec=True),
        }
        if job_id:
            spec["jobId"] = job_id
        return spec

    def _ray_object(self, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "ray.io/v1", "kind": kind, "metadata": self._meta(name), "spec": spec}

    def ray_job(self, name: str, job_id: str | None = None) -> dict[str, Any]:
        return self._ray_object("RayJob", name, self.ray_job_spec(job_id))

    # --- targets ---

    def rayjob(self) -> list[dict[str, Any]]:
        return [self.spec_config_map(), self.ray_job(self.name)]

    def raycluster(self) -> list[dict[str, Any]]:
        return [self._ray_object("RayCluster", self.config.cluster_name, self.ray_cluster_spec(mount_spec=False))]

    def raycronjob(self) -> list[dict[str, Any]]:
        schedule = self.config.schedule
        cron = {"schedule": schedule.cron, "timeZone": schedule.time_zone, "jobTemplate": self.ray_job_spec()}
        return [self.spec_config_map(), self._ray_object("RayCronJob", self.name, cron)]

    def cronjob(self) -> list[dict[str, Any]]:
        """A batch/v1 CronJob whose pod creates ``<name>-<date>``: one RayJob per night, even if the pod retries."""
        scheduler = f"{self.name}-scheduler"
        run_name = f"{self.name}-{RUN_DATE}"
        template = _dump([self.ray_job(run_name, job_id=run_name)])
        script = "\n".join(
            [
                "set -eu",
                'day="$(date +%Y-%m-%d)"',
                f'name="{self.name}-$day"',
                f'sed "s/{RUN_DATE}/$day/g" {SPEC_DIR}/rayjob.yaml > /tmp/rayjob.yaml',
                'if kubectl create -f /tmp/rayjob.yaml; then echo "submitted: $name"',
                'elif kubectl get rayjob "$name" > /dev/null; then echo "already submitted: $name"',
                "else exit 1; fi",
            ]
        )
        container = {
            "name": "create-rayjob",
            "image": self.config.cpu_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/bin/sh", "-c", _Literal(script + "\n")],
            "env": [{"name": "TZ", "value": self.config.schedule.time_zone}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
            "securityContext": {"allowPrivilegeEscalation": False},
            "volumeMounts": [{"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True}],
        }
        pod_spec = {
            "serviceAccountName": scheduler,
            "restartPolicy": "Never",
            "containers": [container],
            "volumes": [{"name": "job-spec", "configMap": {"name": f"{self.name}-spec"}}],
        }
        cron = {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": self._meta(self.name),
            "spec": {
                "schedule": self.config.schedule.cron,
                "timeZone": self.config.schedule.time_zone,
                "concurrencyPolicy": "Forbid",
                "startingDeadlineSeconds": 3600,
                "successfulJobsHistoryLimit": 3,
                "failedJobsHistoryLimit": 3,
                "jobTemplate": {
                    "spec": {
                        "backoffLimit": 3,
                        "template": {"metadata": {"labels": dict(self.labels)}, "spec": pod_spec},
                    }
                },
            },
        }
        rbac_subject = [{"kind": "ServiceAccount", "name": scheduler, "namespace": self.config.namespace}]
        return [
            self.spec_config_map({"rayjob.yaml": template}),
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": self._meta(scheduler)},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": self._meta(scheduler),
                "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": self._meta(scheduler),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": scheduler},
                "subjects": rbac_subject,
            },
            cron,
        ]

    def launcher(self) -> list[dict[str, Any]]:
        """An AWS cluster for ``ray up``: the dashboard listens on the head's loopback only (reach it with
        ``ray dashboard``, an SSH tunnel), token authentication is on with the token file copied from the machine
        that runs ``ray up``, and the nodes reach storage through their IAM instance profile."""
        config, launcher = self.config, self.config.launcher
        gpu_replicas = self.gpu_replicas()
        cpu_replicas = config.cpu_workers.max_replicas

        def node(instance_type: str) -> dict[str, Any]:
            node_config: dict[str, Any] = {"InstanceType": instance_type}
            if launcher.instance_profile_arn:
                node_config["IamInstanceProfile"] = {"Arn": launcher.instance_profile_arn}
            return node_config

        head = {"node_config": node(launcher.head_instance_type), "resources": {"CPU": 0}}
        node_types: dict[str, Any] = {"head": head}
        if gpu_replicas:
            node_types["gpu"] = {
                "min_workers": 0,
                "max_workers": gpu_replicas,
                "node_config": node(launcher.gpu_instance_type),
                "resources": {},
                "docker": {"worker_image": config.gpu_image},
            }
        node_types["cpu"] = {
            "min_workers": config.cpu_workers.min_replicas,
            "max_workers": cpu_replicas,
            "node_config": node(launcher.cpu_instance_type),
            "resources": {},
        }
        token_auth = "RAY_AUTH_MODE=token"
        return [
            {
                "cluster_name": config.cluster_name,
                "max_workers": gpu_replicas + cpu_replicas,
                "idle_timeout_minutes": max(1, config.idle_timeout_seconds // 60),
                "provider": {"type": "aws", "region": launcher.region, "cache_stopped_nodes": False},
                "auth": {"ssh_user": "ubuntu"},
                "docker": {
                    "image": config.cpu_image,
                    "container_name": "ray_container",
                    "pull_before_run": True,
                    "run_options": ["--ulimit nofile=65536:65536"],
                },
                # Copied from the machine running `ray up` (create it with `ray get-auth-token --generate`).
                "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
                "available_node_types": node_types,
                "head_node_type": "head",
                "head_start_ray_commands": [
                    "ray stop",
                    f"{token_auth} ray start --head --port=6379 --dashboard-host=127.0.0.1"
                    " --autoscaling-config=~/ray_bootstrap_config.yaml",
                ],
                "worker_start_ray_commands": ["ray stop", f"{token_auth} ray start --address=$RAY_HEAD_IP:6379"],
            }
        ]


def render(spec: JobSpec, target: str, config: ClusterConfig, command: str) -> Rendered:
    """The target's manifests as objects and as YAML text headed by the command that renders them."""
    if target not in TARGETS:
        raise RenderError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    manifests = _Manifests(spec, config)
    documents = getattr(manifests, target)()
    header = (
        f"# Rendered by: {command}\n"
        "# Do not edit: change the job spec or the cluster file and render again (a test checks this file).\n"
    )
    return Rendered(documents, header + _dump(documents), manifests.left_out if target in SHIPS_SPEC else [])
