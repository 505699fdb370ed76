"""Choosing how UIR-LoRA restores on validation data: each candidate of ``restoration.candidates`` restores
every validation set, single and mixed, exactly as ``uir restore`` would, and is scored by its mean PSNR (each
set weighing the same). Shipped as ``models/restoration.json``, by the one-standard-error rule (Breiman et al.,
*Classification and Regression Trees*, 1984): of the candidates whose score is within one standard error of
the best's, the one that applies the fewest adapters to the validation images. A validation split of a few
photos cannot tell apart candidates that differ on a handful of crops; where it cannot, the restoration that
changes images least goes. The test sets are never looked at."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.files import read_jsonl
from pipeline.images import read_image
from pipeline.models.composition import STRENGTH_LEVELS, strength_at
from pipeline.models.restorer import RestorationSettings, UniversalRestorer, bright_end, to_float


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


def ceilings(data: str | Path, names: Sequence[str], degradations: Sequence[str]) -> dict[str, float]:
    """Per adapter of ``names`` that is one of the run's ``degradations`` (the others are skipped, as
    ``undo_order``'s are), the ``bright_end`` of the brightest degraded image of its training split:
    ``RestorationSettings.ceilings``."""
    found = {}
    for name in (n for n in names if n in degradations):
        folder = Path(data) / name / "train"
        found[name] = max(bright_end(to_float(read_image(folder / r["lq"]))[0])
                          for r in read_jsonl(folder / "manifest.jsonl", "synthesize"))
    return found


def psnr(restored: np.ndarray, clean: np.ndarray) -> float:
    mse = np.mean((restored.astype(np.float64) - clean.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def per_image(restorer: UniversalRestorer, sets: Sequence[PairedImages]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per set, each image's PSNR after ``restorer.restore`` (its own routing, policy and fallback) and the number
    of adapters it applied (0: left as it was)."""
    scores, adapters = {}, {}
    for s in sets:
        analyses = [restorer.analyse(lq) for lq in s.degraded]
        scores[s.name] = np.array([psnr(restorer.restore(lq, analysis=a), gt) for lq, gt, a in zip(s.degraded, s.clean, analyses)])
        adapters[s.name] = np.array([0 if a.unchanged else sum(len(step) for step in a.steps) for a in analyses])
    return scores, adapters


def one_standard_error_choice(scores: Sequence[Mapping[str, np.ndarray]], adapters: Sequence[float]) -> tuple[int, list[float]]:
    """The index of the candidate to ship, and each candidate's standard error against the best.

    ``scores``: per candidate, per set, each image's PSNR (the same images for every candidate); a candidate's
    score is the mean over sets of the per-set means. The standard error of the paired difference to the best
    candidate's score (images independent, sets weighing the same); of the candidates within it of the best,
    the fewest ``adapters`` per image, then the best score.
    """
    means = [float(np.mean([np.mean(v) for v in per_set.values()])) for per_set in scores]
    best = int(np.argmax(means))
    errors = []
    for per_set in scores:
        variances = [np.var(per_set[name] - scores[best][name], ddof=1) / len(per_set[name]) if len(per_set[name]) > 1 else 0.0
                     for name in per_set]
        errors.append(float(np.sqrt(np.sum(variances)) / len(per_set)))
    close = [i for i in range(len(scores)) if means[best] - means[i] <= errors[i]]
    return min(close, key=lambda i: (adapters[i], -means[i], i)), errors


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


def fit_knots(psnrs: np.ndarray, sigmas: np.ndarray, knots: Sequence[float]) -> tuple[float, ...]:
    """The strengths at ``knots`` (non-decreasing, each one of ``STRENGTH_LEVELS``) that maximise the mean PSNR,
    where image ``i`` at strength level ``j`` scores ``psnrs[i, j]`` and gets the strength of its noise level
    ``sigmas[i]`` (``strength_at`` them, as restoration does). Of equal
    scores, the strongest (the closest to the plain adapter)."""
    best, best_score = None, -np.inf
    for values in itertools.combinations_with_replacement(STRENGTH_LEVELS, len(knots)):
        score = float(np.mean(psnrs[np.arange(len(psnrs)), _levels(sigmas, knots, values)]))
        if score > best_score + 1e-9 or (abs(score - best_score) <= 1e-9 and sum(values) > sum(best)):
            best, best_score = values, score
    return best


