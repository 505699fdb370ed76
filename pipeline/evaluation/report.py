"""Per-image results to metrics, CSV tables, PNG charts and sample grids."""

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

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [len(single), len(mixed)]})
    for ax, table, title in ((axes[0], single, "single degradations"), (axes[1], mixed, "mixed degradations")):
        x = np.arange(len(table))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, [r[method] for r in table], width, label=method)
        ax.set_xticks(x, [r["set"] for r in table], rotation=20)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"Test PSNR, {title}")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
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
