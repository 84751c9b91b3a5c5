"""`bench read`: targets/s the cache reader delivers through a DataLoader vs targets/s a step consumes."""

from __future__ import annotations

import math

from torch.utils.data import DataLoader, Dataset

from .common import Context, batch_stream, median_time


class _Reads(Dataset):
    def __init__(self, reader, pairs: list[tuple[int, int]]) -> None:
        self.reader, self.pairs = reader, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int):
        return self.reader.read(*self.pairs[k])


def bench_read(ctx: Context, workers: int = 2) -> dict:
    """Targets/s through a default DataLoader over CacheReader vs targets/s one training step consumes."""
    s = ctx.sizes
    trainer = ctx.trainer()
    if ctx.step_result is None:  # run alone: time the real step (reading included) here
        stream = batch_stream(trainer)
        trainer.student.train()
        step_s = median_time(lambda: trainer.train_step(next(stream)), s.repeats, s.warmup)["median_s"]
    else:
        step_s = ctx.step_result["times"]["cached_read"]["median_s"]
    cache = trainer.cache
    pairs = [(i, v) for i in range(cache.num_samples) for v in range(cache.num_views)]
    pairs = (pairs * math.ceil(256 / len(pairs)))[:256]
    loader = DataLoader(_Reads(cache.reader(), pairs), batch_size=s.batch, num_workers=workers,
                        persistent_workers=workers > 0)

    def one_pass():
        for _ in loader:
            pass

    t = median_time(one_pass, s.repeats, s.warmup)
    delivered = len(pairs) / t["median_s"]
    consumed = 2 * s.batch / step_s
    return {"sizes": {"targets_per_pass": len(pairs), "batch": s.batch, "workers": workers,
                      "teachers": s.teachers, "crop": s.crop},
            "times": {"read_pass": t, "step_s": step_s},
            "rates": {"delivered_targets_per_s": delivered, "consumed_targets_per_s": consumed},
            "ratios": {"delivered/consumed": {"value": delivered / consumed, "goal": ">= 5",
                                              "absolute": f"{delivered:.1f}/s vs {consumed:.2f}/s"}}}
