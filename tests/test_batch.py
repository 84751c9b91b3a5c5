"""`Batch`: a collated batch in one buffer, equal to `default_collate`'s and handed over whole."""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from rsmtdf.data.batch import Batch


def _items(n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"mask": torch.from_numpy(rng.integers(0, 255, (5, 5), dtype=np.uint8)), "index": j,
             "strong": torch.from_numpy(rng.random(8)), "box": torch.arange(4) * j,
             "pixels": torch.from_numpy(rng.integers(0, 9, (2 + j, 3, 3)).astype(np.uint16 if j else np.uint8)),
             "valid": torch.zeros((0, 0), dtype=torch.bool) if j == 1 else torch.from_numpy(rng.random((2 + j, 3)) > 0.5)}
            for j in range(n)]


def _check(batch: Batch, items: list[dict]) -> None:
    plain = default_collate([{k: v for k, v in item.items() if k not in ("pixels", "valid")} for item in items])
    for k, v in plain.items():
        assert batch[k].dtype == v.dtype and torch.equal(batch[k], v), k
    for k in ("pixels", "valid"):
        for got, item in zip(batch.ragged(k), items):
            assert got.shape == item[k].shape and torch.equal(got, item[k].to(got.dtype)), k
    assert batch["pixels"].dtype == torch.uint16  # 8- and 16-bit windows in the dtype holding both


def test_collate_equals_default_collate_with_ragged_keys_per_sample():
    items = _items()
    batch = Batch.collate(items, ("pixels", "valid"))
    _check(batch, items)
    assert sorted(batch) == sorted(["mask", "index", "strong", "box", "pixels", "pixels_shape", "valid", "valid_shape"])
    start, end = batch.buffer.data_ptr(), batch.buffer.data_ptr() + batch.buffer.numel()
    assert all(start <= batch[k].data_ptr() < end or batch[k].numel() == 0 for k in batch)


class _Items(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, j: int) -> dict:
        return _items()[j]


def test_a_loader_worker_hands_the_batch_over_as_one_shared_segment():
    loader = DataLoader(_Items(), batch_size=3, num_workers=1,
                        collate_fn=lambda items: Batch.collate(items, ("pixels", "valid")))
    (batch,) = list(loader)
    assert isinstance(batch, Batch) and batch.buffer.is_shared()
    _check(batch, _items())
