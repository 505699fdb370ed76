"""``UniversalRestorer``: backbone + LoRA adapters + router, for images as people have them.

Any size: padded to the UNet's multiple; large images restored in overlapping tiles blended with a
linear ramp, so memory stays bounded. Grayscale comes back grayscale, RGBA keeps its alpha untouched,
16-bit stays 16-bit (processed in float). NumPy arrays, PIL images and tensors come back as the kind
they went in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.evaluation.methods import pad_to_multiple
from pipeline.models.composition import AdapterComposition
from pipeline.models.router import DegradationRouter, top_k_weights

MIN_SIDE = 16


class ModelsFolderError(FileNotFoundError):
    """A models folder that lacks what restoration needs; the message names the DVC stage to run."""


@dataclass
class Analysis:
    """What the router says of one image."""

    weights: dict[str, float]  # top-K, renormalised
    similarity: dict[str, float]  # cosine similarity to each degradation's prototype
    unknown: bool  # best similarity below the calibrated threshold


def check_models_folder(models: Path) -> list[str]:
    """The adapter names the router was fitted for; a clear error naming the stage for anything missing."""
    needs = [
        (models / "backbone" / "config.json", "pretrain_backbone"),
        (models / "router" / "config.json", "fit_router"),
    ]
    for path, stage in needs:
        if not path.is_file():
            raise ModelsFolderError(f"{path} is missing: run `dvc repro {stage}` (models folder {models})")
    names = DegradationRouter.from_pretrained(models / "router").names
    for name in names:
        if not (models / "loras" / name / "adapter_model.safetensors").is_file():
            raise ModelsFolderError(f"{models / 'loras' / name} is missing: run `dvc repro train_lora@{name}`")
    return names


def _ramp(size: int, overlap: int) -> torch.Tensor:
    """1-D blending weights: linear ramps of ``overlap`` pixels at both ends, never zero."""
    weights = torch.ones(size)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        weights[:overlap] = ramp
        weights[-overlap:] = torch.minimum(weights[-overlap:], ramp.flip(0))
    return weights


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step)) + [length - tile]
    return sorted(set(starts))


class UniversalRestorer:
    """Restore images with the router's top-K composition of LoRAs, or a forced adapter mix.

    Args:
        composition: the adapters on the frozen backbone.
        router: fitted for exactly the composition's adapters.
        top_k: adapters kept per image (default: the router's K).
        tile, overlap: tile side and overlap in pixels for images larger than ``tile``.
        batch_size: tiles restored at once.
        unknown: what to do when the router does not recognise the degradation: ``"identity"``
            returns the input unchanged, ``"route"`` uses the router's top-K anyway.
    """

    def __init__(self, composition: AdapterComposition, router: DegradationRouter, top_k: int | None = None,
                 tile: int = 256, overlap: int = 32, batch_size: int = 4, device: str = "cpu",
                 unknown: str = "identity"):
        router.check_adapters(composition.names)
        if unknown not in ("identity", "route"):
            raise ValueError(f"unknown must be 'identity' or 'route', got {unknown!r}")
        self.multiple = 2 ** (len(composition.model.get_base_model().config.block_out_channels) - 1)
        if tile < MIN_SIDE or tile % self.multiple or not 0 <= overlap < tile // 2:
            raise ValueError(f"tile must be a multiple of {self.multiple} (>= {MIN_SIDE}) and overlap in [0, tile/2)")
        self.device = torch.device(device)
        self.composition = composition.to(self.device)
        self.router = router.to(self.device)
        self.top_k = top_k or router.config.top_k
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        self.unknown = unknown

    @classmethod
    def from_pretrained(cls, models: str | Path = "models", **kwargs: Any) -> "UniversalRestorer":
        """Load ``models/{backbone,loras/<d>,router}`` as the DVC pipeline writes them."""
        models = Path(models)
        names = check_models_folder(models)
        composition = AdapterComposition.from_pretrained(models / "backbone", {n: models / "loras" / n for n in names})
        return cls(composition, DegradationRouter.from_pretrained(models / "router"), **kwargs)

    @property
    def names(self) -> list[str]:
        return self.composition.names

    # --- conversions -------------------------------------------------------------------------

    @staticmethod
    def _to_float(image: Any) -> tuple[torch.Tensor, Any]:
        """(3×H×W float on [0, 1], how to convert back)."""
        from PIL import Image

        if isinstance(image, Image.Image):
            mode = image.mode
            array = np.asarray(image.convert("RGBA") if mode in ("P", "LA") else image)
            tensor, back = UniversalRestorer._to_float(array)
            return tensor, ("pil", mode, back)
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] not in (1, 3, 4) or not image.is_floating_point():
                raise ValueError("a tensor image must be C×H×W float on [0, 1] with C = 1, 3 or 4")
            array = image.detach().cpu().permute(1, 2, 0).numpy()
            tensor, back = UniversalRestorer._to_float(array)
            return tensor, ("tensor", image.dtype, back)
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an H×W, H×W×1, H×W×3 or H×W×4 image, got shape {array.shape}")
        if array.dtype == np.uint8 or array.dtype == np.uint16:
            scale = float(np.iinfo(array.dtype).max)
        elif array.dtype.kind == "f":
            scale = 1.0
        else:
            raise ValueError(f"unsupported image dtype {array.dtype}")
        h, w, c = array.shape
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"image is {w}x{h}: too small for the network (at least {MIN_SIDE}x{MIN_SIDE})")
        rgb = np.repeat(array[..., :1], 3, axis=2) if c == 1 else array[..., :3]
        tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32) / scale).permute(2, 0, 1)
        alpha = array[..., 3:] if c == 4 else None
        return tensor.clamp(0, 1), ("array", array.dtype, scale, c, alpha)

    @staticmethod
    def _from_float(restored: torch.Tensor, back: Any) -> Any:
        from PIL import Image

        if back[0] == "pil":
            _, mode, inner = back
            array = UniversalRestorer._from_float(restored, inner)
            if mode in ("P", "LA"):
                return Image.fromarray(array, "RGBA").convert(mode)
            return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array, mode)
        if back[0] == "tensor":
            _, dtype, inner = back
            array = UniversalRestorer._from_float(restored, inner)
            return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).to(dtype)
        _, dtype, scale, channels, alpha = back
        rgb = restored.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        out = rgb.mean(axis=2, keepdims=True) if channels == 1 else rgb
        if dtype.kind == "u":
            out = np.round(out * scale).astype(dtype)
        else:
            out = out.astype(dtype)
        if alpha is not None:
            out = np.concatenate([out, alpha], axis=2)
        return out

    # --- routing and restoration ---------------------------------------------------------------

    def _route_crops(self, x: torch.Tensor) -> torch.Tensor:
        """Up to four ``tile``² crops (the image itself when smaller): routing sees full-resolution pixels."""
        _, h, w = x.shape
        if max(h, w) <= self.tile:
            return pad_to_multiple(x[None], 8)[0]
        size_h, size_w = min(h, self.tile), min(w, self.tile)
        tops = sorted({(h - size_h) // 4, 3 * (h - size_h) // 4})
        lefts = sorted({(w - size_w) // 4, 3 * (w - size_w) // 4})
        return torch.stack([x[:, t : t + size_h, l : l + size_w] for t in tops for l in lefts])

    @torch.no_grad()
    def _analyse(self, x: torch.Tensor, top_k: int) -> Analysis:
        crops = self._route_crops(x * 2 - 1).to(self.device)
        similarity = self.router.similarity(crops).mean(dim=0, keepdim=True)
        weights = top_k_weights(similarity / self.router.config.temperature, top_k)[0]
        unknown = bool(similarity.max() < self.router.config.threshold)
        return Analysis(
            weights={n: float(w) for n, w in zip(self.names, weights) if w > 0},
            similarity={n: float(s) for n, s in zip(self.names, similarity[0])},
            unknown=unknown,
        )

    def analyse(self, image: Any, top_k: int | None = None) -> Analysis:
        x, _ = self._to_float(image)
        return self._analyse(x, top_k or self.top_k)

    def route(self, image: Any, top_k: int | None = None) -> dict[str, float]:
        """The router's weights by degradation name (top-K, summing to one)."""
        return self.analyse(image, top_k).weights

    @torch.no_grad()
    def _restore_tensor(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Restore 3×H×W on [0, 1] with one weight vector, tiled when larger than a tile."""
        y = x * 2 - 1
        _, h, w = y.shape
        padded, _ = pad_to_multiple(y[None], self.multiple)
        padded = padded[0]
        ph, pw = padded.shape[-2:]
        tile_h, tile_w = min(self.tile, ph), min(self.tile, pw)
        boxes = [(t, l) for t in _starts(ph, tile_h, self.overlap) for l in _starts(pw, tile_w, self.overlap)]
        out = torch.zeros_like(padded)
        norm = torch.zeros(1, ph, pw)
        window = _ramp(tile_h, self.overlap if len(boxes) > 1 else 0)[:, None] * \
            _ramp(tile_w, self.overlap if len(boxes) > 1 else 0)[None, :]
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            batch = torch.stack([padded[:, t : t + tile_h, l : l + tile_w] for t, l in chunk]).to(self.device)
            restored = self.composition.restore(batch, weights.to(self.device)).clamp(-1, 1).cpu()
            for (t, l), tile in zip(chunk, restored):
                out[:, t : t + tile_h, l : l + tile_w] += tile * window
                norm[:, t : t + tile_h, l : l + tile_w] += window
        return ((out / norm)[:, :h, :w] + 1) / 2

    def restore(self, image: Any, weights: Mapping[str, float] | None = None, top_k: int | None = None) -> Any:
        """Restore ``image`` (NumPy array, PIL image or C×H×W tensor on [0, 1]); returns the same kind.

        ``weights`` forces an adapter mix by name (e.g. ``{"noise": 1.0}``); otherwise the router decides.
        """
        x, back = self._to_float(image)
        if weights is None:
            analysis = self._analyse(x, top_k or self.top_k)
            if analysis.unknown and self.unknown == "identity":
                return self._from_float(x, back)
            weights = analysis.weights
        vector = self.composition.weights_for(weights)
        return self._from_float(self._restore_tensor(x, vector), back)
