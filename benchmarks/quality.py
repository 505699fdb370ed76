"""Quality on real photographs: every method on every benchmark, PSNR / SSIM / seconds per image, and each
method's paired PSNR difference to UIR-LoRA on the same images."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from benchmarks.classical import methods_for
from benchmarks.testsets import Benchmark, Case
from pipeline.evaluation.methods import Method

SHOWN = {"uir_lora": "UIR-LoRA (as `uir restore`)", "oracle_sequential": "oracle LoRA", "multitask": "multi-task"}


BARE = "bare backbone, oracle t(σ)"
REFERENCE = SHOWN["uir_lora"]  # the paired differences of a benchmark's rows are taken against it


def network_methods(methods: list[Method]) -> dict[str, Callable[[Case], np.ndarray]]:
    """The project's methods, exactly as the evaluation and `uir restore` run them, one whole image at a time."""
    return {SHOWN[m.name]: (lambda case, m=m: m.restore(case.degraded, case.truth)) for m in methods if m.name in SHOWN}


def bare_backbone(backbone: Path) -> Callable[[Case], np.ndarray]:
    """The frozen backbone alone as a denoiser: one step at the timestep whose noise level is the true σ."""
    from pipeline.models.backbone import OneStepReadout, downsample_factor, load_backbone
    from pipeline.models.restorer import restore_tiled

    unet, scheduler = load_backbone(backbone)
    readout = OneStepReadout(scheduler)

    def restore(case: Case) -> np.ndarray:
        t = readout.timestep_for_sigma(2 * case.extra["sigma"] / 255)
        x = torch.from_numpy(np.ascontiguousarray(case.degraded)).permute(2, 0, 1).float() / 255
        out = restore_tiled(lambda y: readout(unet, y, torch.full((y.shape[0],), t)), x, downsample_factor(unet))
        return (out * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()

    return restore


def luma(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 Y on [16, 235] (MATLAB's rgb2ycbcr), as the JPEG-artefact literature measures PSNR."""
    rgb = image.astype(np.float64) / 255
    return 16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def score(clean: np.ndarray, restored: np.ndarray) -> tuple[float, float, float]:
    """PSNR over RGB, SSIM, and PSNR of the Y channel."""
    psnr = peak_signal_noise_ratio(clean, restored, data_range=255)
    ssim = structural_similarity(clean, restored, data_range=255, channel_axis=-1)
    psnr_y = peak_signal_noise_ratio(luma(clean), luma(restored), data_range=255)
    return float(psnr), float(ssim), float(psnr_y)


def run(benchmarks: list[Benchmark], methods: list[Method], classical: str | None = ".",
        backbone: Path | None = None) -> list[dict]:
    """One row per (benchmark, method): mean PSNR (RGB and Y), SSIM and seconds per image; on noise benchmarks
    also the bare ``backbone`` at the oracle timestep. ``classical``: the classical methods whose name matches
    this regex run too (None: none)."""
    networks = network_methods(methods)
    bare = bare_backbone(backbone) if backbone is not None else None
    rows = []
    with torch.no_grad():
        for bench in tqdm(benchmarks, desc="quality", unit="set"):
            rows += _run_one(bench, networks, bare, classical)
    return rows


def _run_one(bench: Benchmark, networks: dict, bare: Callable | None, classical: str | None) -> list[dict]:
    """The rows of one benchmark: the degraded input, the project's networks, the bare backbone (noise sets)
    and the classical methods that apply."""
    methods = {"degraded input": lambda case: case.degraded, **networks}
    if bare is not None and "sigma" in bench.cases[0].extra:
        methods[BARE] = bare
    if classical is not None:
        methods.update({k: v for k, v in methods_for(bench.cases[0]).items() if re.search(classical, k)})
    rows = []
    for name, method in methods.items():
        scores, seconds = [], []
        for case in bench.cases:
            start = time.perf_counter()
            restored = method(case)
            seconds.append(time.perf_counter() - start)
            scores.append(score(case.clean, restored))
        psnr, ssim, psnr_y = np.mean(scores, axis=0)
        rows.append({"benchmark": bench.name, "method": name, "images": len(bench.cases), "psnr": float(psnr),
                     "ssim": float(ssim), "psnr_y": float(psnr_y), "seconds_per_image": float(np.mean(seconds)),
                     "psnr_per_image": [s[0] for s in scores]})
    reference = next((r["psnr_per_image"] for r in rows if r["method"] == REFERENCE), None)
    if reference is not None:
        for row in rows:
            if row["method"] != REFERENCE:
                row["vs_reference"] = paired_difference(row["psnr_per_image"], reference)
    return rows


def paired_difference(values: list[float], reference: list[float]) -> dict[str, float]:
    """Mean of the per-image differences ``values - reference`` and its standard error (0 for one image)."""
    diff = np.asarray(values) - np.asarray(reference)
    return {"mean": float(diff.mean()),
            "standard_error": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0}
