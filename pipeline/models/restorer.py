"""``UniversalRestorer``: backbone + LoRA adapters + router, for images as people have them — and the one
restoration path of the project: ``uir restore``, ``evaluate``, the benchmarks and the tests all restore
through ``restore_tiled`` (UIR-LoRA and its variants through ``UniversalRestorer.restore``).

Any size: padded to the UNet's multiple; large images restored in overlapping tiles blended with a
linear ramp, so memory stays bounded. Grayscale comes back grayscale (with its alpha, if any), RGBA keeps
its alpha untouched, 16-bit stays 16-bit (processed in float). NumPy arrays, PIL images and tensors come
back as the kind and shape they went in.

How UIR-LoRA restores an image (``RestorationSettings``): the router's probabilities become adapter
weights by a policy (``gated`` by default: one adapter, two only for a detected mix); a mix is restored
``sequential``-ly — each adapter alone at its own ``t*``, undoing the last-applied degradation first — or
by the paper's ``weights``-space composition at the weight-averaged ``t*``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.composition import NOISE_LEVELS, AdapterComposition
from pipeline.models.export import OnnxEngine, check_engine
from pipeline.models.folder import ModelsFolder
from pipeline.models.router import POLICIES, DegradationRouter, Routing, select_adapters

MIN_SIDE = 16
SETTINGS_FILE = "restoration.json"  # in the models folder: the settings `select_restoration` chose
COMPOSITIONS = ("sequential", "weights", "planned")
UNKNOWN = ("identity", "route")
CASCADE_PAIRS = ("any", "validated")

Network = Callable[[torch.Tensor], torch.Tensor]  # B×3×H×W on [-1, 1] -> the same


@dataclass(frozen=True)
class RestorationSettings:
    """How UIR-LoRA turns the router's opinion into a restoration (``restoration`` in params.yaml).

    Args:
        policy: ``top1``, ``gated`` (a second adapter only when its presence reaches the mix threshold),
            ``confirmed`` (gated, and the second adapter's presence still reaches it once the first adapter
            alone has restored the image: a single that merely looks like a mix is not given two), ``topk``
            (the paper's: the ``top_k`` most probable, renormalised), or ``cascade`` (the first adapter, then the
            router reads its restoration again: each other degradation whose presence reaches the mix threshold
            there is added, the most present first, up to ``top_k`` in all; none where it calls the restoration
            clean): a degradation that another hides in the input — low light under noise — is found once the
            first is undone. A degradation is only read again where its presence on the input itself reached
            ``cascade_gate``: weak evidence there, strong evidence once the first is undone.
        top_k: adapters kept by ``topk``, and at most by ``gated``, ``confirmed`` and ``cascade``.
        mix_threshold: ``gated``'s threshold; None: the router's, calibrated on validation.
        cascade_gate: ``cascade``: the presence on the input at or above which a degradation is read again.
        cascade_pairs: ``cascade``: any degradation may be added to the first (``any``), or only one that forms,
            with the first, part of a mix the settings were validated on (``validated``: ``validated_mixes``).
            Once the first is undone the router also reads what the photo itself holds — a hazy horizon, a dark
            scene — as a degradation; a pair the validation never had is never checked to help.
        validated_mixes: the mixes (names sorted, joined by ``+``) of the validation sets ``select_restoration``
            chose these settings on.
        composition: ``sequential``, ``weights``, or ``planned``: each pair of adapters by its ``plans`` entry,
            other mixes sequential.
        unknown: an image of an unrecognised degradation is left as it is (``identity``) or restored by its
            routing anyway (``route``). An image the router finds clean is always left as it is (force an
            adapter to restore it): an adapter on a clean photo costs several dB.
        undo_order: the order in which ``sequential`` applies adapters (the reverse of image formation:
            compression is undone first, the scene last); adapters not listed come after, by name.
        plans: for ``planned``, per pair of adapters (key: their names sorted, joined by ``+``), the steps
            to apply — each step a group of adapters merged in equal parts: ``[["rain"], ["haze"]]`` is rain
            then haze, ``[["lowlight", "noise"]]`` both at once. Chosen on validation by
            ``select_restoration``.
        noise_level: what sets the timestep of an adapter with the ``noise_sigma`` rule: its ``learned``
            ``NoiseLevelEstimator`` (``fit_noise_level``; reads noise that JPEG or blur went over) or the
            ``analytic`` σ̂ (white noise only).
        min_noise_correction: ``learned``: the estimator's correction to the analytic σ̂ is applied only where it is
            at least this large (|log σ − log σ̂|); below it, the noise reads as white and σ̂ is kept: on white noise
            in full-size photos σ̂ is the better estimate, noise that JPEG or blur went over needs far larger
            corrections. 0: always the estimator's.
        ceilings: per adapter, the ``bright_end`` of the brightest input it was trained on (``select_restoration``
            measures it on the training set); ``confirmed`` and ``cascade`` do not add it as a second adapter to
            a first restoration brighter than that. A darkening degradation caps its images' brightness: a
            denoised black sky with a bright star reads as low light but cannot be one.
        strengths: per adapter with the ``noise_sigma`` rule, its strength by the noise level it reads: knots
            ``[[σ, strength], ...]`` (σ on the 0–255 scale, increasing; strength in [0, 1]), linear in between,
            constant beyond (``AdapterComposition.strength``). Its weight is multiplied by it, at the same timestep:
            where light noise is concerned the frozen backbone alone may denoise better than the adapter. Only for
            an adapter restoring alone (``restore_tensor``). Fitted on its validation set by ``select_restoration`` (``strength_knots``); none: full strength.
    """

    policy: str = "gated"
    top_k: int = 2
    mix_threshold: float | None = None
    cascade_gate: float = 0.0
    cascade_pairs: str = "any"
    validated_mixes: tuple[str, ...] = ()
    composition: str = "sequential"
    unknown: str = "identity"
    undo_order: tuple[str, ...] = ("jpeg", "noise", "rain", "blur", "lowlight", "haze")
    plans: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    noise_level: str = "learned"
    min_noise_correction: float = 0.2
    ceilings: Mapping[str, float] = field(default_factory=dict)
    strengths: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    def __post_init__(self):
        checks = [(self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}"),
                  (isinstance(self.top_k, int) and self.top_k >= 1, f"top_k must be an integer >= 1, got {self.top_k!r}"),
                  (self.mix_threshold is None or 0 <= self.mix_threshold <= 1,
                   f"mix_threshold must be in [0, 1], got {self.mix_threshold!r}"),
                  (0 <= self.cascade_gate <= 1, f"cascade_gate must be in [0, 1], got {self.cascade_gate!r}"),
                  (self.cascade_pairs in CASCADE_PAIRS, f"cascade_pairs must be one of {CASCADE_PAIRS}, got {self.cascade_pairs!r}"),
                  (self.cascade_pairs == "any" or bool(self.validated_mixes),
                   "cascade_pairs: validated needs validated_mixes (select_restoration writes them)"),
                  (self.composition in COMPOSITIONS, f"composition must be one of {COMPOSITIONS}, got {self.composition!r}"),
                  (self.unknown in UNKNOWN, f"unknown must be one of {UNKNOWN}, got {self.unknown!r}"),
                  (self.noise_level in NOISE_LEVELS, f"noise_level must be one of {NOISE_LEVELS}, got {self.noise_level!r}"),
                  (self.min_noise_correction >= 0, f"min_noise_correction must be >= 0, got {self.min_noise_correction!r}"),
                  (all(0 <= v <= 1 for v in self.ceilings.values()), f"ceilings must be in [0, 1], got {dict(self.ceilings)!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "min_noise_correction", float(self.min_noise_correction))
        object.__setattr__(self, "undo_order", tuple(self.undo_order))
        object.__setattr__(self, "validated_mixes", tuple(self.validated_mixes))
        plans = {key: tuple(tuple(step) for step in plan) for key, plan in self.plans.items()}
        for key, plan in plans.items():
            applied = [name for step in plan for name in step]
            if key != "+".join(sorted(key.split("+"))) or sorted(applied) != sorted(key.split("+")) or not all(plan):
                raise ValueError(f"plan {key}: {plan} must apply each adapter of the sorted key {key!r} once")
        object.__setattr__(self, "plans", plans)
        object.__setattr__(self, "ceilings", {name: float(v) for name, v in self.ceilings.items()})
        strengths = {name: tuple((float(sigma), float(value)) for sigma, value in knots) for name, knots in self.strengths.items()}
        for name, knots in strengths.items():
            sigmas = [sigma for sigma, _ in knots]
            if not knots or any(b <= a for a, b in zip(sigmas, sigmas[1:])) or not all(0 <= v <= 1 for _, v in knots):
                raise ValueError(f"strengths of {name}: {knots} must be [[σ, strength], ...] with σ increasing and "
                                 "strength in [0, 1]")
        object.__setattr__(self, "strengths", strengths)

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON values (what ``restoration.json`` holds)."""
        return {**self.__dict__, "undo_order": list(self.undo_order), "validated_mixes": list(self.validated_mixes),
                "ceilings": dict(self.ceilings),
                "strengths": {name: [list(knot) for knot in knots] for name, knots in self.strengths.items()},
                "plans": {key: [list(step) for step in plan] for key, plan in self.plans.items()}}

    def save(self, path: str | Path) -> None:
        from pipeline.files import write_json

        write_json(path, self.as_dict())

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> "RestorationSettings":
        import json

        return cls.from_params(json.loads(Path(path).read_text()), **overrides)

    @classmethod
    def from_params(cls, section: Mapping[str, Any], **overrides: Any) -> "RestorationSettings":
        """From ``params.restoration`` (its keys are exactly this class's fields), with ``overrides``."""
        values = {f.name: section[f.name] for f in fields(cls) if f.name in section}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Analysis:
    """What the router says of one image, and what the settings make of it."""

    weights: dict[str, float]  # the adapters to apply, summing to one
    probabilities: dict[str, float]  # softmax over every adapter
    similarity: dict[str, float]  # cosine similarity to each degradation's prototype
    presence: dict[str, float]  # probability that the image holds each degradation (multi-label)
    ranking: list[str]  # every adapter, most likely first (the most probable, then by presence)
    unknown: bool  # best similarity below the calibrated threshold
    clean: bool = False  # the router's probability of a clean image reached its calibrated threshold
    unchanged: bool = False  # clean, or unknown with ``unknown: identity``: left as it is
    steps: list[dict[str, float]] = field(default_factory=list)  # what restore() applies, in order
    # policy ``confirmed``: each adapter the gate added, its presence once the first adapter alone has restored
    # the image (kept at or above the mix threshold); ``cascade``: every other adapter's there
    confirmation: dict[str, float] = field(default_factory=dict)


