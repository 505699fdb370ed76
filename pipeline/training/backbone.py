"""DDPM pre-training of the shared backbone (epsilon prediction on clean patches), with an EMA copy."""

from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.image import PeakSignalNoiseRatio

from pipeline.models.backbone import OneStepReadout
from pipeline.training.schedules import warmup_cosine


def ddpm_loss(unet: UNet2DModel, scheduler: DDPMScheduler, clean: torch.Tensor) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (noise and timesteps from the global RNG)."""
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    return F.mse_loss(unet(scheduler.add_noise(clean, noise, timesteps), timesteps).sample, noise)


class BackboneDDPM(L.LightningModule):
    """Trains ``unet`` to predict the noise added at a uniformly drawn timestep.

    Validation measures what restoration will rely on: the EMA model's one-step denoising PSNR at
    Gaussian noise levels ``val_sigmas`` (0–255 scale), against the noisy input's PSNR.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, lr: float, weight_decay: float,
                 ema_decay: float, warmup_steps: int, max_steps: int, val_sigmas: Sequence[float]):
        super().__init__()
        self.save_hyperparameters(ignore=["unet", "scheduler"])
        self.unet = unet
        self.scheduler = scheduler
        self.ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.readout = OneStepReadout(scheduler)
        self.val_psnr = torch.nn.ModuleDict()
        for sigma in val_sigmas:
            for kind in ("denoised", "input"):
                self.val_psnr[f"{kind}_{sigma:g}"] = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean",
                                                                         dim=(1, 2, 3))

    @property
    def ema_unet(self) -> UNet2DModel:
        return self.ema.module

    def training_step(self, clean: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = ddpm_loss(self.unet, self.scheduler, clean)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.unet)

    def validation_step(self, clean: torch.Tensor, batch_idx: int) -> None:
        generator = torch.Generator(device=clean.device).manual_seed(batch_idx)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        target = (clean + 1) / 2
        for sigma in self.hparams.val_sigmas:
            level = 2 * sigma / 255  # on the [-1, 1] scale
            noisy = clean + level * noise
            t = torch.full((clean.shape[0],), self.readout.timestep_for_sigma(level), device=clean.device)
            denoised = self.readout(self.ema_unet, noisy, t)
            self.val_psnr[f"denoised_{sigma:g}"].update(((denoised + 1) / 2).clamp(0, 1), target)
            self.val_psnr[f"input_{sigma:g}"].update(((noisy + 1) / 2).clamp(0, 1), target)

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_psnr.items():
            kind, sigma = name.split("_")
            key = f"val/psnr_sigma{sigma}" if kind == "denoised" else f"val/psnr_input_sigma{sigma}"
            self.log(key, metric.compute(), prog_bar=kind == "denoised")
            metric.reset()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": warmup_cosine(optimizer, self.hparams.warmup_steps, self.hparams.max_steps)}
