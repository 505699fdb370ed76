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
from pipeline.data.datasets import to_tensor, to_uint8
from pipeline.evaluation.methods import Models


def network_methods(models: Models, top_k: int) -> dict[str, Callable[[Case], np.ndarray]]:
    """The project's methods (evaluation's own definitions), on one whole image at a time."""
    compared = models.methods(top_k)

    def wrap(method):
        def restore(case: Case) -> np.ndarray:
            lq = to_tensor(case.degraded)[None]
            return to_uint8(models.run(method, lq, [case.truth])[0])

        return restore

    return {"UIR-LoRA (router)": wrap(compared["uir_lora"]), "oracle LoRA": wrap(compared["oracle_lora"]),
            "multi-task": wrap(compared["multitask"])}


def score(clean: np.ndarray, restored: np.ndarray) -> tuple[float, float]:
    psnr = peak_signal_noise_ratio(clean, restored, data_range=255)
    ssim = structural_similarity(clean, restored, data_range=255, channel_axis=-1)
    return float(psnr), float(ssim)


def run(benchmarks: list[Benchmark], models: Models, top_k: int, classical: bool = True) -> list[dict]:
    """One row per (benchmark, method): mean PSNR, SSIM and seconds per image."""
    networks = network_methods(models, top_k)
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
