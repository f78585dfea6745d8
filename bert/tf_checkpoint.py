"""Read Google's TensorFlow BERT checkpoints (TF "V2" TensorBundle) without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index`` plus ``PREFIX.data-0000K-of-0000N`` shards.

``.index`` is a LevelDB-style SSTable:

* file = data blocks | metaindex block | index block | 48-byte footer.
* footer = metaindex handle, index handle (each two varints: offset, size), zero padding to
  40 bytes, then the little-endian magic ``0xdb4775248b80fb57``.
* every block is followed by a 5-byte trailer: compression type (0 = none, 1 = snappy) and
  the masked crc32c of block + type byte.
* a block holds entries ``varint shared | varint non_shared | varint value_len | key suffix |
  value`` (keys are prefix-compressed against the previous key), then uint32 restart offsets
  and their uint32 count. The index block's values are handles of the data blocks.

In the data blocks the empty key ``""`` maps to a ``BundleHeaderProto`` (num_shards,
endianness) and every other key is a tensor name mapping to a ``BundleEntryProto`` (dtype,
shape, shard_id, offset, size, crc32c). A tensor's bytes are ``size`` raw bytes at ``offset``
in its shard, in C order.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from bert.errors import CheckpointError

_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_TRAILER_LEN = 5  # 1 byte compression type + 4 bytes masked crc32c

# TensorFlow DataType enum values (types.proto) -> numpy dtype of the stored bytes.
_DTYPES = {1: "f4", 2: "f8", 3: "i4", 9: "i8", 19: "f2", 14: "u2"}
_DT_BFLOAT16 = 14


class _FormatError(ValueError):
    """Raised by the low-level decoders; turned into CheckpointError with the file name."""


# ---------------------------------------------------------------- crc32c (Castagnoli)

def _make_crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _make_crc_table()


def _masked_crc32c(data: bytes | memoryview) -> int:
    """TF stores crc32c "masked" (rotated + constant) so CRCs of CRCs stay well-spread.

    Pure Python, about 10 MB/s: fine for index blocks, opt-in for tensor bytes.
    """
    crc, table = 0xFFFFFFFF, _CRC_TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- varints and protobuf

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _FormatError("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _FormatError("varint longer than 10 bytes")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) of a protobuf message: ints for varint/fixed, bytes for
    length-delimited. Only what BundleEntryProto/BundleHeaderProto need; groups are errors."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise _FormatError("fixed-width protobuf field is truncated")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _FormatError("length-delimited protobuf field is truncated")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise _FormatError(f"unsupported protobuf wire type {wire} (field {field})")
        if field == 0:
            raise _FormatError("protobuf field number 0")
        yield field, value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    """TensorShapeProto: repeated Dim dim = 2 (Dim: int64 size = 1); unknown_rank = 3."""
    dims = []
    for field, value in _proto_fields(buf):
        if field == 2:
            size = next((v for f, v in _proto_fields(value) if f == 1), 0)
            if size >= 2**63:  # int64 -1 ("unknown") arrives as a huge unsigned varint
                raise _FormatError("tensor shape has an unknown (negative) dimension")
            dims.append(size)
        elif field == 3 and value:
            raise _FormatError("tensor shape has unknown rank")
    return tuple(dims)


def _parse_entry(buf: bytes) -> dict:
    """BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6, slices=7."""
    entry = {"dtype": 0, "shape": (), "shard_id": 0, "offset": 0, "size": 0, "crc32c": None}
    names = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size", 6: "crc32c"}
    for field, value in _proto_fields(buf):
        if field == 2:
            entry["shape"] = _parse_shape(value)
        elif field == 7:
            raise _FormatError("partitioned (sliced) variables are not supported")
        elif field in names:
            entry[names[field]] = value
    return entry


# ---------------------------------------------------------------- SSTable

def _read_block(data: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    end = offset + size + _TRAILER_LEN
    if end > len(data):
        raise _FormatError(f"block at offset {offset} (size {size}) runs past the end of the file; truncated?")
    block, kind = data[offset:offset + size], data[offset + size]
    if kind != 0:
        # TF always writes uncompressed bundles; snappy would need a decoder we don't ship.
        raise _FormatError(f"block at offset {offset} is compressed (type {kind}); only uncompressed is supported")
    (stored_crc,) = struct.unpack_from("<I", data, offset + size + 1)
    if _masked_crc32c(data[offset:offset + size + 1]) != stored_crc:
        raise _FormatError(f"block at offset {offset} fails its crc32c check; corrupt file")
    return block


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Walk a block's entries in order, undoing the key prefix compression."""
    if len(block) < 4:
        raise _FormatError("block is too short to hold its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise _FormatError("block restart array is larger than the block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + vlen > limit:
            raise _FormatError("block entry is malformed")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + vlen]
        pos += vlen


