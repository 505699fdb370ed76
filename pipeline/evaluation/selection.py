"""Choosing how UIR-LoRA restores on validation data: each candidate of ``restoration.candidates`` restores
every validation set, single and mixed, exactly as ``uir restore`` would; the best mean PSNR (each set
weighing the same) is shipped as ``models/restoration.json``. The test sets are never looked at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.files import read_jsonl
from pipeline.images import read_image
from pipeline.models.restorer import RestorationSettings, UniversalRestorer


@dataclass
class PairedImages:
    """A synthesized split as uint8 arrays: degraded, clean, and the true degradation's name."""

    name: str
    kind: str  # single | mixed
    degraded: list[np.ndarray]
    clean: list[np.ndarray]


def load_sets(data: str | Path, mixed: str | Path, names: Sequence[str], mixes: Sequence[Sequence[str]],
              split: str) -> list[PairedImages]:
    sets = [(d, "single", Path(data) / d / split, "synthesize") for d in names]
    sets += [("+".join(m), "mixed", Path(mixed) / "+".join(m) / split, "synthesize_mixed") for m in mixes]
    loaded = []
    for name, kind, folder, stage in sets:
        records = read_jsonl(folder / "manifest.jsonl", stage)
        loaded.append(PairedImages(name, kind, [read_image(folder / r["lq"]) for r in records],
                                   [read_image(folder / r["gt"]) for r in records]))
    return loaded


def psnr(restored: np.ndarray, clean: np.ndarray) -> float:
    mse = np.mean((restored.astype(np.float64) - clean.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mean_psnr(restorer: UniversalRestorer, sets: Sequence[PairedImages]) -> dict[str, float]:
    """Per set, the mean PSNR of ``restorer.restore`` (its own routing, policy and fallback)."""
    return {s.name: float(np.mean([psnr(restorer.restore(lq), gt) for lq, gt in zip(s.degraded, s.clean)]))
            for s in sets}


def choose_plans(restorer: UniversalRestorer, sets: Sequence[PairedImages]) -> tuple[dict, list[dict]]:
    """Per validation mix of two adapters, how to apply them — one then the other, the other first, or both
    merged in equal parts (``weights``) — whichever restores that mix best with its true components; and
    every option's mean PSNR. The ``plans`` of ``composition: planned``."""
    plans, rows = {}, []
    for s in sets:
        components = s.name.split("+")
        if s.kind != "mixed" or len(components) != 2 or not set(components) <= set(restorer.names):
            continue
        a, b = sorted(components)
        key = f"{a}+{b}"
        options = {f"{a} then {b}": ((a,), (b,)), f"{b} then {a}": ((b,), (a,)), "weights": ((a, b),)}
        scores = {}
        for label, plan in options.items():
            planned = restorer.with_settings(composition="planned", plans={key: plan})
            scores[label] = float(np.mean([psnr(planned.restore(lq, weights={a: 0.5, b: 0.5}), gt)
                                           for lq, gt in zip(s.degraded, s.clean)]))
        best = max(scores, key=scores.get)
        plans[key] = options[best]
        rows.append({"mix": key, "chosen": best, "val_psnr": scores})
    return plans, rows


def choose(restorer: UniversalRestorer, base: RestorationSettings, candidates: Sequence[Mapping[str, Any]],
           sets: Sequence[PairedImages]) -> tuple[RestorationSettings, list[dict], int]:
    """The candidate (overrides of ``base``) with the best mean validation PSNR, every candidate's scores, and
    the index of the chosen one."""
    kinds = {s.name: s.kind for s in sets}
    rows = []
    for overrides in candidates:
        settings = RestorationSettings(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        per_set = mean_psnr(restorer.with_settings(**settings.__dict__), sets)
        single = [v for name, v in per_set.items() if kinds[name] == "single"]
        mixed = [v for name, v in per_set.items() if kinds[name] == "mixed"]
        rows.append({"settings": settings.as_dict(),
                     "mean_psnr": float(np.mean(list(per_set.values()))), "single_psnr": float(np.mean(single)),
                     "mixed_psnr": float(np.mean(mixed)) if mixed else None, "per_set": per_set})
    best = max(range(len(rows)), key=lambda i: rows[i]["mean_psnr"])
    return RestorationSettings.from_params(rows[best]["settings"]), rows, best
