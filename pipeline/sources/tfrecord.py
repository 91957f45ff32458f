"""TFRecord shards of ``tf.train.Example`` records with the image in ``image/encoded``.

Rows are keyed ``<shard URL>#<image/filename>`` (or ``image/key``, ``key``, ``image/source_id``), else
``<shard URL>#<record index>``. Parsed without TensorFlow, so CPU workers never pay for importing it: the framing is
read here and the ``Example`` message is decoded by protobuf from its published definition.

Files may be GZIP or ZLIB compressed, as ``tf.io.TFRecordWriter(path, options="GZIP" | "ZLIB")`` writes them; they
are decompressed as a stream. Under ``compression: auto`` the first bytes decide (gzip's magic, a record header whose
checksum verifies, a zlib header); the name (``.gz``, ``.gzip``, ``.zz``, ``.zlib``) only when they cannot.

Every record's length and data checksums (masked CRC-32C) are verified. A bad data checksum costs that record an
error row; a bad length checksum or a file that ends inside a record ends the shard with :class:`TFRecordError`,
whose message says which record, where, and what to do.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from functools import cache
from typing import Any, BinaryIO

import google_crc32c

KEY_FEATURES = ("image/filename", "image/key", "key", "image/source_id", "image/id")
COMPRESSIONS = ("none", "gzip", "zlib")

# What a shard's base name looks like: an extension TensorFlow users give (Kaggle's .tfrec included), possibly with
# TFDS's shard suffix, or the bare names of the classic ImageNet scripts; then an optional compression suffix.
_NAME = re.compile(
    r"""
    (?:
        .+\.(?:tfrecords?|tfrec)(?:-\d+-of-\d+)?        # x.tfrecord(s), x.tfrec, mnist-train.tfrecord-00000-of-00001
      | (?:train|validation|val|test|eval)-\d+-of-\d+   # train-00000-of-01024, validation-00127-of-00128
    )
    (?:\.(?:gz|gzip|zz|zlib))?
    """,
    re.VERBOSE,
)
_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zz": "zlib", ".zlib": "zlib"}

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER = 12  # uint64 length, uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data
_CHUNK = 1 << 18  # compressed bytes read at a time
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "zlib": zlib.MAX_WBITS}


class TFRecordError(ValueError):
    """A TFRecord shard that cannot be read on: framing lost, truncated, or compressed otherwise than declared."""


def claims(name: str) -> bool:
    """Whether a file of this (lower-case) name is a shard of this layout, when the format is ``auto``."""
    return _NAME.fullmatch(name) is not None


def masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits, plus a constant (mod 2**32)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _sniff(head: bytes) -> str | None:
    """The compression the first bytes show, or None when they show nothing certain (too short, or damaged)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if len(head) >= _HEADER and masked_crc(head[:8]) == struct.unpack("<I", head[8:_HEADER])[0]:
        return "none"
    # RFC 1950: deflate method, window of at most 32 KiB, header checksum divisible by 31.
    if len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0:
        return "zlib"
    return None


_LOOKS = {
    "gzip": "it starts with gzip's magic bytes 1f 8b",
    "zlib": "it starts with a zlib header",
    "none": "it is an uncompressed TFRecord",
}


def _compression(declared: str, name: str, head: bytes) -> str:
    """The compression to read with: the declared one (checked against the first bytes), or under ``auto`` what
    the first bytes show, else what the name says, else none."""
    found = _sniff(head)
    if declared == "auto":
        if found is not None:
            return found
        return _SUFFIXES.get("." + name.lower().rsplit(".", 1)[-1], "none")
    if declared not in COMPRESSIONS:
        raise TFRecordError(f"input.compression must be auto, none, gzip or zlib, not {declared!r}")
    if found is not None and found != declared:
        raise TFRecordError(
            f"input.compression is {declared} but the file is {_described(declared)}: {_LOOKS[found]}; "
            f"set input.compression: {found} (or auto)"
        )
    return declared


def _described(declared: str) -> str:
    return "compressed" if declared == "none" else f"not {declared}-compressed"


