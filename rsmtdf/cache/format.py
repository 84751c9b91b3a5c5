"""How a cache stores its values: its arrays' layout and bytes (the storage kinds themselves are
`storage`), the codecs and checksums of its chunks, the store behind a path or URL, and the
one-line account of a chunk that does not decode."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import zarr.storage
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..io.remote import is_url, zarr_store
from .choice import request_bytes_per_token
from .storage import Kind, Pca

DIMS = ("sample", "view", "token", "channel")
BASIS = ("mean", "vectors", "spread")  # pca's basis: arrays basis/<teacher>/<name>


@dataclass(frozen=True)
class TeacherLayout:
    """Shape of one teacher's targets in the cache."""

    name: str
    tokens: int
    dim: int


def raw_bytes_per_sample(layouts: list[TeacherLayout], views: int, storage: str | Mapping[str, Kind],
                         group_size: int = 16) -> int:
    """Uncompressed bytes of one sample's targets (every view, every teacher, every stored part), of
    the kinds chosen per teacher or of a request (`[teachers] storage`; auto: at most)."""
    def per_token(lay: TeacherLayout) -> float:
        if isinstance(storage, str):
            return request_bytes_per_token(storage, lay.dim, group_size)
        return storage[lay.name].bytes_per_token(lay.dim)

    return int(views * sum(lay.tokens * per_token(lay) for lay in layouts))


def part_path(part: str, teacher: str) -> str:
    """The array holding one part of a teacher's stored targets: `teachers/<name>`, `<part>s/<name>`."""
    return f"teachers/{teacher}" if part == "" else f"{part}s/{teacher}"


def stored_record(kind: Kind) -> dict:
    """What a cache records of a teacher's kind (`attrs["stored"]`): its record, pca's basis by its sha256."""
    return {**kind.record(), "basis_sha256": basis_sha256(kind.basis())} if isinstance(kind, Pca) else kind.record()


def basis_sha256(basis: dict[str, np.ndarray]) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(basis[k], "<f4").tobytes() for k in BASIS)).hexdigest()


def write_basis(group: zarr.Group, teacher: str, kind: Pca) -> None:
    """pca's basis as checksummed arrays; NaN fill, so a lost chunk file reads as missing, not as zeros."""
    for name, value in kind.basis().items():
        group.create_array(f"basis/{teacher}/{name}", shape=value.shape, dtype="float32", fill_value=np.nan,
                           compressors=checksummed(ZstdCodec()), overwrite=True)[...] = value


def default_compressor() -> BloscCodec | None:
    """No compressor (the crc32c checksum only): on real and DINOv2/CLIP-shaped float16 features
    Blosc-zstd saves at most 8 % of the bytes and costs about twice the read CPU, which a GPU's
    loader cores cannot spare (BENCHMARKS.md, `bench codec`). Caches made with another codec keep
    it in their arrays' metadata and read as before."""
    return None


def checksummed(compressor) -> tuple:
    """The codecs after serialisation: compress (unless None), then append the chunk's crc32c."""
    return (Crc32cCodec(),) if compressor is None else (compressor, Crc32cCodec())


def codec_name(codec: BloscCodec | None) -> str:
    """A codec in a few words: `none`, or `zstd3-bitshuffle`."""
    if codec is None:
        return "none"
    shuffle = getattr(codec.shuffle, "value", codec.shuffle)
    return f"{getattr(codec.cname, 'value', codec.cname)}{codec.clevel}-{shuffle}"


def open_store(url: str, read_only: bool):
    """The Zarr store of a local path (`file://` too) or an fsspec URL."""
    if is_url(url):
        return zarr_store(url, read_only)
    return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)


def repair_command(url: str) -> str:
    return f"`rsmtdf extract-features --repair -o {url}` with the recipe that made it"


def repair_hint(url: str) -> str:
    return f"run `rsmtdf inspect --verify {url}`, then {repair_command(url)}"


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


