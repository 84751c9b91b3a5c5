"""Decoded tiles kept by loader workers: exactly what `load` returned, bounded in bytes, LRU."""

from __future__ import annotations

import numpy as np

from rsmtdf.data.datasets import Sample
from rsmtdf.data.tilecache import DecodedTiles, sample_bytes


def _sample(k: int) -> Sample:
    return Sample(f"t{k}", np.full((8, 8, 3), k, np.uint8), np.full((8, 8), k, np.uint8))


def test_tiles_are_decoded_once_and_the_store_stays_within_its_bound():
    loads = []

    def loader(k):
        def load():
            loads.append(k)
            return _sample(k)
        return load

    size = sample_bytes(_sample(0))
    tiles = DecodedTiles(2 * size)  # room for two tiles
    first = tiles.get(("t0", True), loader(0))
    assert tiles.get(("t0", True), loader(0)) is first and loads == [0]  # kept: no second decode
    tiles.get(("t1", True), loader(1))
    tiles.get(("t0", True), loader(0))  # t0 is now the most recently used
    tiles.get(("t2", True), loader(2))  # evicts t1, the least recently used
    assert tiles.used <= 2 * size and loads == [0, 1, 2]
    tiles.get(("t0", True), loader(0))
    tiles.get(("t1", True), loader(1))
    assert loads == [0, 1, 2, 1]
    assert np.array_equal(tiles.get(("t1", True), loader(1)).image, _sample(1).image)


def test_zero_megabytes_keeps_nothing():
    tiles = DecodedTiles(0)
    calls = []
    for _ in range(2):
        tiles.get(("t0", False), lambda: calls.append(1) or _sample(0))
    assert len(calls) == 2 and tiles.used == 0
