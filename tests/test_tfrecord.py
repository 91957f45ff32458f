"""TFRecord shards as TensorFlow and TFDS write them: names, GZIP / ZLIB compression, checksums, truncation."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import fsspec
import pytest

from pipeline.samples import PHOTOS, VARIANTS, photo
from pipeline.sources import Record, Shard, read_shard, tfrecord
from tests.layouts import _tfrecord

NAMES = ("photo.jpg", "gray.jpg", "small.jpg", "photo.webp", "one-pixel.png", "exif-rotated.jpg")


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    picture = photo(PHOTOS[0])
    return [(name, VARIANTS[name](picture)) for name in NAMES]


@pytest.fixture(scope="module")
def written(images) -> dict[str, bytes]:
    """The same records as TensorFlow's TFRecordWriter writes them uncompressed, with GZIP and with ZLIB."""
    import tensorflow as tf

    raw = _tfrecord(images)
    files = {"none": raw}
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "raw.tfrecord")
        source.write_bytes(raw)
        for option in ("GZIP", "ZLIB"):
            target = Path(folder, f"{option}.tfrecord")
            with tf.io.TFRecordWriter(str(target), options=option) as writer:
                for serialized in tf.data.TFRecordDataset(str(source)):
                    writer.write(serialized.numpy())
            files[option.lower()] = target.read_bytes()
    assert files["gzip"][:2] == b"\x1f\x8b" and files["zlib"][:1] == b"\x78"
    return files


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Puts a file somewhere and returns its URL and the reader options (local disk, or moto's S3 server)."""
    if request.param == "local":
        return lambda name, data: (_put(fsspec.filesystem("file"), str(tmp_path / name), data), {})
    fs, bucket, storage_options = request.getfixturevalue("s3")
    return lambda name, data: ("s3://" + _put(fs, f"{bucket}/{name}", data), {"storage_options": storage_options})


def _put(fs, path: str, data: bytes) -> str:
    fs.pipe_file(path, data)
    return path


def read(url: str, options: dict) -> list[Record]:
    return list(read_shard(Shard(url, "tfrecord"), options))


def offsets(raw: bytes) -> list[tuple[int, int]]:
    """(offset, payload length) of each record of an uncompressed TFRecord file, parsed here independently."""
    found, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<Q", raw, offset)
        found.append((offset, length))
        offset += 12 + length + 4
    return found


@pytest.mark.parametrize(
    "name",
    [
        "mnist-train.tfrecord-00000-of-00001",
        "imagenet2012-validation.tfrecord-00012-of-00064",
        "x.tfrecord",
        "x.tfrecords",
        "train.tfrec",
        "x.tfrecord.gz",
        "x.tfrecords.gz",
        "x.tfrecord.zz",
        "x.tfrecord.zlib",
        "x.tfrecord.gzip",
        "x.tfrecord-00000-of-00010.gz",
        "train-00000-of-01024",
        "validation-00127-of-00128",
        "validation-00127-of-00128.gz",
    ],
)
def test_claims_tfrecord_names(name):
    assert tfrecord.claims(name)


@pytest.mark.parametrize(
    "name",
    [
        "data-00000-of-00010.arrow",
        "part-00000-of-00004.parquet",
        "x.tar.gz",
        "train-00000-of-01024.tar",
        "photo.jpg",
        "x.gz",
        "tfrecord",
        "x.tfrecord.json",
        "x.tfrecord.bz2",
        "shard-00000.tar",
    ],
)
def test_does_not_claim_other_names(name):
    assert not tfrecord.claims(name)


@pytest.mark.parametrize(
    "compression, name",
    [
        ("none", "mnist-train.tfrecord-00000-of-00001"),
        ("none", "train-00000-of-01024"),
        ("gzip", "imagenet2012-validation.tfrecord-00012-of-00064.gz"),
        ("gzip", "validation-00127-of-00128.gzip"),
        ("zlib", "x.tfrecord.zz"),
        ("gzip", "misleading.tfrecord.zz"),  # the first bytes decide, not the name
        ("zlib", "misleading.tfrecord.gz"),
        ("none", "misleading.tfrecord.gz"),
        ("gzip", "neutral-name.bin"),
        ("zlib", "neutral-name"),
    ],
)
def test_auto_compression_reads_every_record(compression, name, written, images, store):
    url, options = store(name, written[compression])
    records = read(url, {**options, "compression": "auto"})
    assert [(r.image_id, r.data, r.error) for r in records] == [(f"{url}#{n}", data, None) for n, data in images]


@pytest.mark.parametrize("compression", ["none", "gzip", "zlib"])
def test_declared_compression_and_older_callers(compression, written, images, tmp_path):
    path = tmp_path / f"train-00000-of-00001.{compression}"
    path.write_bytes(written[compression])
    expected = {f"{path}#{name}": data for name, data in images}
    assert {r.image_id: r.data for r in read(str(path), {"compression": compression})} == expected
    assert {r.image_id: r.data for r in read(str(path), {})} == expected  # no compression key: auto


@pytest.mark.parametrize(
    "declared, actual, message",
    [
        ("gzip", "none", "input.compression is gzip but the file is not gzip-compressed: it is an uncompressed"),
        ("zlib", "gzip", "input.compression is zlib but the file is not zlib-compressed: it starts with gzip's magic"),
        ("gzip", "zlib", "input.compression is gzip but the file is not gzip-compressed: it starts with a zlib header"),
        ("none", "gzip", "input.compression is none but the file is compressed: it starts with gzip's magic"),
    ],
)
def test_wrong_declared_compression_is_one_clear_error_row(declared, actual, message, written, store):
    url, options = store("x.tfrecord", written[actual])
    [record] = read(url, {**options, "compression": declared})
    assert record.image_id == f"{url}#unreadable" and record.data is None
    assert record.error.startswith(f"unreadable shard: TFRecordError: {message}")
    assert f"set input.compression: {actual} (or auto)" in record.error


def test_not_a_tfrecord_hints_at_compression(tmp_path):
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"this is a text file, not a TFRecord\n" * 10)
    [record] = read(str(path), {})
    assert "record 0 at byte 0: length checksum mismatch" in record.error
    assert "set input.compression: gzip or zlib" in record.error


