"""Resumable training batches: a pure function of ``(seed, step)``.

``ResumableBatchSampler`` draws each epoch's order and augmentations from a generator seeded by the epoch,
and datasets never touch the global RNG. A run resumed from a checkpoint at step ``s`` (``ResumableLoader``
carries the step in Lightning's checkpoint) therefore sees exactly the batches an uninterrupted run sees
after step ``s``, and under DDP each rank takes its slice of the same global batch.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.tensors import seeded_generator


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of dataset keys, a pure function of ``(seed, epoch, batch)``: resumable at any step.

    Each iteration is one epoch. ``step`` is the number of batches training has consumed (the trainer
    keeps it current); ``start_at(step)`` makes the next iteration continue from there. Under
    ``torch.distributed`` each rank yields its ``batch_size / world_size`` slice of every global batch,
    so the global batch is the same whatever the number of processes.
    """

    def __init__(self, batch_size: int, batches_per_epoch: int, seed: int):
        if batches_per_epoch < 1:
            raise ValueError(f"an epoch needs at least one batch of {batch_size}")
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.step = 0
        self._epoch, self._skip = 0, 0

    def epoch_keys(self, epoch: int) -> torch.Tensor:
        """The keys of one epoch, ``batch_size * batches_per_epoch`` of them."""
        raise NotImplementedError

    def start_at(self, step: int) -> None:
        self.step = step
        self._epoch, self._skip = divmod(step, self.batches_per_epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        if self.batch_size % world:
            raise ValueError(f"batch size {self.batch_size} is not divisible by {world} processes")
        share = self.batch_size // world
        epoch, skip = self._epoch, self._skip
        self._epoch, self._skip = epoch + 1, 0
        keys = self.epoch_keys(epoch).view(self.batches_per_epoch, self.batch_size)
        for batch in keys[skip:]:
            yield batch[rank * share : (rank + 1) * share].tolist()


class ShuffledD4Sampler(ResumableBatchSampler):
    """Every item once per epoch in a seeded order, each with a seeded D4 element: key = element·n + index
    (for ``D4Augmented``). The last incomplete batch is dropped."""

    def __init__(self, size: int, batch_size: int, seed: int):
        super().__init__(batch_size, size // batch_size, seed)
        self.size = size

    def epoch_keys(self, epoch: int) -> torch.Tensor:
        generator = seeded_generator(self.seed, epoch)
        order = torch.randperm(self.size, generator=generator)
        elements = torch.randint(8, (self.size,), generator=generator)
        return (elements * self.size + order)[: self.batch_size * self.batches_per_epoch]


class FreshDrawSampler(ResumableBatchSampler):
    """Keys 0, 1, 2, ... across epochs: each key names one fresh random draw of a ``CleanPatchDataset``."""

    def epoch_keys(self, epoch: int) -> torch.Tensor:
        per_epoch = self.batch_size * self.batches_per_epoch
        return torch.arange(epoch * per_epoch, (epoch + 1) * per_epoch)


class ResumableLoader(DataLoader):
    """A loader over a ``ResumableBatchSampler`` whose position Lightning saves in its checkpoints and
    restores before it starts iterating (Lightning calls ``state_dict`` / ``load_state_dict``)."""

    def state_dict(self) -> dict[str, int]:
        return {"step": self.batch_sampler.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.start_at(state["step"])


def training_loader(dataset: Dataset, sampler: ResumableBatchSampler, num_workers: int) -> ResumableLoader:
    """A loader over ``sampler``'s batches; its own generator keeps the global RNG untouched."""
    return ResumableLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                           persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(sampler.seed))


def evaluation_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(0))
