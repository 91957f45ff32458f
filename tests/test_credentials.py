"""One rule for credentials: the key names, values that hold one, and redaction of documents, --set words and URLs."""

from __future__ import annotations

import copy

import pytest

from pipeline.credentials import (
    REDACTED,
    holds_secret,
    is_secret_key,
    redact,
    redact_assignment,
    redact_url,
    without_redacted,
)

DOCUMENT = {
    "input": {
        "url": "s3://in/",
        "storage_options": {"endpoint_url": "http://minio:9000", "key": "AKIAEXAMPLE", "secret": "s3cr3t"},
    },
    "output": {
        "storage_options": {
            "client_kwargs": {"aws_session_token": "tok-123", "region_name": "eu-west-1"},
            "account_key": "azure-key",
            "sas_token": "sv=2024",
            "anon": False,
        }
    },
    "model": {"storage_options": {"token": None, "password": ""}},
    "tags": [{"Password": "pw"}, "plain"],
}


@pytest.mark.parametrize(
    "name",
    [
        "key",
        "KEY",
        "secret",
        "aws_secret_access_key",
        "aws_session_token",
        "token",
        "password",
        "passwd",
        "credentials",
        "private_key",
        "access_key",
        "account_key",
        "sas_token",
        "SAS",
        "api_key",
        "connection_string",  # adlfs: "DefaultEndpointsProtocol=https;AccountName=...;AccountKey=..."
    ],
)
def test_credential_like_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["", "key_prefix", "keys", "my_key", "endpoint_url", "region_name", "project", "anon"])
def test_harmless_names(name):
    """``key`` counts only as the whole name: ``key_prefix`` and the like are options, not credentials."""
    assert not is_secret_key(name)


def test_a_secret_is_found_anywhere_inside_a_value():
    assert holds_secret({"client_kwargs": {"aws_session_token": "T"}})
    assert holds_secret([{"secret": "S"}])
    assert holds_secret("S", key="account_key")
    assert not holds_secret("S")  # a value alone, under no key
    assert not holds_secret({"client_kwargs": {"region_name": "x"}, "key_prefix": "p"})


@pytest.mark.parametrize("empty", [None, ""])
def test_an_empty_credential_is_no_credential(empty):
    assert not holds_secret({"key": empty, "client_kwargs": {"token": empty}})
    assert not holds_secret(empty, key="secret")


def test_redact_replaces_credentials_at_any_depth_and_keeps_the_rest():
    original = copy.deepcopy(DOCUMENT)
    redacted = redact(DOCUMENT)
    assert original == DOCUMENT  # a copy: the spec keeps its values for fsspec
    assert redacted["input"]["storage_options"] == {
        "endpoint_url": "http://minio:9000",
        "key": REDACTED,
        "secret": REDACTED,
    }
    output = redacted["output"]["storage_options"]
    assert output["client_kwargs"] == {"aws_session_token": REDACTED, "region_name": "eu-west-1"}
    assert output["account_key"] == output["sas_token"] == REDACTED and output["anon"] is False
    assert redacted["model"]["storage_options"] == {"token": None, "password": ""}  # nothing to hide
    assert redacted["tags"] == [{"Password": REDACTED}, "plain"]


@pytest.mark.parametrize(
    "document",
    [DOCUMENT, {"a": {"b": [1, {"c": "x"}]}}, {"key_prefix": "p"}, {"client_kwargs": {"token": "t"}}, [{"sas": "s"}]],
)
def test_detection_and_redaction_follow_one_rule(document):
    """A document holds a credential exactly when redaction changes it."""
    assert holds_secret(document) == (redact(document) != document)


def test_without_redacted_leaves_out_what_redact_hid():
    restored = without_redacted(redact(DOCUMENT))
    assert restored["input"]["storage_options"] == {"endpoint_url": "http://minio:9000"}
    assert restored["output"]["storage_options"] == {"client_kwargs": {"region_name": "eu-west-1"}, "anon": False}
    assert restored["model"] == DOCUMENT["model"]


@pytest.mark.parametrize(
    ("assignment", "shown"),
    [
        ("input.storage_options.secret=s3cr3t", "input.storage_options.secret=***"),
        ("a.b.key=AKIA", "a.b.key=***"),
        (
            "output.storage_options.client_kwargs.aws_session_token=t",
            "output.storage_options.client_kwargs.aws_session_token=***",
        ),
        ("output.storage_options.sas_token=a=b&c=d", "output.storage_options.sas_token=***"),  # '=' in the value
        ("output.storage_options.account_key=", "output.storage_options.account_key=***"),
        ("token=t", "token=***"),
        ("a.key_prefix=photos/", "a.key_prefix=photos/"),
        ("secret.region=x", "secret.region=x"),  # only the last key counts
        ("inference.batch_size=64", "inference.batch_size=64"),
        ("a.secret", "a.secret"),  # no value: nothing to hide
    ],
)
def test_a_set_assignment_is_shown_without_its_credential(assignment, shown):
    assert redact_assignment(assignment) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://AKIA123:s3cr3t@bucket/model.h5", "s3://bucket/model.h5"),
        ("https://user:pw@host:8443/w.h5", "https://host:8443/w.h5"),
        ("s3://AKIA123@bucket/model.h5", "s3://bucket/model.h5"),
        ("s3://bucket/model.h5", "s3://bucket/model.h5"),
        ("/local/model.h5", "/local/model.h5"),
    ],
)
def test_urls_are_recorded_without_credentials(url, shown):
    assert redact_url(url) == shown
