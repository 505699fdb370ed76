"""Fixed, seeded degraded datasets: random training patches and non-overlapping evaluation crops.

Crop boxes depend on the clean images, the sizes and the seed only, never on the degradation, so
every degradation (and every mix) is built on the same clean content and the test sets are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from pipeline.data.degradations import Degradation, sample_seed
from pipeline.images import read_image, write_image
from pipeline.files import read_json, write_jsonl

Box = tuple[int, int, int, int]  # top, left, height, width


def load_clean(clean_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """The clean images of one split, by name, from ``prepare``'s output."""
    clean_dir = Path(clean_dir)
    manifest = read_json(clean_dir / "manifest.json", stage="prepare")
    return {
        record["name"]: read_image(clean_dir / record["file"])
        for record in manifest["images"]
        if record["split"] == split
    }


def train_boxes(sizes: dict[str, tuple[int, int]], patch: int, count: int, seed: int) -> list[tuple[str, Box]]:
    """``count`` random ``patch``² boxes, images drawn in proportion to their area."""
    names = sorted(n for n, (h, w) in sizes.items() if h >= patch and w >= patch)
    if not names:
        raise ValueError(f"no training image is at least {patch}x{patch}")
    areas = np.array([sizes[n][0] * sizes[n][1] for n in names], dtype=np.float64)
    rng = np.random.default_rng(sample_seed(seed, "train-boxes"))
    picks = rng.choice(len(names), size=count, p=areas / areas.sum())
    boxes = []
    for i in picks:
        h, w = sizes[names[i]]
        top, left = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
        boxes.append((names[i], (top, left, patch, patch)))
    return boxes


def eval_boxes(sizes: dict[str, tuple[int, int]], crop: int, count: int, seed: int) -> list[tuple[str, Box]]:
    """Up to ``count`` non-overlapping ``crop``² boxes, taken in turn from each image (so no image dominates).

    Each image's grid of crops is centred and visited in a seeded random order.
    """
    per_image = {}
    rng = np.random.default_rng(sample_seed(seed, "eval-boxes"))
    for name in sorted(sizes):
        h, w = sizes[name]
        rows, cols = h // crop, w // crop
        top0, left0 = (h - rows * crop) // 2, (w - cols * crop) // 2
        grid = [(top0 + r * crop, left0 + c * crop, crop, crop) for r in range(rows) for c in range(cols)]
        per_image[name] = [grid[i] for i in rng.permutation(len(grid))]
    boxes = []
    while len(boxes) < count and any(per_image.values()):
        for name in sorted(per_image):
            if per_image[name] and len(boxes) < count:
                boxes.append((name, per_image[name].pop(0)))
    return boxes


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    top, left, h, w = box
    return np.ascontiguousarray(image[top : top + h, left : left + w])


def synthesize_split(
    degradation: Degradation,
    images: dict[str, np.ndarray],
    boxes: list[tuple[str, Box]],
    out: str | Path,
    split: str,
    seed: int,
) -> int:
    """Write ``out/{lq,gt}/NNNNN.png`` and ``out/manifest.jsonl`` for one split; return the sample count."""
    out = Path(out)

    def records() -> Iterator[dict[str, Any]]:
        for index, (name, box) in enumerate(tqdm(boxes, desc=f"{degradation.name}/{split}", unit="img")):
            clean = crop(images[name], box)
            sample = sample_seed(seed, degradation.name, split, index)
            degraded, applied = degradation(clean, sample)
            stem = f"{index:05d}"
            write_image(out / "gt" / f"{stem}.png", clean)
            write_image(out / "lq" / f"{stem}.png", degraded)
            yield {
                "id": stem, "lq": f"lq/{stem}.png", "gt": f"gt/{stem}.png", "source": name,
                "box": list(box), "degradation": degradation.name, "seed": sample, "params": applied,
            }

    write_jsonl(out / "manifest.jsonl", records())
    return len(boxes)


def image_sizes(images: dict[str, np.ndarray]) -> dict[str, tuple[int, int]]:
    return {name: image.shape[:2] for name, image in images.items()}


@dataclass(frozen=True)
class ToneJitter:
    """A random global tone change of a clean photo: a gamma, then a gain, each drawn uniformly from its range.

    Applied to a clean patch *before* its degradation, so a router trained on such patches learns the
    degradation rather than the exposure of the few photos it was trained on (a router trained without it
    called 12 of 48 clean test crops low-light)."""

    gamma: tuple[float, float]
    gain: tuple[float, float]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        toned = (image / 255.0) ** rng.uniform(*self.gamma) * rng.uniform(*self.gain)
        return np.clip(np.rint(toned * 255.0), 0, 255).astype(np.uint8)


def degraded_patches(
    degradations: dict, combos: list[tuple[str, ...]], images: dict[str, np.ndarray], patch: int, count: int,
    seed: int, stream: str, tone: ToneJitter | None = None,
) -> list[tuple[np.ndarray, list[str]]]:
    """``count`` patches, each degraded by a random one of ``combos`` (its names applied in order; an empty
    combo leaves the patch clean), with the names applied.

    For router training and validation; built from one split's clean images, in memory. ``stream`` names the
    random draws (one stream per kind of set); ``tone`` changes each clean patch's tone first.
    """
    if not combos:
        return []
    transforms = {combo: Degradation.from_params(degradations, list(combo)) for combo in combos if combo}
    rng = np.random.default_rng(sample_seed(seed, stream))
    boxes = train_boxes(image_sizes(images), patch, count, seed)
    out = []
    for index, (name, box) in enumerate(boxes):
        combo = combos[int(rng.integers(len(combos)))]
        clean = crop(images[name], box)
        if tone is not None:
            clean = tone(clean, np.random.default_rng(sample_seed(seed, stream, "tone", index)))
        degraded = transforms[combo](clean, sample_seed(seed, stream, index))[0] if combo else clean
        out.append((degraded, list(combo)))
    return out
