"""The job spec: validation that names the field, --set overrides, and redaction of credentials."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.model.resnet import embedding_dim
from pipeline.spec import DEPTHS, JobSpec, SpecError, load_spec, parse_spec, read_yaml

MINIMAL = {"input": "s3://bucket/images/", "output": "s3://bucket/labels/"}


def test_defaults_and_shorthand():
    spec = parse_spec(MINIMAL)
    assert spec.input.url == "s3://bucket/images/" and spec.input.format == "auto"
    assert spec.model.architecture == "resnet50" and spec.model.weights == "imagenet" and spec.model.top_k == 5
    assert spec.decode.preprocessing == "crop" and spec.decode.image_size == 224
    assert spec.inference.batch_size == 32 and spec.inference.precision == "float32"
    assert spec.output.embedding_dtype == "float32"


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "model": {"top_k": 5}}))
    spec = load_spec(
        path,
        [
            "model.top_k=3",
            "model.depth=18",
            "inference.actors.max=4",
            "inference.gpus_per_actor=0.5",
            "input.storage_options.endpoint_url=http://127.0.0.1:9000/?a=b",
            "model.allow_download=true",
        ],
    )
    assert spec.model.top_k == 3 and spec.model.architecture == "resnet18"
    assert spec.inference.actors.max == 4 and spec.inference.gpus_per_actor == 0.5
    assert spec.input.storage_options == {"endpoint_url": "http://127.0.0.1:9000/?a=b"}
    assert spec.model.allow_download is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.topk=3"], r"model\.topk: unknown field"),
        (["inference.batch_size=lots"], r"inference\.batch_size: .*integer.*\(got 'lots'\)"),
        (["model.depth=42"], r"model\.depth: .*\(got 42\)"),
        (["output.embedding_dtype=float64"], r"output\.embedding_dtype: .*'float32'.*\(got 'float64'\)"),
        (["inference.actors.min=3", "inference.actors.max=2"], r"inference\.actors: .*max \(2\) must be >= min \(3\)"),
        (["decode.preprocessing=stretch"], r"decode\.preprocessing"),
        (["model.top_k=0"], r"model\.top_k: .*greater than or equal to 1"),
        (["model=3"], r"model: "),
        (["nonsense"], r"--set expects KEY=VALUE"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(MINIMAL, overrides)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"inference": {"batch_size": True}}, r"inference\.batch_size: .*integer.*\(got True\)"),
        ({"inference": {"actors": {"max": True}}}, r"inference\.actors\.max: .*integer"),
        ({"inference": {"gpus_per_actor": True}}, r"inference\.gpus_per_actor: .*number.*\(got True\)"),
        ({"inference": {"batch_size": "32"}}, r"inference\.batch_size: .*integer.*\(got '32'\)"),
        ({"inference": {"batch_size": 2.5}}, r"inference\.batch_size: .*integer"),
        ({"model": {"allow_download": "yes please"}}, r"model\.allow_download: .*boolean"),
        ({"model": {"allow_download": 1}}, r"model\.allow_download: .*boolean"),
        ({"incremental": "true"}, r"incremental: .*boolean"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(document, message):
    """A boolean is not 1, a string is not a number: what a typo in a spec would otherwise turn into a silent run."""
    with pytest.raises(SpecError, match=message):
        parse_spec({**MINIMAL, **document})


def test_numbers_still_widen_where_the_field_is_a_float():
    spec = parse_spec(MINIMAL, ["inference.actor_memory_gb=4", "max_error_fraction=1", "inference.gpus_per_actor=1"])
    assert spec.inference.actor_memory_gb == 4.0 and spec.max_error_fraction == 1.0
    assert spec.inference.gpus_per_actor == 1.0


def test_missing_sections():
    with pytest.raises(SpecError, match=r"output: Field required"):
        parse_spec({"input": "/data"})
    with pytest.raises(SpecError, match=r"input: Field required"):
        parse_spec({})


def test_bad_files(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="a job spec is a mapping"):
        load_spec(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("input: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "broken.yaml")


def test_credentials_are_redacted_but_still_used():
    spec = parse_spec(
        MINIMAL,
        [
            "input.storage_options.key=AKIAEXAMPLE",
            "input.storage_options.secret=s3cr3t-value",
            "input.storage_options.endpoint_url=http://minio:9000",
            "output.storage_options.client_kwargs.aws_session_token=tok-123",
            "output.storage_options.account_key=azure-key",
        ],
    )
    assert spec.input.storage_options["secret"] == "s3cr3t-value"  # passed to fsspec as given
    text = json.dumps(spec.redacted())
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-123", "azure-key"):
        assert secret not in text
    assert spec.redacted()["input"]["storage_options"]["endpoint_url"] == "http://minio:9000"
    assert JobSpec.model_validate(spec.model_dump()) == spec


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_embedding_dim_known_without_building_the_model(depth):
    assert parse_spec(MINIMAL, [f"model.depth={depth}"]).model.embedding_dim == embedding_dim(DEPTHS[depth])


def test_decode_on_is_a_key_not_a_boolean(tmp_path):
    """YAML 1.1 reads ``on``, ``off``, ``yes``, ``no`` as booleans; a spec is read with YAML 1.2's true/false only."""
    path = tmp_path / "job.yaml"
    path.write_text("input: in\noutput: out\ndecode:\n  on: actor\nmodel:\n  allow_download: true\n")
    spec = load_spec(path)
    assert spec.decode.on == "actor" and spec.model.allow_download is True
    assert parse_spec(MINIMAL, ["decode.on=auto"]).decode.on == "auto"
    with pytest.raises(SpecError, match=r"model\.allow_download: Input should be a valid boolean"):
        parse_spec(MINIMAL, ["model.allow_download=yes"])  # a string, refused by name, not silently True


def test_the_example_spec_lists_every_field_with_its_default():
    from pathlib import Path

    path = Path(__file__).parents[1] / "jobs" / "example.yaml"
    document = read_yaml(path.read_text())
    spec = load_spec(path)
    defaults = parse_spec({"input": spec.input.url, "output": spec.output.url})
    assert spec == defaults  # every value shown is the default, apart from the URLs

    def keys(value, prefix=""):
        if isinstance(value, dict) and not prefix.endswith("storage_options"):
            return {k for key, v in value.items() for k in keys(v, f"{prefix}.{key}".lstrip("."))} | {prefix}
        return {prefix}

    assert keys(document) == keys(spec.model_dump())  # no field left out
