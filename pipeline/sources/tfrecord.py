"""TFRecord shards of ``tf.train.Example`` records with the image in ``image/encoded``.

Rows are keyed ``<shard URL>#<image/filename>`` (or ``image/key``, ``key``, ``image/source_id``), else
``<shard URL>#<record index>``. Parsed without TensorFlow, so CPU workers never pay for importing it: the framing is
read here and the ``Example`` message is decoded by protobuf from its published definition. Record checksums are
not verified; a truncated file ends in an error row.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import cache

EXTENSIONS = (".tfrecord", ".tfrecords")
KEY_FEATURES = ("image/filename", "image/key", "key", "image/source_id", "image/id")


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return name.endswith(EXTENSIONS)


@cache
def _example_class():
    """``tensorflow.Example`` (example.proto, feature.proto) built in a private descriptor pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="resnet_pipeline/example.proto", package="tensorflow", syntax="proto3"
    )

    def add(proto, name, number, type_, label=F.LABEL_OPTIONAL, type_name=None, packed=None, oneof_index=None):
        field = proto.field.add(name=name, number=number, type=type_, label=label)
        if type_name:
            field.type_name = type_name
        if packed is not None:
            field.options.packed = packed
        if oneof_index is not None:
            field.oneof_index = oneof_index

    bytes_list = file.message_type.add(name="BytesList")
    add(bytes_list, "value", 1, F.TYPE_BYTES, F.LABEL_REPEATED)
    float_list = file.message_type.add(name="FloatList")
    add(float_list, "value", 1, F.TYPE_FLOAT, F.LABEL_REPEATED, packed=True)
    int64_list = file.message_type.add(name="Int64List")
    add(int64_list, "value", 1, F.TYPE_INT64, F.LABEL_REPEATED, packed=True)
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    add(feature, "bytes_list", 1, F.TYPE_MESSAGE, type_name=".tensorflow.BytesList", oneof_index=0)
    add(feature, "float_list", 2, F.TYPE_MESSAGE, type_name=".tensorflow.FloatList", oneof_index=0)
    add(feature, "int64_list", 3, F.TYPE_MESSAGE, type_name=".tensorflow.Int64List", oneof_index=0)
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, F.TYPE_STRING)
    add(entry, "value", 2, F.TYPE_MESSAGE, type_name=".tensorflow.Feature")
    add(features, "feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, type_name=".tensorflow.Features.FeatureEntry")
    example = file.message_type.add(name="Example")
    add(example, "features", 1, F.TYPE_MESSAGE, type_name=".tensorflow.Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def records(f) -> Iterator[bytes]:
    """The payloads of a TFRecord stream: uint64 length, uint32 CRC, payload, uint32 CRC."""
    while header := f.read(12):
        if len(header) < 12:
            raise EOFError("truncated record header")
        (length,) = struct.unpack("<Q", header[:8])
        payload = f.read(length)
        if len(payload) < length or len(f.read(4)) < 4:
            raise EOFError("truncated record")
        yield payload


def _bytes_feature(example, name: str) -> bytes | None:
    feature = example.features.feature.get(name)
    if feature is None or feature.WhichOneof("kind") != "bytes_list" or not feature.bytes_list.value:
        return None
    return feature.bytes_list.value[0]


def read(fs, path: str, url: str, options: dict) -> Iterator:
    from pipeline.sources import Record

    example_class = _example_class()
    with fs.open(path, "rb") as f:
        for index, payload in enumerate(records(f)):
            example = example_class.FromString(payload)
            key = next((k for name in KEY_FEATURES if (k := _bytes_feature(example, name))), None)
            image_id = f"{url}#{key.decode(errors='replace') if key else index}"
            data = _bytes_feature(example, "image/encoded")
            yield Record(image_id, url, data, None if data is not None else "record has no image/encoded bytes")
