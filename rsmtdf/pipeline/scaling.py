"""A recipe's scaling resolved against its data: the one `BandScaling` every network input uses.

Scaling modes (`[data] scaling`):

- `dtype`: divided by the dtype's range (uint8 by 255, uint16 by 65535); floats taken as in [0, 1].
- `max_value`: divided by `[data] max_value`.
- `percentile`: each band stretched from its 2nd to its 98th percentile (`band_stats.json`), clipped.
- `auto` (default): `max_value` when the recipe sets one; else `percentile` when the statistics exist
  and the data is not 8-bit; else `dtype`. 8-bit data therefore reaches networks exactly as before.

The student sees `[student] bands` (default: the teachers' three), ordered with the teachers' bands
first, so pretrained RGB weights stay on R, G, B and the teachers' input is the student's first
three channels of the same view.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config.recipe import Recipe
from ..data.bandstats import stats_path
from ..errors import RsmtdfError
from ..transforms.pixels import NODATA_FILL
from ..transforms.scaling import BandScaling


def student_bands(recipe: Recipe) -> tuple[int, ...]:
    """The student's raster bands: the teachers' three first, then the rest of `[student] bands`."""
    teacher = tuple(recipe.data.bands)
    asked = tuple(recipe.student.bands) or teacher
    missing = [b for b in teacher if b not in asked]
    if missing:
        grey = "; a one-band raster is read as grey: [data] bands = [0, 0, 0]" if len(set(asked)) == 1 else ""
        raise RsmtdfError(f"{recipe.where('student.bands')}: must include the teachers' bands {list(teacher)} "
                          f"([data] bands; missing {missing}): the teachers see three of the student's bands{grey}")
    return teacher + tuple(b for b in asked if b not in teacher)


def resolve_scaling(recipe: Recipe, dtype: str, count: int, stats: dict | None,
                    bands: tuple[int, ...] | None = None) -> BandScaling:
    """The scaling of `bands` (default: the student's) for data of `dtype` with `count` bands, resolved
    by the recipe's `[data] scaling` (see the module docstring); every problem in one line."""
    data = recipe.data
    bands = student_bands(recipe) if bands is None else bands
    where = recipe.where("data.scaling")
    mode = data.scaling
    if mode == "auto":
        mode = "max_value" if data.max_value is not None else \
            "percentile" if stats is not None and dtype != "uint8" else "dtype"
    source = [b if count > 1 else 0 for b in bands]  # a single band is shown as grey on every channel
    if count > 1 and max(bands) >= count:
        raise RsmtdfError(f"{recipe.where('student.bands')}: band {max(bands)} asked for, the rasters have {count} "
                          f"bands (0..{count - 1})")
    if stats is not None and (stats["dtype"] != dtype or len(stats["bands"]) != count):
        raise RsmtdfError(f"{stats_path(data.splits)}: statistics of {len(stats['bands'])} {stats['dtype']} bands, "
                          f"the dataset has {count} {dtype} bands; run `rsmtdf stats` again")
    if mode == "max_value":
        if data.max_value is None:
            raise RsmtdfError(f"{where}: scaling \"max_value\" needs [data] max_value")
        low, high = (0.0,) * len(bands), (data.max_value,) * len(bands)
    elif mode == "dtype":
        top = float(np.iinfo(dtype).max) if np.issubdtype(np.dtype(dtype), np.integer) else 1.0
        low, high = (0.0,) * len(bands), (top,) * len(bands)
    else:
        if stats is None:
            raise RsmtdfError(f"{where}: percentile scaling needs {stats_path(data.splits)}; run `rsmtdf stats` first")
        per = [stats["bands"][b] for b in source]
        empty = [b for b, s in zip(bands, per) if not s["count"]]
        if empty:
            raise RsmtdfError(f"{stats_path(data.splits)}: band {empty[0]} has no valid pixel to scale by")
        low = tuple(float(s["p2"]) for s in per)
        high = tuple(float(s["p98"]) if s["p98"] > s["p2"] else float(s["p2"]) + 1.0 for s in per)
    scaling = BandScaling(tuple(bands), None, low, high, mode, dtype)
    return dataclasses.replace(scaling, fill=tuple(NODATA_FILL) + extra_band_norm(scaling, stats, recipe)[0])


def extra_band_norm(scaling: BandScaling, stats: dict | None, recipe: Recipe) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) in [0, 1] units of the bands past the teachers' three, from the statistics: the
    stretched moments under percentile scaling, the moments divided by the range otherwise."""
    extra = range(3, len(scaling.bands))
    if not extra:
        return (), ()
    if stats is None:
        raise RsmtdfError(f"{recipe.where('student.bands')}: a student with bands beyond the teachers' three "
                          f"normalises them with {stats_path(recipe.data.splits)}; run `rsmtdf stats` first")
    means, stds = [], []
    for k in extra:
        s = stats["bands"][scaling.bands[k]]
        if scaling.mode == "percentile":
            m, sd = s["stretched"]["mean"], s["stretched"]["std"]
        else:
            span = scaling.high[k] - scaling.low[k]
            m, sd = (s["mean"] - scaling.low[k]) / span, s["std"] / span
        means.append(float(m))
        stds.append(float(max(sd, 1e-6)))
    return tuple(means), tuple(stds)
