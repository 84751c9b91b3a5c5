"""DWL-protocol split lists: labeled fractions per domain, and the official Val split 50/50.

The reference code shuffles without a seed; here the lists come from the dataset's sorted ids and
a fixed seed, are committed under `pipeline/splits/<dataset>/`, and their sha256 is recorded in
every cache and checkpoint so a run can tell that it uses the lists its cache was made with.

```
<dir>/1pct/labeled.txt  1pct/unlabeled.txt  5pct/...  10pct/...  val.txt  test.txt
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import RsmtdfError
from ..transforms.pixels import IGNORE
from .datasets import SegmentationDataset

FRACTIONS = {"1pct": 0.01, "5pct": 0.05, "10pct": 0.10}


def _by_domain(dataset: SegmentationDataset, split: str) -> dict[str, list[str]]:
    """Labeled samples of a split by domain (samples without masks only go to unlabeled lists)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in dataset.records:
        if r.split == split and r.labeled:
            groups[r.domain].append(r.id)
    return {d: sorted(ids) for d, ids in sorted(groups.items())}


def _shuffled(ids: list[str], seed: int, key: str) -> list[str]:
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return [ids[j] for j in rng.permutation(len(ids))]


def make_splits(dataset: SegmentationDataset, out: str | Path, seed: int = 0,
                fractions: dict[str, float] | None = None, val_fraction: float | None = None) -> dict[str, int]:
    """Write the split lists; returns the number of ids in each file.

    Labeled sets are prefixes of one seeded permutation per domain, so 1 % ⊂ 5 % ⊂ 10 %; samples
    without a mask are in every unlabeled list. A dataset without validation images needs
    `val_fraction`: that share of its training scenes (whole scenes, so no scene's tiles straddle
    train and val) is held out as val/test instead of writing empty lists.
    """
    out = Path(out)
    fractions = FRACTIONS if fractions is None else fractions
    if val_fraction is not None:
        dataset = hold_out_scenes(dataset, val_fraction, seed)
    train, val = _by_domain(dataset, "train"), _by_domain(dataset, "val")
    if not train:
        raise RsmtdfError(f"{dataset.root}: no labeled training images to split")
    if not val:
        raise RsmtdfError(f"{dataset.root}: no validation images (no Val/ folder); hold out part of the "
                          f"training scenes with --val-fraction, e.g. --val-fraction 0.2")
    maskless = [r.id for r in dataset.records if not r.labeled]
    files: dict[str, list[str]] = {}
    for name, frac in fractions.items():
        labeled, unlabeled = [], []
        for domain, ids in train.items():
            order = _shuffled(ids, seed, f"train/{domain}")
            n = max(1, round(frac * len(ids)))
            labeled += order[:n]
            unlabeled += order[n:]
        files[f"{name}/labeled.txt"], files[f"{name}/unlabeled.txt"] = sorted(labeled), sorted(unlabeled + maskless)
    files["val.txt"], files["test.txt"] = [], []
    for domain, ids in val.items():
        order = _shuffled(ids, seed, f"val/{domain}")
        half = (len(order) + 1) // 2
        files["val.txt"] += order[:half]
        files["test.txt"] += order[half:]
    for rel, ids in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in sorted(ids)))
    return {rel: len(ids) for rel, ids in files.items()}


def hold_out_scenes(dataset: SegmentationDataset, fraction: float, seed: int) -> SegmentationDataset:
    """The dataset with a seeded `fraction` of its labeled training scenes (files, at least one, and
    at least one left) marked as its validation split."""
    if not 0 < fraction < 1:
        raise RsmtdfError(f"--val-fraction {fraction}: expected a share between 0 and 1, e.g. 0.2")
    scenes = sorted({str(r.image) for r in dataset.records if r.split == "train" and r.labeled})
    if len(scenes) < 2:
        raise RsmtdfError(f"{dataset.root}: --val-fraction needs at least two labeled training scenes "
                          f"to hold one out (found {len(scenes)})")
    n = min(max(1, round(fraction * len(scenes))), len(scenes) - 1)
    held = set(_shuffled(scenes, seed, "val-fraction")[:n])
    return dataset.with_records([dataclasses.replace(r, split="val") if str(r.image) in held and r.labeled else r
                                 for r in dataset.records])


def class_pixel_counts(dataset: SegmentationDataset, lists: dict[str, list[str]],
                       progress: bool = True) -> dict[str, list[int]]:
    """Labeled pixels per class in each list that needs masks (every list but `unlabeled`), from one
    pass over the masks with a progress bar; ignored pixels are not counted."""
    needed = {rel: ids for rel, ids in lists.items() if not rel.endswith("unlabeled.txt")}
    per_sample: dict[str, np.ndarray] = {}
    todo = sorted({i for ids in needed.values() for i in ids})
    k = dataset.classes.num_classes
    for sid in tqdm(todo, desc="class pixels", unit="tile", disable=not progress, dynamic_ncols=True):
        mask = dataset.load(dataset.index(sid)).mask
        per_sample[sid] = np.bincount(mask[mask != IGNORE].ravel(), minlength=k)[:k]
    return {rel: [int(v) for v in sum((per_sample[i] for i in ids), np.zeros(k, np.int64))]
            for rel, ids in needed.items()}


