"""Training a ``NoiseLevelEstimator`` for one adapter with the ``noise_sigma`` timestep rule.

Training patches are clean patches with the adapter's degradation alone, or with one other degradation
applied before or after it (noise that went through JPEG or blur is what the analytic σ̂ misreads). Each patch
is labelled by the adapter itself: its restoration at every timestep of a grid, scored (PSNR) against the
same patch with every degradation but the adapter's (its job is to undo its own degradation). The estimator
is fitted to the log σ of the best timestep (L1) and judged by its *regret*: the PSNR lost at the timestep it
picks against the best of the grid, beside the analytic σ̂'s regret on the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from pipeline.data.degradations import Degradation, sample_seed
from pipeline.data.synthesis import crop, image_sizes, train_boxes
from pipeline.data.tensors import to_tensor
from pipeline.models.composition import AdapterComposition
from pipeline.models.noise_level import NoiseLevelEstimator, quarter_turned
from pipeline.training.schedules import warmup_cosine


def noise_combos(names: list[str], adapter: str) -> list[tuple[str, ...]]:
    """``(adapter,)`` and, for every other degradation, the adapter's degradation before it and after it."""
    others = [n for n in names if n != adapter]
    return [(adapter,)] + [combo for other in others for combo in ((adapter, other), (other, adapter))]


@dataclass
class NoisePatches:
    """Degraded patches (N×3×h×w on [-1, 1]), their references without the adapter's degradation, and what
    was applied to each (``noise+jpeg``: noise, then JPEG)."""

    degraded: torch.Tensor
    reference: torch.Tensor
    combos: list[str]


def noise_patches(degradations, names: list[str], adapter: str, images: dict[str, np.ndarray], size: int,
                  count: int, alone_share: float, seed: int, stream: str) -> NoisePatches:
    """``count`` ``size``² patches of ``images``: a share ``alone_share`` with the adapter's degradation alone,
    the rest with it and one other degradation (``noise_combos``), drawn evenly. A reference applies the same
    draw of the other degradation (each component is seeded by its name) without the adapter's."""
    combos = noise_combos(names, adapter)
    rng = np.random.default_rng(sample_seed(seed, stream))
    transforms: dict[tuple[str, ...], Degradation] = {}
    degraded, reference, applied = [], [], []
    for index, (name, box) in enumerate(train_boxes(image_sizes(images), size, count, sample_seed(seed, stream, "boxes"))):
        combo = combos[0] if len(combos) == 1 or rng.random() < alone_share else combos[1 + int(rng.integers(len(combos) - 1))]
        others = tuple(n for n in combo if n != adapter)
        for key in (combo, others):
            if key and key not in transforms:
                transforms[key] = Degradation.from_params(degradations, list(key))
        clean = crop(images[name], box)
        draw = sample_seed(seed, stream, index)
        degraded.append(to_tensor(transforms[combo](clean, draw)[0]))
        reference.append(to_tensor(transforms[others](clean, draw)[0] if others else clean))
        applied.append("+".join(combo))
    return NoisePatches(torch.stack(degraded), torch.stack(reference), applied)


def timestep_grid(composition: AdapterComposition, sigma_range: tuple[float, float], count: int) -> torch.Tensor:
    """The distinct timesteps whose noise levels ``k_t`` best match ``count`` log-spaced σ (0–255 scale) over
    ``sigma_range``, in increasing order."""
    sigmas = torch.exp(torch.linspace(np.log(sigma_range[0]), np.log(sigma_range[1]), count)) / 127.5
    return torch.unique(composition.readout.timesteps_for_sigma(sigmas))


@torch.no_grad()
def psnr_curves(composition: AdapterComposition, adapter: str, patches: NoisePatches, timesteps: torch.Tensor,
                batch_size: int = 64, progress=None) -> torch.Tensor:
    """(N, T) PSNR (dB) of the adapter's one-step restoration of each patch at each timestep, against its reference."""
    weights = composition.weights_for({adapter: 1.0})
    curves = []
    for start in range(0, len(patches.degraded), batch_size):
        y, reference = patches.degraded[start : start + batch_size], patches.reference[start : start + batch_size]
        row = []
        for t in timesteps.tolist():
            restored = composition.restore_at(y, weights, torch.full((len(y),), t, dtype=torch.long)).clamp(-1, 1)
            row.append(-10 * torch.log10(((restored - reference) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10) / 4))
        curves.append(torch.stack(row, dim=1))
        if progress is not None:
            progress(len(y))
    return torch.cat(curves)


def regret(curves: torch.Tensor, log_sigma: torch.Tensor, grid_log_sigma: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR lost at the grid timestep nearest each ``log_sigma`` against each curve's best."""
    picked = (grid_log_sigma[None] - log_sigma[:, None]).abs().argmin(dim=1)
    return curves.max(dim=1).values - curves.gather(1, picked[:, None])[:, 0]


class LabelledFeatures(Dataset):
    """The estimator's features of labelled patches with their PSNR curves over the timestep grid: ``{"features",
    "curves"}`` samples. A key ``element · N + index`` (``ShuffledD4Sampler``) gives the features of patch ``index``
    under that element of D4, which are computed, not re-measured (``quarter_turned``): a median per patch and
    scale at every step cost more than all the rest of training."""

    def __init__(self, features: torch.Tensor, curves: torch.Tensor):
        if len(features) != len(curves):
            raise ValueError("one curve per patch")
        self.features, self.curves = features, curves

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        element, index = divmod(key, len(self.features))
        features = self.features[index]
        return {"features": quarter_turned(features) if element % 2 else features, "curves": self.curves[index]}


class NoiseLevelTraining(L.LightningModule):
    """Batches of ``{"features", "curves"}``: L1 between the estimator's log σ and the log σ of each curve's best
    timestep; validation logs the estimator's and the analytic σ̂'s mean regret (dB)."""

    def __init__(self, estimator: NoiseLevelEstimator, grid_sigma: torch.Tensor, lr: float, weight_decay: float,
                 warmup_steps: int, max_steps: int):
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "grid_sigma"])
        self.estimator = estimator
        self.register_buffer("grid_log_sigma", grid_sigma.log(), persistent=False)
        self.regret = {"estimator": MeanMetric(), "analytic": MeanMetric()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target = self.grid_log_sigma[batch["curves"].argmax(dim=1)]
        loss = (self.estimator.log_sigma(batch["features"]) - target).abs().mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        features, curves = batch["features"], batch["curves"]
        self.regret["estimator"].update(regret(curves, self.estimator.log_sigma(features), self.grid_log_sigma))
        self.regret["analytic"].update(regret(curves, features[:, 0], self.grid_log_sigma))

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.regret.items():
            self.log(f"val/regret_db_{name}", metric.compute(), prog_bar=name == "estimator")
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.estimator.mlp.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine(optimizer, self.hparams.warmup_steps, self.hparams.max_steps)}
