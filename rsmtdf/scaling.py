"""How raster pixels become network input in [0, 1]: which bands, and each band's scale.

One frozen `BandScaling`, resolved once from the recipe (`[data] bands`, `scaling`, `max_value`,
`[student] bands`), the dataset's dtype and the statistics of `rsmtdf stats`, is what training,
extraction, `show`, `evaluate` and `predict` all apply (`BandScaling.unit`). Its `record()` is
written into the cache's attributes (the teachers' three bands) and into every checkpoint's model
config (the student's bands), and compared wherever data meets a model, so a model is never fed
data scaled another way.

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
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from .bandstats import read_band_stats, stats_path
from .data import NODATA_FILL, SegmentationDataset, pick_bands, to_unit_rgb, unit_pixels
from .errors import RsmtdfError
from .recipe import Recipe


@dataclass(frozen=True)
class BandScaling:
    """Raster bands (0-based) a network sees and how each reaches [0, 1]: `(v - low) / (high - low)`
    clipped, per band. Unresolved (`low`/`high` None, as `BandScaling()` before any dtype is known):
    divided by `max_value`, or by the dtype's range when it is None. `fill` is what pixels without
    data become per band [default: the ImageNet mean on three bands]."""

    bands: tuple[int, ...] = (0, 1, 2)
    max_value: float | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    mode: str = "dtype"
    dtype: str | None = None
    fill: tuple[float, ...] | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> BandScaling:
        """The teachers' bands with the recipe's `max_value`, unresolved (a checkpoint without a record)."""
        return cls(tuple(recipe.data.bands), recipe.data.max_value)

    def unit(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """H×W×C raster (all its bands) → H×W×len(bands) float32 in [0, 1]; invalid pixels get `fill`."""
        divisor, low = self._numbers()
        return to_unit_rgb(image, self.bands, divisor, valid, low, self._fill())

    def pick(self, image: np.ndarray) -> np.ndarray:
        """The raster's bands this scaling reads, in its dtype: what a loader worker ships."""
        return pick_bands(image, self.bands)

    def unit_tensor(self, picked: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`unit` of `pick`'s bands as a tensor, on whichever device they are."""
        divisor, low = self._numbers()
        return unit_pixels(picked, divisor, valid, low, self._fill())

    def _numbers(self) -> tuple[float | Sequence[float] | None, Sequence[float] | None]:
        """(divisor, low) of `to_unit_rgb`: `high - low` and `low`, or `high` alone when low is 0."""
        high = self.max_value if self.high is None else self.high
        if self.low is not None and any(self.low):
            return np.subtract(high, self.low), self.low
        return high, None

    def _fill(self) -> Sequence[float]:
        return NODATA_FILL if self.fill is None else self.fill

    def resolved(self, dtype: str) -> BandScaling:
        """This scaling with its numbers filled in for data of `dtype` (itself if already resolved)."""
        if self.low is not None:
            return self
        top = self.max_value if self.max_value is not None else \
            float(np.iinfo(dtype).max) if np.issubdtype(np.dtype(dtype), np.integer) else 1.0
        n = len(self.bands)
        return dataclasses.replace(self, low=(0.0,) * n, high=(float(top),) * n, dtype=dtype,
                                   mode="max_value" if self.max_value is not None else "dtype")

    def selected(self) -> BandScaling:
        """The same scaling for pixels whose bands were already picked (a windowed read of `bands`)."""
        return dataclasses.replace(self, bands=tuple(range(len(self.bands))))

    def teachers(self) -> BandScaling:
        """The first three bands: what the RGB teachers see (of the same view as the student)."""
        return dataclasses.replace(self, bands=self.bands[:3], low=_first3(self.low), high=_first3(self.high),
                                   fill=_first3(self.fill))

    def record(self) -> dict:
        """Plain data for a cache's attributes or a checkpoint's config (resolved numbers, not just the mode)."""
        return {"bands": list(self.bands), "mode": self.mode, "dtype": self.dtype,
                "low": None if self.low is None else list(self.low),
                "high": None if self.high is None else list(self.high),
                "fill": None if self.fill is None else list(self.fill)}

    @classmethod
    def from_record(cls, record: dict) -> BandScaling:
        tup = (lambda v: None if v is None else tuple(float(x) for x in v))
        return cls(tuple(int(b) for b in record["bands"]), None, tup(record["low"]), tup(record["high"]),
                   record["mode"], record["dtype"], tup(record.get("fill")))

    def describe(self) -> str:
        scale = ", ".join(f"{lo:g}..{hi:g}" for lo, hi in zip(self.low or (), self.high or ()))
        return f"bands {list(self.bands)} of {self.dtype} data, {self.mode} scaling ({scale})"


def _first3(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return None if values is None else values[:3]


def scaling_mismatch(found: dict | None, wanted: dict | None) -> str | None:
    """One phrase saying how two scaling records differ, or None (also when either predates records)."""
    if found is None or wanted is None:
        return None
    keys = ("bands", "dtype", "mode", "low", "high")
    if all(found.get(k) == wanted.get(k) for k in keys):
        return None
    show = lambda r: BandScaling.from_record(r).describe()  # noqa: E731
    return f"its input is {show(found)}, not {show(wanted)}"


def raster_pixels(path) -> tuple[str, int]:
    """(dtype, band count) of a raster, from its header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return src.dtypes[0], src.count
    except RasterioIOError as exc:
        raise RsmtdfError(f"{path}: unreadable image ({str(exc).strip().splitlines()[0]})") from None


def student_bands(recipe: Recipe) -> tuple[int, ...]:
    """The student's raster bands: the teachers' three first, then the rest of `[student] bands`."""
    teacher = tuple(recipe.data.bands)
    asked = tuple(recipe.student.bands) or teacher
    missing = [b for b in teacher if b not in asked]
    if missing:
        raise RsmtdfError(f"{recipe.where('student.bands')}: must include the teachers' bands {list(teacher)} "
                          f"([data] bands; missing {missing}): the teachers see three of the student's bands")
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


def dataset_scaling(recipe: Recipe, dataset: SegmentationDataset) -> tuple[BandScaling, dict | None]:
    """(the student's scaling, the band statistics) for a dataset under a recipe; the teachers' is
    `.teachers()` of it."""
    dtype, count = raster_pixels(dataset.records[0].image)
    stats = read_band_stats(recipe.data.splits)
    return resolve_scaling(recipe, dtype, count, stats), stats


def dataset_record(scaling: BandScaling, dataset: SegmentationDataset) -> dict:
    """The record of `scaling` resolved for the dataset's dtype: what a cache made from it holds."""
    return scaling.resolved(raster_pixels(dataset.records[0].image)[0]).record()


def model_scaling(config: dict, recipe: Recipe) -> BandScaling:
    """How a trained model's input is scaled: its config's record, or (a checkpoint from before
    records) the recipe it was trained with, unresolved."""
    record = config.get("scaling")
    return BandScaling.from_record(record) if record is not None else BandScaling.from_recipe(recipe)


def check_data(scaling: BandScaling, dtype: str, count: int, where: str) -> None:
    """Refuse data a model trained with `scaling` would see scaled otherwise: another dtype, too few bands."""
    if scaling.dtype is not None and dtype != scaling.dtype:
        raise RsmtdfError(f"{where}: {dtype} pixels, but the model was trained on {scaling.describe()}; "
                          "scaled the same way they would be wrong")
    if count > 1 and max(scaling.bands) >= count or count == 1 and len(scaling.bands) != 3:
        raise RsmtdfError(f"{where}: {count} bands, but the model was trained on {scaling.describe()}")
