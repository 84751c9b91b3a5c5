"""How raster pixels become network input in [0, 1]: which bands, and each band's scale.

One frozen `BandScaling`, resolved once from the recipe (`pipeline.scaling`), is what training,
extraction, `show`, `evaluate` and `predict` all apply (`BandScaling.unit`). It is part of the
identity of every cache (the teachers' three bands) and model (the student's bands), compared
wherever data meets a model, so a model is never fed data scaled another way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import RsmtdfError
from ..utils.records import may_differ, unknown_when_none
from .pixels import NODATA_FILL, pick_bands, to_unit_rgb, unit_pixels


@dataclass(frozen=True)
class BandScaling:
    """Raster bands (0-based) a network sees and how each reaches [0, 1]: `(v - low) / (high - low)`
    clipped, per band. Unresolved (`low`/`high` None, as `BandScaling()` before any dtype is known):
    divided by `max_value`, or by the dtype's range when it is None. `fill` is what pixels without
    data become per band [default: the ImageNet mean on three bands]."""

    bands: tuple[int, ...] = (0, 1, 2)
    max_value: float | None = field(default=None, metadata=may_differ("an unresolved divisor: low and high say it"))
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    mode: str = "dtype"
    dtype: str | None = None
    fill: tuple[float, ...] | None = field(default=None, metadata=unknown_when_none(
        "not recorded by caches made before nodata fills were"))

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


def check_data(scaling: BandScaling, dtype: str, count: int, where: str) -> None:
    """Refuse data a model trained with `scaling` would see scaled otherwise: another dtype, too few bands."""
    if scaling.dtype is not None and dtype != scaling.dtype:
        raise RsmtdfError(f"{where}: {dtype} pixels, but the model was trained on {scaling.describe()}; "
                          "scaled the same way they would be wrong")
    if count > 1 and max(scaling.bands) >= count or count == 1 and len(scaling.bands) != 3:
        raise RsmtdfError(f"{where}: {count} bands, but the model was trained on {scaling.describe()}")