def _handle(buf: bytes, pos: int = 0) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


def _table_items(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable held in ``data``, in key order."""
    if len(data) < _FOOTER_LEN:
        raise _FormatError(f"file is {len(data)} bytes, shorter than the {_FOOTER_LEN}-byte footer; truncated?")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, _FOOTER_LEN - 8)
    if magic != _MAGIC:
        raise _FormatError(f"bad magic number {magic:#018x} (want {_MAGIC:#018x}); not a TF checkpoint index, or truncated")
    _metaindex, pos = _handle(footer)
    index_handle, _ = _handle(footer, pos)
    for _sep, value in _block_entries(_read_block(data, index_handle)):
        data_handle, _ = _handle(value)
        yield from _block_entries(_read_block(data, data_handle))


# ---------------------------------------------------------------- tensors

def _shard_path(prefix: str, shard: int, num_shards: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")


def _decode_tensor(raw: bytearray, entry: dict, big_endian: bool, where: Path, name: str) -> np.ndarray:
    code = entry["dtype"]
    dtype = np.dtype(_DTYPES[code]).newbyteorder(">" if big_endian else "<")
    shape = entry["shape"]
    if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CheckpointError(f"{where}: tensor {name!r} has {len(raw)} bytes, which does not fit shape {shape}")
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if code == _DT_BFLOAT16:
        # bfloat16 is the top half of a float32: shift the bits into place.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_tf_checkpoint(
    prefix: str | Path,
    keep: Callable[[str], bool] | None = None,
    verify_crc: bool = False,
) -> dict[str, np.ndarray]:
    """Load the tensors of TF checkpoint ``prefix`` (e.g. ``DIR/bert_model.ckpt``).

    ``keep(name)`` returning False skips a tensor without reading its bytes (optimizer slots,
    pretraining heads). ``verify_crc`` checks each kept tensor's crc32c (slow: pure Python).
    Raises CheckpointError naming the file for anything missing, truncated or malformed.
    """
    prefix = str(prefix)
    index_path = Path(prefix + ".index")
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: checkpoint index file not found")
    try:
        header, entries = None, {}
        for key, value in _table_items(index_path.read_bytes()):
            if key == b"":
                header = dict(_proto_fields(value))
                continue
            name = key.decode("utf-8")
            if keep is None or keep(name):
                entries[name] = _parse_entry(value)
    except (_FormatError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path}: {exc}") from None
    if header is None:
        raise CheckpointError(f"{index_path}: no bundle header (empty key); not a TF V2 checkpoint index")
    for name, entry in entries.items():
        # Checked before any data is read, so a bad tensor fails fast on a multi-GB checkpoint.
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{index_path}: tensor {name!r} has unsupported dtype (TF DataType {entry['dtype']}); "
                                  f"supported: float32, float16, bfloat16, float64, int32, int64")
    num_shards, big_endian = header.get(1, 1), header.get(2, 0) == 1
    return _read_tensors(prefix, entries, num_shards, big_endian, verify_crc)


def _read_tensors(prefix: str, entries: dict[str, dict], num_shards: int, big_endian: bool,
                  verify_crc: bool) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    files: dict[int, tuple[Path, BinaryIO, int]] = {}  # shard -> (path, open file, size)
    try:
        # Read in (shard, offset) order so each shard file is scanned forwards once.
        for name, entry in sorted(entries.items(), key=lambda kv: (kv[1]["shard_id"], kv[1]["offset"])):
            shard = entry["shard_id"]
            if shard not in files:
                if shard >= num_shards:
                    raise CheckpointError(f"{prefix}.index: tensor {name!r} is in shard {shard} "
                                          f"but the header says {num_shards} shard(s)")
                path = _shard_path(prefix, shard, num_shards)
                if not path.is_file():
                    raise CheckpointError(f"{path}: checkpoint data file not found")
                files[shard] = (path, path.open("rb"), path.stat().st_size)
            path, handle, file_size = files[shard]
            offset, size = entry["offset"], entry["size"]
            if offset + size > file_size:
                raise CheckpointError(f"{path}: tensor {name!r} needs bytes {offset}..{offset + size} "
                                      f"but the file has {file_size}; truncated?")
            raw = bytearray(size)  # bytearray so the returned arrays are writable
            handle.seek(offset)
            if handle.readinto(raw) != size:
                raise CheckpointError(f"{path}: short read for tensor {name!r}; truncated?")
            if verify_crc and entry["crc32c"] is not None and _masked_crc32c(raw) != entry["crc32c"]:
                raise CheckpointError(f"{path}: tensor {name!r} fails its crc32c check; corrupt file")
            tensors[name] = _decode_tensor(raw, entry, big_endian, path, name)
    finally:
        for _path, handle, _size in files.values():
            handle.close()
    return tensors