def bright_end(x: torch.Tensor) -> float:
    """How bright an image's brightest parts are: the 99.5th percentile of its channel maximum (3×H×W on
    [0, 1]), box-filtered over 3×3 pixels so that single noisy pixels do not count."""
    peak = x.amax(dim=0)[None, None]
    if min(peak.shape[-2:]) >= 3:
        peak = F.avg_pool2d(peak, 3, stride=1)
    values = peak.flatten()
    return float(values.kthvalue(max(1, round(0.995 * values.numel()))).values)


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad the bottom and right so both sides are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    return images, (h, w)


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
    return sorted(set(list(range(0, length - tile, step)) + [length - tile]))


def tile_count(height: int, width: int, tile: int, overlap: int, multiple: int) -> int:
    ph, pw = height + (-height % multiple), width + (-width % multiple)
    return len(_starts(ph, min(tile, ph), overlap)) * len(_starts(pw, min(tile, pw), overlap))


@torch.no_grad()
def restore_tiled(network: Network, x: torch.Tensor, multiple: int, tile: int = 256, overlap: int = 32,
                  batch_size: int = 4, device: torch.device | str = "cpu",
                  on_tile: Callable[[int], None] | None = None) -> torch.Tensor:
    """Restore ``x`` (3×H×W on [0, 1]) with ``network``: padded to ``multiple``, in ``tile``² tiles blended
    with linear ramps over ``overlap`` pixels when larger than a tile. ``on_tile(n)`` after each ``n`` tiles."""
    y = x * 2 - 1
    _, h, w = y.shape
    padded = pad_to_multiple(y[None], multiple)[0][0]
    ph, pw = padded.shape[-2:]
    tile_h, tile_w = min(tile, ph), min(tile, pw)
    boxes = [(t, l) for t in _starts(ph, tile_h, overlap) for l in _starts(pw, tile_w, overlap)]
    ramp = overlap if len(boxes) > 1 else 0
    window = _ramp(tile_h, ramp)[:, None] * _ramp(tile_w, ramp)[None, :]
    out = torch.zeros_like(padded)
    norm = torch.zeros(1, ph, pw)
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start : start + batch_size]
        batch = torch.stack([padded[:, t : t + tile_h, l : l + tile_w] for t, l in chunk]).to(device)
        restored = network(batch).clamp(-1, 1).float().cpu()
        for (t, l), part in zip(chunk, restored):
            out[:, t : t + tile_h, l : l + tile_w] += part * window
            norm[:, t : t + tile_h, l : l + tile_w] += window
        if on_tile is not None:
            on_tile(len(chunk))
    return ((out / norm)[:, :h, :w] + 1) / 2


