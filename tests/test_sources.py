"""Listing and reading each input layout, from local disk and from the S3 server."""

from __future__ import annotations

import fsspec
import pytest

from pipeline.samples import PHOTOS, VARIANTS, photo
from pipeline.sources import InputError, Shard, list_shards, read_shard
from tests.layouts import LAYOUTS, write_layout


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    picture = photo(PHOTOS[0])
    return {name: VARIANTS[name](picture) for name in ("photo.jpg", "photo.png", "gray.jpg", "small.jpg", "rgba.png")}


def read_all(shards: list[Shard], options: dict) -> dict[str, bytes]:
    records = [record for shard in shards for record in read_shard(shard, options)]
    assert all(record.error is None for record in records), [r.error for r in records]
    ids = [record.image_id for record in records]
    assert len(ids) == len(set(ids))
    return {record.image_id: record.data for record in records}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_local_layouts(layout, images, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = str(tmp_path / "input")
    expected = write_layout(layout, fs, root, root, images)
    shards = list_shards(root).shards
    assert {shard.format for shard in shards} == {layout}
    assert len(shards) == (len(images) if layout == "images" else 2)
    assert all(shard.size and shard.etag for shard in shards)
    assert read_all(shards, {}) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_s3_layouts(layout, images, s3):
    fs, bucket, storage_options = s3
    root = f"{bucket}/{layout}"
    expected = write_layout(layout, fs, root, f"s3://{root}", images)
    shards = list_shards(f"s3://{root}/", "auto", storage_options).shards
    assert {shard.format for shard in shards} == {layout}
    assert all(shard.url.startswith(f"s3://{root}/") for shard in shards)
    assert all(shard.etag for shard in shards)  # S3 ETags, for incremental runs
    assert read_all(shards, {"storage_options": storage_options}) == expected


def test_globs_formats_and_hidden_paths(images, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = str(tmp_path / "input")
    write_layout("images", fs, root, root, images)
    fs.pipe_file(f"{root}/folder0/.hidden.jpg", images["photo.jpg"])
    fs.pipe_file(f"{root}/_staging/partial.jpg", images["photo.jpg"])
    fs.pipe_file(f"{root}/notes.txt", b"not an image")
    assert len(list_shards(root).shards) == len(images)
    assert [s.url.rsplit("/", 1)[1] for s in list_shards(f"{root}/*/*.png").shards] == ["photo.png", "rgba.png"]
    with pytest.raises(InputError, match="no parquet shards found"):
        list_shards(root, "parquet")


def test_mixed_layouts_need_a_format(images, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = str(tmp_path / "input")
    write_layout("images", fs, f"{root}/a", f"{root}/a", images)
    write_layout("webdataset", fs, f"{root}/b", f"{root}/b", images)
    with pytest.raises(InputError, match="mixes layouts"):
        list_shards(root)
    assert {s.format for s in list_shards(root, "webdataset").shards} == {"webdataset"}


def test_missing_and_empty_inputs_name_the_url(tmp_path, s3):
    with pytest.raises(InputError, match=f"nothing found at {tmp_path}/nope"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images or shards found"):
        list_shards(str(tmp_path / "empty"))
    _, bucket, storage_options = s3
    with pytest.raises(InputError, match=f"s3://{bucket}/missing"):
        list_shards(f"s3://{bucket}/missing/", "auto", storage_options)
    with pytest.raises(InputError, match="nothing found at s3://no-such-bucket/x/"):
        list_shards("s3://no-such-bucket/x/", "auto", storage_options)


@pytest.mark.slow
def test_an_unreachable_store_names_the_url(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    # One attempt per botocore call, not its default retries (s3fs's own still apply): 10 s here instead of 50.
    options = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    with pytest.raises(InputError, match="cannot list s3://bucket/x/: Could not connect"):
        list_shards("s3://bucket/x/", "auto", options)


def test_a_truncated_tar_keeps_its_good_members_and_reports_the_rest(images, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = str(tmp_path / "input")
    write_layout("webdataset", fs, root, root, images)
    shard = list_shards(root).shards[0]
    data = fs.cat_file(shard.url)
    fs.pipe_file(shard.url, data[: len(data) // 2])
    records = list(read_shard(Shard(shard.url, "webdataset"), {}))
    assert records[-1].error and "unreadable shard" in records[-1].error
    assert records[-1].image_id == f"{shard.url}#unreadable"
    assert any(record.error is None for record in records)


def test_parquet_columns_can_be_named(images, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"uid": ["a", "b"], "pixels_encoded": [images["photo.jpg"], None]}), path)
    shard = Shard(str(path), "parquet")
    records = list(read_shard(shard, {"image_column": "pixels_encoded", "id_column": "uid"}))
    assert [r.image_id for r in records] == [f"{path}#a", f"{path}#b"]
    assert records[0].data == images["photo.jpg"] and records[1].error == "no image bytes (null)"
    missing = list(read_shard(shard, {}))
    assert len(missing) == 1 and "has no image column: set input.image_column" in missing[0].error


def test_a_remote_prefix_is_listed_folder_by_folder_with_nothing_missed(s3):
    from pipeline.sources import find_files

    fs, bucket, _ = s3
    names = ["top.jpg", "only/deeper/a.jpg", "only/deeper/b/c.jpg", "only/x.jpg"]
    names += [f"many/{folder}/{index}.jpg" for folder in range(5) for index in range(3)]
    fs.pipe({f"{bucket}/in/{name}": b"x" for name in names})
    fs.invalidate_cache()
    found = [info for batch in find_files(fs, f"{bucket}/in") for info in batch]
    paths = [info["name"] for info in found]
    assert sorted(paths) == sorted(f"{bucket}/in/{name}" for name in names) == sorted(fs.find(f"{bucket}/in"))
    assert all(info["size"] == 1 for info in found)
