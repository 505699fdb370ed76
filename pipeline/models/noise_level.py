"""``NoiseLevelEstimator``: the noise level at which an adapter with the ``noise_sigma`` timestep rule restores
an image best, learned from that adapter itself.

The analytic σ̂ (``severity.estimate_noise_sigma``) reads white noise well, but noise that went through a
later degradation is no longer white: JPEG quantisation removes its high frequencies (σ̂ ≈ 3 on crops noised
at σ ≈ 30, then compressed), blur smooths it. The noise adapter then runs at far too small a ``t`` and leaves
the noise in: on seed 20240930's validation crops, with the true adapters, 26.5 dB on noise+jpeg where the
adapter at its best per-crop ``t`` reaches over 28.

The estimator keeps σ̂ and learns a correction from statistics that tell such noise apart, all independent
of the image's size and of where a JPEG block grid starts: the ratios of σ̂ on the image downsampled 2× and
4× to σ̂ at full resolution (white noise halves with each 2× average, low-pass noise does not), and the
blockiness of horizontal and vertical differences (the strongest of the 8 block phases over their mean).
``log σ = log σ̂ + MLP(features)``, the MLP's last layer starting at zero: before training, and wherever the
features say white noise, it is the analytic estimate. A ``min_correction`` keeps σ̂ where the correction is
smaller than that (in log units): on white noise in full-size photos σ̂ is the better estimate (the
correction learned on small patches of a few photos only adds its own error there), while noise that JPEG or
blur went over needs corrections many times larger. Training (``pipeline.training.noise_level``) fits the
σ whose timestep ``t(σ)`` gave the adapter its best PSNR on each training patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models.pretrained import load_module_files, save_module
from pipeline.models.severity import estimate_noise_sigma

FEATURES = ("log σ̂", "log σ̂(2×) − log σ̂", "log σ̂(4×) − log σ̂", "log blockiness (columns)", "log blockiness (rows)")
MIN_SIDE = 16  # the 4× downsampled image must still hold a 3×3 Laplacian, the blockiness two 8-pixel blocks


@dataclass
class NoiseLevelConfig:
    adapter: str  # the adapter whose timestep it sets
    hidden: int = 64
    block: int = 8  # JPEG's block side


def blockiness(gray: torch.Tensor, dim: int, block: int = 8) -> torch.Tensor:
    """(B,) the mean absolute difference between neighbours along ``dim`` (2: rows, 3: columns) of ``gray``
    (B×1×H×W) at the strongest of the ``block`` phases, over its mean across phases: 1 for content without a
    block grid, above 1 where compression blocks start every ``block`` pixels, wherever the grid starts."""
    length = gray.shape[dim] - 1
    diff = (gray.narrow(dim, 1, length) - gray.narrow(dim, 0, length)).abs()
    diff = diff.narrow(dim, 0, length // block * block)
    moved = diff.movedim(dim, -1)  # B×1×other×(blocks·block)
    per_phase = moved.reshape(*moved.shape[:-1], -1, block).mean(dim=(1, 2, 3))  # B×block
    return per_phase.max(dim=1).values / per_phase.mean(dim=1).clamp_min(1e-6)


def noise_features(images: torch.Tensor, block: int = 8) -> torch.Tensor:
    """The estimator's inputs (B, 5) for images B×3×H×W on [-1, 1] (``FEATURES``)."""
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"noise level estimation needs at least {MIN_SIDE}×{MIN_SIDE} pixels, got "
                         f"{images.shape[-2]}×{images.shape[-1]}")
    images = images.float()
    sigmas = [estimate_noise_sigma(F.avg_pool2d(images, s) if s > 1 else images).clamp_min(1e-4).log() for s in (1, 2, 4)]
    gray = images.mean(dim=1, keepdim=True)
    return torch.stack([sigmas[0], sigmas[1] - sigmas[0], sigmas[2] - sigmas[0],
                        blockiness(gray, 3, block).log(), blockiness(gray, 2, block).log()], dim=1)


def quarter_turned(features: torch.Tensor) -> torch.Tensor:
    """The features (…, 5) of the same images turned by 90°: columns and rows swap; σ̂ (a symmetric filter, square
    pooling) is unchanged, and so is everything under a flip."""
    return features[..., [0, 1, 2, 4, 3]]


class NoiseLevelEstimator(torch.nn.Module):
    def __init__(self, config: NoiseLevelConfig):
        super().__init__()
        self.config = config
        width = len(FEATURES)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, config.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(config.hidden, config.hidden), torch.nn.GELU(),
                                       torch.nn.Linear(config.hidden, 1))
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)
        # feature standardisation, set from the training features (``standardise``)
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))

    def standardise(self, features: torch.Tensor) -> None:
        """Centre and scale the MLP's inputs by the statistics of ``features`` (N, 5)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-6))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return noise_features(images, self.config.block)

    def log_sigma(self, features: torch.Tensor, min_correction: float = 0.0) -> torch.Tensor:
        """(B,) log σ on the [-1, 1] scale, from ``features`` (B, 5); a correction to log σ̂ smaller in size than
        ``min_correction`` is dropped."""
        correction = self.mlp((features - self.feature_mean) / self.feature_std)[:, 0]
        if min_correction > 0:
            correction = torch.where(correction.abs() < min_correction, torch.zeros_like(correction), correction)
        return features[:, 0] + correction

    def forward(self, images: torch.Tensor, min_correction: float = 0.0) -> torch.Tensor:
        """σ (B,) on the [-1, 1] scale for images B×3×H×W on [-1, 1] (at least 16×16): σ̂ where the learned
        correction is smaller than ``min_correction`` (log units)."""
        return self.log_sigma(self.features(images), min_correction).exp()

    def save_pretrained(self, path: str | Path, card: str | None = None) -> None:
        """Config and weights, and ``card`` as its README.md where given, written as one folder."""
        save_module(path, self.config, self, card)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "NoiseLevelEstimator":
        fields, state = load_module_files(path, "noise level estimator", "fit_noise_level")
        estimator = cls(NoiseLevelConfig(**fields))
        estimator.load_state_dict(state)
        return estimator.eval()
