"""The teacher feature cache: a Zarr v3 store, written shard by shard, read chunk by chunk.

```
<cache>/                      attrs: schema_version, the identity (dataset, splits, views, teachers,
                              storage, input), compute, recipe, shard_samples, complete, versions
  ids              (N,)          str
  views            (N, A, 5)     float32   (scale, y0, x0, hflip, rot90)
  teachers/<name>  (N, A, L, C)  float16   (or int8, with scales/<name> (N, A, L) float16)
  valid            (N, A)        float32   share of each view's crop holding valid pixels
  done             (N_shards,)   uint8
```

Chunk = one (sample, view) of one teacher: the read unit. Shard = S samples × all A views: the
write unit. A worker only writes whole shards it owns and sets the shard's `done` flag after its
data; concurrent writers to one shard would lose data, so ownership is a rule. Unwritten chunks
read as NaN (the fill value), which the reader rejects.

Every chunk of every array ends in a crc32c checksum (zarr's `crc32c` codec after compression), so
bit rot, a damaged chunk header, a truncated or deleted shard is found on read (one line naming the
sample and view), by `rsmtdf inspect --verify`, and undone by `extract-features --repair`.

Lifecycle: `create` (one process: arrays and attrs, made elsewhere and renamed into place on local
disks so racing workers never see half a store) → `write_shard` by owners → `finalize` (checks
every shard, consolidates metadata, sets `complete`).
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zarr_sync

from .. import __version__
from ..errors import RsmtdfError
from ..io.remote import filesystem, is_url
from ..transforms.views import View
from .format import (DIMS, TeacherLayout, checksummed, decode_problem, default_compressor, open_store,
                     quantize_int8, repair_hint)
from .identity import Identity
from .reader import CacheReader

SCHEMA_VERSION = 2  # 2: every chunk carries a crc32c checksum


class FeatureCache:
    """An open cache. `create` makes one; `open` opens an existing one (read-only by default)."""

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self.group = group
        self.attrs = dict(group.attrs)
        self.identity = Identity.from_record(self.attrs, url)  # rsmtdf 0.1's attributes upgraded here
        self.layouts = [TeacherLayout(t.name, t.grid ** 2, t.dim) for t in self.identity.teachers]
        self.num_samples = int(self.attrs["dataset"]["num_samples"])
        self.num_views = self.identity.views.count
        self.shard_samples = int(self.attrs["shard_samples"])
        self._ids: list[str] | None = None

    # ---- creation and opening -------------------------------------------------------------

    @classmethod
    def create(cls, url: str, ids: list[str], identity: Identity, attrs: dict, layouts: list[TeacherLayout],
               shard_samples: int, compressor=None, wanted_in: str | Callable[[str], str] = "this run") -> FeatureCache:
        """Create an empty cache of `identity` (with the other attributes `attrs`), or open the
        existing one if it is the same cache (resume).

        An existing store that is another cache, or not a cache at all, is refused and left as it
        is; the refusal names the first field that differs and where the wanted value came from
        (`wanted_in`: a label, or a function of the field's path)."""
        url = str(url)
        if _exists(url):
            cache = cls.open(url, mode="r+")
            cache.identity.require(identity, url, "the cache", wanted_in, what="holds a different cache: ",
                                   then="; choose another --output or delete it")
            return cache
        target = url
        if not is_url(url):  # build beside, then rename into place: never half a store at `url`
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            target = f"{url}.init-{uuid.uuid4().hex[:8]}"
        try:
            cls._create_arrays(target, ids, {**identity.record(), **attrs}, layouts, shard_samples, compressor)
        except BaseException:  # disk full, interrupted: leave no half-made store behind
            if target != url:
                shutil.rmtree(target, ignore_errors=True)
            raise
        if target != url:
            try:
                os.rename(target, url)
            except OSError:  # another worker created it first (or an empty folder was there)
                if Path(url).is_dir() and not any(Path(url).iterdir()):
                    Path(url).rmdir()
                    os.rename(target, url)
                else:
                    shutil.rmtree(target, ignore_errors=True)
                    return cls.create(url, ids, identity, attrs, layouts, shard_samples, compressor, wanted_in)
        return cls.open(url, mode="r+")

    @staticmethod
    def _create_arrays(target: str, ids: list[str], attrs: dict, layouts: list[TeacherLayout], shard_samples: int,
                       compressor) -> None:
        compressor = default_compressor() if compressor is None else compressor
        small = checksummed(ZstdCodec())
        n, a, s = len(ids), int(attrs["views"]["count"]), shard_samples
        group = zarr.open_group(store=open_store(target, read_only=False), mode="w-", zarr_format=3)
        group.attrs.update({
            "schema_version": SCHEMA_VERSION, **attrs, "shard_samples": s, "complete": False,
            "versions": _versions(), "created_by": f"rsmtdf {__version__}",
        })
        group.create_array("ids", shape=(n,), chunks=(n,), dtype=str, compressors=small,
                           dimension_names=("sample",))[:] = np.array(ids)
        group.create_array("views", shape=(n, a, 5), chunks=(s, a, 5), dtype="float32", fill_value=np.nan,
                           compressors=small, dimension_names=("sample", "view", "param"),
                           attributes={"params": ["scale", "y0", "x0", "hflip", "rot90"]})
        group.create_array("valid", shape=(n, a), chunks=(s, a), dtype="float32", fill_value=np.nan,
                           compressors=small, dimension_names=("sample", "view"),
                           attributes={"meaning": "share of the view's crop holding valid pixels (not NaN, not "
                                                  "nodata, not padding); 0 means training never shows the view"})
        group.create_array("done", shape=(-(-n // s),), chunks=(1,), dtype="uint8", fill_value=0, compressors=small,
                           dimension_names=("shard",))
        dtype = "int8" if attrs["storage"] == "int8" else "float16"
        for lay in layouts:
            meaning = {"meaning": f"teacher '{lay.name}' target tokens (row-major grid) for each stored view"}
            group.create_array(f"teachers/{lay.name}", shape=(n, a, lay.tokens, lay.dim),
                               chunks=(1, 1, lay.tokens, lay.dim), shards=(s, a, lay.tokens, lay.dim),
                               dtype=dtype, fill_value=0 if dtype == "int8" else np.nan,
                               compressors=checksummed(compressor), dimension_names=DIMS, attributes=meaning)
            if dtype == "int8":
                group.create_array(f"scales/{lay.name}", shape=(n, a, lay.tokens), chunks=(1, 1, lay.tokens),
                                   shards=(s, a, lay.tokens), dtype="float16", fill_value=np.nan, compressors=small,
                                   dimension_names=DIMS[:3], attributes={"meaning": "per-token int8 scale"})

    @staticmethod
    def exists(url: str | Path) -> bool:
        """Whether a cache is at `url` (a folder there that is not a cache is refused)."""
        return _exists(str(url))

    @classmethod
    def open(cls, url: str | Path, mode: str = "r") -> FeatureCache:
        url = str(url)
        if not _exists(url):
            raise RsmtdfError(f"{url}: no cache here (run `rsmtdf extract-features` first)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(store=open_store(url, read_only=mode == "r"), mode=mode)
            found = group.attrs.get("schema_version")
            if found == 1:
                raise RsmtdfError(f"{url}: cache of schema 1 (made without chunk checksums); "
                                  f"re-extract it with `rsmtdf extract-features` into a new --output")
            if found != SCHEMA_VERSION:
                raise RsmtdfError(f"{url}: not an rsmtdf cache of schema {SCHEMA_VERSION} (found {found})")
            return cls(url, group)
        except (FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError) as exc:
            raise RsmtdfError(f"{url}: not a readable rsmtdf cache ({type(exc).__name__})") from None

    # ---- shards --------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_samples)

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_samples, min((k + 1) * self.shard_samples, self.num_samples))

    def done_flags(self) -> np.ndarray:
        return self._read("done", lambda: self.group["done"][:]).astype(bool)

    def missing_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done_flags())]

    def write_shard(self, k: int, views: np.ndarray, targets: dict[str, np.ndarray],
                    valid: np.ndarray | None = None) -> int:
        """Write shard k whole (views, their valid shares (None: all 1) and every teacher), then set
        its done flag. Returns bytes.

        Every value is checked finite as stored before anything is written: a NaN or an fp16
        overflow would otherwise be read back as a target (or as an unwritten shard)."""
        r = self.shard_range(k)
        expected = (len(r), self.num_views)
        if views.shape[:2] != expected:
            raise ValueError(f"shard {k}: views {views.shape[:2]} != {expected}")
        stored = {}
        for lay in self.layouts:
            x = targets[lay.name]
            if self.attrs["storage"] == "int8":
                q, scale = quantize_int8(x)
                stored[f"teachers/{lay.name}"], stored[f"scales/{lay.name}"] = q, scale
                check = scale
            else:
                with np.errstate(over="ignore"):  # an overflow becomes inf, which the check names
                    stored[f"teachers/{lay.name}"] = check = x.astype(np.float16)
            self._check_finite(lay.name, check, r)
        self.group["views"][r.start : r.stop] = views
        self.group["valid"][r.start : r.stop] = np.ones(expected, np.float32) if valid is None else valid
        for key, value in stored.items():
            self.group[key][r.start : r.stop] = value
        self.group["done"][k] = 1
        return sum(v.nbytes for v in stored.values())

    def _check_finite(self, teacher: str, x: np.ndarray, r: range) -> None:
        bad = ~np.isfinite(x.reshape(x.shape[0], x.shape[1], -1)).all(axis=-1)
        if bad.any():
            i, a = (int(v) for v in np.argwhere(bad)[0])
            raise RsmtdfError(f"{self.url}: teacher '{teacher}' gives non-finite features (NaN or beyond float16) "
                              f"for sample '{self.ids[r.start + i]}' view {a}; nothing of its shard was written "
                              f"(check the image for NaN or nodata pixels)")

    def shard_arrays(self) -> list[str]:
        """The arrays whose chunk k (along samples) is shard k, done flag first."""
        per_teacher = ("teachers", "scales") if self.attrs["storage"] == "int8" else ("teachers",)
        return ["done", "views", "valid", *(f"{p}/{lay.name}" for lay in self.layouts for p in per_teacher)]

    def shard_keys(self, k: int) -> list[str]:
        """The store keys holding shard k, one per array of `shard_arrays` (a chunk or a shard object)."""
        keys = []
        for name in self.shard_arrays():
            arr = self.group[name]
            keys.append(f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}")
        return keys

    def drop_shard(self, k: int) -> None:
        """Delete shard k from every array (done flag first), so it reads as unwritten and is extracted again."""
        for key in self.shard_keys(k):
            zarr_sync(self.group.store.delete(key))

    def rewrite_ids(self, ids: list[str]) -> None:
        self.group["ids"][:] = np.array(ids)
        self._ids = list(ids)

    def finalize(self) -> None:
        """Check every shard is done, consolidate metadata, mark complete."""
        if missing := self.missing_shards():
            raise RsmtdfError(f"{self.url}: cannot finalize, shards {missing[:10]} are not written")
        self.group.attrs["complete"] = True
        self.attrs["complete"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(open_store(self.url, read_only=False))

    # ---- reading -------------------------------------------------------------------------

    def _read(self, what: str, fn):
        """fn() reading array `what`, a decode or checksum failure said as one line."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - any codec's failure on stored bytes is damage
            raise RsmtdfError(f"{self.url}: array '{what}' is damaged ({decode_problem(exc)}); "
                              f"{repair_hint(self.url)}") from None

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = [str(s) for s in self._read("ids", lambda: self.group["ids"][:])]
        return self._ids

    def views_array(self) -> np.ndarray:
        """(N, A, 5) parameters of every stored view; a missing one (NaN) is refused, naming its sample."""
        views = self._read("views", lambda: self.group["views"][:])
        if np.isnan(views).any() and self.attrs.get("complete"):
            i, a = (int(v) for v in np.argwhere(np.isnan(views).any(axis=-1))[0])
            raise RsmtdfError(f"{self.url}: no stored parameters for sample {i} ('{self.ids[i]}') view {a} "
                              f"(its chunk was deleted); {repair_hint(self.url)}")
        return views

    def valid_array(self) -> np.ndarray:
        """(N, A) share of each stored view's crop that holds valid pixels."""
        return self._read("valid", lambda: self.group["valid"][:])

    def views_of(self, i: int) -> list[View]:
        return [View.from_array(v) for v in self._read("views", lambda: self.group["views"][i])]

    def reader(self) -> CacheReader:
        return CacheReader(self.url, [lay.name for lay in self.layouts], self.attrs["storage"], self.ids)

    def bytes_stored(self, name: str) -> int:
        b = self.group[f"teachers/{name}"].nbytes_stored()
        if self.attrs["storage"] == "int8":
            b += self.group[f"scales/{name}"].nbytes_stored()
        return b


def _exists(url: str) -> bool:
    if is_url(url):
        fs, path = filesystem(url)
        return fs.exists(f"{path}/zarr.json")
    p = Path(url.removeprefix("file://"))
    if p.is_dir() and any(p.iterdir()) and not (p / "zarr.json").exists():
        raise RsmtdfError(f"{p}: exists and is not an rsmtdf cache (nothing there was changed)")
    return (p / "zarr.json").exists()


def _versions() -> dict:
    import numcodecs
    import timm
    import torch

    return {"rsmtdf": __version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "torch": torch.__version__, "timm": timm.__version__, "numpy": np.__version__}
