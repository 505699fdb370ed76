"""The standard test sets in ``../shared/data/testsets`` and their degradation protocols."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.degradations import Degradation, leaf_transforms, sample_seed
from pipeline.images import read_image

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "testsets"


# Published PSNR (dB, RGB) from ../shared/data/testsets/README.md: shown beside the benchmark, never run here.
PUBLISHED = {
    **{f"CBSD68 noise σ={sigma}": {"CBM3D": cbm3d, "CDnCNN-B": cdncnn, "FFDNet": ffdnet, "AirNet": airnet,
                                   "PromptIR": promptir}
       for sigma, cbm3d, cdncnn, ffdnet, airnet, promptir in [(15, 33.52, 33.90, 33.87, 33.92, 33.98),
                                                            (25, 30.71, 31.24, 31.21, 31.26, 31.31),
                                                            (50, 27.38, 27.95, 27.96, 28.00, 28.06)]},
    **{f"Kodak24 noise σ={sigma}": {"CBM3D": cbm3d, "FFDNet": ffdnet}
       for sigma, cbm3d, ffdnet in [(15, 34.28, 34.63), (25, 31.68, 32.13), (50, 28.46, 28.98)]},
}


@dataclass
class Case:
    """One degraded test image: the clean reference, the degraded input, what degraded it."""

    image: str
    clean: np.ndarray
    degraded: np.ndarray
    truth: str  # the project's degradation name(s), "+"-joined: what the oracle LoRA uses
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. sigma for denoisers, the blur kernel


@dataclass
class Benchmark:
    name: str  # e.g. "CBSD68 σ=25"
    cases: list[Case]


def load_set(root: Path, name: str, limit: int) -> list[tuple[str, np.ndarray]]:
    folder = root / name
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".bmp", ".jpg", ".tif"})
    return [(p.name, read_image(p)) for p in (files[:limit] if limit else files)]


def gaussian_noise(clean: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The stated protocol: clean + N(0, σ²) on [0, 255], a fixed seed per image, clipped."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, clean.shape)
    return np.clip(clean.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def jpeg(clean: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(clean).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def benchmarks(root: Path, degradations: dict, mixes: list[str], limit: int, sigmas=(15, 25, 50),
               qualities=(10, 20, 30, 40), project_sets: tuple[str, ...] = ("blur", "haze", "lowlight", "rain")
               ) -> tuple[list[Benchmark], list[str]]:
    """Every benchmark whose test set is present, and one line per absent set."""
    out, skipped = [], []
    for set_name in ("CBSD68", "Kodak24"):
        images = load_set(root, set_name, limit)
        if not images:
            skipped.append(f"{set_name}: not found under {root}")
            continue
        for sigma in sigmas:
            out.append(Benchmark(f"{set_name} noise σ={sigma}", [
                Case(n, img, gaussian_noise(img, sigma, sample_seed(n, sigma)), "noise", {"sigma": sigma})
                for n, img in images]))
    live1 = load_set(root, "LIVE1", limit)
    if live1:
        for q in qualities:
            out.append(Benchmark(f"LIVE1 JPEG q={q}", [Case(n, img, jpeg(img, q), "jpeg") for n, img in live1]))
    else:
        skipped.append(f"LIVE1: not found under {root}")
    kodak = load_set(root, "Kodak24", limit)
    if kodak:
        for name in [*project_sets, *mixes]:
            cases = []
            for n, img in kodak:
                degradation = Degradation.from_params(degradations, name)  # fresh: only the applied blur has params
                degraded, _ = degradation(img, sample_seed(n, name))
                extra = {"kernel": blur_kernel(degradation)} if name == "blur" else {}
                cases.append(Case(n, img, degraded, name, extra))
            out.append(Benchmark(f"Kodak24 {name}", cases))
    return out, skipped


def blur_kernel(degradation: Degradation) -> np.ndarray:
    """The point-spread function the blur transform just applied (2-D, sums to one): what a non-blind
    deconvolution is given."""
    kernels = [leaf.params["kernel"] for leaf in leaf_transforms(degradation.transforms[0])
               if leaf.params and "kernel" in leaf.params]
    if len(kernels) != 1:
        raise RuntimeError(f"expected one applied blur kernel, found {len(kernels)}")
    kernel = np.asarray(kernels[0], dtype=np.float64)
    kernel = np.outer(kernel, kernel) if kernel.ndim == 1 else kernel
    return kernel / kernel.sum()
