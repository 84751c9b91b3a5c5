"""Chunks read straight from local shard files are zarr's chunks, byte for byte, and damage or
absence reads as zarr reads it; arrays of other codecs are left to zarr."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from rsmtdf.cache.format import checksummed
from rsmtdf.cache.shardfile import ShardDamaged, ShardFile


def array(tmp_path, compressor=None, fill=np.nan, dtype="float16") -> zarr.Array:
    """A (5 samples, 2 views, 6 tokens, 4 dims) array, chunks of one (sample, view), shards of 2 samples."""
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    arr = group.create_array("teachers/t", shape=(5, 2, 6, 4), chunks=(1, 1, 6, 4), shards=(2, 2, 6, 4),
                             dtype=dtype, fill_value=fill, compressors=checksummed(compressor))
    return arr


def test_every_chunk_equals_zarrs_and_unwritten_ones_are_the_fill(tmp_path):
    arr = array(tmp_path)
    values = np.random.default_rng(0).standard_normal((5, 2, 6, 4)).astype(np.float16)
    arr[:4] = values[:4]  # shards 0 and 1 written, shard 2 (sample 4) never
    arr[1, 1] = np.nan  # zarr omits a chunk that equals the fill value: its index entry says missing
    direct = ShardFile.of(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["teachers/t"])
    assert direct is not None
    for i in range(5):
        for a in range(2):
            got = direct.read((i, a, 0, 0))
            assert got.dtype == np.float16 and got.flags.writeable
            np.testing.assert_array_equal(got[0, 0], arr[i, a])  # NaN == NaN here
    assert np.isnan(direct.read((4, 0, 0, 0))).all() and np.isnan(direct.read((1, 1, 0, 0))).all()


@pytest.mark.parametrize("where", ["chunk", "index", "truncated"])
def test_damage_is_a_checksum_error(tmp_path, where):
    arr = array(tmp_path)
    arr[:] = np.ones((5, 2, 6, 4), np.float16)
    path = tmp_path / "s.zarr" / "teachers" / "t" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    if where == "chunk":
        data[10] ^= 0x01
    elif where == "index":
        data[-10] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    direct = ShardFile.of(zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["teachers/t"])
    with pytest.raises(ShardDamaged, match="checksum"):
        direct.read((0, 0, 0, 0))


def test_other_codecs_and_stores_are_left_to_zarr(tmp_path):
    assert ShardFile.of(array(tmp_path, BloscCodec(cname="zstd"))) is None
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    mem = group.create_array("t", shape=(2, 2), chunks=(1, 1), shards=(2, 2), dtype="float16",
                             compressors=checksummed(None))
    assert ShardFile.of(mem) is None
