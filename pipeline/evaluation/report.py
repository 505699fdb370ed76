"""Per-image results to metrics, the headline figures, CSV tables, PNG charts and labelled sample grids."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.files import atomic_path


def mean_table(rows: list[dict], kind: str, methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method, the mean PSNR/SSIM over the sets of ``kind`` (each set weighs the same)."""
    table = {}
    for method in methods:
        per_set = {}
        for row in rows:
            if row["kind"] == kind and row["method"] == method:
                per_set.setdefault(row["set"], []).append((row["psnr"], row["ssim"]))
        if per_set:
            means = np.array([np.mean(v, axis=0) for v in per_set.values()])
            table[method] = {"psnr": float(means[:, 0].mean()), "ssim": float(means[:, 1].mean())}
    return table


def headline(metrics: dict) -> dict[str, float | None]:
    """The few numbers experiments are compared on, short-named so ``dvc metrics show`` fits 100 columns:
    PSNR (dB) on the single sets of UIR-LoRA as shipped (``uir``), the multi-task baseline (``mt``) and the
    oracle adapter (``oracle``); on the mixed sets (``uir_mix``, ``mt_mix``); the router's top-1 accuracy on
    single sets (``top1``) and its recall of mix components (``recall``)."""

    def psnr(kind: str, method: str) -> float | None:
        value = metrics[kind].get(method)
        return round(value["psnr"], 2) if value else None

    router = metrics["router"]
    return {"uir": psnr("single", "uir_lora"), "mt": psnr("single", "multitask"), "oracle": psnr("single", "oracle_sequential"),
            "uir_mix": psnr("mixed", "uir_lora"), "mt_mix": psnr("mixed", "multitask"),
            "top1": round(router["top1_accuracy"], 3),
            "recall": None if router["mix_recall"] is None else round(router["mix_recall"], 3)}


def sample_grid(rows: list[list[np.ndarray]], header: Sequence[str], band: int = 20) -> np.ndarray:
    """Same-size H×W×3 uint8 images in rows, under a white band naming each column."""
    import cv2

    h, w, c = rows[0][0].shape
    grid = np.zeros((band + len(rows) * h, len(header) * w, c), dtype=np.uint8)
    grid[:band] = 255
    for col, title in enumerate(header):
        cv2.putText(grid, title, (col * w + 4, band - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for r, images in enumerate(rows):
        for col, image in enumerate(images):
            grid[band + r * h : band + (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


def per_set_table(rows: list[dict], kind: str, methods: Sequence[str], metric: str) -> list[dict]:
    sets = list(dict.fromkeys(r["set"] for r in rows if r["kind"] == kind))
    table = []
    for name in sets:
        entry = {"set": name}
        for method in methods:
            values = [r[metric] for r in rows if r["set"] == name and r["method"] == method]
            entry[method] = round(float(np.mean(values)), 4)
        table.append(entry)
    return table


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def psnr_chart(path: str | Path, single: list[dict], mixed: list[dict], methods: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [len(single), len(mixed)]})
    for ax, table, title in ((axes[0], single, "single degradations"), (axes[1], mixed, "mixed degradations")):
        x = np.arange(len(table))
        width = 0.8 / len(methods)
        values = [r[m] for r in table for m in methods]
        for i, method in enumerate(methods):
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [r[method] for r in table], width, label=method)
        ax.set_ylim(np.floor(min(values)) - 1, np.ceil(max(values)) + 0.5)  # 1 dB gaps stay visible
        ax.set_xticks(x, [r["set"] for r in table], rotation=20)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"Test PSNR, {title}")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=min(len(methods), 5))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def confusion_chart(path: str | Path, confusion: np.ndarray, names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("router's top-1")
    ax.set_ylabel("true degradation")
    ax.set_title("Router confusion (single test sets)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
