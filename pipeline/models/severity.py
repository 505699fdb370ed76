"""How strong a degradation is, estimated from the image alone: the timestep a one-step restoration uses.

For noise the frozen backbone answers the question itself: it was trained to denoise ``x_t`` at every
``t``, and a noisy image with noise level σ (on the [-1, 1] scale) *is* an ``x0``-prediction problem at
the ``t`` where ``k_t = sqrt(1 − ᾱ_t) / sqrt(ᾱ_t)`` equals σ. An adapter whose ``timestep`` rule is
``noise_sigma`` is trained and applied at ``t(σ̂)`` instead of one fixed ``t*``.

σ̂ is a robust classic estimate (after Immerkær, 1996): the median absolute response of the 3×3
Laplacian-difference filter, which cancels smooth image content, over its response to unit noise
(6σ), with the Gaussian median-to-σ factor 0.6745. Measured on 128² photo crops (0–255 scale): bias
+1.7 at σ = 0 (texture), ±2 at σ 15–25, −5 at σ = 50 (noise clipped at black and white).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_RULES = ("fixed", "noise_sigma")
_FILTER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def estimate_noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """σ̂ (B,) of additive white noise in ``images`` (B×C×H×W, any scale: σ̂ is on the same scale)."""
    b, c, h, w = images.shape
    if min(h, w) < 3:
        raise ValueError(f"noise estimation needs at least 3×3 pixels, got {h}×{w}")
    kernel = _FILTER.to(images.device)[None, None].expand(c, 1, 3, 3)
    response = F.conv2d(images.float(), kernel, groups=c).abs().reshape(b, -1)
    return response.median(dim=1).values / (0.6745 * 6)


def rule_timesteps(rule: str, t_star: int, y: torch.Tensor, readout) -> torch.Tensor:
    """Per-sample timesteps (B,) for ``y`` (B×3×H×W on [-1, 1]) under an adapter's ``timestep`` rule."""
    if rule == "noise_sigma":
        return readout.timesteps_for_sigma(estimate_noise_sigma(y))
    if rule != "fixed":
        raise ValueError(f"timestep rule must be one of {TIMESTEP_RULES}, got {rule!r}")
    return torch.full((y.shape[0],), int(t_star), dtype=torch.long, device=y.device)
