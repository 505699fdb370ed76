"""Datasets and Lightning data modules built from the synthesize stages' manifests.

Images are small and few, so each dataset decodes its PNGs once into memory. Tensors are float32
on [-1, 1], channels first. Training samples get a random element of the dihedral group D4 (flips and
90° rotations), the same one for the degraded and the clean image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from pipeline.data.synthesis import load_clean
from pipeline.images import read_image
from pipeline.files import read_jsonl


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 on [-1, 1]."""
    return torch.tensor(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """3xHxW on [-1, 1] -> HxWx3 uint8."""
    return tensor.detach().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def random_d4(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply one random flip/rotation (drawn from torch's RNG) to every tensor alike."""
    k = int(torch.randint(4, ()))
    flip = bool(torch.randint(2, ()))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(t.flip(-1) if flip else t)
    return tuple(out)


class PairedDataset(Dataset):
    """(degraded, clean, task) samples of one synthesized split: ``<root>/{manifest.jsonl,lq,gt}``."""

    def __init__(self, root: str | Path, task: int = 0, augment: bool = False, stage: str = "synthesize"):
        root = Path(root)
        self.records = read_jsonl(root / "manifest.jsonl", stage=stage)
        if not self.records:
            raise ValueError(f"{root}: empty dataset")
        self.lq = [to_tensor(read_image(root / r["lq"])) for r in self.records]
        self.gt = [to_tensor(read_image(root / r["gt"])) for r in self.records]
        self.task = task
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        lq, gt = self.lq[index], self.gt[index]
        if self.augment:
            lq, gt = random_d4(lq, gt)
        return {"lq": lq, "gt": gt, "task": self.task}


class CleanPatchDataset(Dataset):
    """Random clean ``patch``² crops of one split of ``prepare``'s images, ``length`` per epoch."""

    def __init__(self, clean_dir: str | Path, split: str, patch: int, length: int):
        images = load_clean(clean_dir, split)
        self.images = [to_tensor(img) for img in images.values() if min(img.shape[:2]) >= patch]
        if not self.images:
            raise ValueError(f"no {split} image in {clean_dir} is at least {patch}x{patch}")
        areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.images])
        self.weights = areas / areas.sum()
        self.patch = patch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[int(torch.multinomial(self.weights, 1))]
        top = int(torch.randint(image.shape[1] - self.patch + 1, ()))
        left = int(torch.randint(image.shape[2] - self.patch + 1, ()))
        (patch,) = random_d4(image[:, top : top + self.patch, left : left + self.patch])
        return patch


class RestorationDataModule(L.LightningDataModule):
    """Paired train/val sets of one or several degradations (``roots``: ``data/degraded/<d>`` folders).

    With several degradations the union is sampled uniformly and each sample carries its task index.
    """

    def __init__(self, roots: Sequence[str | Path], batch_size: int, num_workers: int = 0):
        super().__init__()
        self.roots = [Path(r) for r in roots]
        self.batch_size = batch_size
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ConcatDataset([PairedDataset(r / "train", i, augment=True) for i, r in enumerate(self.roots)])
        self.val_set = ConcatDataset([PairedDataset(r / "val", i) for i, r in enumerate(self.roots)])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


class CleanPatchDataModule(L.LightningDataModule):
    """Clean training patches for DDPM pre-training; validation on the val split's noisy crops."""

    def __init__(self, clean_dir: str | Path, patch: int, batch_size: int, steps_per_epoch: int,
                 val_patches: int, num_workers: int = 0):
        super().__init__()
        self.clean_dir = clean_dir
        self.patch = patch
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.val_patches = val_patches
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        self.train_set = CleanPatchDataset(self.clean_dir, "train", self.patch, self.batch_size * self.steps_per_epoch)
        with torch.random.fork_rng():  # a fixed validation set, whatever the global seed
            torch.manual_seed(0)
            val = CleanPatchDataset(self.clean_dir, "val", self.patch, self.val_patches)
            self.val_set = [val[i] for i in range(len(val))]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)


class LabelledImages(Dataset):
    """Degraded images with a target distribution over degradations (one-hot, or uniform over a mix's
    components), for training and validating the router."""

    def __init__(self, images: Sequence[torch.Tensor], targets: torch.Tensor, augment: bool = False):
        if len(images) != len(targets):
            raise ValueError("one target per image")
        self.images = list(images)
        self.targets = targets.float()
        self.augment = augment

    @classmethod
    def from_sets(cls, roots: Sequence[str | Path], split: str, augment: bool = False) -> "LabelledImages":
        """The degraded images of ``<root>/<split>`` for each degradation root, labelled by its index."""
        images, labels = [], []
        for index, root in enumerate(roots):
            dataset = PairedDataset(Path(root) / split, index)
            images += dataset.lq
            labels += [index] * len(dataset)
        return cls(images, torch.nn.functional.one_hot(torch.tensor(labels), len(roots)), augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        if self.augment:
            (image,) = random_d4(image)
        return {"image": image, "target": self.targets[index]}
