"""The classical CPU methods a user would pick instead: CBM3D, non-local means and TV for noise;
Wiener and Richardson–Lucy deconvolution for a known blur kernel."""

from __future__ import annotations

import numpy as np
from skimage import restoration

from benchmarks.testsets import Case


def _float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) / 255.0


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0, 0, 255).round().astype(np.uint8)


def cbm3d(case: Case) -> np.ndarray:
    import bm3d  # optional: pip install -e '.[bench]'

    return _uint8(bm3d.bm3d_rgb(_float(case.degraded), case.extra["sigma"] / 255.0))


def non_local_means(case: Case) -> np.ndarray:
    x = _float(case.degraded)
    sigma = case.extra["sigma"] / 255.0
    return _uint8(restoration.denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                                               fast_mode=True, channel_axis=-1))


def total_variation(case: Case) -> np.ndarray:
    # Chambolle TV; weight proportional to the noise level (0.1 at σ=25 is skimage's usual choice)
    return _uint8(restoration.denoise_tv_chambolle(_float(case.degraded), weight=0.004 * case.extra["sigma"],
                                                   channel_axis=-1))


def wiener(case: Case) -> np.ndarray:
    x = _float(case.degraded)
    kernel = case.extra["kernel"]
    return _uint8(np.stack([restoration.wiener(x[..., c], kernel, balance=0.01) for c in range(3)], axis=-1))


def richardson_lucy(case: Case) -> np.ndarray:
    x = _float(case.degraded)
    kernel = case.extra["kernel"]
    return _uint8(np.stack([restoration.richardson_lucy(x[..., c], kernel, num_iter=30) for c in range(3)], axis=-1))


def methods_for(case: Case) -> dict:
    """The classical methods that apply to ``case`` (they need σ or the kernel)."""
    if "sigma" in case.extra:
        return {"CBM3D": cbm3d, "NLM (skimage)": non_local_means, "TV (skimage)": total_variation}
    if "kernel" in case.extra:
        return {"Wiener": wiener, "Richardson–Lucy": richardson_lucy}
    return {}
