"""The identity of a cache or a model: what it was made from, as one frozen type.

`pipeline.resolve` builds it once from a recipe and its data. Extraction writes it into the cache's
attributes, training into every checkpoint, `export` into the sidecar; each is read back with
`Identity.from_record`, where records of the previous release are upgraded. Two identities are
compared in one place, `Identity.require`, field by field (`utils.records`): the refusal names the
field and both values (`views.count is 8 in the cache, 4 in pipeline/mine.toml`). What may differ
is declared on the field itself: where the data lies (the samples found there must match, by the
hash of their ids), where split lists lie (their hash must match), a display palette, where a
teacher's weights are fetched from (their sha256 must match).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data.bandstats import stats_path
from ..data.classes import ClassTable
from ..data.datasets import DATASETS, SegmentationDataset
from ..data.splits import splits_sha256
from ..errors import RsmtdfError
from ..transforms.pixels import NODATA_FILL
from ..transforms.scaling import BandScaling
from ..transforms.views import ViewSpec
from ..utils.files import ids_sha256
from ..utils.records import Difference, differences, may_differ, show, unknown_when_none
from .choice import StorageOptions

NOT_RECORDED = "not recorded by rsmtdf 0.1 (the release before identities)"
NO_STATISTICS = "none"  # `stats_sha256` of split lists without band_stats.json


@dataclass(frozen=True)
class DatasetIdentity:
    """The training samples: which dataset, the hash of their ids, how masks are read, the tiling."""

    name: str
    ids_sha256: str
    classes: ClassTable
    tile: int | None
    tile_stride: int | None
    root: str = field(metadata=may_differ("data moves between machines: the samples found there must match "
                                          "(ids_sha256)"))
    num_samples: int = field(default=0, metadata=may_differ("follows from ids_sha256"))
    empty_tiles_skipped: int = field(default=0, metadata=may_differ("follows from the scenes and ids_sha256"))

    @classmethod
    def of(cls, dataset: SegmentationDataset) -> DatasetIdentity:
        ids = dataset.ids_in("train")
        return cls(dataset.name, ids_sha256(ids), dataset.classes, dataset.tile,
                   None if dataset.tile is None else dataset.stride or dataset.tile, str(dataset.root.resolve()),
                   len(ids), dataset.skipped_empty)

    def shown(self, name: str, value: Any) -> str:
        if name == "ids_sha256":  # which samples: where they were found and how many
            return f"{show(value)} ({self.num_samples} samples at {self.root})"
        return show(value)

    def record(self) -> dict:
        return {"name": self.name, "root": self.root, "ids_sha256": self.ids_sha256, "num_samples": self.num_samples,
                "classes": list(self.classes.names), "class_table": self.classes.to_attrs(), "tile": self.tile,
                "tile_stride": self.tile_stride, "empty_tiles_skipped": self.empty_tiles_skipped}

    @classmethod
    def from_record(cls, d: dict, source: str) -> DatasetIdentity:
        """Also rsmtdf 0.1's records: `tile_stride` only where it differed from `tile`."""
        if "class_table" in d:
            classes = ClassTable.from_attrs(d["class_table"])
        elif d["name"] in DATASETS and d["name"] != "folder":
            classes = DATASETS[d["name"]].classes
        else:
            raise RsmtdfError(f"{source}: made before class tables were recorded; re-extract it with "
                              f"`rsmtdf extract-features` into a new --output")
        tile = d.get("tile")
        return cls(d["name"], d["ids_sha256"], classes, tile, d.get("tile_stride", tile), d["root"],
                   int(d.get("num_samples", 0)), int(d.get("empty_tiles_skipped", 0)))


@dataclass(frozen=True)
class SplitsIdentity:
    """The split lists and the band statistics beside them, by hash."""

    sha256: str
    stats_sha256: str | None = field(metadata=unknown_when_none(NOT_RECORDED))
    dir: str = field(default="", metadata=may_differ("the lists move with the data: their hash must match"))

    @classmethod
    def of(cls, splits_dir: str | Path) -> SplitsIdentity:
        stats = stats_path(splits_dir)
        return cls(splits_sha256(splits_dir), hashlib.sha256(stats.read_bytes()).hexdigest() if stats.is_file()
                   else NO_STATISTICS,
                   str(Path(splits_dir).resolve()))

    def shown(self, name: str, value: Any) -> str:
        return f"{show(value)} (lists at {self.dir})" if name in ("sha256", "stats_sha256") else show(value)

    def record(self) -> dict:
        return {"dir": self.dir, "sha256": self.sha256, "stats_sha256": self.stats_sha256}

    @classmethod
    def from_record(cls, d: dict) -> SplitsIdentity:
        return cls(d["sha256"], d.get("stats_sha256"), d.get("dir", ""))


