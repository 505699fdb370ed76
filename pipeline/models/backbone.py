"""The shared generative component: a ``diffusers.UNet2DModel`` trained as a pixel-space DDPM
(epsilon prediction), and the one-step restoration read-out used by every adapter.

One-step restoration treats a degraded image ``y`` (on [-1, 1]) as a noisy sample at a fixed timestep
``t*``: the network sees ``x_t = sqrt(ᾱ) · y`` and the restored image is its x0-prediction
``x0 = y − k · ε̂`` with ``k = sqrt(1 − ᾱ) / sqrt(ᾱ)``. ``k`` bounds how far an adapter can move the
image, so ``t*`` is a per-adapter setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import DDPMScheduler, UNet2DModel

BACKBONE_STAGE = "pretrain_backbone"


def build_unet(architecture: Mapping[str, Any]) -> UNet2DModel:
    """A fresh RGB-to-RGB ``UNet2DModel`` from the ``backbone.architecture`` params."""
    arch = dict(architecture)
    return UNet2DModel(
        in_channels=3,
        out_channels=3,
        sample_size=arch.pop("sample_size"),
        block_out_channels=tuple(arch.pop("block_out_channels")),
        down_block_types=tuple(arch.pop("down_block_types")),
        up_block_types=tuple(arch.pop("up_block_types")),
        **arch,
    )


def build_scheduler(schedule: Mapping[str, Any]) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=schedule["num_train_timesteps"],
        beta_schedule=schedule["beta_schedule"],
        prediction_type="epsilon",
        clip_sample=False,
    )


def load_backbone(path: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load a backbone folder (``save_pretrained`` layout: UNet config + safetensors, scheduler config).

    Any ``UNet2DModel`` folder with 3 input and 3 output channels works, e.g. a larger one trained on a
    GPU; a folder without a scheduler config gets the DDPM defaults. The model comes back frozen, in
    eval mode.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no UNet2DModel (config.json missing): run `dvc repro {BACKBONE_STAGE}` "
            "or set backbone.pretrained to a UNet2DModel folder"
        )
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise ValueError(f"{path} holds a {config['_class_name']}, not a UNet2DModel")
    unet = UNet2DModel.from_pretrained(path, use_safetensors=True)
    if unet.config.in_channels != 3 or unet.config.out_channels != 3:
        raise ValueError(
            f"{path}: the backbone must map RGB to RGB, got {unet.config.in_channels} -> {unet.config.out_channels} channels"
        )
    scheduler = (
        DDPMScheduler.from_pretrained(path)
        if (path / "scheduler_config.json").is_file()
        else DDPMScheduler(num_train_timesteps=unet.config.num_train_timesteps or 1000)
    )
    unet.requires_grad_(False).eval()
    return unet, scheduler


def save_backbone(path: str | Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    path = Path(path)
    unet.save_pretrained(path, safe_serialization=True)
    scheduler.save_pretrained(path)


def downsample_factor(unet: UNet2DModel) -> int:
    """Input sides must be multiples of this (one halving per down block but the last)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


class OneStepReadout(torch.nn.Module):
    """Per-timestep constants of the one-step x0 read-out (buffers, so they follow ``.to(device)``)."""

    def __init__(self, scheduler: DDPMScheduler):
        super().__init__()
        alpha_bar = scheduler.alphas_cumprod.to(torch.float32)
        self.register_buffer("sqrt_alpha_bar", alpha_bar.sqrt(), persistent=False)
        self.register_buffer("k", ((1 - alpha_bar) / alpha_bar).sqrt(), persistent=False)

    @property
    def num_timesteps(self) -> int:
        return self.k.numel()

    def timestep_for_sigma(self, sigma: float) -> int:
        """The timestep whose noise level ``k`` is closest to ``sigma`` (on the [-1, 1] scale)."""
        return int(torch.argmin((self.k - sigma).abs()))

    def timesteps_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """``timestep_for_sigma`` for each entry of ``sigma`` (B,)."""
        return (self.k[None, :] - sigma.to(self.k)[:, None]).abs().argmin(dim=1)

    def noisy_sample(self, y: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network sees: ``x_t = sqrt(ᾱ_t) · y``."""
        return self.sqrt_alpha_bar[timesteps].view(-1, 1, 1, 1) * y

    def x0(self, y: torch.Tensor, timesteps: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
        """The x0-prediction ``y − k_t · ε̂``."""
        return y - self.k[timesteps].view(-1, 1, 1, 1) * epsilon

    def forward(self, unet: torch.nn.Module, y: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Restore ``y`` (B×3×H×W on [-1, 1]) with a ``UNet2DModel`` at per-sample ``timesteps`` (B, long)."""
        return self.x0(y, timesteps, unet(self.noisy_sample(y, timesteps), timesteps).sample)


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}

