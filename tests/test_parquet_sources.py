"""Parquet written by Hugging Face ``datasets``: images kept as paths (absolute, relative, URLs) or embedded as bytes,
read back through ``read_shard`` from local disk and from moto's S3 server. Nothing is downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.samples import PHOTOS, VARIANTS, photo
from pipeline.sources import Record, Shard, parquet, read_shard

NAMES = ("photo.jpg", "photo.png", "gray.jpg", "small.jpg", "rgba.png")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    picture = photo(PHOTOS[0])
    return {name: VARIANTS[name](picture) for name in NAMES}


@pytest.fixture
def hf(tmp_path_factory, monkeypatch):
    """The ``datasets`` module, offline, with its caches in a temporary folder."""
    home = tmp_path_factory.mktemp("huggingface")
    for name, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    import datasets

    # Read from the environment when first imported: set them here too in case another test imported it earlier.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return datasets


def write_dataset(hf, ids: list[str], images: list, destination: str, batch_size: int = 2, **to_parquet) -> None:
    """``images`` (paths, or ``{"bytes", "path"}``) as a ``datasets`` Image column, saved with ``to_parquet`` (a row
    group per ``batch_size`` rows)."""
    dataset = hf.Dataset.from_dict({"id": ids, "image": images}).cast_column("image", hf.Image())
    dataset.to_parquet(destination, batch_size=batch_size, **to_parquet)


def image_column(parquet_file) -> list[dict | None]:
    table = pq.read_table(parquet_file)
    assert table.schema.field("image").type == IMAGE_TYPE
    return table.column("image").to_pylist()


def read(url: str, options: dict | None = None) -> list[Record]:
    return list(read_shard(Shard(url, "parquet"), options or {}))


def read_ok(url: str, options: dict | None = None) -> dict[str, bytes]:
    records = read(url, options)
    assert [record.error for record in records] == [None] * len(records)
    return {record.image_id: record.data for record in records}


def test_absolute_paths_as_datasets_writes_them(hf, images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    output = str(tmp_path / "out" / "train.parquet")
    write_dataset(hf, list(NAMES), [str(folder / name) for name in NAMES], output)

    assert image_column(output) == [{"bytes": None, "path": str(folder / name)} for name in NAMES]
    assert pq.ParquetFile(output).num_row_groups == 3
    assert read_ok(output) == {f"{output}#{name}": images[name] for name in NAMES}


def test_paths_relative_to_the_parquet_file(hf, images, tmp_path, monkeypatch):
    dataset = tmp_path / "made" / "dataset"
    (dataset / "images").mkdir(parents=True)
    for name, data in images.items():
        (dataset / "images" / name).write_bytes(data)
    monkeypatch.chdir(dataset)
    write_dataset(hf, list(NAMES), [f"images/{name}" for name in NAMES], "train.parquet")
    assert image_column(dataset / "train.parquet") == [{"bytes": None, "path": f"images/{name}"} for name in NAMES]

    # Shipped elsewhere and read from another working directory: the paths hold relative to the file, not the cwd.
    moved = Path(shutil.move(dataset, tmp_path / "shipped"))
    monkeypatch.chdir(tmp_path)
    url = str(moved / "train.parquet")
    assert read_ok(url) == {f"{url}#{name}": images[name] for name in NAMES}
    assert read_ok(f"file://{url}") == {f"file://{url}#{name}": images[name] for name in NAMES}


def test_parent_folders_and_file_urls(hf, images, tmp_path):
    (tmp_path / "images").mkdir()
    for name, data in images.items():
        (tmp_path / "images" / name).write_bytes(data)
    output = str(tmp_path / "data" / "train" / "part-0.parquet")
    paths = ["../../images/photo.jpg", f"file://{tmp_path}/images/photo.png", f"{tmp_path}/data/../images/gray.jpg"]
    write_dataset(hf, ["a", "b", "c"], paths, output)
    assert [row["path"] for row in image_column(output)] == paths
    records = read_ok(output)
    assert list(records.values()) == [images["photo.jpg"], images["photo.png"], images["gray.jpg"]]


def test_missing_and_unreadable_files_are_one_row_each(hf, images, tmp_path):
    (tmp_path / "images" / "folder.jpg").mkdir(parents=True)
    for name, data in images.items():
        (tmp_path / "images" / name).write_bytes(data)
    output = str(tmp_path / "train.parquet")
    paths = [
        "images/photo.jpg",
        "images/gone.jpg",
        None,
        "images/folder.jpg",
        f"{tmp_path}/nope.jpg",
        "images/rgba.png",
    ]
    write_dataset(hf, ["ok1", "gone", "null", "folder", "absent", "ok2"], paths, output)
    assert image_column(output)[2] is None

    records = {record.image_id.rsplit("#", 1)[1]: record for record in read(output)}
    assert list(records) == ["ok1", "gone", "null", "folder", "absent", "ok2"]
    assert records["ok1"].data == images["photo.jpg"] and records["ok2"].data == images["rgba.png"]
    assert records["ok1"].error is None and records["ok2"].error is None
    assert records["gone"].error == (
        f"image file not found: {tmp_path}/images/gone.jpg (path 'images/gone.jpg' in the Parquet file, relative to "
        "its folder)"
    )
    assert records["null"].error == "no image bytes and no path (null)"
    assert records["folder"].error.startswith(f"cannot read image file {tmp_path}/images/folder.jpg (path 'images/")
    assert records["absent"].error == f"image file not found: {tmp_path}/nope.jpg"
    assert all(records[key].data is None for key in ("gone", "null", "folder", "absent"))


def test_embedded_bytes_are_read_not_the_path(hf, images, tmp_path, monkeypatch):
    from datasets.table import embed_table_storage

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    dataset = hf.Dataset.from_dict({"id": list(NAMES), "image": [str(folder / n) for n in NAMES]})
    dataset = dataset.cast_column("image", hf.Image())
    # What push_to_hub does before it writes Parquet: the files' bytes go into the table, the paths become names.
    embedded = dataset.with_format("arrow").map(embed_table_storage, batched=True)
    output = str(tmp_path / "embedded.parquet")
    embedded.to_parquet(output, batch_size=2)
    shutil.rmtree(folder)
    fetched: list[list[str]] = []
    monkeypatch.setattr(parquet, "_cat", lambda fs, paths: fetched.append(paths) or [])

    assert image_column(output) == [{"bytes": images[name], "path": name} for name in NAMES]
    assert read_ok(output) == {f"{output}#{name}": images[name] for name in NAMES}

    # Bytes given directly, with a path that leads nowhere: the bytes win.
    direct = str(tmp_path / "direct.parquet")
    write_dataset(hf, ["x"], [{"bytes": images["gray.jpg"], "path": "/nowhere/gray.jpg"}], direct)
    assert read_ok(direct) == {f"{direct}#x": images["gray.jpg"]}
    assert fetched == []


def test_s3_relative_paths_and_urls(hf, images, s3):
    fs, bucket, storage_options = s3
    for name, data in images.items():
        fs.pipe_file(f"{bucket}/ds/images/{name}", data)
    fs.pipe_file(f"{bucket}/shared/photo.png", images["photo.png"])
    url = f"s3://{bucket}/ds/data/train.parquet"
    paths = [
        "../images/photo.jpg",
        f"s3://{bucket}/shared/photo.png",
        "../images/gray.jpg",
        "../images/gone.jpg",
        "/home/someone/small.jpg",
        f"s3://{bucket}/ds/images/rgba.png",
    ]
    write_dataset(hf, ["a", "b", "c", "gone", "local", "d"], paths, url, storage_options=storage_options)
    with fs.open(url, "rb") as f:
        assert [row["bytes"] for row in image_column(f)] == [None] * len(paths)

    records = {record.image_id: record for record in read(url, {"storage_options": storage_options})}
    assert {key: r.data for key, r in records.items() if r.error is None} == {
        f"{url}#a": images["photo.jpg"],
        f"{url}#b": images["photo.png"],
        f"{url}#c": images["gray.jpg"],
        f"{url}#d": images["rgba.png"],
    }
    assert records[f"{url}#gone"].error == (
        f"image file not found: s3://{bucket}/ds/images/gone.jpg (path '../images/gone.jpg' in the Parquet file, "
        "relative to its folder)"
    )
    assert records[f"{url}#local"].error.startswith(
        "local path '/home/someone/small.jpg' in a Parquet file on s3://: it names a file on the machine that wrote"
    )


def test_local_parquet_naming_s3_and_local_files(hf, images, s3, tmp_path, monkeypatch):
    """Two stores in one row group, each fetched together; the storage options reach the S3 one."""
    fs, bucket, storage_options = s3
    for name, data in images.items():
        fs.pipe_file(f"{bucket}/images/{name}", data)
        (tmp_path / name).write_bytes(data)
    output = str(tmp_path / "mixed.parquet")
    paths = [f"s3://{bucket}/images/photo.jpg", "photo.png", f"s3://{bucket}/images/gray.jpg", "small.jpg"]
    write_dataset(hf, ["s3a", "local1", "s3b", "local2"], paths, output, batch_size=4)
    calls: list[tuple[str, int]] = []
    cat = parquet._cat
    monkeypatch.setattr(parquet, "_cat", lambda fs, p: calls.append((fs.protocol[0], len(p))) or cat(fs, p))
    assert read_ok(output, {"storage_options": storage_options}) == {
        f"{output}#s3a": images["photo.jpg"],
        f"{output}#local1": images["photo.png"],
        f"{output}#s3b": images["gray.jpg"],
        f"{output}#local2": images["small.jpg"],
    }
    assert sorted(calls) == [("file", 2), ("s3", 2)]


def test_a_large_row_group_is_fetched_in_chunks(images, tmp_path, monkeypatch):
    rows = parquet.CHUNK_ROWS * 2 + 10
    for index in range(rows):
        (tmp_path / f"{index}.jpg").write_bytes(images["small.jpg"] + index.to_bytes(4, "big"))
    output = str(tmp_path / "big.parquet")
    column = pa.array([{"bytes": None, "path": f"{index}.jpg"} for index in range(rows)], IMAGE_TYPE)
    pq.write_table(pa.table({"image": column}), output)  # one row group
    assert pq.ParquetFile(output).num_row_groups == 1

    calls: list[int] = []
    cat = parquet._cat
    monkeypatch.setattr(parquet, "_cat", lambda fs, paths: calls.append(len(paths)) or cat(fs, paths))
    records = read(output)
    assert calls == [parquet.CHUNK_ROWS, parquet.CHUNK_ROWS, 10]
    assert [record.image_id for record in records] == [f"{output}#{index}" for index in range(rows)]
    assert all(r.data == images["small.jpg"] + i.to_bytes(4, "big") for i, r in enumerate(records))


def test_a_retry_of_some_ids_fetches_only_theirs(images, tmp_path, monkeypatch):
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    output = str(tmp_path / "paths.parquet")
    keys = ["a", "b", "a", "c", "d"]  # "a" repeats: its second row is delivered as a~2
    column = pa.array([{"bytes": None, "path": name} for name in NAMES], IMAGE_TYPE)
    pq.write_table(pa.table({"id": keys, "image": column}), output)
    fetched: list[str] = []
    cat = parquet._cat
    monkeypatch.setattr(parquet, "_cat", lambda fs, paths: fetched.extend(paths) or cat(fs, paths))
    only = {f"{output}#c", f"{output}#a~2"}
    records = list(read_shard(Shard(output, "parquet"), {}, only=only))
    assert {r.image_id: r.data for r in records} == {f"{output}#a~2": images[NAMES[2]], f"{output}#c": images[NAMES[3]]}
    # The two rows keyed "a" may be either: both are fetched; "b" and "d" are not.
    assert sorted(Path(p).name for p in fetched) == sorted([NAMES[0], NAMES[2], NAMES[3]])


def test_transient_errors_are_retried_per_image(images, tmp_path, monkeypatch):
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    output = str(tmp_path / "flaky.parquet")
    column = pa.array([{"bytes": None, "path": name} for name in NAMES], IMAGE_TYPE)
    pq.write_table(pa.table({"id": list(NAMES), "image": column}), output)
    monkeypatch.setattr(parquet, "backoff", lambda attempt: 0)

    fetched: list[list[str]] = []
    cat = parquet._cat

    def flaky(fs, paths: list[str]) -> list:
        fetched.append([os.path.basename(path) for path in paths])
        outcomes = cat(fs, paths)
        # gray.jpg fails twice then reads; rgba.png never reads (503 each time)
        return [
            ConnectionError("Connection reset by peer")
            if (path.endswith("gray.jpg") and len(fetched) <= 2) or path.endswith("rgba.png")
            else outcome
            for path, outcome in zip(paths, outcomes, strict=True)
        ]

    monkeypatch.setattr(parquet, "_cat", flaky)
    records = {record.image_id.rsplit("#", 1)[1]: record for record in read(output)}
    assert fetched[0] == list(NAMES)
    assert fetched[1] == ["gray.jpg", "rgba.png"] and fetched[3:] == [["rgba.png"]] * (len(fetched) - 3)
    assert len(fetched) == parquet.ATTEMPTS
    assert {key: r.data for key, r in records.items() if r.error is None} == {
        name: images[name] for name in NAMES if name != "rgba.png"
    }
    assert records["rgba.png"].error == (
        f"cannot read image file {tmp_path}/rgba.png (path 'rgba.png' in the Parquet file, relative to its folder): "
        f"ConnectionError: Connection reset by peer (after {parquet.ATTEMPTS} attempts)"
    )
