"""Writes the same images in each input layout, locally or to the S3 server, for the source and pipeline tests."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

LAYOUTS = ("images", "webdataset", "tfrecord", "parquet")


def _tfrecord(records: list[tuple[str, bytes]]) -> bytes:
    """A TFRecord file written by TensorFlow's own writer (the format's reference implementation)."""
    import tempfile

    import tensorflow as tf

    with tempfile.NamedTemporaryFile(suffix=".tfrecord") as f:
        with tf.io.TFRecordWriter(f.name) as writer:
            for name, data in records:
                feature = {
                    "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                    "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name.encode()])),
                    "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
                }
                writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
        return open(f.name, "rb").read()


def tar_shard(records: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in records:
            key = name.rsplit(".", 1)[0]
            for member, payload in ((name, data), (f"{key}.json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _parquet(records: list[tuple[str, bytes]], huggingface_style: bool) -> bytes:
    if huggingface_style:  # {"image": {"bytes": ..., "path": ...}} as the datasets library writes it
        images = pa.array([{"bytes": data, "path": name} for name, data in records])
    else:
        images = pa.array([data for _, data in records], pa.binary())
    table = pa.table({"id": [name for name, _ in records], "image": images, "caption": ["x"] * len(records)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=3)  # several row groups per file
    return buffer.getvalue()


def write_layout(layout: str, fs, root: str, url_root: str, images: dict[str, bytes]) -> dict[str, bytes]:
    """Write ``images`` under ``root`` in ``layout``, split over two shards or folders.

    Returns the expected image id (as the pipeline forms it from ``url_root``) -> the image's bytes.
    """
    items = sorted(images.items())
    halves = [items[: len(items) // 2], items[len(items) // 2 :]]
    expected = {}
    fs.makedirs(root, exist_ok=True)
    for index, part in enumerate(halves):
        if layout == "images":
            for name, data in part:
                fs.pipe_file(f"{root}/folder{index}/{name}", data)
                expected[f"{url_root}/folder{index}/{name}"] = data
            continue
        if layout == "webdataset":
            shard, payload = f"shard-{index:05d}.tar", tar_shard(part)
        elif layout == "tfrecord":
            shard, payload = f"shard-{index:05d}.tfrecord", _tfrecord(part)
        else:
            shard, payload = f"shard-{index:05d}.parquet", _parquet(part, huggingface_style=index == 1)
        fs.pipe_file(f"{root}/{shard}", payload)
        for name, data in part:
            expected[f"{url_root}/{shard}#{name}"] = data
    return expected