@dataclass(frozen=True)
class TeacherIdentity:
    """What defines a teacher's targets: its configuration (the registry's, the recipe's input size)
    and what is known once it is built (token grid, channels, the sha256 of its weights)."""

    name: str
    library: str
    model: str
    input_size: int
    layer: int
    norm: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict, metadata=may_differ(
        "where the weights are fetched from, not which: weights_sha256 says which"))
    grid: int | None = field(default=None, metadata=unknown_when_none("known once the teacher is built"))
    dim: int | None = field(default=None, metadata=unknown_when_none("known once the teacher is built"))
    weights_sha256: str | None = field(default=None, metadata=unknown_when_none("known once its weights are loaded"))

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_record(cls, d: dict) -> TeacherIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in d.items() if k in names}
        return cls(**{**kept, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def _scaling_record(scaling: BandScaling | None) -> dict | None:
    return None if scaling is None else scaling.record()


def _scaling(record: dict | None) -> BandScaling | None:
    """A scaling record read back; rsmtdf 0.1's three-band records without a fill had the ImageNet mean."""
    if record is None:
        return None
    scaling = BandScaling.from_record(record)
    if scaling.fill is None and len(scaling.bands) == 3:
        scaling = dataclasses.replace(scaling, fill=tuple(NODATA_FILL))
    return scaling


@dataclass(frozen=True)
class Identity:
    """What a cache or a model was made from. A cache's `input` is its teachers' (three bands); a
    model's `student_input` is the student's, all its bands; either is None where not recorded.
    `storage` is the kind the recipe asked for (`auto` included), `storage_options` what else of
    the request decides what is stored; the kind each teacher got is the cache's (`attrs["stored"]`)."""

    dataset: DatasetIdentity
    splits: SplitsIdentity
    views: ViewSpec | None = field(default=None, metadata=unknown_when_none(NOT_RECORDED + " in checkpoints"))
    teachers: tuple[TeacherIdentity, ...] | None = field(default=None, metadata=unknown_when_none(
        NOT_RECORDED + " in checkpoints"))
    storage: str | None = field(default=None, metadata=unknown_when_none("targets computed online are not stored"))
    input: BandScaling | None = field(default=None, metadata=unknown_when_none(NOT_RECORDED + " in checkpoints"))
    student_input: BandScaling | None = field(default=None, metadata=unknown_when_none(
        "a cache records its teachers' input only"))
    storage_options: StorageOptions | None = field(default=None, metadata=unknown_when_none(
        "caches made before the compact storage kinds record the storage alone (float16 or int8)"))

    def record(self) -> dict:
        """Plain JSON data: the keys a cache's attributes hold (`student_input` where known)."""
        out = {"dataset": self.dataset.record(), "splits": self.splits.record(),
               "views": None if self.views is None else self.views.to_attrs(),
               "teachers": None if self.teachers is None else [t.record() for t in self.teachers],
               "storage": self.storage, "input": _scaling_record(self.input)}
        if self.student_input is not None:
            out["student_input"] = self.student_input.record()
        if self.storage_options is not None:
            out["storage_options"] = self.storage_options.record()
        return out

    @classmethod
    def from_record(cls, d: dict, source: str) -> Identity:
        """The identity a cache's attributes, a checkpoint or a sidecar records (one line if unreadable)."""
        try:
            views, teachers = d.get("views"), d.get("teachers")
            return cls(DatasetIdentity.from_record(d["dataset"], source), SplitsIdentity.from_record(d["splits"]),
                       None if views is None else ViewSpec.from_attrs(views),
                       None if teachers is None else tuple(TeacherIdentity.from_record(t) for t in teachers),
                       d.get("storage"), _scaling(d.get("input")), _scaling(d.get("student_input")),
                       StorageOptions.from_record(d.get("storage_options")))
        except (KeyError, TypeError, ValueError) as exc:
            raise RsmtdfError(f"{source}: its identity record is unreadable ({type(exc).__name__}: {exc}); "
                              f"re-extract or retrain it") from None

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.classes.names)

    def differences(self, wanted: Identity) -> list[Difference]:
        return differences(self, wanted)

    def require(self, wanted: Identity, where: str, found_in: str, wanted_in: str | Callable[[str], str],
                what: str = "", then: str = "") -> None:
        """Refuse, in one line starting with `where`, a `wanted` identity that differs from this one:
        `<where>: <what>views.count is 8 in <found_in>, 4 in <wanted_in><then>` (`wanted_in` may name
        the source of each field, e.g. the recipe key or option that set it)."""
        found = self.differences(wanted)
        if not found:
            return
        first = found[0]
        label = wanted_in(first.path) if callable(wanted_in) else wanted_in
        more = f" (and {len(found) - 1} more difference{'s' * (len(found) > 2)})" if len(found) > 1 else ""
        raise RsmtdfError(f"{where}: {what}{first.line(found_in, label)}{more}{then}")
