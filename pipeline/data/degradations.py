"""Degradations are data: each one is an albumentations ``Compose`` in its serialised dict form (YAML in
``conf/degradations/``). Where albumentations has no physically based model (haze), or where its
transform is not what the study needs, the project adds a transform here that registers with
albumentations' serialiser, so YAML names it like any other:

* ``AtmosphericHaze``: the scattering model, with a smooth random depth map.
* ``ExactGaussianBlur`` / ``ExactMotionBlur``: albumentations' kernels, applied in exact integer
  arithmetic. OpenCV's float filters (``filter2D`` switches to a DFT for kernels of 11² and more) round
  differently with each CPU's SIMD units, so the same seed gave other bytes on another machine.
* ``AreaRain``: ``RandomRain`` with a number of drops proportional to the image's *area*.
  albumentations draws ``height // 3`` drops, so a 48² training patch got 2.7× the streak density of a
  128² test crop and the router learned the wrong picture of rain.

Every degradation's statistics per pixel are the same at any image size (tested), and every sample is
degraded under its own seed, so the same params and seed give the same bytes on any x86-64 machine.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Any, Iterable, Mapping

import albumentations as A
import cv2
import numpy as np
from albumentations.core.pydantic import check_range_bounds
from albumentations.core.transforms_interface import BaseTransformInitSchema
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import AfterValidator
from scipy import ndimage

KERNEL_BITS = 12  # fixed-point precision of a quantised kernel tap (per axis for separable kernels)


class AtmosphericHaze(A.ImageOnlyTransform):
    """Atmospheric scattering ``I = J·t + A·(1 − t)`` with ``t = exp(−β·d)``.

    ``d`` is a smooth random depth map in [0, 1]: a vertical gradient (the top of a photo is usually
    farther away) blended with low-frequency noise from a ``grid`` x ``grid`` lattice upsampled bicubically.

    Args:
        beta_range: scattering coefficient β; larger is denser haze.
        airlight_range: global atmospheric light A on the [0, 1] scale.
        gradient_weight: share of the vertical gradient in the depth map (the rest is smooth noise).
        grid: size of the random lattice the smooth noise is upsampled from.
    """

    class InitSchema(BaseTransformInitSchema):
        beta_range: Annotated[tuple[float, float], AfterValidator(check_range_bounds(0, None))]
        airlight_range: Annotated[tuple[float, float], AfterValidator(check_range_bounds(0, 1))]
        gradient_weight: float
        grid: int

    def __init__(
        self,
        beta_range: tuple[float, float] = (0.8, 2.0),
        airlight_range: tuple[float, float] = (0.7, 1.0),
        gradient_weight: float = 0.5,
        grid: int = 4,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.beta_range = beta_range
        self.airlight_range = airlight_range
        self.gradient_weight = gradient_weight
        self.grid = grid

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        beta = self.py_random.uniform(*self.beta_range)
        airlight = self.py_random.uniform(*self.airlight_range)
        lattice = self.random_generator.standard_normal((self.grid, self.grid)).astype(np.float32)
        field = cv2.resize(lattice, (w, h), interpolation=cv2.INTER_CUBIC)
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        gradient = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None]
        depth = self.gradient_weight * gradient + (1 - self.gradient_weight) * field
        return {"beta": beta, "airlight": airlight, "transmission": np.exp(-beta * depth)}

    def apply(self, img: np.ndarray, beta: float, airlight: float, transmission: np.ndarray, **params: Any):
        max_value = np.iinfo(img.dtype).max if img.dtype.kind == "u" else 1.0
        t = transmission[..., None]
        hazy = img.astype(np.float32) / max_value * t + airlight * (1 - t)
        hazy = np.clip(hazy * max_value, 0, max_value)
        return np.round(hazy).astype(img.dtype) if img.dtype.kind == "u" else hazy.astype(img.dtype)


def quantise_kernel(kernel: np.ndarray, bits: int = KERNEL_BITS) -> np.ndarray:
    """Integer taps summing to exactly ``2**bits`` (the rounding error goes to the largest tap), so a
    flat image stays flat."""
    scale = 1 << bits
    kernel = np.asarray(kernel, dtype=np.float64)
    taps = np.round(kernel / kernel.sum() * scale).astype(np.int64)
    taps.flat[int(np.argmax(taps))] += scale - int(taps.sum())
    return taps


def exact_filter(image: np.ndarray, kernel: np.ndarray, separable: bool = False) -> np.ndarray:
    """``image`` (H×W×C uint8) correlated with ``kernel`` (2-D, or the 1-D factor of a separable one),
    reflect-101 borders, rounded to uint8.

    Integer taps on integer pixels: every partial sum is an integer below 2**53, so the float64
    accumulation is exact in any order and the result is the same on every CPU and thread count.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"exact_filter takes uint8 images, got {image.dtype}")
    pixels = image.astype(np.float64)
    taps = quantise_kernel(kernel).astype(np.float64)
    if separable:
        for axis in (0, 1):
            pixels = ndimage.correlate1d(pixels, taps, axis=axis, mode="mirror")
        scale = float(1 << (2 * KERNEL_BITS))
    else:
        pixels = ndimage.correlate(pixels, taps[..., None] if pixels.ndim == 3 else taps, mode="mirror")
        scale = float(1 << KERNEL_BITS)
    return np.clip(np.floor((pixels + scale / 2) / scale), 0, 255).astype(np.uint8)


