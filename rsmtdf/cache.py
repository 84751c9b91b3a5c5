"""The teacher feature cache: a Zarr v3 store, written shard by shard, read chunk by chunk.

```
<cache>/                      attrs: schema_version, dataset, splits, views, teachers, storage, ...
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

Lifecycle: `create` (one process: arrays and attrs, made elsewhere and renamed into place on local
disks so racing workers never see half a store) → `write_shard` by owners → `finalize` (checks
every shard, consolidates metadata, sets `complete`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
import zarr.storage
from zarr.codecs import BloscCodec

from . import __version__
from .errors import RsmtdfError
from .views import View

SCHEMA_VERSION = 1
STORAGES = ("float16", "int8")
DIMS = ("sample", "view", "token", "channel")


def default_compressor() -> BloscCodec:
    """Blosc-zstd with bit shuffle: the best size/speed trade-off measured for fp16 features."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _store(url: str, read_only: bool):
    if _is_url(url):
        return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
    return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: x ≈ q · scale, scale = max|x| / 127 over the token's channels."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
    q = np.clip(np.rint(x / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return q, scale[..., 0]


@dataclass(frozen=True)
class TeacherLayout:
    """Shape of one teacher's targets in the cache."""

    name: str
    tokens: int
    dim: int


def expected_attrs(dataset: dict, splits: dict, views: dict, teachers: list[dict], storage: str) -> dict:
    """The attributes that decide whether an existing cache is the one a run asks for."""
    return {"dataset": dataset, "splits": splits, "views": views, "teachers": teachers, "storage": storage}


def mismatch(found: dict, wanted: dict) -> str | None:
    """One phrase saying how a cache differs from what is asked for, or None if it matches."""
    fd, wd = found["dataset"], wanted["dataset"]
    if fd["name"] != wd["name"] or fd.get("ids_sha256") != wd.get("ids_sha256"):
        return f"it was made from dataset '{fd['name']}' ({fd['num_samples']} samples at {fd['root']}), " \
               f"not '{wd['name']}' ({wd['num_samples']} samples at {wd['root']})"
    if found["splits"]["sha256"] != wanted["splits"]["sha256"]:
        return f"its split lists differ (sha256 {found['splits']['sha256'][:12]} vs {wanted['splits']['sha256'][:12]})"
    if found["views"] != wanted["views"]:
        return f"its views differ ({found['views']} vs {wanted['views']})"
    ft = [(t["name"], t["model"], t["layer"], t["input_size"], t["weights_sha256"]) for t in found["teachers"]]
    wt = [(t["name"], t["model"], t["layer"], t["input_size"], t["weights_sha256"]) for t in wanted["teachers"]]
    if ft != wt:
        return f"its teachers differ ({[t[0] for t in ft]} vs {[t[0] for t in wt]}, or their weights/layers)"
    if found["storage"] != wanted["storage"]:
        return f"its storage is {found['storage']}, not {wanted['storage']}"
    return None


class FeatureCache:
    """An open cache. `create` makes one; `open` opens an existing one (read-only by default)."""

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url = url
        self.group = group
        self.attrs = dict(group.attrs)
        self.layouts = [TeacherLayout(t["name"], t["grid"] ** 2, t["dim"]) for t in self.attrs["teachers"]]
        self.num_samples = int(self.attrs["dataset"]["num_samples"])
        self.num_views = int(self.attrs["views"]["count"])
        self.shard_samples = int(self.attrs["shard_samples"])

    # ---- creation and opening -------------------------------------------------------------

    @classmethod
    def create(cls, url: str, ids: list[str], attrs: dict, layouts: list[TeacherLayout],
               shard_samples: int, compressor=None) -> FeatureCache:
        """Create an empty cache, or open the existing one if it is the same cache (resume).

        An existing store that is another cache, or not a cache at all, is refused and left as it is.
        """
        url = str(url)
        if _exists(url):
            cache = cls.open(url, mode="r+")
            if (why := mismatch(cache.attrs, attrs)) is not None:
                raise RsmtdfError(f"{url}: holds a different cache: {why}; choose another --output or delete it")
            return cache
        target = url
        if not _is_url(url):  # build beside, then rename into place: never half a store at `url`
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            target = f"{url}.init-{uuid.uuid4().hex[:8]}"
        compressor = default_compressor() if compressor is None else compressor
        n, a, s = len(ids), int(attrs["views"]["count"]), shard_samples
        group = zarr.open_group(store=_store(target, read_only=False), mode="w-", zarr_format=3)
        group.attrs.update({
            "schema_version": SCHEMA_VERSION, **attrs, "shard_samples": s, "complete": False,
            "versions": _versions(), "created_by": f"rsmtdf {__version__}",
        })
        group.create_array("ids", shape=(n,), chunks=(n,), dtype=str, dimension_names=("sample",))[:] = np.array(ids)
        group.create_array("views", shape=(n, a, 5), chunks=(s, a, 5), dtype="float32", fill_value=np.nan,
                           dimension_names=("sample", "view", "param"),
                           attributes={"params": ["scale", "y0", "x0", "hflip", "rot90"]})
        group.create_array("valid", shape=(n, a), chunks=(s, a), dtype="float32", fill_value=np.nan,
                           dimension_names=("sample", "view"),
                           attributes={"meaning": "share of the view's crop holding valid pixels (not NaN, not "
                                                  "nodata, not padding); 0 means training never shows the view"})
        group.create_array("done", shape=(-(-n // s),), chunks=(1,), dtype="uint8", fill_value=0,
                           dimension_names=("shard",))
        dtype = "int8" if attrs["storage"] == "int8" else "float16"
        for lay in layouts:
            meaning = {"meaning": f"teacher '{lay.name}' target tokens (row-major grid) for each stored view"}
            group.create_array(f"teachers/{lay.name}", shape=(n, a, lay.tokens, lay.dim),
                               chunks=(1, 1, lay.tokens, lay.dim), shards=(s, a, lay.tokens, lay.dim),
                               dtype=dtype, fill_value=0 if dtype == "int8" else np.nan, compressors=compressor,
                               dimension_names=DIMS, attributes=meaning)
            if dtype == "int8":
                group.create_array(f"scales/{lay.name}", shape=(n, a, lay.tokens), chunks=(1, 1, lay.tokens),
                                   shards=(s, a, lay.tokens), dtype="float16", fill_value=np.nan,
                                   dimension_names=DIMS[:3], attributes={"meaning": "per-token int8 scale"})
        if target != url:
            try:
                os.rename(target, url)
            except OSError:  # another worker created it first (or an empty folder was there)
                if Path(url).is_dir() and not any(Path(url).iterdir()):
                    Path(url).rmdir()
                    os.rename(target, url)
                else:
                    shutil.rmtree(target, ignore_errors=True)
                    return cls.create(url, ids, attrs, layouts, shard_samples, compressor)
        return cls.open(url, mode="r+")

    @classmethod
    def open(cls, url: str | Path, mode: str = "r") -> FeatureCache:
        url = str(url)
        if not _exists(url):
            raise RsmtdfError(f"{url}: no cache here (run `rsmtdf extract-features` first)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                group = zarr.open_group(store=_store(url, read_only=mode == "r"), mode=mode)
            if group.attrs.get("schema_version") != SCHEMA_VERSION:
                raise RsmtdfError(f"{url}: not an rsmtdf cache of schema {SCHEMA_VERSION} "
                                  f"(found {group.attrs.get('schema_version')})")
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
        return self.group["done"][:].astype(bool)

    def missing_shards(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done_flags())]

    def write_shard(self, k: int, views: np.ndarray, targets: dict[str, np.ndarray],
                    valid: np.ndarray | None = None) -> int:
        """Write shard k whole (views, their valid shares (None: all 1) and every teacher), then set
        its done flag. Returns bytes."""
        r = self.shard_range(k)
        expected = (len(r), self.num_views)
        if views.shape[:2] != expected:
            raise ValueError(f"shard {k}: views {views.shape[:2]} != {expected}")
        written = 0
        self.group["views"][r.start : r.stop] = views
        self.group["valid"][r.start : r.stop] = np.ones(expected, np.float32) if valid is None else valid
        for lay in self.layouts:
            x = targets[lay.name]
            if self.attrs["storage"] == "int8":
                q, scale = quantize_int8(x)
                self.group[f"teachers/{lay.name}"][r.start : r.stop] = q
                self.group[f"scales/{lay.name}"][r.start : r.stop] = scale
                written += q.nbytes + scale.nbytes
            else:
                self.group[f"teachers/{lay.name}"][r.start : r.stop] = x.astype(np.float16)
                written += x.size * 2
        self.group["done"][k] = 1
        return written

    def finalize(self) -> None:
        """Check every shard is done, consolidate metadata, mark complete."""
        if missing := self.missing_shards():
            raise RsmtdfError(f"{self.url}: cannot finalize, shards {missing[:10]} are not written")
        self.group.attrs["complete"] = True
        self.attrs["complete"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(_store(self.url, read_only=False))

    # ---- reading -------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [str(s) for s in self.group["ids"][:]]

    def views_array(self) -> np.ndarray:
        """(N, A, 5) parameters of every stored view."""
        return self.group["views"][:]

    def valid_array(self) -> np.ndarray:
        """(N, A) share of each stored view's crop that holds valid pixels."""
        return self.group["valid"][:]

    def views_of(self, i: int) -> list[View]:
        return [View.from_array(v) for v in self.group["views"][i]]

    def reader(self) -> CacheReader:
        return CacheReader(self.url, [lay.name for lay in self.layouts], self.attrs["storage"])

    def bytes_stored(self, name: str) -> int:
        b = self.group[f"teachers/{name}"].nbytes_stored()
        if self.attrs["storage"] == "int8":
            b += self.group[f"scales/{name}"].nbytes_stored()
        return b


class CacheReader:
    """Targets of (sample, view), read one chunk per teacher; opens the store lazily in each
    DataLoader worker (it pickles as just a URL)."""

    def __init__(self, url: str, teachers: list[str], storage: str) -> None:
        self.url, self.teachers, self.storage = url, teachers, storage
        self._group = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}

    def read(self, i: int, a: int) -> dict[str, np.ndarray]:
        if self._group is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._group = zarr.open_group(store=_store(self.url, read_only=True), mode="r")
        out = {}
        for name in self.teachers:
            x = self._group[f"teachers/{name}"][i, a]
            if self.storage == "int8":
                x = x.astype(np.float32) * self._group[f"scales/{name}"][i, a].astype(np.float32)[:, None]
            x = x.astype(np.float32)
            if np.isnan(x).any():
                raise RsmtdfError(f"{self.url}: teacher '{name}' has no data for sample {i} view {a} (unwritten shard)")
            out[name] = x
        return out


def _exists(url: str) -> bool:
    if _is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
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
