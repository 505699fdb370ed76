"""Reading and writing images as people have them: modes, bit depths, EXIF orientation; atomic writes.

Pillow silently truncates 16-bit colour PNG/TIFF to 8 bits, so pixels of 16-bit files are read
with OpenCV; Pillow is used to validate the file and to read its EXIF orientation.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.files import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class ImageReadError(ValueError):
    """An input file that is not a readable image; the message says which file and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


_EXIF_ORIENTATION = 0x0112


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1-8) to an HxW[xC] array."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1],
    }
    return np.ascontiguousarray(ops[orientation](array)) if orientation in ops else array


def _is_16_bit(path: Path, image: Image.Image) -> bool:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return True
    if image.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(25)
        return len(header) == 25 and header[24] == 16  # IHDR bit depth
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)  # BitsPerSample
        return bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) == 16
    return False


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into an ``HxWxC`` array (C = 1 gray, 2 gray + alpha, 3 or 4; uint8 or uint16),
    EXIF-oriented.

    Raises :class:`ImageReadError` with the path and a one-line reason for anything that is not a
    readable image (missing, not an image, truncated, unsupported mode).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        with Image.open(path) as image:
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            if _is_16_bit(path, image):
                array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                if array is None:
                    raise ImageReadError(path, f"16-bit {image.format} that OpenCV cannot decode")
                if array.ndim == 3:
                    code = cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB
                    array = cv2.cvtColor(array, code)
                if array.dtype not in (np.uint8, np.uint16):
                    array = np.clip(array, 0, 65535).astype(np.uint16)
            else:
                array = _pil_to_array(path, ImageOps.exif_transpose(image))
                orientation = 1  # exif_transpose already applied it
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (format not recognised)") from None
    except (OSError, SyntaxError) as error:  # Pillow reports truncated / corrupt data as OSError
        raise ImageReadError(path, f"truncated or corrupt image ({error})") from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(path, f"image too large to decode safely ({error})") from None
    array = _orient(array, orientation)
    return array[..., None] if array.ndim == 2 else array


def _pil_to_array(path: Path, image: Image.Image) -> np.ndarray:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif image.mode == "F":
        raise ImageReadError(path, "32-bit float images are not supported")
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageReadError(path, f"unsupported image mode {image.mode!r}")
    return np.asarray(image)


def to_rgb8(array: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Convert an ``HxWxC`` image to RGB uint8; also return what was converted, in words."""
    conversions = []
    if array.dtype == np.uint16:
        array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
        conversions.append("16-bit to 8-bit")
    elif array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or uint16 image, got {array.dtype}")
    if array.shape[2] in (2, 4):
        array = array[..., : array.shape[2] - 1]
        conversions.append("alpha channel dropped")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
        conversions.append("grayscale to RGB")
    return np.ascontiguousarray(array), conversions


def write_image(path: str | os.PathLike, array: np.ndarray, quality: int = 95) -> None:
    """Write an ``HxW[xC]`` uint8/uint16 array atomically; the format follows the file extension."""
    path = Path(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 2:  # gray + alpha: OpenCV has no such mode, Pillow has (8-bit)
        if array.dtype != np.uint8:
            raise OSError(f"could not write {path}: 16-bit gray + alpha is not supported")
        with atomic_path(path) as tmp:
            Image.fromarray(array, "LA").save(tmp, format=Image.registered_extensions().get(path.suffix.lower()))
        return
    if array.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if array.shape[2] == 4 else cv2.COLOR_RGB2BGR
        array = cv2.cvtColor(array, code)
    params = []
    if path.suffix.lower() in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), array, params):
            raise OSError(f"could not write {path} (extension {path.suffix!r})")


def tile(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Same-size HxWxC images in a grid, row by row (missing cells black)."""
    h, w, c = images[0].shape
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=images[0].dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid
