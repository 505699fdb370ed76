"""Drawing images from the backbone: the evidence that the shared component is a generative model."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.models.backbone import downsample_factor


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: DDPMScheduler, count: int, size: int, steps: int, seed: int) -> torch.Tensor:
    """Draw ``count`` images (on [-1, 1]) from the backbone by ancestral DDPM sampling in ``steps`` steps.

    The x0-estimate is clipped to [-1, 1] at each step, as pixel-space DDPMs are sampled: a small
    backbone's noise predictions at the largest timesteps are poor, and unclipped they diverge
    (deterministic DDIM did too, in our measurements).
    """
    factor = downsample_factor(unet)
    if size % factor:
        raise ValueError(f"sample size must be a multiple of {factor}, got {size}")
    sampler = DDPMScheduler.from_config(scheduler.config, clip_sample=True)
    sampler.set_timesteps(steps)
    device = next(unet.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn((count, 3, size, size), generator=generator).to(device)
    for t in sampler.timesteps:
        epsilon = unet(x, t.to(device).expand(count)).sample
        x = sampler.step(epsilon, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)
