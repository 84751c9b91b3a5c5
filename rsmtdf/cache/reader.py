"""Targets read back: one (sample, view) of each teacher, or a batch's, checked as they are read.

Local caches whose chunks carry only the checksum are read straight from their shard files
(`shardfile`, the training fast path); anything else through zarr, a batch's chunks fetched
together through its async API (one round trip on object storage). A damaged or missing chunk
ends in one line naming its teacher, sample and view.
"""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from ..errors import RsmtdfError
from .format import decode_problem, has_nan, open_store, repair_hint
from .shardfile import ShardFile


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


