"""Inputs as people have them: every object listed and every entry of a shard is a row or counted as skipped, by
reason; WebDataset shards as the ``webdataset`` library writes them (compressed too); keys that repeat in a shard."""

from __future__ import annotations

import io
import tarfile

import fsspec
import pytest
from PIL import Image

from pipeline.manifest import Tally
from pipeline.samples import PHOTOS, VARIANTS, photo
from pipeline.sources import InputError, Shard, list_shards, read_shard


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return VARIANTS["small.jpg"](photo(PHOTOS[0]))


def encoded(format: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    photo(PHOTOS[1]).resize((64, 48)).convert(mode).save(buffer, format)
    return buffer.getvalue()


def read_all(shards: list[Shard], options: dict | None = None) -> tuple[list, Tally]:
    tally = Tally()
    records = [record for shard in shards for record in read_shard(shard, options or {}, tally=tally)]
    return records, tally


def assert_adds_up(tally: Tally) -> None:
    assert tally.seen == tally.kept + tally.skipped_count, tally


def test_an_image_tree_as_cameras_and_tools_leave_it(jpeg, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = tmp_path / "card"
    files = {
        "DCIM/100NIKON/_DSC0001.JPG": jpeg,  # Nikon's Adobe RGB photos begin with "_"
        "DCIM/100NIKON/DSC_0002.JPG": jpeg,
        "DCIM/100NIKON/DSC_0002.XMP": b"<x:xmpmeta/>",
        "scans/page.ppm": encoded("PPM"),
        "scans/page.pgm": encoded("PPM", "L"),
        "scans/map.jp2": encoded("JPEG2000"),
        "phone/IMG_0003.HEIC": b"\x00\x00\x00\x18ftypheic",
        ".DS_Store": b"\x00\x00\x00\x01Bud1",
        "DCIM/._DSC_0002.JPG": b"\x00\x05\x16\x07",  # a macOS resource fork
        "_delta_log/00000.json": b"{}",
        "export/_SUCCESS": b"",
        "export/part.parquet": b"PAR1",
    }
    for name, data in files.items():
        fs.pipe_file(str(root / name), data)

    listing = list_shards(str(root), "images")
    names = sorted(shard.url.removeprefix(f"{root}/") for shard in listing.shards)
    assert names == [
        "DCIM/100NIKON/DSC_0002.JPG",
        "DCIM/100NIKON/_DSC0001.JPG",
        "phone/IMG_0003.HEIC",  # format: images reads any name by its bytes
        "scans/map.jp2",
        "scans/page.pgm",
        "scans/page.ppm",
    ]
    tally = listing.tally
    assert_adds_up(tally)
    assert {reason: e.count for reason, e in tally.skipped.items()} == {
        "hidden": 2,
        "metadata": 2,
        "sidecar": 1,
        "other layout": 1,
    }
    assert sorted(tally.skipped["hidden"].first) == [".DS_Store", "DCIM/._DSC_0002.JPG"]
    assert tally.skipped["other layout"].first == ["export/part.parquet"]

    records, read = read_all(listing.shards)
    assert [r.image_id.removeprefix(f"{root}/") for r in records] == names[:2] + names[3:]
    assert {reason: e.count for reason, e in read.skipped.items()} == {"not an image": 1}
    assert read.skipped["not an image"].first == [f"{root}/phone/IMG_0003.HEIC"]
    assert_adds_up(read)

    # Under auto, a name no layout claims is counted, not read; the error names it.
    with pytest.raises(InputError, match=r"no images or shards found at .*skipped 1 not an image: IMG_0003.HEIC\)"):
        list_shards(str(root / "phone"))
    with pytest.raises(InputError, match=r"mixes layouts \(images, parquet\)"):
        list_shards(str(root))
    auto = list_shards(str(root / "DCIM"))
    assert len(auto.shards) == 2
    assert {reason: e.count for reason, e in auto.tally.skipped.items()} == {"hidden": 1, "sidecar": 1}


def test_auto_refuses_mixed_layouts_and_says_what_it_skipped(tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    fs.pipe_file(str(tmp_path / "in" / "notes.txt"), b"x")
    fs.pipe_file(str(tmp_path / "in" / ".hidden.jpg"), b"x")
    with pytest.raises(InputError, match=r"no images or shards found .*skipped 1 hidden: \.hidden\.jpg; 1 sidecar"):
        list_shards(str(tmp_path / "in"))


def test_a_file_named_with_a_format_is_read_whatever_its_name(jpeg, tmp_path):
    path = tmp_path / "upload.bin"
    path.write_bytes(jpeg)
    with pytest.raises(InputError, match="no images or shards found"):
        list_shards(str(path))
    (shard,) = list_shards(str(path), "images").shards
    (record,), tally = read_all([shard])
    assert record.data == jpeg and record.error is None
    assert tally.kept == tally.seen == 1


def webdataset_shards(fs, root: str, images: dict[str, bytes]) -> None:
    """Two shards written by the ``webdataset`` library: a plain tar and a gzip-compressed one, with sidecars."""
    import webdataset as wds

    for name, compress in (("shard-000000.tar", False), ("shard-000001.tar.gz", True)):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer, compress=compress) as sink:
            for index, (key, data) in enumerate(images.items()):
                sink.write({"__key__": key, "jpg": data, "cls": index, "json": {"source": key}})
            # What datasets converted from other tools hold: an image under a name that is no image extension,
            # and a second sample that reuses a key.
            sink.write({"__key__": "scan", "image": encoded("PNG"), "txt": "a scan"})
            sink.write({"__key__": next(iter(images)), "jpg": next(iter(images.values())), "cls": 9})
        fs.pipe_file(f"{root}/{name}", buffer.getvalue())


@pytest.mark.parametrize("store", ["local", "s3"])
def test_webdataset_shards_written_by_webdataset_plain_and_compressed(store, jpeg, tmp_path, request):
    if store == "s3":
        fs, bucket, options = request.getfixturevalue("s3")
        root, url = f"{bucket}/wds", f"s3://{bucket}/wds"
    else:
        fs, options = fsspec.filesystem("file", auto_mkdir=True), {}
        root = url = str(tmp_path / "wds")
    images = {"a": jpeg, "b": VARIANTS["gray.jpg"](photo(PHOTOS[0]))}
    webdataset_shards(fs, root, images)

    listing = list_shards(url, "auto", options)
    assert [s.url.rsplit("/", 1)[1] for s in listing.shards] == ["shard-000000.tar", "shard-000001.tar.gz"]
    assert {s.format for s in listing.shards} == {"webdataset"}
    records, tally = read_all(listing.shards, {"storage_options": options})
    for shard in listing.shards:
        ids = [r.image_id.removeprefix(f"{shard.url}#") for r in records if r.source == shard.url]
        assert ids == ["a.jpg", "b.jpg", "scan.image", "a.jpg~9"]  # the repeated key: its position in the tar
    assert [r.data for r in records[:2]] == list(images.values())
    assert Image.open(io.BytesIO(records[2].data)).format == "PNG"
    assert tally.kept == 8
    assert {reason: e.count for reason, e in tally.skipped.items()} == {"sidecar": 12}  # 2 x (2 cls, 2 json, txt, cls)
    assert tally.renamed.count == 2 and tally.renamed.first[0].endswith("shard-000000.tar#a.jpg")
    assert_adds_up(tally)

    # The same shard read again gives the same ids; a read of some ids finds the renamed one.
    again, _ = read_all(listing.shards[:1], {"storage_options": options})
    assert [r.image_id for r in again] == [r.image_id for r in records[:4]]
    only = {records[3].image_id}
    (retried,) = list(read_shard(listing.shards[0], {"storage_options": options}, only=only))
    assert retried.image_id == records[3].image_id


def test_tar_members_skipped_by_reason(jpeg, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:

        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "0001.jpg"
            archive.addfile(info, io.BytesIO(data))

        add("0001.jpg", jpeg)
        add("0001.json", b"{}")
        add("._0001.jpg", b"\x00\x05\x16\x07")
        add("0002.jpg", kind=tarfile.SYMTYPE)
        add("0003.bin", b"\x00" * 64)
        add("0004.dat", encoded("BMP"))
        add("folder", kind=tarfile.DIRTYPE)
    path = tmp_path / "shard.tgz"
    import gzip

    path.write_bytes(gzip.compress(buffer.getvalue()))
    (shard,) = list_shards(str(tmp_path)).shards
    records, tally = read_all([shard])
    assert [r.image_id.split("#")[1] for r in records] == ["0001.jpg", "0004.dat"]
    assert {reason: e.first for reason, e in tally.skipped.items()} == {
        "sidecar": [f"{shard.url}#0001.json"],
        "hidden": [f"{shard.url}#._0001.jpg"],
        "link": [f"{shard.url}#0002.jpg"],
        "not an image": [f"{shard.url}#0003.bin"],
    }
    assert_adds_up(tally)


SMALL = ["model.depth=18", "model.weights=random", "model.top_k=1", "decode.image_size=32", "inference.batch_size=8"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def run_and_check(input_url: str, output: str, storage_options: dict, overrides: list[str] = ()) -> tuple:
    """Run the pipeline; check one row per record with unique ids, and that the manifest's counts add up."""
    from pipeline.query import connect
    from pipeline.runner import run
    from pipeline.runs import OutputLocation
    from pipeline.spec import parse_spec
    from pipeline.tables import read_manifests

    document = {"input": {"url": input_url, "storage_options": storage_options}, "output": output}
    result = run(parse_spec(document, [*SMALL, *overrides]), progress=False)
    (manifest,) = read_manifests(OutputLocation.open(output))
    listed, read = manifest.input.listed, manifest.input.read
    assert_adds_up(listed)
    assert_adds_up(read)
    assert listed.kept == manifest.plan.listed
    assert read.kept == manifest.counts.rows == result.rows
    with connect(output) as db:
        ids = [row[0] for row in db.execute("SELECT image_id FROM latest").fetchall()]
    assert len(ids) == len(set(ids)) == result.rows
    return result, manifest, ids


@pytest.mark.slow
def test_runs_count_every_object_and_member(ray_cluster, jpeg, s3, tmp_path):
    fs, bucket, options = s3
    images = {"a": jpeg, "b": VARIANTS["gray.jpg"](photo(PHOTOS[0]))}
    webdataset_shards(fs, f"{bucket}/wds", images)
    fs.pipe_file(f"{bucket}/wds/.DS_Store", b"\x00")
    fs.pipe_file(f"{bucket}/wds/_SUCCESS", b"")
    fs.pipe_file(f"{bucket}/wds/README.md", b"# shards")
    workers = {**options, "key": "testing", "secret": "testing"}  # Ray's workers began before the fixture's env
    result, manifest, ids = run_and_check(f"s3://{bucket}/wds/", str(tmp_path / "out"), workers)
    assert result.ok == 8
    assert {reason: e.count for reason, e in manifest.input.listed.skipped.items()} == {
        "hidden": 1,
        "metadata": 1,
        "sidecar": 1,
    }
    assert manifest.input.listed.seen == 5
    assert {reason: e.count for reason, e in manifest.input.read.skipped.items()} == {"sidecar": 12}
    assert manifest.input.read.renamed.count == 2
    assert sum(image_id.endswith("#a.jpg~9") for image_id in ids) == 2  # both rows of the repeated key stay


@pytest.mark.slow
def test_runs_over_gzip_tfrecords_named_as_tfds_names_them(ray_cluster, tmp_path):
    import tensorflow as tf

    from tests.layouts import _tfrecord

    pictures = [(f"{name}", VARIANTS[name](photo(PHOTOS[0]))) for name in ("photo.jpg", "gray.jpg", "small.jpg")]
    folder = tmp_path / "tfds" / "my_dataset" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "raw.tfrecord").write_bytes(_tfrecord([*pictures, pictures[0]]))  # the first key twice
    for index in range(2):
        with tf.io.TFRecordWriter(str(folder / f"my_dataset-train.tfrecord-0000{index}-of-00002"), "GZIP") as writer:
            for serialized in tf.data.TFRecordDataset(str(folder / "raw.tfrecord")):
                writer.write(serialized.numpy())
    (folder / "raw.tfrecord").unlink()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "features.json").write_text("{}")
    (folder / "label.labels.txt").write_text("a\n")

    result, manifest, ids = run_and_check(str(tmp_path / "tfds"), str(tmp_path / "out"), {})
    assert (result.ok, result.error) == (8, 0)
    assert manifest.input.listed.skipped["sidecar"].count == 3
    assert manifest.input.read.renamed.count == 2
    assert sorted(image_id.rsplit("#", 1)[1] for image_id in ids)[:2] == ["gray.jpg", "gray.jpg"]
    assert sum(image_id.endswith("#photo.jpg~3") for image_id in ids) == 2


@pytest.mark.slow
def test_runs_over_hugging_face_parquet_of_paths_on_s3(ray_cluster, jpeg, s3, tmp_path, monkeypatch):
    fs, bucket, options = s3
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    local = tmp_path / "images"
    local.mkdir()
    names = ["a.jpg", "b.png", "c.jpg"]
    for name in names:
        (local / name).write_bytes(jpeg if name.endswith("jpg") else encoded("PNG"))
    monkeypatch.chdir(tmp_path)  # datasets keeps the paths as given: relative to the Parquet file's folder here
    table = datasets.Dataset.from_dict({"image": [f"images/{name}" for name in names]})
    table = table.cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "train.parquet"))
    fs.put(str(local), f"{bucket}/hf/images", recursive=True)  # the paths are relative: the images go along
    fs.put_file(str(tmp_path / "train.parquet"), f"{bucket}/hf/train.parquet")

    workers = {**options, "key": "testing", "secret": "testing"}
    result, manifest, _ = run_and_check(f"s3://{bucket}/hf/", str(tmp_path / "out"), workers, ["input.format=parquet"])
    assert (result.ok, result.error) == (3, 0)
    assert manifest.input.listed.skipped["other layout"].count == 3  # the images beside the Parquet file
