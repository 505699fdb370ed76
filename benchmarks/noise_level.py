"""``python -m benchmarks.noise_level``: what should set the noise adapter's timestep on photographs — the analytic
σ̂, or the learned noise level estimator, and from which size of its correction on (``min_noise_correction``).

The noise path (the noise adapter alone, at the models' strengths, as ``uir restore --lora noise`` runs it) on the
validation photos of a pinned split — by default the held-out CBSD432 photos the shipped backbone was validated on:
the backbone, the adapters and the noise level estimator never trained on them; not a test set — with white
Gaussian noise at each σ (the test sets' protocol: clean + N(0, σ²), a fixed seed per image, clipped). Each rule's
mean PSNR and its paired difference to the estimator as trained (``min_noise_correction`` 0) with the standard
error of that mean difference. Validation data: settings may be chosen on it.

Writes ``reports/noise_level.json`` and ``.md``; skips, saying so, where the photos are absent.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.report import table, write_report
from benchmarks.testsets import gaussian_noise

ROOT = Path(__file__).resolve().parents[1]
CBSD432 = ROOT.parent / "shared" / "data" / "trainsets" / "CBSD432"
SHIPPED = ROOT / "weights" / "uir-lora-cbsd432"


def shown(path: Path) -> str:
    """``path`` relative to the project (``../shared/...`` for the shared data), as the reports name it."""
    return os.path.relpath(path.resolve(), ROOT)


def validation_photos(folder: Path, split_file: Path, limit: int) -> list:
    """The photos of ``folder`` that ``split_file`` (a pinned split) puts in ``val``, sorted by name."""
    from pipeline.data.sources import load_folder, read_pinned_splits

    splits = read_pinned_splits(split_file)
    found, _ = load_folder(folder, min_size=16)
    photos = sorted((image for image in found if splits.get(image.name) == "val"), key=lambda image: image.name)
    if not photos:
        raise ValueError(f"{split_file} puts none of the photos of {folder} in 'val'")
    return photos[:limit] if limit else photos


def learned_label(correction: float) -> str:
    return f"learned, min correction {correction:g}"


def rules(corrections: list[float]) -> dict[str, dict]:
    """Row label -> restoration settings: the analytic σ̂, then the learned estimator at each minimum correction."""
    found = {"analytic σ̂": {"noise_level": "analytic"}}
    found.update({learned_label(c): {"noise_level": "learned", "min_noise_correction": c} for c in corrections})
    return found


def measure(models: Path, photos: list, sigmas: list[int], corrections: list[float]) -> list[dict]:
    from benchmarks.quality import paired_difference
    from pipeline.data.degradations import sample_seed
    from pipeline.evaluation.selection import psnr
    from pipeline.models.restorer import UniversalRestorer

    restorer = UniversalRestorer.from_pretrained(models, router=False)
    settings = rules(corrections)
    variants = {label: restorer.with_settings(**changes) for label, changes in settings.items()}
    reference = learned_label(corrections[0])
    rows = []
    for sigma in sigmas:
        scores = {label: [] for label in variants}
        for photo in photos:
            noisy = gaussian_noise(photo.pixels, sigma, sample_seed(photo.name, sigma))
            for label, variant in variants.items():
                scores[label].append(psnr(variant.restore(noisy, weights={"noise": 1.0}), photo.pixels))
        for label, values in scores.items():
            paired = paired_difference(values, scores[reference])
            rows.append({"sigma": sigma, "rule": label, "settings": settings[label], "psnr": float(np.mean(values)),
                         "vs_reference": paired["mean"], "standard_error": paired["standard_error"]})
        print(f"noise_level: σ={sigma:g} done", flush=True)
    return rows


def markdown(result: dict) -> str:
    rows = [[f"{r['sigma']:g}", r["rule"], f"{r['psnr']:.3f}", f"{r['vs_reference']:+.3f} ± {r['standard_error']:.3f}"]
            for r in result["rows"]]
    return (f"Measured by `python -m benchmarks.noise_level` in {result['seconds'] / 60:.1f} min: the noise path of "
            f"`{result['models']}` on the {result['photos']} validation photos of `{result['photos_folder']}` under "
            f"`{result['split']}` (held out; not a test set), white Gaussian noise at each σ, a fixed seed per photo. "
            f"Difference: paired, to `{result['reference']}`, ± its standard error.\n\n"
            + table(["σ", "noise level", "PSNR (dB)", "difference (dB)"], rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=SHIPPED)
    parser.add_argument("--photos", type=Path, default=CBSD432)
    parser.add_argument("--split", type=Path, default=SHIPPED / "backbone_split.json",
                        help="a pinned split file: its 'val' photos are measured")
    parser.add_argument("--sigmas", type=int, nargs="+", default=[15, 25, 50])
    parser.add_argument("--min-corrections", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3],
                        help="the first is the reference of the differences")
    parser.add_argument("--images", type=int, default=0, help="at most this many photos; 0: all")
    parser.add_argument("--out", type=Path, default=Path("reports/noise_level"))
    args = parser.parse_args(argv)
    if not args.photos.is_dir():
        print(f"noise_level: skipped: {args.photos} is absent")
        return
    if any(c < 0 for c in args.min_corrections):
        parser.error("--min-corrections must be >= 0")
    import torch

    started = time.perf_counter()
    photos = validation_photos(args.photos, args.split, args.images)
    with torch.no_grad():
        rows = measure(args.models, photos, args.sigmas, args.min_corrections)
    result = {"models": shown(args.models), "photos_folder": shown(args.photos), "split": shown(args.split),
              "photos": len(photos), "reference": learned_label(args.min_corrections[0]),
              "rows": rows, "seconds": time.perf_counter() - started}
    write_report(args.out, result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
