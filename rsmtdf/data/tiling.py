"""Large scenes cut into tiles on a grid: the tiles' windows, their stable names, and the tiles left
out because they hold no valid pixel.

Edge rule: tiles start on the stride grid from the scene's top-left corner, and the last row and
column of tiles is cut at the scene's edge (a partial tile, smaller than `size`), as torchgeo keeps
its last partial chip. With `stride == size` every pixel lies in exactly one tile and none is read
twice; a smaller stride overlaps tiles, and no tile lies wholly inside the one before it.

Names: `<scene id>@<row>_<col>`, the tile's pixel offsets in its scene, so adding scenes or changing
which tiles are empty never renames a tile (split lists, caches and checkpoints stay meaningful).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from rasterio.windows import Window

from ..io.raster import open_cached, window_grid


@dataclass(frozen=True)
class TileGrid:
    """Tiles of `size` px every `stride` px (`[data] tile_size`, `tile_stride`)."""

    size: int
    stride: int

    def windows(self, height: int, width: int) -> list[Window]:
        """The tiles of a height×width scene in raster order, cut at its edges."""
        bounds = Window(0, 0, width, height)
        return [w.intersection(bounds) for row in window_grid(height, width, self.size, self.stride, edge="partial")
                for w in row]


def tile_id(scene_id: str, window: Window) -> str:
    return f"{scene_id}@{int(window.row_off)}_{int(window.col_off)}"


def empty_tiles(path: Path, grid: TileGrid) -> list[bool]:
    """For each tile of the scene at `path` (in `grid.windows` order): True if no pixel is valid.

    Free for rasters that cannot mark a pixel missing (no nodata, alpha or mask band; integers, so no
    NaN); otherwise the tiles' validity is read window by window (memory: one tile), once per file
    version and process."""
    st = path.stat()
    return _empty_tiles(path, st.st_mtime_ns, st.st_size, grid)


@functools.lru_cache(maxsize=256)
def _empty_tiles(path: Path, mtime_ns: int, size: int, grid: TileGrid) -> list[bool]:
    src = open_cached(path)
    windows = grid.windows(src.height, src.width)
    if src.all_valid():
        return [False] * len(windows)
    return [not src.read_raw(w)[1].any() for w in windows]