def _levels(sigmas: np.ndarray, knots: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """Index into ``STRENGTH_LEVELS`` of the strength restoration gives each noise level of ``sigmas``."""
    return np.searchsorted(STRENGTH_LEVELS, strength_at(sigmas, zip(knots, values)))


def choose_strengths(restorer: UniversalRestorer, sets: Sequence[PairedImages], knots: Sequence[float]) -> tuple[dict, list[dict]]:
    """Per adapter with the ``noise_sigma`` rule, its strength by noise level (``RestorationSettings.strengths``)
    fitted on its own validation set — restored by it alone at every strength of ``STRENGTH_LEVELS`` —
    at the noise levels ``knots`` (0–255 scale); and per adapter its validation PSNR at each level and as fitted."""
    composition = restorer.composition
    strengths, rows = {}, []
    for s in sets:
        if s.kind != "single" or s.name not in composition.names or \
                composition.timestep_rules[composition.names.index(s.name)] != "noise_sigma":
            continue
        psnrs = np.array([[psnr(restorer.with_settings(strengths={s.name: [[0.0, level]]}).restore(lq, weights={s.name: 1.0}), gt)
                           for level in STRENGTH_LEVELS] for lq, gt in zip(s.degraded, s.clean)])
        sigmas = np.array([float(composition.noise_sigma(s.name, to_float(lq)[0][None] * 2 - 1, restorer.settings.noise_level,
                                                         restorer.settings.min_noise_correction)[0])
                           * 127.5 for lq in s.degraded])
        values = fit_knots(psnrs, sigmas, knots)
        strengths[s.name] = [[float(k), float(v)] for k, v in zip(knots, values)]
        level = _levels(sigmas, knots, values)
        rows.append({"adapter": s.name, "strengths": strengths[s.name],
                     "val_psnr_by_strength": {str(v): float(m) for v, m in zip(STRENGTH_LEVELS, psnrs.mean(axis=0))},
                     "val_psnr_fitted": float(np.mean(psnrs[np.arange(len(psnrs)), level]))})
    return strengths, rows


def choose(restorer: UniversalRestorer, base: RestorationSettings, candidates: Sequence[Mapping[str, Any]],
           sets: Sequence[PairedImages]) -> tuple[RestorationSettings, list[dict], int]:
    """The candidate (overrides of ``base``) to ship by the one-standard-error rule, every candidate's scores,
    and the index of the chosen one."""
    kinds = {s.name: s.kind for s in sets}
    rows, scores, adapters = [], [], []
    for overrides in candidates:
        settings = RestorationSettings(**{**base.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
        psnrs, applied = per_image(restorer.with_settings(**settings.__dict__), sets)
        per_set = {name: float(np.mean(values)) for name, values in psnrs.items()}
        single = [v for name, v in per_set.items() if kinds[name] == "single"]
        mixed = [v for name, v in per_set.items() if kinds[name] == "mixed"]
        scores.append(psnrs)
        adapters.append(float(np.mean([np.mean(a) for a in applied.values()])))
        rows.append({"settings": settings.as_dict(),
                     "mean_psnr": float(np.mean(list(per_set.values()))), "single_psnr": float(np.mean(single)),
                     "mixed_psnr": float(np.mean(mixed)) if mixed else None, "per_set": per_set,
                     "adapters_per_image": adapters[-1]})
    chosen, errors = one_standard_error_choice(scores, adapters)
    for row, error in zip(rows, errors):
        row["standard_error_to_best"] = error
    return RestorationSettings.from_params(rows[chosen]["settings"]), rows, chosen
