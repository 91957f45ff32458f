"""The shipped ImageNet class list and custom label files."""

from __future__ import annotations

import json

import pytest

from pipeline.model import LabelError, Labels, imagenet_labels


def test_imagenet_classes_ship_with_the_package():
    labels = imagenet_labels()
    wnids = [c.wnid for c in labels]
    assert len(labels) == 1000
    assert len(set(wnids)) == 1000
    assert wnids == sorted(wnids)  # Keras's class index order
    assert [c.class_id for c in labels] == list(range(1000))
    assert len({c.label for c in labels}) == 1000
    assert (labels[0].wnid, labels[0].label) == ("n01440764", "tench")
    assert (labels[207].wnid, labels[207].label) == ("n02099601", "golden retriever")
    assert (labels[281].wnid, labels[281].label) == ("n02123045", "tabby")
    assert (labels[954].wnid, labels[954].label) == ("n07753592", "banana")


def test_duplicate_imagenet_names_are_disambiguated_and_keep_their_wnid():
    labels = {c.wnid: c for c in imagenet_labels()}
    assert labels["n02012849"].label == "crane (bird)"
    assert labels["n03126707"].label == "crane (machine)"
    assert labels["n03710637"].label == "maillot (tights)"
    assert labels["n03710721"].label == "maillot (tank suit)"
    first_lemmas = [c.lemmas[0] for c in imagenet_labels()]
    assert first_lemmas.count("crane") == 2 and first_lemmas.count("maillot") == 2


def test_custom_labels_from_text_and_json(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("cat\ndog\n\nbird\n")
    assert [c.label for c in Labels.from_file(str(text))] == ["cat", "dog", "bird"]

    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))
    assert Labels.from_file(names.as_uri())[1].label == "dog"

    index = tmp_path / "imagenet_class_index.json"
    index.write_text(json.dumps({"0": ["n1", "cat"], "1": ["n2", "dog"]}))
    assert [(c.class_id, c.wnid, c.label) for c in Labels.from_file(str(index))] == [
        (0, "n1", "cat"),
        (1, "n2", "dog"),
    ]


def test_label_count_is_checked_against_the_model(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("cat\ndog\n")
    labels = Labels.from_file(str(path))
    assert labels.check(2) is labels
    with pytest.raises(LabelError, match="has 2 labels but the model predicts 10 classes"):
        labels.check(10)


def test_bad_label_files(tmp_path):
    repeated = tmp_path / "repeated.txt"
    repeated.write_text("cat\ncat\n")
    with pytest.raises(LabelError, match="repeated: cat"):
        Labels.from_file(str(repeated))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(LabelError, match="not valid JSON"):
        Labels.from_file(str(broken))
    with pytest.raises(LabelError, match="Could not read"):
        Labels.from_file(str(tmp_path / "missing.txt"))


def test_labels_from_s3(s3):
    fs, bucket, storage_options = s3
    fs.pipe(f"{bucket}/labels.txt", b"cat\ndog\n")
    labels = Labels.from_file(f"s3://{bucket}/labels.txt", storage_options)
    assert [c.label for c in labels] == ["cat", "dog"]
