"""Targets read back: one (sample, view) of each teacher, or a batch's, checked as they are read.

Local caches whose chunks carry only the checksum are read straight from their shard files
(`shardfile`, the training fast path); anything else through zarr, a batch's chunks fetched
together through its async API (one round trip on object storage). A damaged or missing chunk
ends in one line naming its teacher, sample and view.

Targets come decoded to float32, or as stored (`as_stored`, for training): one (sample, view) of a
teacher as one record of its kind's parts (`layout`: float16's is its (L, C) array, any other
kind's an aligned numpy record with a field per part), so a batch of them is one buffer of bytes
that crosses to the device in one copy and is decoded there (`decode`).
"""

from __future__ import annotations

import asyncio
import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import zarr
from zarr.core.sync import sync as zarr_sync

from ..errors import RsmtdfError
from .format import decode_problem, has_nan, open_store, part_path, repair_hint
from .shardfile import ShardFile
from .storage import Kind, storage_kind

TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8}


class CacheReader:
    """Targets of (sample, view), read one chunk per part per teacher; opens the store lazily in
    each process that reads (it pickles as a URL and the teachers' kinds). `storage`: each
    teacher's kind, or the name of one kind without parameters for all of them."""

    def __init__(self, url: str, teachers: list[str], storage: str | Mapping[str, Kind], ids: list[str]) -> None:
        self.url, self.teachers, self.ids = url, teachers, ids
        self.storage = {n: storage_kind({"kind": storage}) for n in teachers} if isinstance(storage, str) \
            else dict(storage)
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._group = None
        self._arrays: dict[str, zarr.Array] = {}  # opened once per process: a group lookup costs a read's CPU
        self._files: dict[str, ShardFile | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None, "_arrays": {}, "_files": {}}

    def _array(self, path: str) -> zarr.Array:
        if self._group is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._group = zarr.open_group(store=open_store(self.url, read_only=True), mode="r")
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
        """Targets of sample i, view a: float32 (L, C) per teacher, or `as_stored` one record of
        `layout` (float16's stays its (L, C) float16, half the bytes to copy; training decodes on the
        device); damaged or missing chunks end in one line naming them."""
        return self.read_batch([(i, a)], as_stored)[0]

    def _parts(self, name: str) -> list[str]:
        return list(self.storage[name].part_names)

    def read_batch(self, pairs: list[tuple[int, int]], as_stored: bool = False,
                   teachers: list[str] | None = None) -> list[dict[str, np.ndarray]]:
        """`read` of each (sample, view) (of `teachers`, default all), the chunks fetched together."""
        names = self.teachers if teachers is None else teachers
        chunks = self._fetch([part_path(p, n) for n in names for p in self._parts(n)], pairs)
        return [{name: self._target(name, i, a, chunks, as_stored) for name in names} for i, a in pairs]

    def layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per teacher, the shape and dtype of one (sample, view) as stored (`read(as_stored=True)`):
        float16's ((L, C), float16); any other kind's ((), a record with a field per part, aligned so
        that each part of a batch's bytes views as its own dtype)."""
        if self._layout is None:
            self._layout = {}
            for name in self.teachers:
                arrays = {p: self._array(part_path(p, name)) for p in self._parts(name)}
                if list(arrays) == [""]:
                    self._layout[name] = (tuple(arrays[""].shape[2:]), np.dtype(arrays[""].dtype))
                else:
                    self._layout[name] = ((), np.dtype([(_field(p), a.dtype, a.shape[2:]) for p, a in arrays.items()],
                                                       align=True))
        return self._layout

    def records(self, name: str, raw: np.ndarray) -> np.ndarray:
        """A batch's buffer of bytes (B, record bytes) of teacher `name`, seen as its `layout` records
        (what `read_into` fills)."""
        shape, dtype = self.layout()[name]
        return raw.view(dtype).reshape(len(raw), *shape)

    def record_bytes(self, name: str) -> int:
        shape, dtype = self.layout()[name]
        return dtype.itemsize * math.prod(shape)

    def decode(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """A batch of teacher `name`'s records as bytes (B, record bytes), on any device → its
        targets (B, L, C) float32 there, each part viewed in place, decoded batched by the kind."""
        shape, dtype = self.layout()[name]
        fields = {"": (dtype, 0)} if dtype.names is None else {p: dtype.fields[_field(p)] for p in self._parts(name)}
        parts = {}
        for part, (sub, offset) in fields.items():
            base, inner = (sub.subdtype or (sub, ()))
            inner = inner or shape
            size = base.itemsize * math.prod(inner)
            parts[part] = raw[:, offset : offset + size].view(TORCH_DTYPES[base]).reshape(len(raw), *inner)
        return self.storage[name].decode(parts)

    def read_into(self, pairs: list[tuple[int, int]], out: dict[str, np.ndarray]) -> None:
        """`read_batch(pairs, as_stored=True)` written into `out[teacher][j]` (arrays of `layout`'s
        records, e.g. views of a pinned batch: `records`): local uncompressed chunks go from the file
        straight there, part by part."""
        direct = [n for n in self.teachers if all(self._direct(part_path(p, n)) for p in self._parts(n))]
        for name in direct:
            for j, (i, a) in enumerate(pairs):
                for part in self._parts(name):
                    into = out[name][j] if out[name].dtype.names is None else out[name][_field(part)][j]
                    try:
                        self._files[part_path(part, name)].read_into((i, a) + (0,) * into.ndim, into[None, None])
                    except Exception as exc:  # noqa: BLE001 - judged with its chunk's name
                        raise self._unreadable(exc, name, i, a) from None
                    self._check(into, name, i, a)
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
        """Unwritten chunks read as the fill value: NaN in every floating part (integer parts read 0)."""
        if x.dtype.kind == "f" and has_nan(x):
            raise RsmtdfError(f"{self.url}: no data for {self._where(name, i, a)} (its shard is unwritten or was "
                              f"deleted); {repair_hint(self.url)}")

    def _target(self, name: str, i: int, a: int, chunks: dict, as_stored: bool) -> np.ndarray:
        parts = {p: chunks[part_path(p, name), i, a] for p in self._parts(name)}
        for exc in (v for v in parts.values() if isinstance(v, BaseException)):
            raise self._unreadable(exc, name, i, a)
        for value in parts.values():
            self._check(value, name, i, a)
        if not as_stored:
            return self.storage[name].decode({p: torch.from_numpy(v) for p, v in parts.items()}).numpy()
        shape, dtype = self.layout()[name]
        if dtype.names is None:
            return parts[""]
        record = np.zeros((), dtype)
        for p, v in parts.items():
            record[_field(p)] = v
        return record


def _field(part: str) -> str:
    """A part's field in a record (numpy names no field ""): the values are `values`."""
    return part or "values"
