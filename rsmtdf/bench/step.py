"""`bench step`: one training step in four set-ups at the same batch and crop (FixMatch without
distillation, RS-MTDF with targets from memory, reading the cache through the real loader path,
online teachers), with FLOP-count predictions beside the measured ratios."""

from __future__ import annotations

import copy
import itertools

import numpy as np

from ..cache.reader import CacheReader
from ..models.student import Student
from ..train.losses import StepInputs
from .common import Context, batch_stream, interleaved_times, step_flops, wait_idle


class MemoryReader(CacheReader):
    """Every target of a cache held in RAM behind CacheReader's `read_into`: the floor any cache
    reader is measured against, through the same loader path."""

    def __init__(self, reader: CacheReader, views: int) -> None:
        super().__init__(reader.url, reader.teachers, reader.storage, reader.ids)
        pairs = [(i, a) for i in range(len(self.ids)) for a in range(views)]
        rows = self.read_batch(pairs, as_stored=True)
        self.targets = {n: {pair: row[n] for pair, row in zip(pairs, rows)} for n in self.teachers}

    def read_into(self, pairs: list[tuple[int, int]], out: dict[str, np.ndarray]) -> None:
        for name, t in self.targets.items():
            for j, pair in enumerate(pairs):
                out[name][j] = t[pair]


def _memory_twin(trainer):
    """The same Trainer whose loaders hand in targets from memory instead of reading the cache."""
    t = copy.copy(trainer)
    t.reader = MemoryReader(trainer.reader, trainer.cache.num_views)
    t.loaders = t.make_loaders()
    return t


def _no_distill(trainer):
    """The same Trainer with a Student that has no teachers: FixMatch, no translators or second pass."""
    t = copy.copy(trainer)
    cfg = {**trainer.student.config, "teachers": []}
    t.student = Student.from_config(cfg).to(trainer.device)
    t.ema = Student.from_config(cfg).to(trainer.device).eval().requires_grad_(False)
    t.model = t.student
    t.optimizer = t.make_optimizer()
    return t


# ---- the parts -------------------------------------------------------------------------------------


def bench_step(ctx: Context) -> dict:
    """Four set-ups of one training step at the same batch and crop, with FLOP predictions."""
    s = ctx.sizes
    trainer = ctx.trainer()
    trainer.student.train()
    stream = batch_stream(trainer)
    batches = [next(stream) for _ in range(s.warmup + s.repeats)]  # the in-memory set-ups replay these
    cycle = itertools.cycle(batches)
    bare = [StepInputs(**{**b.__dict__, "targets_l": {}, "targets_u": {}}) for b in batches]
    bare_cycle = itertools.cycle(bare)

    fix = _no_distill(trainer)
    fix.student.train()
    online = copy.copy(trainer)
    online.mode, online.teachers = "online", ctx.teachers()

    setups = {
        "fixmatch": lambda: fix.train_step(next(bare_cycle)),
        "cached_memory": lambda: trainer.train_step(next(cycle)),
        "online": lambda: online.train_step(next(cycle)),
    }
    # the real loader path in its steady state, reading the cache vs the same path with every target
    # already in memory: the ratio is what reading the cache costs. Warm-up steps drain the start-up
    # prefetch burst; each timed step pays for the loader work beside it (same cores) and any wait.
    memory = _memory_twin(trainer)
    memory_stream = batch_stream(memory)
    loader_times = interleaved_times({"cached_read": lambda: trainer.train_step(next(stream)),
                                      "loader_memory": lambda: memory.train_step(next(memory_stream))},
                                     s.repeats, max(s.warmup, 2))
    wait_idle([*trainer.loaders.values(), *memory.loaders.values()])
    times = {**interleaved_times(setups, s.repeats, s.warmup), **loader_times}
    flops = {k: step_flops(setups[k]) for k in ("fixmatch", "cached_memory", "online")}
    t = {k: v["median_s"] for k, v in times.items()}
    result = {
        "sizes": {"crop": s.crop, "batch": s.batch, "student": s.student, "teachers": s.teachers,
                  "workers": trainer.recipe.train.workers},
        "times": times, "flops": flops,
        "ratios": {
            "cached_read/cached_memory": {
                "value": t["cached_read"] / t["loader_memory"], "goal": "<= 1.05",
                "absolute": f"{t['cached_read']:.3f} s vs {t['loader_memory']:.3f} s (loader path, targets in memory)"},
            "cached/fixmatch": {
                "value": t["cached_memory"] / t["fixmatch"], "predicted": flops["cached_memory"] / flops["fixmatch"],
                "goal": "within 10 % of predicted",
                "absolute": f"{t['cached_memory']:.3f} s vs {t['fixmatch']:.3f} s "
                            f"({flops['cached_memory'] / 1e9:.1f} vs {flops['fixmatch'] / 1e9:.1f} GFLOP)"},
            "online/cached": {
                "value": t["online"] / t["cached_memory"], "predicted": flops["online"] / flops["cached_memory"],
                "goal": "within 10 % of predicted",
                "absolute": f"{t['online']:.3f} s vs {t['cached_memory']:.3f} s "
                            f"({flops['online'] / 1e9:.1f} vs {flops['cached_memory'] / 1e9:.1f} GFLOP)"},
        },
    }
    ctx.step_result = result
    return result