# --- images as people have them <-> 3×H×W float on [0, 1] ---------------------------------------------

def to_float(image: Any) -> tuple[torch.Tensor, Any]:
    """(3×H×W float on [0, 1], how to convert back) for a NumPy array (H×W or H×W×C, C = 1-4, uint8,
    uint16 or float on [0, 1]), a PIL image or a C×H×W float tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        mode = image.mode
        array = np.asarray(image.convert("RGBA") if mode == "P" else image)
        tensor, back = to_float(array)
        return tensor, ("pil", mode, back)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 2, 3, 4) or not image.is_floating_point():
            raise ValueError("a tensor image must be C×H×W float on [0, 1] with C = 1, 2, 3 or 4")
        tensor, back = to_float(image.detach().cpu().permute(1, 2, 0).numpy())
        return tensor, ("tensor", image.dtype, back)
    array = np.asarray(image)
    flat = array.ndim == 2
    if flat:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an H×W or H×W×C image with C = 1, 2, 3 or 4, got shape {array.shape}")
    if array.dtype in (np.uint8, np.uint16):
        scale = float(np.iinfo(array.dtype).max)
    elif array.dtype.kind == "f":
        scale = 1.0
    else:
        raise ValueError(f"unsupported image dtype {array.dtype}")
    h, w, c = array.shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {w}x{h}: too small for the network (at least {MIN_SIDE}x{MIN_SIDE})")
    colour = 1 if c in (1, 2) else 3
    rgb = np.repeat(array[..., :1], 3, axis=2) if colour == 1 else array[..., :3]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32) / scale).permute(2, 0, 1)
    alpha = array[..., colour:] if c in (2, 4) else None
    return tensor.clamp(0, 1), ("array", array.dtype, scale, colour, alpha, flat)


def from_float(restored: torch.Tensor, back: Any) -> Any:
    """The inverse of ``to_float``: the same kind, shape, mode and dtype as the input."""
    from PIL import Image

    if back[0] == "pil":
        _, mode, inner = back
        array = from_float(restored, inner)
        if mode == "P":
            return Image.fromarray(array, "RGBA").convert("P")
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array, mode)
    if back[0] == "tensor":
        _, dtype, inner = back
        return torch.from_numpy(np.ascontiguousarray(from_float(restored, inner))).permute(2, 0, 1).to(dtype)
    _, dtype, scale, colour, alpha, flat = back
    rgb = restored.clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    out = rgb.mean(axis=2, keepdims=True) if colour == 1 else rgb
    out = np.round(out * scale).astype(dtype) if dtype.kind == "u" else out.astype(dtype)
    if alpha is not None:
        out = np.concatenate([out, alpha], axis=2)
    return out[..., 0] if flat else out


class RestorationCache:
    """What a restorer already computed, by the input's pixels: the routing of an image and its restoration
    by each prefix of adapter steps. For stages that restore the same images under many settings
    (``evaluate``, ``select_restoration``): variants that reach the same steps — the oracle and every routed
    variant of a correctly routed single, a sequential mix's first step and top-1 — then cost one network
    pass, with the same result. Beyond ``max_bytes`` the least recently used entries go. Entries are keyed by
    the restorer's models, tiling and engine too, so restorers of other models never share one."""

    def __init__(self, max_bytes: int = 2 << 30):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def digest(x: torch.Tensor) -> str:
        """The identity of an input tensor: its shape, dtype and pixels."""
        data = x.detach().cpu().contiguous()
        return f"{tuple(data.shape)}:{data.dtype}:" + hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """The value stored under ``key``, or ``compute()``'s, stored (a tensor or a dataclass of tensors)."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][0]
        self.misses += 1
        value = compute()
        tensors = [value] if isinstance(value, torch.Tensor) else [v for v in value.__dict__.values() if isinstance(v, torch.Tensor)]
        size = sum(t.nelement() * t.element_size() for t in tensors)
        self._entries[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes and self._entries:
            self._bytes -= self._entries.popitem(last=False)[1][1]
        return value

    def __len__(self) -> int:
        return len(self._entries)


class UniversalRestorer:
    """Restore images with the router's choice of LoRAs (``settings``), or a forced adapter mix.

    Args:
        composition: the adapters on the frozen backbone.
        router: fitted for exactly the composition's adapters; None restores forced mixes only.
        settings: how routing becomes restoration (policy, composition, unknown degradations).
        tile, overlap: tile side and overlap in pixels for images larger than ``tile``.
        batch_size: tiles restored at once.
        engine: ``torch``, ``onnxruntime`` or ``openvino`` (the network exported to ONNX with the mix merged
            in, run by that runtime on the CPU; the router stays in PyTorch).
        precision: ``fp32``; ``int8`` (onnxruntime) or ``bf16`` (openvino): faster, at a measured PSNR cost.
        cache: reuse routings and restorations of images seen before (shared by ``with_settings`` variants).
    """

    def __init__(self, composition: AdapterComposition, router: DegradationRouter | None = None,
                 settings: RestorationSettings | None = None, tile: int = 256, overlap: int = 32,
                 batch_size: int = 4, device: str = "cpu", engine: str = "torch", precision: str = "fp32",
                 cache: RestorationCache | None = None):
        if router is not None:
            router.check_adapters(composition.names)
        self.multiple = 2 ** (len(composition.model.get_base_model().config.block_out_channels) - 1)
        if tile < MIN_SIDE or tile % self.multiple or not 0 <= overlap < tile // 2:
            raise ValueError(f"tile must be a multiple of {self.multiple} (>= {MIN_SIDE}) and overlap in [0, tile/2)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.composition = composition.to(self.device)
        self.router = router.to(self.device) if router is not None else None
        self.settings = settings or RestorationSettings()
        self.tile, self.overlap, self.batch_size = tile, overlap, batch_size
        check_engine(engine, precision, device)
        self.engine, self.precision = engine, precision
        self._onnx = None
        self.cache = cache

    @classmethod
    def from_pretrained(cls, models: str | Path = "models", router: bool = True,
                        settings: RestorationSettings | None = None, **kwargs: Any) -> "UniversalRestorer":
        """Load a models folder as the DVC pipeline writes it, with the settings ``select_restoration`` chose
        (``models/restoration.json``) unless ``settings`` are given; ``router=False`` loads every adapter
        present and no router (forced mixes only)."""
        folder = ModelsFolder(models)
        names = folder.check(router=router)
        if settings is None and (folder.root / SETTINGS_FILE).is_file():
            settings = RestorationSettings.load(folder.root / SETTINGS_FILE)
        composition = AdapterComposition.from_pretrained(folder.backbone, {n: folder.lora(n) for n in names},
                                                         folder.noise_levels(names))
        return cls(composition, DegradationRouter.from_pretrained(folder.router) if router else None,
                   settings=settings, **kwargs)

    @property
    def names(self) -> list[str]:
        return self.composition.names

    def with_settings(self, **changes: Any) -> "UniversalRestorer":
        """The same models under other settings (nothing is loaded again)."""
        other = object.__new__(UniversalRestorer)
        other.__dict__.update(self.__dict__)
        other.settings = RestorationSettings(**{**self.settings.__dict__, **changes})
        return other

    # --- routing ----------------------------------------------------------------------------------------

    def _route_crops(self, x: torch.Tensor) -> torch.Tensor:
        """Up to four ``tile``² crops (the image itself when smaller): routing sees full-resolution pixels."""
        _, h, w = x.shape
        if max(h, w) <= self.tile:
            return pad_to_multiple(x[None], 8)[0]
        size_h, size_w = min(h, self.tile), min(w, self.tile)
        tops = sorted({(h - size_h) // 4, 3 * (h - size_h) // 4})
        lefts = sorted({(w - size_w) // 4, 3 * (w - size_w) // 4})
        return torch.stack([x[:, t : t + size_h, l : l + size_w] for t in tops for l in lefts])

    def _routing(self, x: torch.Tensor) -> Routing:
        return self._cached(("routing", self.router), x, lambda: self.router.route_crops(self._route_crops(x * 2 - 1).to(self.device)))

    @torch.no_grad()
    def _analyse(self, x: torch.Tensor, on_tile: Callable[[int], None] | None = None) -> Analysis:
        if self.router is None:
            raise ValueError("no router loaded: force an adapter (--lora / --mix, or weights=...)")
        routing = self._routing(x)
        settings = self.settings
        threshold = self.router.config.mix_threshold if settings.mix_threshold is None else settings.mix_threshold
        weights = select_adapters(routing.probabilities, settings.policy, settings.top_k, threshold, routing.presence)[0]
        chosen = {n: float(w) for n, w in zip(self.names, weights) if w > 0}
        ranking = [self.names[i] for i in routing.ranking()[0]]
        unchanged = bool(routing.clean[0]) or (bool(routing.unknown[0]) and settings.unknown == "identity")

        def by_name(values: torch.Tensor) -> dict[str, float]:
            return {n: float(v) for n, v in zip(self.names, values[0])}

        confirmation, first = {}, ranking[0]
        if settings.policy == "cascade":
            if not unchanged:  # the first adapter, and only what its restoration shows besides: not the gate's second
                chosen = {first: 1.0}
            presence = by_name(routing.presence)
            candidates = [n for n in ranking[1:] if presence[n] >= settings.cascade_gate and self._may_follow(first, n)]
        else:
            candidates = [n for n in ranking[1:] if n in chosen] if settings.policy == "confirmed" else []
        if candidates and not unchanged:
            restored = self.restore_tensor(x, [{first: 1.0}], on_tile, strengthen=False)
            after = self._routing(restored)
            presence_after = by_name(after.presence)
            confirmation = {n: presence_after[n] for n in candidates}
            found = [n for n in candidates if confirmation[n] >= threshold]
            if any(n in settings.ceilings for n in found):
                brightness = bright_end(restored)
                found = [n for n in found if brightness <= settings.ceilings.get(n, 1.0)]
            found.sort(key=lambda n: -confirmation[n])
            kept = [first] + ([] if settings.policy == "cascade" and bool(after.clean[0]) else found[: settings.top_k - 1])
            chosen = {n: 1.0 / len(kept) for n in kept}
        return Analysis(weights=chosen, probabilities=by_name(routing.probabilities),
                        similarity=by_name(routing.similarity), presence=by_name(routing.presence),
                        ranking=ranking, unknown=bool(routing.unknown[0]), clean=bool(routing.clean[0]),
                        unchanged=unchanged, steps=self.steps(chosen), confirmation=confirmation)

    def _may_follow(self, first: str, second: str) -> bool:
        """Whether ``cascade`` may add ``second`` to ``first`` under ``cascade_pairs``."""
        return self.settings.cascade_pairs == "any" or any(
            {first, second} <= set(mix.split("+")) for mix in self.settings.validated_mixes)

    def analyse(self, image: Any, on_tile: Callable[[int], None] | None = None) -> Analysis:
        """What the router says of ``image`` and which adapters ``restore`` will apply, in order. Under the
        ``confirmed`` policy a detected mix costs one restoration by the first adapter (``on_tile`` counts
        its tiles); a restorer with a ``cache`` reuses it when the mix's first step is that adapter."""
        return self._analyse(to_float(image)[0], on_tile)

    def route(self, image: Any) -> dict[str, float]:
        """The adapter weights by degradation name (summing to one)."""
        return self.analyse(image).weights

    # --- restoration ------------------------------------------------------------------------------------

    def steps(self, weights: Mapping[str, float]) -> list[dict[str, float]]:
        """The adapter mixes applied one after another: one step with the weights (``weights`` composition or a
        single adapter), the pair's plan (``planned``), or each adapter alone in ``undo_order`` (``sequential``,
        and ``planned`` mixes without a plan)."""
        self.composition.weights_for(weights)  # names and values checked
        if self.settings.composition == "weights" or len(weights) == 1:
            return [dict(weights)]
        plan = self.settings.plans.get("+".join(sorted(weights)))
        if self.settings.composition == "planned" and plan is not None:
            return [{name: 1.0 / len(step) for name in step} for step in plan]
        rank = {name: i for i, name in enumerate(self.settings.undo_order)}
        order = sorted(weights, key=lambda n: (rank.get(n, len(rank)), n))
        return [{name: 1.0} for name in order]

    def restore_tensor(self, x: torch.Tensor, steps: list[dict[str, float]],
                       on_tile: Callable[[int], None] | None = None, strengthen: bool = True) -> torch.Tensor:
        """Restore 3×H×W on [0, 1] by the adapter mixes of ``steps``, one after another; the settings' ``strengths``
        apply to an adapter restoring alone (in a mix the later steps amplify what it leaves: low light brightens
        the noise a weaker denoising left), unless not to ``strengthen``: the first adapter's restoration that
        ``confirmed`` and ``cascade`` read again is at full strength, so that what is left of the noise hides no
        second degradation."""
        strengths = self.settings.strengths if strengthen and len(steps) == 1 and len(steps[0]) == 1 else {}
        context = ("restoration", self.composition, self.tile, self.overlap, self.batch_size, self.engine, self.precision,
                   self.settings.noise_level, self.settings.min_noise_correction, tuple(sorted(strengths.items())))
        source, done = x, ()
        for mix in steps:
            vector = self.composition.weights_for(mix).to(self.device)
            done += (tuple(sorted(mix.items())),)
            x = self._cached((*context, done), source, lambda x=x: restore_tiled(
                lambda y: self._network(y, vector, strengths), x, self.multiple, self.tile, self.overlap, self.batch_size,
                self.device, on_tile))
        return x

    def _cached(self, key: tuple, x: torch.Tensor, compute: Callable[[], Any]) -> Any:
        """``compute()`` for the input ``x``, through the cache when there is one."""
        if self.cache is None:
            return compute()
        return self.cache.get((*key, RestorationCache.digest(x)), compute)

    def _network(self, y: torch.Tensor, vector: torch.Tensor, strengths: Mapping) -> torch.Tensor:
        if self.engine == "torch":
            return self.composition.restore(y, vector, self.settings.noise_level, strengths, self.settings.min_noise_correction)
        if self._onnx is None:
            self._onnx = OnnxEngine(self.composition, self.engine, self.precision)
        return self._onnx.restore(y, vector, self.settings.noise_level, strengths, self.settings.min_noise_correction)

    def tiles(self, image_shape: tuple[int, ...], steps: int = 1) -> int:
        """Tiles restoring an image of ``image_shape`` (H, W, ...) in ``steps`` steps takes: for progress bars."""
        return steps * tile_count(image_shape[0], image_shape[1], self.tile, self.overlap, self.multiple)

    def restore(self, image: Any, weights: Mapping[str, float] | None = None, analysis: Analysis | None = None,
                on_tile: Callable[[int], None] | None = None) -> Any:
        """Restore ``image`` (NumPy array, PIL image or C×H×W tensor on [0, 1]); returns the same kind.

        ``weights`` forces an adapter mix by name (e.g. ``{"noise": 1.0}``); otherwise the router decides
        (pass the ``analysis`` of ``analyse(image)`` to route once).
        """
        x, back = to_float(image)
        if weights is None:
            analysis = analysis or self._analyse(x)
            if analysis.unchanged:
                return from_float(x, back)
            steps = analysis.steps
        else:
            steps = self.steps(weights)
        return from_float(self.restore_tensor(x, steps, on_tile), back)
