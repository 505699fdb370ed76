"""Small odd image files, written as people have them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def rgb(h: int = 80, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth colour test image (gradients plus a little texture), HxWx3 uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def write_odd_files(folder: Path, size: int = 80) -> dict[str, Path]:
    """A grayscale, an RGBA, a 16-bit RGB and a 16-bit gray PNG, a truncated JPEG, a text file with an image
    extension, a non-image extension, and an image smaller than ``size``; also one plain RGB PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    image = rgb(size, size + 16)
    files = {
        "plain": folder / "plain.png",
        "gray": folder / "gray.png",
        "rgba": folder / "rgba.png",
        "rgb16": folder / "rgb16.png",
        "gray16": folder / "gray16.png",
        "truncated": folder / "truncated.jpg",
        "not_image": folder / "notes.png",
        "other_ext": folder / "readme.txt",
        "tiny": folder / "tiny.png",
    }
    Image.fromarray(image).save(files["plain"])
    Image.fromarray(image[..., 0]).save(files["gray"])
    Image.fromarray(np.dstack([image, np.full(image.shape[:2], 128, np.uint8)])).save(files["rgba"])
    cv2.imwrite(str(files["rgb16"]), (image.astype(np.uint16) * 257)[..., ::-1])
    cv2.imwrite(str(files["gray16"]), image[..., 1].astype(np.uint16) * 257)
    Image.fromarray(image).save(folder / "full.jpg", quality=90)
    data = (folder / "full.jpg").read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    (folder / "full.jpg").unlink()
    files["not_image"].write_text("this is not a PNG")
    files["other_ext"].write_text("hello")
    Image.fromarray(image[:16, :16]).save(files["tiny"])
    return files
