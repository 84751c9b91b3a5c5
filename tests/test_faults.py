"""Faults that real storage and machines produce, injected into a small real cache (EfficientNet-Lite
teacher on the generated scenes): bit rot and damaged, truncated or deleted chunks and shards are
found by `inspect --verify`, refused by training in one line naming sample and view, and repaired
bit-identically by `extract-features --repair`; a full disk ends in one line; the worker and thread
counts do not change a single stored bit."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from conftest import STUDENT, model_identity, run_cli, write_recipe
from test_errors import error_line, tree_hashes
from rsmtdf.cache import FeatureCache
from rsmtdf.data.datasets import open_dataset
from rsmtdf.errors import RsmtdfError
from rsmtdf.config.recipe import load_recipe
from rsmtdf.data.splits import make_splits, read_list
from rsmtdf.train.loader import sample_rng as _rng

SHARD = 2  # samples per shard: 6 samples, 3 shards
TEACHER = "effnet_lite0"


def extract(recipe: Path, cache: Path, *args: str, **kw):
    """`rsmtdf extract-features` as the pristine cache was made; later options win."""
    return run_cli("extract-features", "-r", recipe, "-o", cache, "--workers", "0", "--device", "cpu",
                   "--shard-samples", str(SHARD), *args, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, synthetic_root) -> SimpleNamespace:
    """A complete, undamaged cache and its recipe (with a tiny student, so training runs in seconds)."""
    work = tmp_path_factory.mktemp("faults")
    make_splits(open_dataset("loveda", synthetic_root), work / "splits")
    recipe = write_recipe(work / "recipe.toml", synthetic_root, work / "splits", sizes="{ effnet_lite0 = 56 }",
                          extra=STUDENT)
    extract(recipe, work / "cache", check=True)
    cache = work / "cache"
    return SimpleNamespace(recipe=recipe, cache=cache, splits=work / "splits", hashes=tree_hashes(cache))


def damaged_copy(pristine, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(pristine.cache, cache)
    return cache


def target_chunk(pristine) -> tuple[str, int, int, int]:
    """(sample id, cache index, shard, view) of a labeled sample's chunk that training reads in its
    first epoch: every labeled sample is read then (the list is repeated to the unlabeled length),
    and a sample's view in an epoch is a pure function of (seed, epoch, id)."""
    sid = read_list(pristine.splits, "10pct/labeled")[0]
    i = FeatureCache.open(pristine.cache).ids.index(sid)
    seed = load_recipe(pristine.recipe).train.seed
    return sid, i, i // SHARD, int(_rng(seed, 0, sid, "l").integers(0, 2))


def shard_file(cache: Path, k: int, array: str = f"teachers/{TEACHER}") -> Path:
    c = FeatureCache.open(cache)
    return cache / c.shard_keys(k)[c.shard_arrays().index(array)]


def chunk_span(shard: Path, local: int, view: int, views: int = 2) -> tuple[int, int]:
    """(offset, length) of one inner chunk, from the shard index at the end of the shard
    (one little-endian (offset, nbytes) uint64 pair per chunk, then the index's crc32c)."""
    n = SHARD * views
    data = shard.read_bytes()
    index = np.frombuffer(data[-(16 * n + 4) : -4], "<u8").reshape(n, 2)
    offset, length = index[local * views + view]
    return int(offset), int(length)


def edit_chunk(cache: Path, pristine, edit) -> None:
    """Apply edit(bytearray of the chunk) in place to the training-read chunk's bytes."""
    _, i, k, a = target_chunk(pristine)
    path = shard_file(cache, k)
    data = bytearray(path.read_bytes())
    off, n = chunk_span(path, i % SHARD, a)
    data[off : off + n] = edit(bytearray(data[off : off + n]))
    path.write_bytes(bytes(data))


