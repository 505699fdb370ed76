"""N LoRA adapters on one frozen backbone, composed with per-sample weights.

Every adapted layer computes ``base(x) + Σ_i w[b, i] · scale_i · B_i(A_i(x))`` for each sample ``b``.
PEFT's layers hold the adapters; PEFT has no per-sample weighted mixing, so each LoRA layer's forward
is replaced by one that composes the weights first — ``W_b = W + Σ_i w[b, i] · ΔW_i`` with PEFT's
``get_delta_weight`` (``adapters.merged_weight``, which training uses too) — and runs a single
convolution or matmul: for every sample alike when all rows
of the weights agree, else one grouped convolution (``groups = batch``) over per-sample kernels. The
result is PEFT's own computation up to float rounding, at the cost of the bare backbone whatever the
number of adapters composed. The merged weights of a mix shared by the whole batch are kept (least recently
used beyond ``merged_cache_bytes``): restoring many images or tiles with one mix merges it once.
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from pipeline.models.adapters import apply_weight, merged_weight, read_restoration_settings
from pipeline.models.backbone import OneStepReadout, load_backbone
from pipeline.models.noise_level import NoiseLevelEstimator
from pipeline.models.severity import estimate_noise_sigma, rule_timesteps

NOISE_LEVELS = ("learned", "analytic")  # what sets the timestep of a noise_sigma adapter (``timesteps``)


class AdapterComposition(torch.nn.Module):
    """A ``PeftModel`` holding N named adapters, each with its one-step timestep ``t*``."""

    def __init__(self, model: PeftModel, names: Sequence[str], t_star: Sequence[int], readout: OneStepReadout,
                 timestep_rules: Sequence[str] | None = None, merged_cache_bytes: int = 256 << 20,
                 noise_levels: Mapping[str, NoiseLevelEstimator] | None = None):
        super().__init__()
        if merged_cache_bytes < 0:
            raise ValueError(f"merged_cache_bytes must be >= 0, got {merged_cache_bytes}")
        missing = [n for n in names if n not in model.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} are not loaded in the model")
        self.model = model
        self.names = list(names)
        self.readout = readout
        self.register_buffer("t_star", torch.tensor(list(t_star), dtype=torch.float32), persistent=False)
        self.timestep_rules = list(timestep_rules or ["fixed"] * len(self.names))
        unknown = sorted(set(noise_levels or {}) - set(self.names))
        if unknown:
            raise ValueError(f"noise level estimators for {unknown}, which are not adapters here: {self.names}")
        self.noise_levels = torch.nn.ModuleDict(dict(noise_levels or {}))
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        unsupported = sorted({type(m.get_base_layer()).__name__ for m in self.layers} - {"Conv2d", "Linear"})
        if unsupported:
            raise ValueError(f"composition supports LoRA on Conv2d and Linear layers, not {unsupported}")
        self._weights: torch.Tensor | None = None
        self._used: list[int] = []
        self._mix_key: tuple[float, ...] | None = None
        self.merged_cache_bytes = merged_cache_bytes
        self._merged: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._merged_size = 0
        for layer in self.layers:
            layer.forward = types.MethodType(self._composed_forward(), layer)
        model.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, backbone: str | Path, adapters: Mapping[str, str | Path],
                        noise_levels: Mapping[str, str | Path] | None = None) -> "AdapterComposition":
        """The backbone folder plus adapter folders (PEFT format + ``restoration.json``), by degradation name, and
        the noise level estimators (``NoiseLevelEstimator`` folders) of adapters with the ``noise_sigma`` rule."""
        if not adapters:
            raise ValueError("no adapters to compose")
        unet, scheduler = load_backbone(backbone)
        settings = {name: read_restoration_settings(path) for name, path in adapters.items()}
        for name, path in adapters.items():
            if settings[name].get("degradation") != name:
                raise ValueError(f"{path} holds the adapter for {settings[name].get('degradation')!r}, not {name!r}")
        model = None
        for name, path in adapters.items():
            try:
                if model is None:
                    model = PeftModel.from_pretrained(unet, str(path), adapter_name=name, is_trainable=False)
                else:
                    model.load_adapter(str(path), adapter_name=name, is_trainable=False)
            except RuntimeError as error:  # shape mismatch: trained on another backbone
                raise ValueError(f"adapter {path} does not fit the backbone {backbone}: {str(error).splitlines()[0]}") from None
        return cls(model, list(adapters), [settings[n]["t_star"] for n in adapters], OneStepReadout(scheduler),
                   [settings[n].get("timestep", "fixed") for n in adapters],
                   noise_levels={n: NoiseLevelEstimator.from_pretrained(p) for n, p in (noise_levels or {}).items()})

    def _composed_forward(self):
        composition = self

        def forward(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            weights = composition._weights
            if weights is None:
                return type(layer).forward(layer, x, *args, **kwargs)
            base = layer.get_base_layer()
            used = [i for i in composition._used if composition.names[i] in layer.lora_A]
            if not used:
                return base(x)
            if composition._mix_key is None:
                return apply_weight(base, x, merged_weight(layer, [composition.names[i] for i in used], weights[..., used]))
            key = (id(layer), composition._mix_key)
            weight = composition._merged.get(key)
            if weight is None:
                weight = merged_weight(layer, [composition.names[i] for i in used], weights[used])
                composition._keep_merged(key, weight)
            else:
                composition._merged.move_to_end(key)
            return apply_weight(base, x, weight)

        return forward

    def _keep_merged(self, key: tuple, weight: torch.Tensor) -> None:
        self._merged[key] = weight
        self._merged_size += weight.nelement() * weight.element_size()
        while self._merged_size > self.merged_cache_bytes and self._merged:
            evicted = self._merged.popitem(last=False)[1]
            self._merged_size -= evicted.nelement() * evicted.element_size()

    def _apply(self, fn, *args, **kwargs):
        # a move or cast makes the kept merged weights stale
        self._merged.clear()
        self._merged_size = 0
        return super()._apply(fn, *args, **kwargs)

    def epsilon(self, x_t: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The composed UNet's noise prediction ε̂; ``weights`` is (B, N), or (N,) for every sample alike."""
        weights = self._check(weights, x_t.shape[0])
        if weights.ndim == 2 and bool((weights == weights[:1]).all()):
            weights = weights[0]
        self._weights = weights.to(x_t.device)
        self._used = [i for i, used in enumerate(weights.reshape(-1, len(self.names)).any(dim=0).tolist()) if used]
        # a mix the whole batch shares, not a learnt one: its merged weights can be kept
        self._mix_key = tuple(weights.tolist()) if weights.ndim == 1 and not weights.requires_grad else None
        try:
            return self.model(x_t, timesteps).sample
        finally:
            self._weights, self._used, self._mix_key = None, [], None

    def timesteps(self, weights: torch.Tensor, y: torch.Tensor, noise_level: str = "analytic",
                  sigmas: Mapping[str, torch.Tensor] | None = None, min_correction: float = 0.0) -> torch.Tensor:
        """Per-sample timesteps: the weight-averaged timesteps of the composed adapters (rounded), each
        adapter's its ``t*`` or, under the ``noise_sigma`` rule, the one of the noise level in ``y`` — estimated
        by the analytic σ̂ (``noise_level="analytic"``) or by the adapter's ``NoiseLevelEstimator`` ("learned",
        with its ``min_correction``), unless ``sigmas`` has it already (``noise_sigmas``).

        All-zero weights (no adapter) get the mean."""
        if noise_level not in NOISE_LEVELS:
            raise ValueError(f"noise_level must be one of {NOISE_LEVELS}, got {noise_level!r}")
        weights = weights if weights.ndim == 2 else weights[None]
        total = weights.sum(dim=1, keepdim=True)
        uniform = torch.full_like(weights, 1.0 / weights.shape[1])
        normalised = torch.where(total > 0, weights / total.clamp_min(1e-12), uniform)
        used = normalised.any(dim=0).tolist()
        per_adapter = torch.stack([self._adapter_timesteps(i, y, noise_level, sigmas or {}, min_correction).float() if used[i]
                                   else torch.zeros(y.shape[0], device=y.device) for i in range(len(self.names))], dim=1)
        return (normalised * per_adapter).sum(dim=1).round().long()

    def _adapter_timesteps(self, index: int, y: torch.Tensor, noise_level: str,
                           sigmas: Mapping[str, torch.Tensor], min_correction: float) -> torch.Tensor:
        name = self.names[index]
        if self.timestep_rules[index] != "noise_sigma":
            return rule_timesteps(self.timestep_rules[index], int(self.t_star[index]), y, self.readout)
        return self.readout.timesteps_for_sigma(sigmas[name] if name in sigmas
                                                else self.noise_sigma(name, y, noise_level, min_correction))

    def noise_sigma(self, name: str, y: torch.Tensor, noise_level: str = "analytic",
                    min_correction: float = 0.0) -> torch.Tensor:
        """The noise level (B,) in ``y`` (B×3×H×W on [-1, 1]; σ on that scale) that sets the timestep of the
        ``noise_sigma`` adapter ``name``: its ``NoiseLevelEstimator``'s (``learned``; σ̂ where its correction is
        smaller than ``min_correction``) or the ``analytic`` σ̂."""
        if noise_level == "analytic":
            return estimate_noise_sigma(y)
        if name not in self.noise_levels:
            raise ValueError(f"adapter {name!r} has no noise level estimator: run `dvc repro fit_noise_level`, "
                             "or restore with the analytic estimate (noise_level: analytic)")
        return self.noise_levels[name](y, min_correction)

    def noise_sigmas(self, y: torch.Tensor, noise_level: str, names: Iterable[str],
                     min_correction: float = 0.0) -> dict[str, torch.Tensor]:
        """``noise_sigma`` of each adapter of ``names``, which must have the ``noise_sigma`` rule: read once, for
        both its timestep and its strength."""
        for name in names:
            if name not in self.names or self.timestep_rules[self.names.index(name)] != "noise_sigma":
                raise ValueError(f"a strength needs an adapter with the noise_sigma rule; {name!r} is not one here")
        return {name: self.noise_sigma(name, y, noise_level, min_correction) for name in names}

    def strength(self, y: torch.Tensor, noise_level: str, strengths: Mapping[str, Sequence[Sequence[float]]],
                 sigmas: Mapping[str, torch.Tensor] | None = None, min_correction: float = 0.0) -> torch.Tensor:
        """(B, N) factors of the adapter weights: 1, or for an adapter of ``strengths`` (it needs the ``noise_sigma``
        rule) ``strength_at`` the noise level of each sample (``sigmas``, or ``noise_sigmas`` of ``y``)."""
        sigmas = self.noise_sigmas(y, noise_level, strengths, min_correction) if sigmas is None else sigmas
        factors = torch.ones(y.shape[0], len(self.names), device=y.device)
        for name, knots in strengths.items():
            at = strength_at((sigmas[name] * 127.5).detach().cpu().double().numpy(), knots)
            factors[:, self.names.index(name)] = torch.from_numpy(at).to(factors)
        return factors

    def restore(self, y: torch.Tensor, weights: torch.Tensor, noise_level: str = "analytic",
                strengths: Mapping[str, Sequence[Sequence[float]]] | None = None, min_correction: float = 0.0) -> torch.Tensor:
        """One-step restoration of ``y`` (B×3×H×W on [-1, 1]) with the composed adapters, at ``timesteps``'s;
        with ``strengths`` (``strength``), each adapter's weight times its strength on that sample (the timestep
        stays the adapter's: strength 0 is the bare backbone at it)."""
        weights = self._check(weights, y.shape[0])
        per_sample = weights if weights.ndim == 2 else weights.expand(y.shape[0], -1)
        sigmas = self.noise_sigmas(y, noise_level, strengths or {}, min_correction)
        timesteps = self.timesteps(per_sample, y, noise_level, sigmas, min_correction)
        if strengths:
            weights = per_sample * self.strength(y, noise_level, strengths, sigmas)
        return self.restore_at(y, weights, timesteps)

    def restore_at(self, y: torch.Tensor, weights: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """One-step restoration of ``y`` with the composed adapters at given per-sample ``timesteps`` (B,)."""
        weights = self._check(weights, y.shape[0])
        return self.readout.x0(y, timesteps, self.epsilon(self.readout.noisy_sample(y, timesteps), timesteps, weights))

    def _check(self, weights: torch.Tensor, batch: int) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape[-1] != len(self.names) or weights.ndim not in (1, 2) or (
            weights.ndim == 2 and weights.shape[0] != batch
        ):
            raise ValueError(f"weights must be ({batch}, {len(self.names)}) or ({len(self.names)},), got {tuple(weights.shape)}")
        return weights

    def weights_for(self, mix: Mapping[str, float]) -> torch.Tensor:
        """A weight vector from ``{degradation: weight}``; unknown names, negative or non-finite weights and
        an all-zero mix are errors."""
        unknown = sorted(set(mix) - set(self.names))
        if unknown:
            raise KeyError(f"no adapter for {unknown}; loaded: {self.names}")
        check_mix(mix)
        return torch.tensor([float(mix.get(n, 0.0)) for n in self.names])


STRENGTH_LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def strength_at(sigma: np.ndarray, knots: Iterable[Sequence[float]]) -> np.ndarray:
    """An adapter's strength at noise levels ``sigma`` (0–255 scale) by its ``knots`` ``[[σ, strength], ...]`` (σ
    increasing, strength in [0, 1]): linear between them, constant beyond, rounded to ``STRENGTH_LEVELS`` (quarters)
    so that a few merged networks serve every tile (``OnnxEngine``)."""
    knots = list(knots)
    return np.round(np.interp(sigma, [k[0] for k in knots], [k[1] for k in knots]) * 4) / 4


def check_mix(mix: Mapping[str, float]) -> None:
    """Adapter weights must be finite, non-negative and not all zero (``ValueError`` naming the bad one)."""
    for name, weight in mix.items():
        if not math.isfinite(float(weight)) or float(weight) < 0:
            raise ValueError(f"adapter weight {name}={weight} must be a finite number >= 0")
    if not mix or sum(float(w) for w in mix.values()) <= 0:
        raise ValueError(f"an adapter mix needs a positive weight, got {dict(mix)}")
