"""Datasets and Lightning data modules built from the synthesize stages' manifests.

Images are small and few, so each dataset decodes its PNGs once into memory. Tensors are float32
on [-1, 1], channels first. Training samples get a random element of the dihedral group D4 (flips and
90° rotations), the same one for the degraded and the clean image.

Training batches are a pure function of ``(seed, step)``: ``ResumableBatchSampler`` draws each epoch's
order and augmentations from a generator seeded by the epoch, and datasets never touch the global RNG.
A run resumed from a checkpoint at step ``s`` (``ResumableLoader`` carries the step in Lightning's
checkpoint) therefore sees exactly the batches an uninterrupted run sees after step ``s``, and under
DDP each rank takes its slice of the same global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from pipeline.data.synthesis import load_clean
from pipeline.images import read_image
from pipeline.files import read_jsonl


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 on [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """3xHxW on [-1, 1] -> HxWx3 uint8."""
    return tensor.detach().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def seeded_generator(*key: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (seed, epoch, ...)."""
    state = 0
    for part in key:
        state = (state * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(state)


def d4(tensor: torch.Tensor, element: int) -> torch.Tensor:
    """Element 0..7 of the dihedral group D4: ``element % 4`` quarter turns, then a flip if ``element >= 4``."""
    tensor = torch.rot90(tensor, element % 4, dims=(-2, -1))
    return tensor.flip(-1) if element >= 4 else tensor


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


class D4Augmented(Dataset):
    """``dataset`` under the D4 element encoded in the key (``ShuffledD4Sampler``), applied to every tensor
    of the sample alike."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        element, index = divmod(key, len(self.dataset))
        sample = self.dataset[index]
        return {k: d4(v, element) if isinstance(v, torch.Tensor) and v.ndim == 3 else v for k, v in sample.items()}


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


class PairedDataset(Dataset):
    """(degraded, clean, task) samples of one synthesized split: ``<root>/{manifest.jsonl,lq,gt}``."""

    def __init__(self, root: str | Path, task: int = 0, stage: str = "synthesize"):
        root = Path(root)
        self.records = read_jsonl(root / "manifest.jsonl", stage=stage)
        if not self.records:
            raise ValueError(f"{root}: empty dataset")
        self.lq = [to_tensor(read_image(root / r["lq"])) for r in self.records]
        self.gt = [to_tensor(read_image(root / r["gt"])) for r in self.records]
        self.task = task

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"lq": self.lq[index], "gt": self.gt[index], "task": self.task}


class CleanPatchDataset(Dataset):
    """Random clean ``patch``² crops (image chosen by area, position, D4 element) of one split of
    ``prepare``'s images; key ``k`` is the draw seeded by ``(seed, k)``, ``length`` keys per epoch."""

    def __init__(self, clean_dir: str | Path, split: str, patch: int, length: int, seed: int):
        images = load_clean(clean_dir, split)
        self.images = [to_tensor(img) for img in images.values() if min(img.shape[:2]) >= patch]
        if not self.images:
            raise ValueError(f"no {split} image in {clean_dir} is at least {patch}x{patch}")
        areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.images])
        self.weights = areas / areas.sum()
        self.patch = patch
        self.length = length
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int) -> torch.Tensor:
        generator = seeded_generator(self.seed, key)
        image = self.images[int(torch.multinomial(self.weights, 1, generator=generator))]
        top = int(torch.randint(image.shape[1] - self.patch + 1, (), generator=generator))
        left = int(torch.randint(image.shape[2] - self.patch + 1, (), generator=generator))
        return d4(image[:, top : top + self.patch, left : left + self.patch], int(torch.randint(8, (), generator=generator)))


class RestorationDataModule(L.LightningDataModule):
    """Paired train/val sets of one or several degradations (``roots``: ``data/degraded/<d>`` folders).

    With several degradations the union is sampled uniformly and each sample carries its task index.
    """

    def __init__(self, roots: Sequence[str | Path], batch_size: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.roots = [Path(r) for r in roots]
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ConcatDataset([PairedDataset(r / "train", i) for i, r in enumerate(self.roots)])
        self.val_set = ConcatDataset([PairedDataset(r / "val", i) for i, r in enumerate(self.roots)])

    def train_dataloader(self) -> DataLoader:
        sampler = ShuffledD4Sampler(len(self.train_set), self.batch_size, self.seed)
        return training_loader(D4Augmented(self.train_set), sampler, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.val_set, self.batch_size, self.num_workers)


class CleanPatchDataModule(L.LightningDataModule):
    """Clean training patches for DDPM pre-training; validation on the val split's noisy crops."""

    def __init__(self, clean_dir: str | Path, patch: int, batch_size: int, steps_per_epoch: int,
                 val_patches: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.seed = seed
        self.clean_dir = clean_dir
        self.patch = patch
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.val_patches = val_patches
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_set = CleanPatchDataset(self.clean_dir, "train", self.patch, self.batch_size * self.steps_per_epoch,
                                           self.seed)
        val = CleanPatchDataset(self.clean_dir, "val", self.patch, self.val_patches, seed=0)  # fixed, whatever the seed
        self.val_set = [val[i] for i in range(len(val))]

    def train_dataloader(self) -> DataLoader:
        sampler = FreshDrawSampler(self.batch_size, self.steps_per_epoch, self.seed)
        return training_loader(self.train_set, sampler, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return evaluation_loader(self.val_set, self.batch_size)


class LabelledImages(Dataset):
    """Degraded images with a target distribution over degradations (one-hot, or uniform over a mix's
    components), for training and validating the router."""

    def __init__(self, images: Sequence[torch.Tensor], targets: torch.Tensor):
        if len(images) != len(targets):
            raise ValueError("one target per image")
        self.images = list(images)
        self.targets = targets.float()

    @classmethod
    def from_sets(cls, roots: Sequence[str | Path], split: str) -> "LabelledImages":
        """The degraded images of ``<root>/<split>`` for each degradation root, labelled by its index."""
        images, labels = [], []
        for index, root in enumerate(roots):
            dataset = PairedDataset(Path(root) / split, index)
            images += dataset.lq
            labels += [index] * len(dataset)
        return cls(images, torch.nn.functional.one_hot(torch.tensor(labels), len(roots)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "target": self.targets[index]}