def flip_bit(chunk: bytearray) -> bytearray:
    chunk[len(chunk) // 2] ^= 0x10
    return chunk


def overwrite_header(chunk: bytearray) -> bytearray:
    chunk[:16] = b"\xff" * 16  # blosc's header: version, flags, sizes
    return chunk


def random_bytes(chunk: bytearray) -> bytearray:
    return bytearray(np.random.default_rng(0).bytes(len(chunk)))


def truncate_shard(cache: Path, pristine) -> None:
    path = shard_file(cache, target_chunk(pristine)[2])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_shard(cache: Path, pristine) -> None:
    shard_file(cache, target_chunk(pristine)[2]).unlink()


def delete_views_chunk(cache: Path, pristine) -> None:
    shard_file(cache, target_chunk(pristine)[2], "views").unlink()


FAULTS = {
    "flipped bit": (lambda c, p: edit_chunk(c, p, flip_bit), "checksum mismatch", True),
    "overwritten chunk header": (lambda c, p: edit_chunk(c, p, overwrite_header), "checksum mismatch", True),
    "random bytes in a chunk": (lambda c, p: edit_chunk(c, p, random_bytes), "checksum mismatch", True),
    "truncated shard": (truncate_shard, "checksum mismatch", False),
    "deleted shard file": (delete_shard, "shard file missing", False),
    "deleted views chunk file": (delete_views_chunk, "shard file missing", False),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_found_refused_and_repaired_bit_identically(pristine, tmp_path, fault):
    damage, problem, one_chunk = FAULTS[fault]
    sid, i, k, a = target_chunk(pristine)
    shard_ids = FeatureCache.open(pristine.cache).ids[k * SHARD : (k + 1) * SHARD]
    cache = damaged_copy(pristine, tmp_path)
    damage(cache, pristine)

    verify = run_cli("inspect", "--verify", cache)
    line = error_line(SimpleNamespace(returncode=verify.returncode, stdout="", stderr=verify.stderr),
                      str(cache), f"1 damaged shards [{k}]", "--repair")
    listed = [ln for ln in verify.stdout.splitlines() if ln.startswith("damaged")]
    assert len(listed) == 1 and f"shard {k}:" in listed[0] and problem in listed[0], verify.stdout
    assert (f"{sid} view {a}" if one_chunk else sid) in listed[0], listed  # names the chunk, or the shard's samples

    run = tmp_path / "run"
    train = run_cli("train", "--cache", cache, "--split", "10pct", "-r", pristine.recipe, "--run-dir", run,
                    "--max-steps", "2", "--workers", "2")
    line = error_line(train, str(cache), "view", "--repair")
    if one_chunk:
        assert f"'{sid}') view {a}" in line, line
    else:
        assert any(f"'{s}') view" in line for s in shard_ids), line
    assert not (run / "latest.pt").exists()

    untouched = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and f"/c/{k}" not in p.as_posix()}
    fixed = extract(pristine.recipe, cache, "--repair", check=True)
    assert f"repaired 1 damaged shards [{k}]" in fixed.stdout and "shards done 1" in fixed.stdout, fixed.stdout
    assert tree_hashes(cache) == pristine.hashes  # bit-identical to the cache before the damage
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # and nothing else was rewritten
    assert run_cli("inspect", "--verify", cache, check=True).stdout.strip().endswith("no damage")


def test_verify_and_repair_of_an_undamaged_cache_change_nothing(pristine, tmp_path):
    cache = damaged_copy(pristine, tmp_path)
    # per shard: done, views, valid (2 samples × 2 views), targets (4 chunks) and the shard's fidelity row
    assert "verified 3 shards (33 chunks)" in run_cli("inspect", "--verify", cache, check=True).stdout
    out = extract(pristine.recipe, cache, "--repair", check=True).stdout
    assert "repaired 0 damaged shards" in out and "shards done 0" in out
    assert tree_hashes(cache) == pristine.hashes


def test_cache_of_schema_1_is_refused_in_one_line(pristine, tmp_path):
    cache = damaged_copy(pristine, tmp_path)
    meta = json.loads((cache / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    (cache / "zarr.json").write_text(json.dumps(meta))
    error_line(run_cli("inspect", cache), str(cache), "schema 1", "re-extract")
    error_line(run_cli("train", "--cache", cache, "--split", "10pct"), str(cache), "schema 1", "re-extract")


def test_non_finite_feature_is_an_error_naming_the_sample(pristine, tmp_path, monkeypatch):
    """A teacher output that is NaN (or beyond float16) is refused before its shard is written."""
    from rsmtdf.models.teachers import Teacher
    from rsmtdf.pipeline.extract import extract as extract_fn
    from rsmtdf.pipeline.resolve import resolve

    resolved = resolve(load_recipe(pristine.recipe))
    ds, teachers = resolved.dataset, resolved.teachers()
    real = Teacher.targets

    def poisoned(self, views):  # one batch per shard (2 samples × 2 views): poison the second shard's
        out = real(self, views)
        poisoned.calls += 1
        if poisoned.calls == 2:
            out[3, 5, 7] = 1e6  # crop 3: the shard's second sample, view 1; beyond float16, stored as inf
        return out

    poisoned.calls = 0
    monkeypatch.setattr(Teacher, "targets", poisoned)
    out = tmp_path / "cache"
    with pytest.raises(RsmtdfError) as exc:
        extract_fn(resolved, teachers, str(out), shard_samples=SHARD, num_workers=0, progress=False)
    sid = ds.ids_in("train")[SHARD + 1]  # second shard, its second sample, view 1 (crop 3 of the batch)
    assert f"sample '{sid}' view 1" in str(exc.value) and "non-finite" in str(exc.value)
    cache = FeatureCache.open(out)
    assert list(cache.done_flags()) == [True, False, False]
    assert not (out / cache.shard_keys(1)[2]).exists()  # nothing of that shard was written


# ---- disk full -----------------------------------------------------------------------------------


def enospc_on(monkeypatch, prefix: str, after: int) -> None:
    """Make the store's writes of keys starting with `prefix` fail with ENOSPC after `after` of them."""
    real = zarr.storage.LocalStore.set
    seen = []

    async def set_(self, key, value):
        if key.startswith(prefix):
            seen.append(key)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_)


def test_disk_full_mid_extraction_says_what_the_rest_needs(pristine, tmp_path, monkeypatch):
    enospc_on(monkeypatch, f"teachers/{TEACHER}/c/", after=1)
    out = tmp_path / "cache"
    proc = run_cli("extract-features", "-r", pristine.recipe, "-o", out, "--workers", "0", "--shard-samples", SHARD)
    error_line(proc, str(out), "disk full", "2 shards (4 samples) still to write", "at the compression of the 1 shard")
    monkeypatch.undo()
    extract(pristine.recipe, out, check=True)  # space freed: the same command finishes the cache
    assert tree_hashes(out) == pristine.hashes


def test_disk_full_at_creation_leaves_no_half_made_store(pristine, tmp_path, monkeypatch):
    enospc_on(monkeypatch, "", after=2)
    out = tmp_path / "cache"
    proc = run_cli("extract-features", "-r", pristine.recipe, "-o", out, "--workers", "0", "--shard-samples", SHARD)
    error_line(proc, str(out), "disk full", "3 shards (6 samples)", "uncompressed")
    assert sorted(tmp_path.iterdir()) == []  # no cache and no *.init-* folder


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 64 KB tmpfs: room for the cache's metadata and one shard (needs root to mount)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here; the simulated ENOSPC tests cover the same paths")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}; "
                    "the simulated ENOSPC tests cover the same paths")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_on_a_real_tiny_disk(pristine, tiny_disk):
    out = tiny_disk / "cache"
    error_line(extract(pristine.recipe, out), str(out), "disk full", "still to write", "free")
    assert [p.name for p in tiny_disk.iterdir()] == ["cache"]  # no *.init-* beside it
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    assert "cache complete" in extract(pristine.recipe, out, check=True).stdout
    assert tree_hashes(out) == pristine.hashes


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_disk):
    from rsmtdf.models.checkpoint import load_checkpoint, save_checkpoint

    path = tiny_disk / "latest.pt"
    meta = {"identity": model_identity(["a"]), "model": {}, "split": "-"}
    save_checkpoint({**meta, "step": 1, "w": torch.zeros(100)}, path)
    with pytest.raises(RsmtdfError) as exc:
        save_checkpoint({**meta, "step": 2, "w": torch.zeros(100_000)}, path)  # 400 KB on a 64 KB disk
    assert str(exc.value).startswith(f"{path}: disk full") and "needs about 0.4 MB" in str(exc.value)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tiny_disk.iterdir()] == ["latest.pt"]  # the temporary file is gone