class _Joined:
    """A stream's first bytes (already read, to sniff them) followed by the rest of it."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, size: int) -> bytes:
        if not self._head:
            return self._rest.read(size)
        part, self._head = self._head[:size], self._head[size:]
        return part + self._rest.read(size - len(part)) if len(part) < size else part


class _Inflated(io.RawIOBase):
    """The decompressed bytes of a gzip (one or more members) or zlib stream, a chunk at a time."""

    def __init__(self, source: _Joined, compression: str) -> None:
        self._source, self.compression = source, compression
        self._inflater = zlib.decompressobj(_WBITS[compression])
        self._input = b""
        self.complete = False  # whether the stream reached its end marker (a cut-off file never does)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._inflater.eof:
                self.complete = True
                self._input = self._input or self._source.read(_CHUNK)
                if not self._input:
                    return 0
                if self.compression == "zlib":
                    raise TFRecordError("there are bytes after the end of the zlib stream (two files joined?)")
                self._inflater = zlib.decompressobj(_WBITS["gzip"])  # concatenated gzip members are one stream
                self.complete = False
            if not self._input:
                self._input = self._source.read(_CHUNK)
                if not self._input:
                    return 0  # cut off: the reader of the records says so, knowing where
            data = self._inflater.decompress(self._input, len(buffer))
            self._input = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
            if data:
                buffer[: len(data)] = data
                return len(data)


def _read(stream, size: int) -> bytes:
    data = stream.read(size)
    while 0 < len(data) < size and (more := stream.read(size - len(data))):
        data += more
    return data


def _where(index: int, offset: int, compression: str) -> str:
    place = f"record {index} at byte {offset:,}"
    return place if compression == "none" else f"{place} of the {compression}-decompressed data"


def records(stream, compression: str = "none", complete=lambda: True) -> Iterator[tuple[int, int, bytes | None]]:
    """``(index, offset, payload)`` for each record of a TFRecord stream (decompressed already); the payload is None
    when its data checksum does not verify. ``complete()`` says whether a compressed stream reached its end marker."""
    index = offset = 0
    while True:
        try:
            header = _read(stream, _HEADER)
        except zlib.error as error:
            raise _corrupt(index, offset, compression, error) from None
        if not header:
            if not complete():
                raise TFRecordError(
                    f"truncated: the {compression} stream ends before its end marker, after {index} whole records "
                    f"({offset:,} bytes decompressed); the file was cut off and the records after these are lost"
                )
            return
        if len(header) < _HEADER:
            raise _truncated(index, offset, compression, f"its header has {len(header)} of {_HEADER} bytes")
        length, length_crc = struct.unpack("<QI", header)
        if masked_crc(header[:8]) != length_crc:
            raise _framing_lost(index, offset, compression)
        try:
            payload = _read(stream, length)
            footer = _read(stream, _FOOTER) if len(payload) == length else b""
        except zlib.error as error:
            raise _corrupt(index, offset, compression, error) from None
        if len(footer) < _FOOTER:
            got = len(payload) + len(footer)
            raise _truncated(
                index, offset, compression, f"it has {got:,} of {length + _FOOTER:,} bytes after its header"
            )
        yield index, offset, payload if masked_crc(payload) == struct.unpack("<I", footer)[0] else None
        index += 1
        offset += _HEADER + length + _FOOTER


def _truncated(index: int, offset: int, compression: str, detail: str) -> TFRecordError:
    return TFRecordError(f"truncated: the file ends inside {_where(index, offset, compression)} ({detail})")


def _framing_lost(index: int, offset: int, compression: str) -> TFRecordError:
    where = _where(index, offset, compression)
    if index > 0:
        return TFRecordError(f"{where}: length checksum mismatch; the framing is lost, so the rest cannot be read")
    if compression != "none":
        return TFRecordError(
            f"{where}: length checksum mismatch; the {compression}-decompressed data is not a TFRecord"
        )
    return TFRecordError(
        f"{where}: length checksum mismatch; the file may be compressed or not a TFRecord at all "
        "(if it is compressed, set input.compression: gzip or zlib)"
    )


def _corrupt(index: int, offset: int, compression: str, error: zlib.error) -> TFRecordError:
    if offset == 0:
        return TFRecordError(
            f"the file is not {compression}-compressed, or is damaged at its start ({error}); check input.compression"
        )
    return TFRecordError(f"the {compression} data is corrupt at {_where(index, offset, compression)} ({error})")


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


def _bytes_feature(example, name: str) -> bytes | None:
    feature = example.features.feature.get(name)
    if feature is None or feature.WhichOneof("kind") != "bytes_list" or not feature.bytes_list.value:
        return None
    return feature.bytes_list.value[0]


def read(fs, path: str, url: str, options: dict[str, Any]) -> Iterator:
    from google.protobuf.message import DecodeError

    from pipeline.sources import Record

    example_class = _example_class()
    with fs.open(path, "rb") as f:
        head = _read(f, _HEADER)
        compression = _compression(options.get("compression") or "auto", path.rsplit("/", 1)[-1], head)
        source = _Joined(head, f)
        if compression == "none":
            stream, complete = source, lambda: True
        else:
            inflated = _Inflated(source, compression)
            stream, complete = io.BufferedReader(inflated, buffer_size=_CHUNK), lambda: inflated.complete
        for index, offset, payload in records(stream, compression, complete):
            where = _where(index, offset, compression)
            if payload is None:
                yield Record(f"{url}#{index}", url, None, f"{where}: data checksum mismatch (the record is corrupt)")
                continue
            try:
                example = example_class.FromString(payload)
            except DecodeError as error:
                yield Record(f"{url}#{index}", url, None, f"{where}: not a tf.train.Example ({error})")
                continue
            key = next((k for name in KEY_FEATURES if (k := _bytes_feature(example, name))), None)
            image_id = f"{url}#{key.decode(errors='replace') if key else index}"
            data = _bytes_feature(example, "image/encoded")
            yield Record(image_id, url, data, None if data is not None else "record has no image/encoded bytes")
