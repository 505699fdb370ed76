"""Datasets and Lightning data modules built from the synthesize stages' manifests.

Images are small and few, so each dataset decodes its PNGs once into memory. Tensors are float32
on [-1, 1], channels first (``pipeline.data.tensors``). Training samples get a random element of the
dihedral group D4 (flips and 90° rotations), the same one for the degraded and the clean image; batches
come from the resumable samplers of ``pipeline.data.loaders``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from pipeline.data.loaders import FreshDrawSampler, ShuffledD4Sampler, evaluation_loader, training_loader
from pipeline.data.synthesis import load_clean
from pipeline.data.tensors import d4, seeded_generator, to_tensor
from pipeline.files import read_jsonl
from pipeline.images import read_image


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
        if hasattr(self, "train_set"):  # set up already (by the caller, before Lightning's own call)
            return
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