def check_classes(dataset: SegmentationDataset, counts: dict[str, list[int]], where: Path) -> None:
    """Refuse a labeled list in which a class of the table never occurs (it could never be learned)."""
    for rel, per_class in counts.items():
        if rel.endswith("labeled.txt"):
            missing = [n for n, c in zip(dataset.classes.names, per_class) if c == 0]
            if missing:
                raise RsmtdfError(f"{where / rel}: class{'es' if len(missing) > 1 else ''} "
                                  f"{', '.join(repr(m) for m in missing)} never occur{'s' if len(missing) == 1 else ''} "
                                  f"in its masks, so training could never learn {'them' if len(missing) > 1 else 'it'} "
                                  f"(pass --allow-missing-classes to write it anyway)")


def format_class_counts(dataset: SegmentationDataset, counts: dict[str, list[int]]) -> str:
    """The per-class pixel counts as a table: one row per list, one column per class."""
    names = list(dataset.classes.names)
    width = max(len(r) for r in counts) if counts else 4
    cols = [max(len(n), 9) for n in names]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols))]
    for rel, per_class in counts.items():
        lines.append(rel.ljust(width) + "  " + "  ".join(f"{v:,}".replace(",", " ").rjust(c) for v, c in zip(per_class, cols)))
    return "\n".join(lines)


def splits_sha256(splits_dir: str | Path) -> str:
    """Hash of every list under the folder (names and contents), recorded in caches and checkpoints."""
    root = Path(splits_dir)
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise RsmtdfError(f"{root}: no split lists here (run `rsmtdf make-splits` first)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def split_names(splits_dir: str | Path) -> list[str]:
    root = Path(splits_dir)
    return sorted({p.parent.name for p in root.glob("*/labeled.txt")})


def read_list(splits_dir: str | Path, name: str) -> list[str]:
    """Ids of a list: `val`, `test`, `<split>/labeled` or `<split>/unlabeled`."""
    path = Path(splits_dir) / f"{name}.txt"
    if not path.is_file():
        known = split_names(splits_dir)
        raise RsmtdfError(f"{path}: no such split list (splits here: {', '.join(known) or 'none'}; plus val, test)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def describe(splits_dir: str | Path) -> dict:
    return {"dir": str(Path(splits_dir).resolve()), "sha256": splits_sha256(splits_dir)}


def check_lists(splits_dir: str | Path, dataset: SegmentationDataset) -> dict[str, int]:
    """Names per list, after checking that every name in every list is a sample of `dataset`.

    Committed lists (e.g. the reference's DWL lists for Potsdam and DeepGlobe) only compare with the
    paper when they resolve against the user's folder; the first name that does not is named."""
    root = Path(splits_dir)
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise RsmtdfError(f"{root}: no split lists here (run `rsmtdf make-splits` first)")
    known = set(dataset.ids)
    counts, first, missing = {}, None, 0
    for f in files:
        names = [line.strip() for line in f.read_text().splitlines()]
        for n, name in enumerate(names, 1):
            if name and name not in known:
                missing += 1
                first = first or (f, n, name)
        if first is None and f.name != "unlabeled.txt":
            check_labeled(dataset, names, f)
        counts[f.relative_to(root).as_posix()] = sum(1 for name in names if name)
    if first is not None:
        f, n, name = first
        raise RsmtdfError(f"{f}: line {n} names '{name}', which {dataset.root} does not hold "
                          f"({missing} of {sum(counts.values())} names missing; dataset '{dataset.name}' reads {dataset.layout})")
    return counts


def check_labeled(dataset: SegmentationDataset, names: list[str], where: str | Path) -> None:
    """Refuse a list that needs masks (labeled, val, test) naming a sample without one."""
    maskless = {r.id: r for r in dataset.records if not r.labeled}
    for n, name in enumerate(names, 1):
        if name in maskless:
            r = maskless[name]
            raise RsmtdfError(f"{where}: line {n} names '{name}', which has no mask ({r.image}); "
                              f"only unlabeled lists may name it")


def write_checked_splits(dataset: SegmentationDataset, out: str | Path, seed: int = 0,
                         val_fraction: float | None = None, allow_missing_classes: bool = False) -> str:
    """`make-splits`: the lists made beside `out`, their class pixels counted and checked, and only
    then moved into `out` with `class_counts.json` (a refused split leaves `out` as it was).
    Returns the summary to print."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.new-") as tmp:
        sizes = make_splits(dataset, tmp, seed, val_fraction=val_fraction)
        lists = {rel: read_list(tmp, rel.removesuffix(".txt")) for rel in sizes}
        counts = class_pixel_counts(dataset, lists)
        if not allow_missing_classes:
            check_classes(dataset, counts, out)
        (Path(tmp) / "class_counts.json").write_text(json.dumps(
            {"classes": list(dataset.classes.names), "pixels": counts}, indent=1) + "\n")
        for rel in [*sizes, "class_counts.json"]:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / rel, out / rel)
    return (", ".join(f"{k}: {v}" for k, v in sizes.items()) + "\n"
            + "labeled pixels per class:\n" + format_class_counts(dataset, counts) + "\n"
            + f"wrote {len(sizes)} lists and class_counts.json to {out} (sha256 {splits_sha256(out)[:12]})")
