"""`rsmtdf inspect --verify`: read every chunk of a cache and name the shards that are damaged.

Reading a chunk runs it back through its codecs, so the crc32c that ends every chunk (and every
shard's index) is checked: a flipped bit, an overwritten chunk header or a truncated shard fails to
decode; a deleted shard or chunk file is missing from the store. Shards are checked side by side in
threads of the main process (a loader worker would turn each failure into a multi-line traceback):
every part of every teacher's targets and each shard's fidelity row; pca's basis once.
`extract-features --repair` drops exactly the shards found here and extracts them again (a damaged
basis is fitted again and kept only if it is bit for bit the one recorded).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm
from zarr.core.sync import sync

from .format import BASIS, decode_problem, repair_command
from .store import FeatureCache


@dataclass(frozen=True)
class Damage:
    """One damaged array of one shard: which samples' chunks failed, and how."""

    shard: int
    array: str
    samples: tuple[str, ...]
    problem: str


@dataclass
class VerifyReport:
    url: str
    shards: list[int]
    seconds: float = 0.0
    chunks: int = 0
    damage: list[Damage] = field(default_factory=list)
    unwritten: list[int] = field(default_factory=list)
    ids_damaged: str | None = None
    basis_damaged: dict[str, str] = field(default_factory=dict)  # teacher → problem

    @property
    def damaged_shards(self) -> list[int]:
        return sorted({d.shard for d in self.damage})

    def lines(self) -> list[str]:
        """One line per damaged shard: its samples, then each damaged array and what is wrong."""
        out = [f"damaged   ids array: {self.ids_damaged}"] if self.ids_damaged else []
        out += [f"damaged   pca basis of teacher '{t}': {why}" for t, why in self.basis_damaged.items()]
        for k in self.damaged_shards:
            parts = [d for d in self.damage if d.shard == k]
            what = "; ".join(f"{d.array}: {d.problem} ({', '.join(d.samples)})" for d in parts)
            out.append(f"damaged   shard {k}: {what}")
        return out

    def summary(self) -> str:
        state = self._damage() or "no damage"
        unwritten = f", {len(self.unwritten)} shards not written yet" if self.unwritten else ""
        return (f"verified {len(self.shards)} shards ({self.chunks} chunks) of {self.url} in {self.seconds:.1f} s: "
                f"{state}{unwritten}")

    def problem(self) -> str | None:
        """The error line for damage, or None."""
        damage = self._damage()
        return f"{self.url}: {damage}; run {repair_command(self.url)}" if damage else None

    def _damage(self) -> str:
        parts = [f"{len(self.damaged_shards)} damaged shards {self.damaged_shards[:20]}"] if self.damage else []
        parts += [f"a damaged pca basis of '{t}'" for t in self.basis_damaged]
        return " and ".join(parts + (["a damaged ids array"] if self.ids_damaged else []))


def verify_cache(cache: FeatureCache, shards: list[int] | None = None, threads: int | None = None,
                 progress: bool = True) -> VerifyReport:
    """Read every chunk of `shards` (default: all) and return what is damaged or unwritten."""
    shards = list(range(cache.num_shards)) if shards is None else shards
    report = VerifyReport(cache.url, shards)
    start = time.perf_counter()
    try:
        ids = [str(s) for s in cache.group["ids"][:]]
    except Exception as exc:  # noqa: BLE001 - any decode failure is damage
        report.ids_damaged = decode_problem(exc)
        ids = [f"#{i}" for i in range(cache.num_samples)]
    for teacher in (t for t, rec in cache.stored.items() if rec["kind"] == "pca"):
        for name in (f"basis/{teacher}/{k}" for k in BASIS):
            if bad := _bad_read(lambda name=name: cache.group[name][...]):
                report.basis_damaged.setdefault(teacher, f"{name.rsplit('/', 1)[1]}: {bad}")
    threads = threads or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(shards), unit="shard", desc=f"verify {cache.url}", disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for k, (damage, unwritten, chunks) in zip(shards, pool.map(lambda k: _check_shard(cache, ids, k), shards)):
                report.damage += damage
                report.chunks += chunks
                if unwritten:
                    report.unwritten.append(k)
                bar.update(1)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _check_shard(cache: FeatureCache, ids: list[str], k: int) -> tuple[list[Damage], bool, int]:
    """(damage, unwritten, chunks read) of shard k. A shard without its done flag is unwritten, or
    damaged when the cache says it is complete (the flag's file was lost)."""
    r = cache.shard_range(k)
    all_ids = tuple(ids[i] for i in r)
    group, store = cache.group, cache.group.store
    keys = cache.shard_keys(k)
    try:
        done = int(group["done"][k]) if sync(store.exists(keys[0])) else 0
    except Exception as exc:  # noqa: BLE001
        return [Damage(k, "done", all_ids, decode_problem(exc))], False, 1
    if not done:
        if cache.attrs.get("complete"):
            return [Damage(k, "done", all_ids, "done flag lost in a complete cache")], False, 1
        return [], True, 1
    damage, chunks = [], 1
    for key, name in zip(keys[1:], cache.shard_arrays()[1:]):
        if not sync(store.exists(key)):
            damage.append(Damage(k, name, all_ids, "shard file missing"))
            continue
        if name == "views" or name.startswith("fidelity/"):  # one chunk per shard
            chunks += 1
            rows = slice(r.start, r.stop) if name == "views" else slice(k, k + 1)
            bad = _bad_read(lambda: group[name][rows])
            if bad:
                damage.append(Damage(k, name, all_ids, bad))
            continue
        failed: dict[str, list[str]] = {}
        for i in r:
            chunks += cache.num_views
            if _bad_read(lambda i=i: group[name][i]) is None:
                continue
            for a in range(cache.num_views):  # pinpoint the view
                if bad := _bad_read(lambda i=i, a=a: group[name][i, a]):
                    failed.setdefault(bad, []).append(f"{ids[i]} view {a}")
        damage += [Damage(k, name, tuple(where), problem) for problem, where in failed.items()]
    return damage, False, chunks


def _bad_read(read) -> str | None:
    """None if the read decodes and holds no fill value (NaN: a chunk absent from its shard), else why not."""
    try:
        x = read()
    except Exception as exc:  # noqa: BLE001 - any codec's failure on stored bytes is damage
        return decode_problem(exc)
    if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
        return "chunk missing"
    return None
