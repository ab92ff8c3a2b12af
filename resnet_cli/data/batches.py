"""Batch sources for the training loop.

Both paths share one notion of order: epoch e visits a permutation that depends only on
(seed, e), split across ranks, and can start at any step. That makes runs reproducible and
lets a resumed run continue mid-epoch exactly where it stopped.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError
from .images import worker_error
from .transforms import Preprocess, device_batch


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, epoch, step) streams do not overlap."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9) & 0x7FFFFFFFFFFFFFFF
    return h


class EpochOrder:
    """Indices one rank visits in one epoch."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.drop_last = rank, world, drop_last
        # Training: every rank gets the same number of samples (the remainder is dropped each
        # epoch, a different one each time); evaluation: every sample exactly once.
        self.per_rank = n // world if shuffle else len(range(rank, n, world))

    def indices(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
            return order[self.rank::self.world][: self.per_rank]
        return torch.arange(self.rank, self.n, self.world)

    def num_batches(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        if self.drop_last and full:
            # One batch shape for the whole run (issue 12): cudnn's autotuner and CUDA graphs
            # work per shape. The images left out differ from epoch to epoch (the order does).
            return full
        # BatchNorm cannot train on a batch of one: such a last training batch is dropped.
        return full + (1 if rest > 1 or (rest == 1 and not self.shuffle) else 0)

    def batch_slices(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        idx = self.indices(epoch)
        for b in range(start, self.num_batches()):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size]


class DeviceBatches:
    """The fast path: a uint8 tensor on the training device, preprocessed per batch there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, prep: Preprocess, order: EpochOrder,
                 train: bool, device: torch.device):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.prep, self.order, self.train, self.device = prep, order, train, device
        self.gen = torch.Generator(device=device)

    def __len__(self) -> int:
        return self.order.num_batches()

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, idx in enumerate(self.order.batch_slices(epoch, start), start):
            idx = idx.to(self.device, non_blocking=True)
            # One seed per (seed, epoch, rank, step): augmentation of batch k never depends on
            # what ran before it, so a mid-epoch resume sees exactly the same batches.
            self.gen.manual_seed(_mix(self.order.seed, epoch, self.order.rank, step))
            yield device_batch(self.images[idx], self.prep, self.train, self.gen), self.labels[idx]


class _OrderSampler(Sampler[tuple[int, int]]):
    """(index, seed) pairs: each sample's augmentation is drawn from its own seed, a function of
    (seed, epoch, index), so batch k of an epoch does not depend on which worker process made
    it or on what that worker made before (workers are persistent): a resumed run sees the same
    batches as an uninterrupted one, as on the device path."""

    def __init__(self, order: EpochOrder):
        self.order, self.epoch, self.start = order, 0, 0

    def __iter__(self):
        indices = self.order.indices(self.epoch)[self.start * self.order.batch_size:].tolist()
        return iter((i, _mix(self.order.seed, self.epoch, i)) for i in indices)

    def __len__(self) -> int:
        return max(0, self.order.per_rank - self.start * self.order.batch_size)


class _SeededSamples(Dataset):
    """dataset[(i, seed)]: sample i with torch's global RNG (what torchvision's transforms draw
    from) seeded for it. In the main process (num_workers=0) the global RNG is put back after."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        if torch.utils.data.get_worker_info() is not None:
            torch.manual_seed(seed)
            return self.dataset[i]
        state = torch.get_rng_state()
        try:
            torch.manual_seed(seed)
            return self.dataset[i]
        finally:
            torch.set_rng_state(state)


class LoaderBatches:
    """The DataLoader path, for data that does not fit in memory (image folders)."""

    def __init__(self, dataset: Dataset, order: EpochOrder, device: torch.device, num_workers: int,
                 prefetch: int = 4):
        self.order, self.device = order, device
        self.sampler = _OrderSampler(order)
        pin = device.type == "cuda"
        self.loader = DataLoader(
            _SeededSamples(dataset), batch_size=order.batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=pin, persistent_workers=num_workers > 0, drop_last=False,
            prefetch_factor=prefetch if num_workers > 0 else None)

    def __len__(self) -> int:
        return self.order.num_batches()

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        remaining = len(self) - start
        try:
            for x, y in self.loader:
                if remaining <= 0:  # a dropped batch of one
                    break
                remaining -= 1
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        except DataError as e:  # an unreadable image, raised in a worker: its own line, not the worker's traceback
            raise worker_error(e) from None


def default_workers() -> int:
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


__all__ = ["DeviceBatches", "EpochOrder", "LoaderBatches", "default_workers"]