# ---- exactness across worker and thread counts ----------------------------------------------------------


def test_workers_and_intra_op_threads_do_not_change_a_bit(pristine, tmp_path):
    """--batch-size 1: a shard's 4 crops are 4 batches, so the teacher thread pool has work to share."""
    extract(pristine.recipe, tmp_path / "w0", "--batch-size", "1", env={"OMP_NUM_THREADS": "2"}, check=True)
    extract(pristine.recipe, tmp_path / "w2", "--batch-size", "1", "--workers", "2", check=True)
    extract(pristine.recipe, tmp_path / "t1", "--batch-size", "1", env={"OMP_NUM_THREADS": "1"}, check=True)
    extract(pristine.recipe, tmp_path / "t3", "--batch-size", "1", "--workers", "2", env={"OMP_NUM_THREADS": "3"},
            check=True)
    for name in ("w2", "t1", "t3"):
        assert tree_hashes(tmp_path / name) == tree_hashes(tmp_path / "w0"), name


def test_resume_with_another_batch_size_is_refused(pristine, tmp_path):
    out = tmp_path / "cache"
    extract(pristine.recipe, out, "--num-shards", "2", "--shard-index", "0", check=True)
    before = tree_hashes(out)
    error_line(extract(pristine.recipe, out, "--batch-size", "4"), str(out), "--batch-size 8", "--batch-size 4")
    assert tree_hashes(out) == before
