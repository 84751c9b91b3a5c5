"""Files written whole, hashes of what was written, and sizes and exceptions said in a few words."""

from __future__ import annotations

import hashlib
import functools
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ..errors import RsmtdfError

T = TypeVar("T")


@contextmanager
def replaced_whole(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without
    an error, removed when it fails. A reader only ever sees the old file or the new one, whole
    (a folder works the same: the rename replaces a missing or empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_whole(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Write `content` (text, bytes, or a function writing the file it is given) to `path`, whole."""
    with replaced_whole(path) as tmp:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
    return Path(path)


def text_sha256(*parts: str | bytes) -> str:
    """sha256 of the parts joined by newlines (ids, file contents), for records that must match."""
    h = hashlib.sha256()
    for k, part in enumerate(parts):
        h.update((b"\n" if k else b"") + (part.encode() if isinstance(part, str) else part))
    return h.hexdigest()


def ids_sha256(ids: list[str]) -> str:
    """The hash of a list of sample ids, in order: what identifies the samples a cache holds."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (weights files: a cache is tied to the exact weights), computed once
    per file version and process."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime)


def format_bytes(n: float) -> str:
    """`1.2 GB`: decimal units, as disks are sold."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (GDAL's can run over several), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def parse_file(path: Path, parse: Callable[[str], T], what: str, missing: str) -> T:
    """`parse` of the file's text; a missing file (`missing` says what that means) or text that
    does not parse as `what` is one line naming the file."""
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        raise RsmtdfError(f"{path}: {missing}") from None
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise RsmtdfError(f"{path}: not valid {what} ({exc})") from None
