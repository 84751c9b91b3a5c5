"""Caches on object storage: fsspec URLs (`s3://bucket/cache`, `gs://bucket/cache`, ...).

The backends are optional extras (`rsmtdf[s3]` installs s3fs, `rsmtdf[gcs]` gcsfs); without one, a
URL ends in one line naming the extra to install. Where the store lives and how to log in is the
backend's own configuration, so nothing here is rsmtdf-specific: for S3 the standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, and `AWS_ENDPOINT_URL` for an
S3-compatible server such as MinIO or Ceph), or fsspec's own (`FSSPEC_S3_ENDPOINT_URL`, ...).
"""

from __future__ import annotations

import fsspec
import zarr.storage

from ..errors import RsmtdfError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_url(url: str) -> bool:
    """A URL names a remote store; `file://` and plain paths are local."""
    return "://" in url and not url.startswith("file://")


def _unusable(url: str, exc: Exception) -> RsmtdfError:
    """fsspec says ImportError for a protocol it knows whose backend is absent, ValueError for one it does not know."""
    protocol = url.split("://", 1)[0]
    if isinstance(exc, ImportError) and protocol in EXTRAS:
        extra = EXTRAS[protocol]
        return RsmtdfError(f"{url}: {protocol}:// needs the '{extra}' extra: pip install 'rsmtdf[{extra}]'")
    return RsmtdfError(f"{url}: no usable filesystem for {protocol}:// ({exc})")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a URL, or one line saying which extra provides its protocol."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise _unusable(url, exc) from None


def zarr_store(url: str, read_only: bool) -> zarr.storage.FsspecStore:
    """The Zarr store at a URL (see `filesystem` for the errors)."""
    try:
        return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
    except (ImportError, ValueError) as exc:
        raise _unusable(url, exc) from None
