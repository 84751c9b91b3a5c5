"""The process's torch threads and memory allocator: settings that change speed, never values."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored after. Results of
    resampling and convolutions depend on it, so work that must not depend on the machine runs
    with one (`intra_op_threads(1)`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mallopt(*settings: tuple[int, int]) -> None:
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only; elsewhere a no-op
    if mallopt is not None:
        for param, value in settings:
            mallopt(param, value)


def keep_freed_buffers(worker_id: int = 0) -> None:
    """Serve allocations up to 64 MB from the heap and keep up to 256 MB of freed heap. A loader
    worker allocates and frees the same few-megabyte buffers every item; glibc would return them to
    the system and zero-fill fresh pages on the next item, which at 518 px cost more CPU than reading
    the targets (`bench feed`). A DataLoader `worker_init_fn`: the worker's peak is held anyway."""
    _mallopt((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 256 << 20))


def return_freed_memory() -> None:
    """Serve every allocation above 1 MB from its own mapping, returned to the system when freed.

    glibc raises its mmap threshold each time a large block is freed, after which the batches,
    probabilities and activations that mapping a scene allocates window after window come from heap
    arenas that fragment and keep growing with the number of windows (measured: +130 MB peak at 8192²
    over 2048², BENCHMARKS.md "Mapping"). A fixed threshold keeps the peak a function of the batch."""
    _mallopt((M_MMAP_THRESHOLD, 1 << 20))
