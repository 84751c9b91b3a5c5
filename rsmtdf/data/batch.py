"""A collated batch as one block of memory.

A DataLoader worker hands each tensor of a batch to the training process as a shared-memory
segment of its own, whose file descriptor crosses over a socket: about 1.2 ms of CPU per tensor,
worker and receiver together, whatever its size. With 18 tensors per step that was more than the
batches' own work (`rsmtdf bench feed`). A `Batch` keeps every field in one byte buffer: one
segment to hand over, one copy to pin; fields are views into it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

ALIGN = 64  # bytes between fields' starts: any dtype's view of the buffer is aligned


@dataclass(frozen=True)
class Field:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()


class Batch(Mapping):
    """Read-only mapping of field name to tensor, all views of `buffer` (uint8)."""

    def __init__(self, buffer: torch.Tensor, fields: dict[str, Field]) -> None:
        self.buffer, self.fields = buffer, fields

    @classmethod
    def collate(cls, items: list[dict], ragged: Sequence[str] = ()) -> Batch:
        """`default_collate` of flat items (tensors and numbers), stacked along a new first axis,
        except the `ragged` keys, whose tensors differ in size between samples: each key's tensors
        flattened into one, with their shapes beside (`<key>_shape`, see `ragged`). In a loader
        worker the buffer is shared memory, as `default_collate` makes it, so handing it over
        copies nothing."""
        values = {k: [torch.as_tensor(item[k]) for item in items] for k in items[0]}
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for k, ts in values.items():
            if k in ragged:
                values[k] = ts = _common_dtype(ts)
                layout[k] = ts[0].dtype, (sum(t.numel() for t in ts),)
                layout[f"{k}_shape"] = torch.int64, (len(ts), ts[0].dim())
            else:
                layout[k] = ts[0].dtype, (len(ts), *ts[0].shape)
        fields, size = {}, 0
        for k, (dtype, shape) in layout.items():
            fields[k] = Field(dtype, shape, size)
            size += -(-fields[k].nbytes // ALIGN) * ALIGN
        buffer = torch.UntypedStorage._new_shared(size) if get_worker_info() is not None else None
        batch = cls(torch.empty(size, dtype=torch.uint8) if buffer is None else
                    torch.empty(0, dtype=torch.uint8).set_(buffer), fields)
        for k, ts in values.items():
            if k in ragged:
                torch.cat([t.reshape(-1) for t in ts], out=batch[k])
                batch[f"{k}_shape"].copy_(torch.tensor([t.shape for t in ts], dtype=torch.int64))
            else:
                torch.stack(ts, out=batch[k])
        return batch

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self.fields[key]
        return self.buffer[f.offset:f.offset + f.nbytes].view(f.dtype).view(f.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def ragged(self, key: str, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """A ragged key's per-sample tensors, copied to `device` in one transfer."""
        flat = self[key].to(device, non_blocking=True)
        shapes = self[f"{key}_shape"]
        return [t.view(*shape) for t, shape in zip(flat.split(shapes.prod(1).tolist()), shapes.tolist())]

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory, with one copy (DataLoader's `pin_memory` calls it)."""
        return Batch(self.buffer.pin_memory(), self.fields)


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in the one dtype holding all their values (NumPy's promotion: torch has none for
    uint16): a folder may mix 8- and 16-bit tiles, and the scaling's numbers do not depend on it."""
    if len({t.dtype for t in tensors}) == 1:
        return tensors
    common = torch.from_numpy(np.empty(0, np.result_type(*(t.numpy().dtype for t in tensors)))).dtype
    return [t.to(common) for t in tensors]