def test_compressed_name_without_compressed_data(tmp_path):
    path = tmp_path / "x.tfrecord.gz"
    path.write_bytes(b"short")
    [record] = read(str(path), {"compression": "auto"})
    assert "the file is not gzip-compressed, or is damaged at its start" in record.error


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_flipped_payload_byte_costs_one_record(compression, written, images, store):
    raw = bytearray(written["none"])
    offset, length = offsets(bytes(raw))[2]
    raw[offset + 12 + length // 2] ^= 0xFF
    data = bytes(raw) if compression == "none" else gzip.compress(bytes(raw))
    url, options = store("x.tfrecord", data)
    records = read(url, options)
    assert len(records) == len(images)
    assert records[2].image_id == f"{url}#2" and records[2].data is None
    where = f"record 2 at byte {offset:,}" + ("" if compression == "none" else " of the gzip-decompressed data")
    assert records[2].error == f"{where}: data checksum mismatch (the record is corrupt)"
    good = [(r.image_id, r.data, r.error) for r in records[:2] + records[3:]]
    assert good == [(f"{url}#{name}", data, None) for name, data in images[:2] + images[3:]]


def test_flipped_length_byte_ends_the_shard(written, images, tmp_path):
    raw = bytearray(written["none"])
    offset, _ = offsets(bytes(raw))[3]
    raw[offset + 1] ^= 0x01
    path = tmp_path / "x.tfrecord"
    path.write_bytes(bytes(raw))
    *good, last = read(str(path), {})
    assert [r.data for r in good] == [data for _, data in images[:3]]
    assert last.error == (
        f"unreadable shard: TFRecordError: record 3 at byte {offset:,}: length checksum mismatch; "
        "the framing is lost, so the rest cannot be read"
    )


@pytest.mark.parametrize("compression", ["none", "gzip", "zlib"])
def test_truncated_file_gives_its_good_records_then_one_error(compression, written, images, store):
    offset, length = offsets(written["none"])[3]
    if compression == "none":
        data = written["none"][: offset + 12 + length // 2]
    else:  # cut the compressed stream where it has produced record 3's header but not all its payload
        data = written[compression][: len(written[compression]) * (offset + 12 + length // 2) // len(written["none"])]
    url, options = store("validation-00000-of-00001", data)
    *good, last = read(url, options)
    assert [(r.image_id, r.data) for r in good] == [(f"{url}#{name}", data) for name, data in images[: len(good)]]
    assert len(good) >= 2
    assert last.image_id == f"{url}#unreadable" and last.data is None
    assert last.error.startswith("unreadable shard: TFRecordError: truncated: ")
    assert f"record {len(good)} at byte " in last.error


@pytest.mark.parametrize("compression", ["gzip", "zlib"])
def test_compressed_stream_cut_between_records_is_truncated(compression, written, images, tmp_path):
    stream = written[compression]
    path = tmp_path / "x.tfrecord"
    path.write_bytes(stream[:-4])  # the records are whole, the stream's trailer is not
    *good, last = read(str(path), {})
    assert [r.data for r in good] == [data for _, data in images]
    assert last.error == (
        f"unreadable shard: TFRecordError: truncated: the {compression} stream ends before its end marker, after "
        f"{len(images)} whole records ({len(written['none']):,} bytes decompressed); the file was cut off and the "
        "records after these are lost"
    )


def test_concatenated_gzip_members(written, images, tmp_path):
    path = tmp_path / "x.tfrecord.gz"
    path.write_bytes(gzip.compress(written["none"]) + gzip.compress(written["none"]))
    records = read(str(path), {})
    assert [r.data for r in records] == [data for _, data in images] * 2


def test_masked_crc_matches_tensorflow(written):
    raw = written["none"]
    for offset, length in offsets(raw):
        header, payload = raw[offset : offset + 12], raw[offset + 12 : offset + 12 + length]
        assert tfrecord.masked_crc(header[:8]) == struct.unpack("<I", header[8:])[0]
        assert tfrecord.masked_crc(payload) == struct.unpack_from("<I", raw, offset + 12 + length)[0]
