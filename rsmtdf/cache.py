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

Every chunk of every array ends in a crc32c checksum (zarr's `crc32c` codec after compression), so
bit rot, a damaged chunk header, a truncated or deleted shard is found on read (one line naming the
sample and view), by `rsmtdf inspect --verify`, and undone by `extract-features --repair`.

Lifecycle: `create` (one process: arrays and attrs, made elsewhere and renamed into place on local
disks so racing workers never see half a store) → `write_shard` by owners → `finalize` (checks
every shard, consolidates metadata, sets `complete`).
"""

from __future__ import annotations

import asyncio
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
from zarr.core.sync import sync as zarr_sync
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from . import __version__
from .errors import RsmtdfError
from .remote import filesystem, zarr_store
from .remote import is_url
from .shardfile import ShardFile
from .views import View

SCHEMA_VERSION = 2  # 2: every chunk carries a crc32c checksum
STORAGES = ("float16", "int8")
DIMS = ("sample", "view", "token", "channel")


def default_compressor() -> BloscCodec | None:
    """No compressor (the crc32c checksum only): on real and DINOv2/CLIP-shaped float16 features
    Blosc-zstd saves at most 8 % of the bytes and costs about twice the read CPU, which a GPU's
    loader cores cannot spare (BENCHMARKS.md, `bench codec`). Caches made with another codec keep
    it in their arrays' metadata and read as before."""
    return None


def checksummed(compressor) -> tuple:
    """The codecs after serialisation: compress (unless None), then append the chunk's crc32c."""
    return (Crc32cCodec(),) if compressor is None else (compressor, Crc32cCodec())


def repair_command(url: str) -> str:
    return f"`rsmtdf extract-features --repair -o {url}` with the recipe that made it"


def repair_hint(url: str) -> str:
    return f"run `rsmtdf inspect --verify {url}`, then {repair_command(url)}"


def _store(url: str, read_only: bool):
    if is_url(url):
        return zarr_store(url, read_only)
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


def raw_bytes_per_sample(layouts: list[TeacherLayout], views: int, storage: str) -> int:
    """Uncompressed bytes of one sample's targets (every view, every teacher; int8 adds its scales)."""
    per_token = (lambda dim: dim + 2) if storage == "int8" else (lambda dim: 2 * dim)
    return views * sum(lay.tokens * per_token(lay.dim) for lay in layouts)


def expected_attrs(dataset: dict, splits: dict, views: dict, teachers: list[dict], storage: str,
                   input: dict | None = None) -> dict:
    """The attributes that decide whether an existing cache is the one a run asks for; `input` is the
    record of the teachers' bands and scaling (`scaling.BandScaling.record`)."""
    return {"dataset": dataset, "splits": splits, "views": views, "teachers": teachers, "storage": storage,
            **({"input": input} if input is not None else {})}


def mismatch(found: dict, wanted: dict) -> str | None:
    """One phrase saying how a cache differs from what is asked for, or None if it matches."""
    from .data import ClassTable
    from .scaling import scaling_mismatch  # scaling reads band statistics, which import this module

    fd, wd = found["dataset"], wanted["dataset"]
    if fd["name"] != wd["name"] or fd.get("ids_sha256") != wd.get("ids_sha256"):
        return f"it was made from dataset '{fd['name']}' ({fd['num_samples']} samples at {fd['root']}), " \
               f"not '{wd['name']}' ({wd['num_samples']} samples at {wd['root']})"
    if "class_table" in fd and "class_table" in wd and \
            (why := ClassTable.from_attrs(fd["class_table"]).difference(ClassTable.from_attrs(wd["class_table"]))):
        return f"its class table differs: {why}"
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
    return scaling_mismatch(found.get("input"), wanted.get("input"))


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
        self._ids: list[str] | None = None

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
        if not is_url(url):  # build beside, then rename into place: never half a store at `url`
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            target = f"{url}.init-{uuid.uuid4().hex[:8]}"
        try:
            cls._create_arrays(target, ids, attrs, layouts, shard_samples, compressor)
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
                    return cls.create(url, ids, attrs, layouts, shard_samples, compressor)
        return cls.open(url, mode="r+")

    @staticmethod
    def _create_arrays(target: str, ids: list[str], attrs: dict, layouts: list[TeacherLayout], shard_samples: int,
                       compressor) -> None:
        compressor = default_compressor() if compressor is None else compressor
        small = checksummed(ZstdCodec())
        n, a, s = len(ids), int(attrs["views"]["count"]), shard_samples
        group = zarr.open_group(store=_store(target, read_only=False), mode="w-", zarr_format=3)
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
                group = zarr.open_group(store=_store(url, read_only=mode == "r"), mode=mode)
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
        from zarr.core.sync import sync

        for key in self.shard_keys(k):
            sync(self.group.store.delete(key))

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
            zarr.consolidate_metadata(_store(self.url, read_only=False))

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


class CacheReader:
    """Targets of (sample, view), read one chunk per teacher; opens the store lazily in each
    process that reads (it pickles as just a URL)."""

    def __init__(self, url: str, teachers: list[str], storage: str, ids: list[str]) -> None:
        self.url, self.teachers, self.storage, self.ids = url, teachers, storage, ids
        self._group = None
        self._arrays: dict[str, zarr.Array] = {}  # opened once per process: a group lookup costs a read's CPU
        self._files: dict[str, ShardFile | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None, "_arrays": {}, "_files": {}}

    def _array(self, path: str) -> zarr.Array:
        if self._group is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._group = zarr.open_group(store=_store(self.url, read_only=True), mode="r")
        if path not in self._arrays:
            self._arrays[path] = self._group[path]
            self._files[path] = ShardFile.of(self._arrays[path])
        return self._arrays[path]

    def _fetch(self, paths: list[str], pairs: list[tuple[int, int]]) -> dict:
        """{(path, i, a): chunk or the exception reading it}: straight from the local shard files
        where the codecs allow, else all of them at once through zarr's async API (so a remote
        store costs one round trip for the batch, not one per chunk)."""
        out, pending = {}, []
        for path in paths:
            self._array(path)
            direct = self._files[path]
            for i, a in pairs:
                if direct is None:
                    pending.append((path, i, a))
                    continue
                try:
                    out[path, i, a] = direct.read((i, a) + (0,) * (len(direct.chunk) - 2))[0, 0]
                except Exception as exc:  # noqa: BLE001 - judged with its chunk's name in `read_batch`
                    out[path, i, a] = exc
        if pending:
            async def every() -> list:
                return await asyncio.gather(*(self._arrays[p]._async_array.getitem((i, a)) for p, i, a in pending),
                                            return_exceptions=True)
            out.update(zip(pending, zarr_sync(every())))
        return out

    def read(self, i: int, a: int, as_stored: bool = False) -> dict[str, np.ndarray]:
        """Targets of sample i, view a, as float32 (`as_stored`: float16 caches' targets stay float16,
        half the bytes to collate and copy; training widens them on the device); damaged or missing
        chunks end in one line naming them."""
        return self.read_batch([(i, a)], as_stored)[0]

    def read_batch(self, pairs: list[tuple[int, int]], as_stored: bool = False,
                   teachers: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        """`read` of each (sample, view) (of `teachers`, default all), the chunks fetched together."""
        names = self.teachers if teachers is None else teachers
        paths = [f"teachers/{n}" for n in names] + ([f"scales/{n}" for n in names] if self.storage == "int8" else [])
        chunks = self._fetch(paths, pairs)
        return [{name: self._target(name, i, a, chunks, as_stored) for name in names} for i, a in pairs]

    def layout(self) -> dict[str, tuple[tuple[int, int], np.dtype]]:
        """Per teacher, the (tokens, dim) and dtype of `read(..., as_stored=True)`'s targets."""
        dtype = np.dtype(np.float16 if self.storage == "float16" else np.float32)
        return {n: (tuple(self._array(f"teachers/{n}").shape[2:]), dtype) for n in self.teachers}

    def read_into(self, pairs: list[tuple[int, int]], out: dict[str, np.ndarray]) -> None:
        """`read_batch(pairs, as_stored=True)` written into `out[teacher][j]` (arrays of `layout`'s
        shapes, e.g. pinned batches): local uncompressed chunks go from the file straight there."""
        direct = [n for n in self.teachers if self.storage != "int8" and self._direct(f"teachers/{n}")]
        for name in direct:
            for j, (i, a) in enumerate(pairs):
                try:
                    self._files[f"teachers/{name}"].read_into((i, a, 0, 0), out[name][j][None, None])
                except Exception as exc:  # noqa: BLE001 - judged with its chunk's name
                    raise self._unreadable(exc, name, i, a) from None
                self._check(out[name][j], name, i, a)
        rest = [n for n in self.teachers if n not in direct]
        for j, row in enumerate(self.read_batch(pairs, True, rest) if rest else []):
            for name in rest:
                out[name][j] = row[name]

    def _direct(self, path: str) -> bool:
        self._array(path)
        return self._files[path] is not None

    def _where(self, name: str, i: int, a: int) -> str:
        return f"teacher '{name}', sample {i} ('{self.ids[i]}') view {a}"

    def _unreadable(self, exc: BaseException, name: str, i: int, a: int) -> RsmtdfError:
        """The one line for a chunk that could not be read or decoded."""
        if isinstance(exc, OSError):  # the store itself failed (network, permissions): not damage
            return RsmtdfError(f"{self.url}: cannot read {self._where(name, i, a)} ({exc.strerror or exc})")
        return RsmtdfError(f"{self.url}: damaged chunk of {self._where(name, i, a)} ({decode_problem(exc)}); "
                           f"{repair_hint(self.url)}")

    def _check(self, x: np.ndarray, name: str, i: int, a: int) -> None:
        if has_nan(x):
            raise RsmtdfError(f"{self.url}: no data for {self._where(name, i, a)} (its shard is unwritten or was "
                              f"deleted); {repair_hint(self.url)}")

    def _target(self, name: str, i: int, a: int, chunks: dict, as_stored: bool) -> np.ndarray:
        parts = [chunks[f"teachers/{name}", i, a]] + ([chunks[f"scales/{name}", i, a]] if self.storage == "int8" else [])
        for exc in (p for p in parts if isinstance(p, BaseException)):
            raise self._unreadable(exc, name, i, a)
        x = parts[0]
        if self.storage == "int8":
            x = x.astype(np.float32) * parts[1].astype(np.float32)[:, None]
        if not (as_stored and x.dtype == np.float16):
            x = x.astype(np.float32)
        self._check(x, name, i, a)
        return x


def has_nan(x: np.ndarray) -> bool:
    """Whether x holds a NaN; float16 as integers (exponent all ones, mantissa not zero), which is
    15 times faster than numpy's float16 isnan."""
    if x.dtype == np.float16:
        return bool(((x.view(np.uint16) & 0x7FFF) > 0x7C00).any())
    return bool(np.isnan(x).any())


def decode_problem(exc: Exception) -> str:
    """A decode failure in a few words: zarr's checksum message, or the codec's first line."""
    text = str(exc).split("\n")[0]
    if "checksum" in text:
        return "checksum mismatch"
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


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
