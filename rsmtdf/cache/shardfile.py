"""One chunk of a local zarr v3 shard read straight from its file, for the cache's target arrays.

Targets are stored as zarr v3 shards whose chunks carry only the `bytes` and `crc32c` codecs (the
default since `bench codec`), every part of every storage kind (float16 values, int8 and packed
4-bit values, their float16 scales). Reading one (sample, view) chunk is then two reads: the shard's index
at the end of the file, checked by its crc32c, and the chunk's bytes, checked by theirs. Through
zarr's async machinery the same read costs about five times the CPU (`bench feed`), which a GPU's
loader cores cannot spare. Arrays with any other codec, and remote stores, are read through zarr.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

MISSING = 2**64 - 1  # offset and length of a chunk the shard does not hold


class ShardDamaged(ValueError):
    """The stored bytes are not what was written ("checksum" in the message, as zarr's own)."""


class ShardFile:
    """Reads whole chunks of one array of shards with `bytes` + `crc32c` chunks and index."""

    def __init__(self, folder: Path, array: zarr.Array, sharding: ShardingCodec) -> None:
        self.folder, self.encoding = folder, array.metadata.chunk_key_encoding
        self.dtype, self.chunk = np.dtype(array.dtype).newbyteorder("<"), tuple(sharding.chunk_shape)
        self.per_shard = tuple(s // c for s, c in zip(array.shards, self.chunk))
        self.index_bytes = 16 * math.prod(self.per_shard) + 4
        self.fill = array.fill_value

    @classmethod
    def of(cls, array: zarr.Array) -> ShardFile | None:
        """The direct reader of `array`, or None when zarr must read it (other codecs, not local)."""
        codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
        if not isinstance(array.store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        plain = (BytesCodec(endian="little"), Crc32cCodec())
        single = (BytesCodec(endian=None), Crc32cCodec())  # one-byte values (int8, packed uint8): no byte order
        chunks_plain = tuple(sharding.codecs) == plain or (np.dtype(array.dtype).itemsize == 1 and
                                                            tuple(sharding.codecs) == single)
        if not chunks_plain or tuple(sharding.index_codecs) != plain or \
                sharding.index_location != ShardingCodecIndexLocation.end:
            return None
        return cls(Path(array.store.root) / array.path, array, sharding)

    def read(self, chunk: tuple[int, ...]) -> np.ndarray:
        """The chunk at chunk-grid coordinates `chunk`; the fill value, as zarr reads it, where it
        was never written (its shard file or its index entry missing)."""
        out = np.empty(self.chunk, self.dtype)
        self.read_into(chunk, out)
        return out

    def read_into(self, chunk: tuple[int, ...], out: np.ndarray) -> None:
        """`read` into `out` (C-contiguous, of the chunk's size and dtype, e.g. a row of a pinned
        batch): the bytes go from the file straight into it."""
        shard = tuple(c // p for c, p in zip(chunk, self.per_shard))
        local = np.ravel_multi_index(tuple(c % p for c, p in zip(chunk, self.per_shard)), self.per_shard)
        try:
            fd = os.open(self.folder / self.encoding.encode_chunk_key(shard), os.O_RDONLY)
        except FileNotFoundError:
            out[...] = self.fill
            return
        try:
            index = _checked(_pread(fd, self.index_bytes, os.fstat(fd).st_size - self.index_bytes), "shard index")
            offset, length = (int(v) for v in index.view("<u8")[2 * local : 2 * local + 2])
            if offset == length == MISSING:
                out[...] = self.fill
                return
            if length != out.nbytes + 4:
                raise ShardDamaged(f"chunk of {length - 4} bytes where {self.chunk} {self.dtype} were written")
            data, crc = out.reshape(-1).view(np.uint8), np.empty(4, np.uint8)
            if os.preadv(fd, [data, crc], offset) != length:
                raise ShardDamaged(f"shard file ends inside a chunk (checksum not readable at {offset}+{length})")
        finally:
            os.close(fd)
        seen = data.view()
        seen.flags.writeable = False  # the checksum library takes read-only buffers only
        if google_crc32c.value(seen) != int.from_bytes(crc.tobytes(), "little"):
            raise ShardDamaged("chunk checksum mismatch")


def _pread(fd: int, length: int, offset: int) -> np.ndarray:
    if offset < 0:
        raise ShardDamaged("shard file shorter than its index (checksum not readable)")
    buf = np.empty(length, np.uint8)
    if os.preadv(fd, [buf], offset) != length:
        raise ShardDamaged(f"shard file ends inside a chunk (checksum not readable at {offset}+{length})")
    return buf


def _checked(buf: np.ndarray, what: str) -> np.ndarray:
    """The bytes before the trailing little-endian crc32c, if it matches them."""
    buf.flags.writeable = False  # the checksum library takes read-only buffers only
    if google_crc32c.value(buf[:-4]) != int.from_bytes(buf[-4:].tobytes(), "little"):
        raise ShardDamaged(f"{what} checksum mismatch")
    buf.flags.writeable = True
    return buf[:-4]
