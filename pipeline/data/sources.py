"""Clean photographs: the ones that ship inside installed packages, and folders the user names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from pipeline.images import IMAGE_EXTENSIONS, ImageReadError, read_image, to_rgb8


@dataclass
class CleanImage:
    name: str
    source: str
    pixels: np.ndarray  # HxWx3 uint8
    conversions: list[str] = field(default_factory=list)
    group: str = ""  # images of one scene share a group, and so a split; defaults to the name

    def __post_init__(self) -> None:
        self.group = self.group or self.name


@dataclass
class Rejected:
    source: str
    reason: str


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _retina() -> np.ndarray:
    # The fundus photograph is a disc on a wide black border: keep the square inscribed in the disc.
    import skimage.data

    image = skimage.data.retina()
    h, w = image.shape[:2]
    side = int(min(h, w) / np.sqrt(2) * 0.92)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def _stereo_view(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[index]  # (left, right, disparity)

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        return read_image(matplotlib.cbook.get_sample_data(filename, asfileobj=False))

    return load


EMBEDDED: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _retina,
    "motorcycle_left": _stereo_view(0),
    "motorcycle_right": _stereo_view(1),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
}
"""Photographs that ship inside scikit-image, scikit-learn and matplotlib: no network needed."""

SCENES = {"motorcycle_left": "motorcycle", "motorcycle_right": "motorcycle"}
"""The two stereo views show one scene: they must land in the same split."""


def load_embedded(names: Iterable[str]) -> list[CleanImage]:
    unknown = sorted(set(names) - set(EMBEDDED))
    if unknown:
        raise ValueError(f"unknown embedded image(s) {unknown}; known: {sorted(EMBEDDED)}")
    images = []
    for name in names:
        pixels, conversions = to_rgb8(np.atleast_3d(EMBEDDED[name]()))
        images.append(CleanImage(name, f"embedded:{name}", pixels, conversions, group=SCENES.get(name, name)))
    return images


def _folder_image_name(folder: Path, path: Path) -> str:
    # Readable stem plus a short hash of the path inside the folder: unique within it, and the same wherever
    # the folder lives (names order the patches and decide the split, so they must not depend on the checkout).
    digest = hashlib.sha1(path.relative_to(folder).as_posix().encode()).hexdigest()[:8]
    return f"{folder.resolve().name}_{path.stem}_{digest}"


def load_folder(folder: str | Path, min_size: int) -> tuple[list[CleanImage], list[Rejected]]:
    """Every image file under ``folder`` (recursively) as RGB uint8, plus what could not be used and why.

    Grayscale, RGBA and 16-bit files are converted (recorded per image); unreadable files and images
    smaller than ``min_size`` on a side are rejected with their reason.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"clean image folder {folder} does not exist")
    images, rejected = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            rejected.append(Rejected(str(path), f"not an image extension ({path.suffix or 'none'})"))
            continue
        try:
            pixels, conversions = to_rgb8(read_image(path))
        except ImageReadError as error:
            rejected.append(Rejected(str(path), error.reason))
            continue
        h, w = pixels.shape[:2]
        if min(h, w) < min_size:
            rejected.append(Rejected(str(path), f"{w}x{h} is smaller than {min_size} pixels on a side"))
            continue
        images.append(CleanImage(_folder_image_name(folder, path), str(path), pixels, conversions))
    return images, rejected


SPLITS = ("train", "val", "test")


def read_pinned_splits(path: str | Path) -> dict[str, str]:
    """The ``{"splits": {image name: split}}`` of a pinned-split file (e.g. the split a shipped backbone saw)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pinned split file {path} does not exist (prepare.split.pinned)")
    splits = json.loads(path.read_text(encoding="utf-8")).get("splits")
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: expected an object with 'splits': {{image name: split}}")
    return splits


def split_by_image(
    groups: dict[str, str], val_fraction: float, test_fraction: float, seed: int,
    pinned: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each image (not each patch) to train / val / test, deterministically from ``seed``.

    ``groups`` maps image name to scene: all images of a scene go to one split. Val and test each
    get at least one scene when there are three or more. Images named in ``pinned`` (name -> split) keep
    that split, with their whole scene; the other scenes are split by ``seed`` and the fractions.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    scene_pins: dict[str, str] = {}
    for name, split in (pinned or {}).items():
        if split not in SPLITS:
            raise ValueError(f"pinned split of {name!r} is {split!r}; expected one of {SPLITS}")
        if name in groups and scene_pins.setdefault(groups[name], split) != split:
            raise ValueError(f"scene {groups[name]!r} is pinned to both {scene_pins[groups[name]]} and {split}")
    scenes = sorted(set(groups.values()) - set(scene_pins))
    np.random.default_rng(seed).shuffle(scenes)
    n = len(scenes)
    n_test = max(round(n * test_fraction), 1 if n >= 3 and test_fraction > 0 else 0)
    n_val = max(round(n * val_fraction), 1 if n >= 3 and val_fraction > 0 else 0)
    scene_split = dict(zip(scenes, ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)))
    scene_split.update(scene_pins)
    return {name: scene_split[group] for name, group in groups.items()}
