"""The teacher feature cache: a Zarr v3 store, written shard by shard, read chunk by chunk.

```
<cache>/                      attrs: schema_version, the identity (dataset, splits, views, teachers,
                              storage and its options, input), stored (each teacher's kind),
                              fidelity (finalized), compute, recipe, shard_samples, complete, versions
  ids              (N,)          str
  views            (N, A, 5)     float32   (scale, y0, x0, hflip, rot90)
  teachers/<name>  (N, A, L, …)  the kind's values: float16 (L, C); int8 (L, C); int4, pca uint8
  scales/<name>    (N, A, L, …)  float16   per-token (int8, pca) or per-group (int4) scales
  basis/<name>/{mean,vectors,spread}  float32   pca's basis, fitted when the cache was created
  fidelity/<name>  (N_shards, F) float64   each shard's `storage.Fidelity` of what it stored
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

Lifecycle: `create` (one process: arrays and attrs, what each teacher stores decided and pca's
basis written, made elsewhere and renamed into place on local disks so racing workers never see
half a store) → `write_shard` by owners (encoded with the teacher's kind, the fidelity of what it
stores measured against the full-precision targets) → `finalize` (checks every shard, merges the
fidelity into the attributes, consolidates metadata, sets `complete`).
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.sync import sync as zarr_sync

from .. import __version__
from ..errors import RsmtdfError
from ..io.remote import filesystem, is_url
from ..transforms.views import View
from .choice import below_floor, fixed_kind
from .format import (BASIS, DIMS, TeacherLayout, basis_sha256, checksummed, decode_problem, default_compressor,
                     open_store, part_path, repair_hint, stored_record, write_basis)
from .identity import Identity
from .reader import CacheReader
from .storage import KINDS, Fidelity, Kind, Pca, storage_kind

SCHEMA_VERSION = 3  # 2: every chunk carries a crc32c checksum; 3: storage kinds per teacher, fidelity, pca basis
READABLE = (2, SCHEMA_VERSION)  # schema 2 caches are float16 or int8, recorded in attrs["storage"] alone


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
        # what each teacher stores; a schema 2 cache's teachers all the kind its storage names
        legacy = {"kind": self.attrs.get("storage")}
        self.stored = {lay.name: self.attrs.get("stored", {}).get(lay.name, legacy) for lay in self.layouts}
        self.measured = "stored" in self.attrs  # made with fidelity arrays (schema 3)
        self._ids: list[str] | None = None
        self._kinds: dict[str, Kind] | None = None

    # ---- creation and opening -------------------------------------------------------------

    @classmethod
    def create(cls, url: str, ids: list[str], identity: Identity, attrs: dict, layouts: list[TeacherLayout],
               shard_samples: int, compressor=None, wanted_in: str | Callable[[str], str] = "this run",
               kinds: dict[str, Kind] | None = None) -> FeatureCache:
        """Create an empty cache of `identity` (with the other attributes `attrs`) whose teachers
        store `kinds` (default: the kind `identity.storage` names, for requests decided without a
        probe), or open the existing one if it is the same cache (resume; its own kinds are kept).

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
        if kinds is None:
            kind = fixed_kind(identity.storage, identity.storage_options)
            if kind is None:
                raise ValueError(f"storage '{identity.storage}' is decided on a probe: give the kinds")
            kinds = {lay.name: kind for lay in layouts}
        try:
            cls._create_arrays(target, ids, {**identity.record(), **attrs}, layouts, kinds, shard_samples, compressor)
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
                    return cls.create(url, ids, identity, attrs, layouts, shard_samples, compressor, wanted_in, kinds)
        return cls.open(url, mode="r+")

    @staticmethod
    def _create_arrays(target: str, ids: list[str], attrs: dict, layouts: list[TeacherLayout], kinds: dict[str, Kind],
                       shard_samples: int, compressor) -> None:
        compressor = default_compressor() if compressor is None else compressor
        small = checksummed(ZstdCodec())
        n, a, s = len(ids), int(attrs["views"]["count"]), shard_samples
        group = zarr.open_group(store=open_store(target, read_only=False), mode="w-", zarr_format=3)
        group.attrs.update({
            "schema_version": SCHEMA_VERSION, **attrs, "shard_samples": s, "complete": False,
            "stored": {lay.name: stored_record(kinds[lay.name]) for lay in layouts},
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
        shards = -(-n // s)
        group.create_array("done", shape=(shards,), chunks=(1,), dtype="uint8", fill_value=0, compressors=small,
                           dimension_names=("shard",))
        for lay in layouts:
            kind = kinds[lay.name]
            for part, (shape, dtype) in kind.parts(lay.tokens, lay.dim).items():
                meaning = (f"teacher '{lay.name}' target tokens (row-major grid) for each stored view, as "
                           f"{kind.describe()}: decode with rsmtdf.cache.storage.storage_kind(stored record)")
                # every part uncompressed but for its checksum by default: read straight from the shard files
                group.create_array(part_path(part, lay.name), shape=(n, a, *shape), chunks=(1, 1, *shape),
                                   shards=(s, a, *shape), dtype=dtype,
                                   fill_value=np.nan if np.dtype(dtype).kind == "f" else 0,
                                   compressors=checksummed(compressor), dimension_names=_part_dims(part, len(shape)),
                                   attributes={"meaning": meaning if part == "" else f"{kind.describe()}: its {part}s",
                                               "storage": kind.record()})
            if isinstance(kind, Pca):
                write_basis(group, lay.name, kind)
            length = len(Fidelity().vector())
            group.create_array(f"fidelity/{lay.name}", shape=(shards, length), chunks=(1, length), dtype="float64",
                               fill_value=np.nan, compressors=small, dimension_names=("shard", "statistic"),
                               attributes={"meaning": "each shard's rsmtdf.cache.storage.Fidelity.vector() of the "
                                                      "stored targets against the full-precision ones"})

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
            if found not in READABLE:
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

    @property
    def kinds(self) -> dict[str, Kind]:
        """Each teacher's storage kind (pca's with its basis, read once)."""
        if self._kinds is None:
            self._kinds = {name: storage_kind(rec, self.basis(name) if rec["kind"] == "pca" else None)
                           for name, rec in self.stored.items()}
        return self._kinds

    def basis(self, teacher: str) -> dict[str, np.ndarray]:
        return {k: self._read(f"basis/{teacher}/{k}", lambda k=k: self.group[f"basis/{teacher}/{k}"][...])
                for k in BASIS}

    def rewrite_basis(self, teacher: str, kind: Pca) -> None:
        """Write a damaged pca basis again, if `kind` (fitted again) has the very basis recorded."""
        if basis_sha256(kind.basis()) != self.stored[teacher].get("basis_sha256"):
            raise RsmtdfError(f"{self.url}: the pca basis of teacher '{teacher}' is damaged and fitting it again gives "
                              f"another one (other teachers' weights, device or batch size?); extract the cache "
                              f"again into a new --output")
        write_basis(self.group, teacher, kind)
        self._kinds = None

    def write_shard(self, k: int, views: np.ndarray, targets: dict[str, np.ndarray],
                    valid: np.ndarray | None = None, floor_from: str = "") -> int:
        """Write shard k whole (views, their valid shares (None: all 1) and every teacher's targets,
        full-precision float32, stored as its kind, and the fidelity of what is stored), then set its
        done flag. Returns bytes.

        Before anything is written, every stored value is checked finite (a NaN or an fp16 overflow
        would be read back as a target, or as an unwritten shard), and each teacher's mean token
        cosine over the shard checked against the floor the cache was made with (`floor_from`: where
        the refusal says it was set)."""
        r = self.shard_range(k)
        storage, options = self.identity.storage, self.identity.storage_options
        floor = options.floor(storage) if options is not None else 0.0
        expected = (len(r), self.num_views)
        if views.shape[:2] != expected:
            raise ValueError(f"shard {k}: views {views.shape[:2]} != {expected}")
        stored, measured = {}, {}
        for lay in self.layouts:
            kind, x = self.kinds[lay.name], targets[lay.name]
            parts = kind.encode(x)
            for part in parts.values():
                if part.dtype.kind == "f":
                    self._check_finite(lay.name, part, r)
            measured[lay.name] = fid = Fidelity()
            for i in range(len(r)):  # decoded as a reader decodes it
                fid.add(x[i], kind.decode({p: torch.from_numpy(np.ascontiguousarray(v[i])) for p, v in parts.items()}))
            if fid.mean_cosine < floor:
                raise RsmtdfError(f"{self.url}: " + below_floor(lay, kind, fid.mean_cosine, k, storage, options, floor_from))
            stored.update({part_path(p, lay.name): v for p, v in parts.items()})
        self.group["views"][r.start : r.stop] = views
        self.group["valid"][r.start : r.stop] = np.ones(expected, np.float32) if valid is None else valid
        for key, value in stored.items():
            self.group[key][r.start : r.stop] = value
        if self.measured:
            for name, fid in measured.items():
                self.group[f"fidelity/{name}"][k] = fid.vector()
        self.group["done"][k] = 1
        return sum(v.nbytes for v in stored.values())

    def _check_finite(self, teacher: str, x: np.ndarray, r: range) -> None:
        bad = ~np.isfinite(x.reshape(x.shape[0], x.shape[1], -1)).all(axis=-1)
        if bad.any():
            i, a = (int(v) for v in np.argwhere(bad)[0])
            raise RsmtdfError(f"{self.url}: teacher '{teacher}' gives non-finite features (NaN or beyond float16) "
                              f"for sample '{self.ids[r.start + i]}' view {a}; nothing of its shard was written "
                              f"(check the image for NaN or nodata pixels)")

    def part_arrays(self, teacher: str) -> list[str]:
        """The arrays holding a teacher's stored targets, its values first."""
        return [part_path(p, teacher) for p in KINDS[self.stored[teacher]["kind"]].part_names]

    def shard_arrays(self) -> list[str]:
        """The arrays whose chunk k (along their first axis) is shard k, done flag first."""
        fidelity = [f"fidelity/{lay.name}" for lay in self.layouts] if self.measured else []
        return ["done", "views", "valid", *(p for lay in self.layouts for p in self.part_arrays(lay.name)), *fidelity]

    def fidelity(self, teacher: str) -> Fidelity | None:
        """What `teacher`'s stored targets keep of the full-precision ones, merged over the shards
        written; None for a cache made before fidelity was recorded."""
        if not self.measured:
            return None
        rows = self._read(f"fidelity/{teacher}", lambda: self.group[f"fidelity/{teacher}"][:])
        total = Fidelity()
        for k in np.flatnonzero(self.done_flags()):
            if np.isfinite(rows[k]).all():  # a lost row is damage, which --verify names
                total = total + Fidelity.from_vector(rows[k])
        return total

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
        if self.measured:
            fidelity = {lay.name: self.fidelity(lay.name).record() for lay in self.layouts}
            self.group.attrs["fidelity"] = self.attrs["fidelity"] = fidelity
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
        return CacheReader(self.url, [lay.name for lay in self.layouts], self.kinds, self.ids)

    def _target_arrays(self, name: str) -> list[str]:
        basis = [f"basis/{name}/{k}" for k in BASIS] if self.stored[name]["kind"] == "pca" else []
        return self.part_arrays(name) + basis

    def bytes_stored(self, name: str) -> int:
        """Bytes on disk of a teacher's targets: every part, and pca's basis."""
        return sum(self.group[a].nbytes_stored() for a in self._target_arrays(name))

    def bytes_raw(self, name: str) -> int:
        """Uncompressed bytes of a teacher's targets: every part, and pca's basis."""
        return sum(self.group[a].nbytes for a in self._target_arrays(name))


def _part_dims(part: str, ndim: int) -> tuple[str, ...]:
    """A part's dimension names: sample, view, token, then channel (values) or group (scales)."""
    return DIMS[: 2 + ndim] if part == "" else (*DIMS[:3], "group")[: 2 + ndim]


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
