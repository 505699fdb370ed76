"""Quality on real photographs: every method on every benchmark, PSNR / SSIM / seconds per image."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from benchmarks.classical import methods_for
from benchmarks.testsets import Benchmark, Case
from pipeline.evaluation.methods import Method

SHOWN = {"uir_lora": "UIR-LoRA (as `uir restore`)", "oracle_sequential": "oracle LoRA", "multitask": "multi-task"}


def network_methods(methods: list[Method]) -> dict[str, Callable[[Case], np.ndarray]]:
    """The project's methods, exactly as the evaluation and `uir restore` run them, one whole image at a time."""
    return {SHOWN[m.name]: (lambda case, m=m: m.restore(case.degraded, case.truth)) for m in methods if m.name in SHOWN}


def score(clean: np.ndarray, restored: np.ndarray) -> tuple[float, float]:
    psnr = peak_signal_noise_ratio(clean, restored, data_range=255)
    ssim = structural_similarity(clean, restored, data_range=255, channel_axis=-1)
    return float(psnr), float(ssim)


def run(benchmarks: list[Benchmark], methods: list[Method], classical: bool = True) -> list[dict]:
    """One row per (benchmark, method): mean PSNR, SSIM and seconds per image."""
    networks = network_methods(methods)
    rows = []
    torch.set_grad_enabled(False)
    for bench in tqdm(benchmarks, desc="quality", unit="set"):
        methods = {"degraded input": lambda case: case.degraded, **networks}
        if classical:
            methods.update(methods_for(bench.cases[0]))
        for name, method in methods.items():
            psnr, ssim, seconds = [], [], []
            for case in bench.cases:
                start = time.perf_counter()
                restored = method(case)
                seconds.append(time.perf_counter() - start)
                p, s = score(case.clean, restored)
                psnr.append(p)
                ssim.append(s)
            rows.append({"benchmark": bench.name, "method": name, "images": len(bench.cases),
                         "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
                         "seconds_per_image": float(np.mean(seconds))})
    return rows