class ExactGaussianBlur(A.GaussianBlur):
    """``GaussianBlur`` whose kernel is applied by :func:`exact_filter` (bit-identical on every CPU)."""

    def apply(self, img: np.ndarray, kernel: np.ndarray, **params: Any) -> np.ndarray:
        return exact_filter(img, kernel, separable=True)


class ExactMotionBlur(A.MotionBlur):
    """``MotionBlur`` whose kernel is applied by :func:`exact_filter` (bit-identical on every CPU)."""

    def apply(self, img: np.ndarray, kernel: np.ndarray, **params: Any) -> np.ndarray:
        return exact_filter(img, kernel)


class AreaRain(A.RandomRain):
    """``RandomRain`` with a streak density that does not depend on the image size.

    Args:
        drops_per_megapixel: range of the density; each image draws a density from it, then a
            Poisson number of drops for its area.
        The other arguments are ``RandomRain``'s (``drop_length`` in pixels, as there).
    """

    class InitSchema(A.RandomRain.InitSchema):
        drops_per_megapixel: Annotated[tuple[float, float], AfterValidator(check_range_bounds(0, None))]

    def __init__(self, drops_per_megapixel: tuple[float, float] = (4000.0, 8000.0),
                 slant_range: tuple[float, float] = (-10, 10), drop_length: int | None = None, drop_width: int = 1,
                 drop_color: tuple[int, int, int] = (200, 200, 200), blur_value: int = 7,
                 brightness_coefficient: float = 0.7, rain_type: str = "default", p: float = 0.5):
        super().__init__(slant_range=slant_range, drop_length=drop_length, drop_width=drop_width, drop_color=drop_color,
                         blur_value=blur_value, brightness_coefficient=brightness_coefficient, rain_type=rain_type, p=p)
        self.drops_per_megapixel = drops_per_megapixel

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        density = self.py_random.uniform(*self.drops_per_megapixel)
        length = self.drop_length if self.drop_length is not None else max(1, height // 8)
        length = min(length, height - 1)
        count = int(self.random_generator.poisson(density * height * width / 1e6))
        drops = self.random_generator.integers(low=[0, 0], high=[width, height - length], size=(count, 2),
                                               dtype=np.int32)
        slant = self.py_random.uniform(*self.slant_range)
        return {"drop_length": length, "slant": slant, "rain_drops": drops, "density": density}


def build_transform(name: str, spec: Mapping[str, Any]) -> A.Compose:
    """An albumentations ``Compose`` from a degradation's ``transform`` dict, with a clear error if it is bad."""
    if "transform" not in spec:
        raise ValueError(f"degradation {name!r} has no 'transform' entry")
    try:
        transform = A.from_dict({"transform": _plain(spec["transform"])})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"degradation {name!r}: invalid albumentations transform: {error}") from error
    if not isinstance(transform, A.Compose):
        raise ValueError(f"degradation {name!r}: the transform must be a Compose, got {type(transform).__name__}")
    return transform


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain dicts/lists (albumentations validates with pydantic)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def leaf_transforms(transform: Any) -> Iterable[A.BasicTransform]:
    if isinstance(transform, A.BaseCompose):
        for child in transform.transforms:
            yield from leaf_transforms(child)
    else:
        yield transform


def _summarise(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.size <= 16:
            return value.tolist()
        return {"shape": list(value.shape), "mean": float(value.mean()), "std": float(value.std())}
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_summarise(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _summarise(v) for k, v in value.items()}
    return value


def sample_seed(*parts: int | str) -> int:
    """A 32-bit seed from a tuple of ints and strings, stable across processes and platforms."""
    words = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


class Degradation:
    """One named degradation (or a sequence of them, for mixes) applied to uint8 RGB images under a seed."""

    def __init__(self, names: list[str], transforms: list[A.Compose]):
        self.names = names
        self.transforms = transforms

    @property
    def name(self) -> str:
        return "+".join(self.names)

    @classmethod
    def from_params(cls, degradations: Mapping[str, Any], names: str | list[str]) -> "Degradation":
        names = names.split("+") if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in degradations]
        if unknown:
            raise KeyError(f"unknown degradation(s) {unknown}; configured: {sorted(degradations)}")
        return cls(names, [build_transform(n, degradations[n]) for n in names])

    def __call__(self, image: np.ndarray, seed: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Degrade ``image`` (HxWx3 uint8); return the result and every parameter that was sampled."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        applied = []
        for name, transform in zip(self.names, self.transforms):
            transform.set_random_seed(sample_seed(seed, name))
            image = transform(image=image)["image"]
            for leaf in leaf_transforms(transform):
                if leaf.params:
                    params = {k: v for k, v in leaf.params.items() if k != "shape"}
                    applied.append({"degradation": name, "transform": type(leaf).__name__, **_summarise(params)})
        return image, applied
